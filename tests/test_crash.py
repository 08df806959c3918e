"""The headline crash test: SIGKILL the relay's whole process group mid-load, start it again.

Every message that got a 250 must reach the sink at least once. Duplicates may only come from
deliveries in flight at the kill (the sink had the message, the relay had not recorded it), and
never from two workers at once: within one run of the relay each message arrives at most once.
Nothing may stay 'active' in the index and nothing may stay pending once everything is delivered.
"""

from __future__ import annotations

import smtplib
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from queuefiles import pending_ids
from relayproc import RelayProcess, proc_stats
from sink import Sink

CLIENTS = 8
MAX_DUPLICATES = 64     # at most the deliveries in flight at the kill
MARKER = b"X-Crash-Marker: "
PDF_LINE = b"JVBERi0xLjcK" + b"0123456789abcdef" * 3 + b"\r\n"  # 62 octets


def message_body(marker: str, big: bool = False) -> bytes:
    """The message a Load client sends for `marker` (so a delivery can be checked byte for
    byte); `big`: 1.6 MiB, over the streaming threshold."""
    body = (f"From: <app@invoices.test>\r\nTo: <ap@example.net>\r\n"
            f"Message-ID: <{marker}@invoices.test>\r\n"
            f"Subject: invoice {marker}\r\n"
            f"X-Crash-Marker: {marker}\r\n\r\n"
            + f"invoice line for {marker}\r\n" * 40).encode()
    return body + PDF_LINE * 26000 if big else body


