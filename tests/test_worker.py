"""The worker thread behind group commit and the index: in order, results and errors back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relay.queue.worker import WorkerThread


async def test_calls_run_in_order_on_one_thread() -> None:
    worker = WorkerThread("test")
    seen: list[tuple[int, str]] = []

    def work(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    try:
        assert await asyncio.gather(*(worker.call(work, n) for n in range(50))) == [
            n * 2 for n in range(50)]
        assert worker.call_blocking(work, 7) == 14
    finally:
        worker.stop()
    assert [n for n, _ in seen] == [*range(50), 7]
    assert {name for _, name in seen} == {"test"}


async def test_errors_come_back_to_the_caller() -> None:
    worker = WorkerThread("test")

    def fail() -> None:
        raise OSError(5, "Input/output error")

    try:
        with pytest.raises(OSError, match="Input/output"):
            await worker.call(fail)
        with pytest.raises(OSError, match="Input/output"):
            worker.call_blocking(fail)
        assert await worker.call(lambda: "still alive") == "still alive"
    finally:
        worker.stop()
