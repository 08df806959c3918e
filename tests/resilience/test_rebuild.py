"""The index lost or overwritten while the spool survives: `invoice-relay queue rebuild` gets
every message back, and after a restart every acknowledged message is delivered.

A message delivered before the loss whose segment is still there is delivered again (README,
`queue rebuild`); nothing may be lost.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from queuefiles import pending_ids, stored_ids
from relayproc import RelayProcess
from scenario import intact, marker_in
from sink import Sink
from test_crash import index_states, message_body, wait_until

MESSAGES = 60
BIG_EVERY = 10      # 1.6 MiB, streamed into a .one segment of its own
DEFERRED_EVERY = 3  # refused with 451 until the index is rebuilt
EXIT_CONFIG = 78


def number(marker: str) -> int:
    """r-m7 -> 7"""
    return int(marker.rsplit("m", 1)[1])


def is_big(marker: str) -> bool:
    return number(marker) % BIG_EVERY == 0


class Refusing:
    """A destination that answers 451 to every DEFERRED_EVERY-th message while `on`."""

    def __init__(self) -> None:
        self.on = True
        self.refused: Counter[str] = Counter()

    def __call__(self, content: bytes) -> str | None:
        marker = marker_in(content)
        if self.on and marker is not None and number(marker) % DEFERRED_EVERY == 0:
            self.refused[marker] += 1
            return "451 4.3.0 try again later"
        return None


def send_all(port: int) -> dict[str, str]:
    """MESSAGES messages, every one acknowledged: marker -> queue id."""
    acked = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("app.test")
        for n in range(1, MESSAGES + 1):
            marker = f"r-m{n}"
            smtp.mail("app@invoices.test")
            smtp.rcpt("ap@example.net")
            code, text = smtp.data(message_body(marker, is_big(marker)))
            assert code == 250, (code, text)
            acked[marker] = text.decode().rsplit(" ", 1)[1]
    return acked


def queue_with_deferred(relay: RelayProcess, sink: Sink, refusing: Refusing
                        ) -> tuple[dict[str, str], set[str]]:
    """Acknowledged messages, of which the sink took some and refused the others once."""
    acked = send_all(relay.port)
    deferred = {m for m in acked if number(m) % DEFERRED_EVERY == 0}
    wait_until(lambda: len(sink.messages) == len(acked) - len(deferred), 30,
               "the messages the sink accepts")
    wait_until(lambda: set(refusing.refused) == deferred, 30, "a first refusal each")
    return acked, deferred


def damage(queue: Path, how: str) -> None:
    index = queue / "index.sqlite"
    if how == "removed":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
    else:  # garbage over the whole file, as a bad disk or a stray write would leave it
        size = index.stat().st_size
        with open(index, "r+b") as f:
            f.write(os.urandom(size))


def refuses_to_start(relay: RelayProcess) -> None:
    """A damaged index does not heal by restarting: exit 78, saying what to run."""
    relay.start(wait=False)
    assert relay.proc is not None and relay.proc.wait(30) == EXIT_CONFIG
    assert "queue rebuild" in relay.new_log(), relay.new_log()


def rebuild(relay: RelayProcess) -> str:
    """The real command line, as an operator runs it (the relay is stopped)."""
    cli = Path(sys.executable).with_name("invoice-relay")
    done = subprocess.run([str(cli), "--config", str(relay.config), "queue", "rebuild"],
                          capture_output=True, text=True, timeout=60, cwd=relay.dir)
    assert done.returncode == 0, done.stderr
    return done.stdout


def deliver_all(relay: RelayProcess, sink: Sink, acked: dict[str, str]) -> Counter[str]:
    """Every acknowledged message at the sink, intact, and nothing left in the queue."""
    relay.start()
    wait_until(lambda: set(acked) <= {marker_in(m.data) for m in sink.messages}, 60,
               "every acknowledged message at the sink")
    wait_until(lambda: not pending_ids(relay.queue_dir), 30, "an empty queue")
    counts: Counter[str] = Counter()
    for msg in sink.messages:
        marker = marker_in(msg.data)
        assert marker is not None and intact(msg, message_body(marker, is_big(marker)))
        counts[marker] += 1
    states = index_states(relay.queue_dir)
    assert states["active"] == states["queued"] == states["deferred"] == 0, states
    return counts


@pytest.mark.parametrize("how", ["removed", "garbage"])
def test_rebuild_recovers_every_message(tmp_path: Path, how: str) -> None:
    refusing = Refusing()
    with Sink(data_reply=refusing) as sink:
        relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]})
        try:
            relay.start()
            acked, deferred = queue_with_deferred(relay, sink, refusing)
            before = {marker_in(m.data) for m in sink.messages}
            assert relay.stop() == 0
            kept = set(stored_ids(relay.queue_dir))
            assert {acked[m] for m in deferred} <= kept

            damage(relay.queue_dir, how)
            if how == "garbage":
                refuses_to_start(relay)
            output = rebuild(relay)
            print(f"[rebuild, index {how}] {output.strip()}")
            assert f"{len(kept)} messages from the spool segments" in output, output

            refusing.on = False
            counts = deliver_all(relay, sink, acked)
            again = sorted(m for m, n in counts.items() if n > 1)
            print(f"[rebuild, index {how}] acked={len(acked)} deferred={len(deferred)}"
                  f" delivered before the loss={len(before)} in kept segments={len(kept)}"
                  f" delivered again={len(again)}")
            # Only what was delivered before the loss may come twice, and only once more.
            assert set(again) <= before and max(counts.values()) <= 2, counts
            assert relay.stop() == 0
        finally:
            relay.__exit__()