@dataclass
class Load:
    """Client threads sending one-recipient messages as fast as the relay takes them."""

    port: int
    big_every: int = 0      # every Nth message is large enough to be streamed to its file
    clients: int = CLIENTS
    reconnect: bool = False  # keep trying while the relay is down (restarted by the test)
    big: set[str] = field(default_factory=set)            # markers of the large messages
    acked: dict[str, str] = field(default_factory=dict)   # marker -> queue id
    attempted: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.clients):
            t = threading.Thread(target=self._client, args=(n,), daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _client(self, n: int) -> None:
        seq = 0
        while not self.stop.is_set():
            try:
                smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
            except OSError:
                if not self.reconnect:
                    return  # the relay is gone
                self.stop.wait(0.05)  # it is being restarted
                continue
            try:
                smtp.ehlo("load.test")
                # A few messages per session, then a fresh connection, as apps do.
                for _ in range(5):
                    if self.stop.is_set():
                        break
                    seq += 1
                    marker = f"c{n}-m{seq}"
                    big = bool(self.big_every) and seq % self.big_every == 0
                    body = message_body(marker, big)
                    with self.lock:
                        self.attempted.add(marker)
                        if big:
                            self.big.add(marker)
                    smtp.mail("app@invoices.test")
                    smtp.rcpt("ap@example.net")
                    code, reply = smtp.data(body)
                    if code == 250:
                        text = reply.decode()
                        assert text.startswith("2.0.0 Ok: queued as "), text
                        with self.lock:
                            self.acked[marker] = text.rsplit(" ", 1)[1]
                    elif code != 451:
                        with self.lock:
                            self.errors.append(f"{marker}: {code} {reply!r}")
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                if not self.reconnect:
                    return  # killed mid-session: that message got no 250
            finally:
                smtp.close()


def marker_of(data: bytes) -> str:
    start = data.index(MARKER) + len(MARKER)
    return data[start:data.index(b"\r\n", start)].decode()


def group_processes(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes in process group `pgid` or whose parent is `pgid`."""
    return [(pid, stat[:80]) for pid, _, fields, stat in proc_stats()
            if pgid in (int(fields[2]), int(fields[1]))]


def assert_group_dead(pgid: int) -> None:
    deadline = time.monotonic() + 2
    while (alive := group_processes(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive, f"processes survived SIGKILL of the group: {alive}"


def index_states(queue_dir: Path) -> Counter[str]:
    conn = sqlite3.connect(queue_dir / "index.sqlite", timeout=30)
    try:
        return Counter(state for (state,) in conn.execute("SELECT state FROM recipients"))
    finally:
        conn.close()


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def quiet_sink(sink: Sink, quiet: float = 0.5, timeout: float = 15) -> None:
    """Wait until the sink has no connection left and has taken nothing new for `quiet` s."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_count = len(sink.messages)
        if now_count != count or sink._connections:
            count, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    raise AssertionError("the sink did not settle after the kill")


def run_crash(tmp_path: Path, sink: Sink, kill_after: int, *, big_every: int = 0,
              expect_released: bool = False) -> None:
    relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]})
    relay.start()
    pgid = relay.proc.pid  # type: ignore[union-attr]
    load = Load(relay.port, big_every=big_every)
    try:
        load.start()
        wait_until(lambda: load.count() >= kill_after, 30, f"{kill_after} acknowledged messages")
        relay.kill()
        assert_group_dead(pgid)
        load.join()
        # Let the sink finish whatever it had already taken before the kill: the last bytes
        # of large messages may still sit in its socket buffers.
        quiet_sink(sink)
        before = Counter(marker_of(m.data) for m in list(sink.messages))
        assert not load.errors, load.errors[:5]
        acked = dict(load.acked)
        assert len(acked) >= kill_after

        # Within the first run, no message reached the sink twice (one worker per recipient).
        twice = [m for m, n in before.items() if n > 1]
        assert not twice, f"delivered twice before the kill: {twice[:5]}"
        never_sent = set(before) - load.attempted
        assert not never_sent, never_sent

        relay.start()
        recovered = relay.events("recovered", at_least=1)
        assert recovered, relay.new_log()
        if expect_released:  # recipients the killed delivery process had claimed
            assert int(recovered[0].get("released", 0)) > 0, recovered

        wait_until(lambda: set(acked) <= {marker_of(m.data) for m in list(sink.messages)},
                   30, "every acknowledged message at the sink")
        wait_until(lambda: not pending_ids(relay.queue_dir), 15, "an empty queue")
        time.sleep(0.3)  # nothing more may arrive
        total = Counter(marker_of(m.data) for m in list(sink.messages))
        after = total - before

        lost = set(acked) - set(total)
        assert not lost, f"{len(lost)} acknowledged messages lost: {sorted(lost)[:5]}"
        twice = [m for m, n in after.items() if n > 1]
        assert not twice, f"delivered twice after the restart: {twice[:5]}"
        duplicates = sum(n - 1 for n in total.values() if n > 1)
        print(f"acked={len(acked)} before={sum(before.values())}"
              f" total={sum(total.values())} duplicates={duplicates} {recovered[0]}")
        assert duplicates <= MAX_DUPLICATES, f"{duplicates} duplicates"
        # A duplicate is a message the sink had before the kill and got again after it.
        assert set(m for m, n in total.items() if n > 1) <= set(before)

        states = index_states(relay.queue_dir)
        assert states["active"] == 0, states
        pending = states["queued"] + states["deferred"] + states["unknown"]
        assert pending == 0, states
        assert states["delivered"] >= len(acked), states
        assert relay.stop() == 0
        assert_group_dead(pgid)
    finally:
        load.stop.set()
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill()


@pytest.mark.parametrize("kill_after", [30, 200, 450])
def test_sigkill_under_load_loses_nothing(tmp_path: Path, sink: Sink, kill_after: int) -> None:
    run_crash(tmp_path, sink, kill_after)


@pytest.mark.parametrize("kill_after", [150, 300])
def test_sigkill_mid_delivery_to_slow_sink(tmp_path: Path, kill_after: int) -> None:
    # Each delivery takes 50 ms at the sink: kills land while many are in flight.
    with Sink(accept_delay=0.05) as slow:
        run_crash(tmp_path, slow, kill_after, expect_released=True)


@pytest.mark.parametrize("kill_after", [60, 120])
def test_sigkill_while_large_messages_stream_to_the_spool(tmp_path: Path, sink: Sink,
                                                          kill_after: int) -> None:
    # Every 4th message is over the streaming threshold: kills land mid-stream too, leaving
    # files with the incomplete sentinel that startup must remove, never deliver.
    run_crash(tmp_path, sink, kill_after, big_every=4)
