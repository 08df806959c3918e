"""The buffered metric value: updates reach the process's file at a flush (or within half a
second), a forked child counts in a file of its own, and an exiting child's counts are kept."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics, metricvalue


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup() switches this process to shared files: back to in-memory metrics after."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    yield
    monkeypatch.undo()
    metricvalue.close()
    metrics._directory = None
    metrics._build()


def accepted(directory: Path) -> float:
    text = metrics.render(directory)[0].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "invoice_relay_messages_accepted_total":
                return sample.value
    raise AssertionError("no messages_accepted_total")


def test_updates_are_written_by_the_flusher_and_at_fork_exit(tmp_path: Path) -> None:
    metrics.setup(tmp_path)
    directory = tmp_path / metrics.DIRECTORY_NAME
    metrics.ACCEPTED.inc()
    metrics.ACCEPTED.inc(2)
    deadline = time.monotonic() + 3
    while accepted(directory) != 3:  # the flusher thread, within half a second
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = os.fork()
    if pid == 0:  # a child counts from zero into its own file and flushes before _exit
        code = 1
        try:
            metrics.ACCEPTED.inc(10)
            code = 0 if metrics.ACCEPTED._value.get() == 10 else 2
        finally:
            metrics.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(list(directory.glob("counter_*.db"))) == 2
    metrics.ACCEPTED.inc()
    metrics.flush()
    assert accepted(directory) == 14
