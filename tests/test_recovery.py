"""Startup recovery: plant what a crash or a power cut can leave in the queue, start the relay.

The queue is written directly with the queue's own classes (Spool, Envelope, Index), the relay
stopped; then the real relay starts on it and delivers to a sink.
"""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sink import Sink

from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import Index
from relay.queue.spool import HEADER_LEN, Spool

LIFETIME = 5 * 86400


class Queue:
    """The relay's queue folder, planted by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool(root)
        self.db = root / "index.sqlite"

    def message(self, marker: str, recipients: tuple[str, ...] = ("ap@example.net",),
                sender: str = "app@example.net") -> tuple[Envelope, bytes]:
        env = Envelope(id=new_queue_id(), sender=sender, recipients=recipients,
                       received=time.time(), client="127.0.0.1", helo="app.test",
                       message_id=f"<{marker}@invoices.test>")
        data = (f"From: <{sender}>\r\nMessage-ID: <{marker}@invoices.test>\r\n"
                f"Subject: {marker}\r\n\r\nbody of {marker}\r\n").encode()
        return env, data

    def write(self, env: Envelope, data: bytes, *, complete: bool = True) -> Path:
        fd = self.spool.create(env, [data], complete=complete)
        os.fsync(fd)
        os.close(fd)
        return self.spool.path(env.id)

    def index(self, env: Envelope, data: bytes) -> None:
        index = Index(self.db)
        try:
            index.insert([(env, len(data))], LIFETIME)
        finally:
            index.close()

    def plant(self, marker: str, recipients: tuple[str, ...] = ("ap@example.net",)) -> Envelope:
        """A message as the committer leaves it: complete spool file and index rows."""
        env, data = self.message(marker, recipients)
        self.write(env, data)
        self.index(env, data)
        return env

    def sql(self, query: str, *args: object) -> list[tuple]:
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            with conn:
                return conn.execute(query, args).fetchall()
        finally:
            conn.close()

    def states(self, queue_id: str) -> list[str]:
        return [s for (s,) in self.sql(
            "SELECT state FROM recipients WHERE msg = ? ORDER BY idx", queue_id)]

    def spool_ids(self) -> set[str]:
        return set(self.spool.ids())


def subjects(sink: Sink) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for m in list(sink.messages):
        subject = m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        out.append((subject, tuple(m.rcpt_tos)))
    return sorted(out)


def settle(relay, sink: Sink, count: int, *, quiet: float = 1.5) -> None:  # type: ignore[no-untyped-def]
    """Wait for `count` messages at the sink, then make sure no more arrive (retries are 1 s)."""
    if count:
        sink.wait_for(count)
    time.sleep(quiet)


def start(relay_factory, sink: Sink):  # type: ignore[no-untyped-def]
    return relay_factory(routes={"example.net": [sink.address]}).start()


# --- (a) files that were never acknowledged -------------------------------------------------

def test_incomplete_spool_files_are_removed_and_never_delivered(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    streaming, data = q.message("streaming")
    q.write(streaming, data, complete=False)  # header still carries the sentinel length
    truncated, data = q.message("truncated")
    path = q.write(truncated, data)
    os.truncate(path, path.stat().st_size - 10)
    headless, data = q.message("headless")
    path = q.write(headless, data)
    os.truncate(path, HEADER_LEN - 5)
    good = q.plant("good")

    relay = start(relay_factory, sink)
    settle(relay, sink, 1)
    assert subjects(sink) == [("good", ("ap@example.net",))]
    assert q.spool_ids() == set()
    assert not (q.root / "corrupt").exists() or not any((q.root / "corrupt").iterdir())
    [event] = relay.events("recovered")
    assert event["removed_incomplete"] == "3"
    assert q.states(good.id) == ["delivered"]
    assert relay.stop() == 0


def test_truncated_file_the_index_knows_is_quarantined(tmp_path: Path, relay_factory,
                                                      sink: Sink) -> None:
    # The index holds it, so it may have been acknowledged: keep it for an operator, never
    # delete it, never send a truncated message; its recipients are closed and logged.
    q = Queue(tmp_path / "var")
    env = q.plant("cut-short")
    path = q.spool.path(env.id)
    os.truncate(path, path.stat().st_size - 10)

    relay = start(relay_factory, sink)
    settle(relay, sink, 0)
    assert subjects(sink) == []
    assert (q.root / "corrupt" / env.id).exists()
    assert [e["id"] for e in relay.events("spool_corrupt")] == [env.id]
    assert [e["id"] for e in relay.events("spool_missing")] == [env.id]
    assert q.states(env.id) == ["expired"]
    assert "Traceback" not in relay.new_log()
    assert relay.stop() == 0


@pytest.mark.parametrize("clean", [False, True])
def test_finished_message_file_left_behind_is_removed(tmp_path: Path, relay_factory,
                                                      sink: Sink, clean: bool) -> None:
    # Killed (or stopped) between the index commit of the last outcome and the unlink.
    q = Queue(tmp_path / "var")
    if clean:
        (q.root / "clean-shutdown").touch()
    q.plant("finished")
    q.sql("UPDATE recipients SET state = 'delivered', attempts = 1")
    q.sql("UPDATE messages SET done = ?", time.time())

    relay = start(relay_factory, sink)
    settle(relay, sink, 0, quiet=1.0)
    assert subjects(sink) == []
    assert q.spool_ids() == set()
    assert relay.stop() == 0


# --- (b) a spool file the index does not know ---------------------------------------------

def test_spool_file_without_index_row_is_reindexed_and_delivered_once(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    indexed = q.plant("indexed")
    orphan, data = q.message("orphan", ("a@example.net", "b@example.net"))
    q.write(orphan, data)  # the index commit was lost

    relay = start(relay_factory, sink)
    settle(relay, sink, 2)
    assert subjects(sink) == [("indexed", ("ap@example.net",)),
                              ("orphan", ("a@example.net", "b@example.net"))]
    [event] = relay.events("recovered")
    assert event["reindexed"] == "1"
    assert [e["id"] for e in relay.events("reindexed")] == [orphan.id]
    assert q.states(orphan.id) == ["delivered", "delivered"]
    assert q.states(indexed.id) == ["delivered"]
    assert q.sql("SELECT sender, message_id FROM messages WHERE id = ?", orphan.id) == [
        ("app@example.net", "<orphan@invoices.test>")]
    assert q.spool_ids() == set()
    assert relay.stop() == 0


def test_lost_index_is_rebuilt_from_the_spool(tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    first = q.plant("first")
    second = q.plant("second", ("a@example.net", "b@example.net"))
    q.spool.mark_final(second.id, [(0, "delivered")], sync=True)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (q.root / name).unlink(missing_ok=True)

    relay = start(relay_factory, sink)
    settle(relay, sink, 2)
    assert subjects(sink) == [("first", ("ap@example.net",)), ("second", ("b@example.net",))]
    assert q.states(first.id) == ["delivered"]
    assert q.states(second.id) == ["delivered", "delivered"]
    assert q.spool_ids() == set()
    assert relay.stop() == 0


# --- (c) an index row whose spool file is gone ----------------------------------------------

def test_index_row_without_spool_file_is_closed(tmp_path: Path, relay_factory,
                                                  sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    gone = q.plant("gone")
    q.spool.remove(gone.id)
    kept = q.plant("kept")

    relay = start(relay_factory, sink)
    settle(relay, sink, 1)
    assert subjects(sink) == [("kept", ("ap@example.net",))]
    [event] = relay.events("spool_missing")
    assert event["id"] == gone.id
    assert q.states(gone.id) == ["expired"]
    assert q.sql("SELECT last_reply FROM recipients WHERE msg = ?", gone.id) == [
        ("spool file missing",)]
    assert q.sql("SELECT done IS NOT NULL FROM messages WHERE id = ?", gone.id) == [(1,)]
    assert q.states(kept.id) == ["delivered"]
    assert relay.stop() == 0


# --- (d) final states the index lost --------------------------------------------------------

def test_final_state_in_spool_is_reapplied_not_resent(tmp_path: Path, relay_factory,
                                                       sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env = q.plant("half-done", ("a@example.net", "b@example.net"))
    q.spool.mark_final(env.id, [(0, "delivered")], sync=True)
    assert q.states(env.id) == ["queued", "queued"]  # the index lost recipient 0's state

    relay = start(relay_factory, sink)
    settle(relay, sink, 1)
    assert subjects(sink) == [("half-done", ("b@example.net",))]
    assert q.states(env.id) == ["delivered", "delivered"]
    [event] = relay.events("recovered")
    assert event["finals_applied"] == "1"
    assert q.spool_ids() == set()
    assert relay.stop() == 0


def test_all_recipients_final_in_spool_sends_nothing(tmp_path: Path, relay_factory,
                                                     sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env = q.plant("all-done", ("a@example.net", "b@example.net"))
    q.spool.mark_final(env.id, [(0, "delivered"), (1, "bounced")], sync=True)

    relay = start(relay_factory, sink)
    settle(relay, sink, 0)
    assert subjects(sink) == []
    assert q.states(env.id) == ["delivered", "bounced"]
    assert q.spool_ids() == set()
    assert relay.stop() == 0


def test_torn_final_record_means_the_recipient_is_retried(tmp_path: Path, relay_factory,
                                                           sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env = q.plant("torn", ("a@example.net", "b@example.net"))
    q.spool.mark_final(env.id, [(0, "delivered")], sync=True)
    with open(q.spool.path(env.id), "ab") as f:
        f.write(b"F 1 deliv")  # a power cut in the middle of the append

    relay = start(relay_factory, sink)
    settle(relay, sink, 1)
    assert subjects(sink) == [("torn", ("b@example.net",))]
    assert q.states(env.id) == ["delivered", "delivered"]
    assert relay.stop() == 0


# --- (e) recipients a killed delivery process had claimed ---------------------------------

def test_active_recipients_are_delivered_after_restart(tmp_path: Path, relay_factory,
                                                       sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    fresh = q.plant("fresh-active")
    retried = q.plant("retried-active")
    q.sql("UPDATE recipients SET state = 'active'")
    q.sql("UPDATE recipients SET attempts = 2, next_attempt = ? WHERE msg = ?",
          time.time() + 3600, retried.id)
    (q.root / "clean-shutdown").touch()  # even after a clean stop, 'active' means nobody

    relay = start(relay_factory, sink)
    settle(relay, sink, 2)
    assert subjects(sink) == [("fresh-active", ("ap@example.net",)),
                              ("retried-active", ("ap@example.net",))]
    assert q.states(fresh.id) == ["delivered"]
    assert q.states(retried.id) == ["delivered"]
    assert q.sql("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]
    [event] = relay.events("recovered")
    assert event["released"] == "2"
    assert relay.stop() == 0


# --- (f) a damaged envelope -----------------------------------------------------------------

def test_damaged_envelope_is_quarantined_not_deleted(tmp_path: Path, relay_factory,
                                                     sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env, data = q.message("damaged")
    path = q.write(env, data)
    raw = bytearray(path.read_bytes())
    raw[HEADER_LEN:HEADER_LEN + 8] = b"#garbage"  # the JSON envelope no longer parses
    path.write_bytes(bytes(raw))
    q.index(env, data)
    other, data = q.message("unindexed-damaged")
    path = q.write(other, data)
    raw = bytearray(path.read_bytes())
    raw[HEADER_LEN + 2:HEADER_LEN + 8] = b"\xff\xfe{{{["
    path.write_bytes(bytes(raw))
    good = q.plant("good")

    relay = start(relay_factory, sink)
    settle(relay, sink, 1)
    assert subjects(sink) == [("good", ("ap@example.net",))]
    corrupt = q.root / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == sorted([env.id, other.id])
    assert (corrupt / env.id).read_bytes()[HEADER_LEN:HEADER_LEN + 8] == b"#garbage"
    assert {e["id"] for e in relay.events("spool_corrupt")} == {env.id, other.id}
    assert q.spool_ids() == set()
    assert q.states(good.id) == ["delivered"]
    # The indexed one is closed (and said so), not left pending forever.
    assert q.states(env.id) == ["expired"]
    assert relay.stop() == 0


# --- (g) unusable addresses in files an older intake wrote -----------------------------------

def test_unusable_addresses_in_old_spool_files_bounce_alone(tmp_path: Path, relay_factory,
                                                            sink: Sink) -> None:
    """Older intake let a bare CR or LF into an address. Such a recipient bounces alone (5.1.3,
    with a DSN); a message whose sender is unusable bounces whole (5.1.7) without a DSN; an
    envelope the index cannot even hold is quarantined. Nothing crashes, nothing stays active."""
    q = Queue(tmp_path / "var")
    mixed = q.plant("mixed", ("ok1@example.net", "bo\rb@example.net", "li\nne@example.net",
                              "ok2@example.net"))
    # Only on disk (its index commit was lost): recovery indexes it again.
    bad_sender, data = q.message("bad-sender", ("x@example.net", "y@example.net"),
                                 sender="ap\rp@example.net")
    q.write(bad_sender, data)
    # A lone surrogate in the JSON (same length as the placeholder it replaces).
    unstorable, data = q.message("unstorable", ("XXXXXX@example.net",))
    path = q.write(unstorable, data)
    path.write_bytes(path.read_bytes().replace(b"XXXXXX@", b"\\udc80@", 1))

    relay = start(relay_factory, sink)
    received = sink.wait_for(2)
    [dsn] = [m for m in received if m.mail_from in ("", "<>")]
    [mail] = [m for m in received if m.mail_from not in ("", "<>")]
    relay.wait_for_log(r"event=delivered", count=3)  # two recipients and the DSN
    relay.wait_for_log(rf"event=dsn_skipped id={bad_sender.id} ")
    assert mail.rcpt_tos == ["ok1@example.net", "ok2@example.net"]
    assert dsn.rcpt_tos == ["app@example.net"]
    assert b"Final-Recipient: utf-8; bo\\x{0D}b@example.net\r\n" in dsn.data
    assert b"Final-Recipient: utf-8; li\\x{0A}ne@example.net\r\n" in dsn.data
    assert b"\r" not in dsn.data.replace(b"\r\n", b"")
    assert b"\n" not in dsn.data.replace(b"\r\n", b"")

    assert q.states(mixed.id) == ["delivered", "bounced", "bounced", "delivered"]
    assert q.states(bad_sender.id) == ["bounced", "bounced"]
    assert q.sql("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]
    assert q.sql("SELECT COUNT(*) FROM messages") == [(3,)]  # one DSN, none to ap\rp@
    bounced = {e["rcpt"]: e["status"] for e in relay.events("bounced")}
    assert bounced == {"bo\\rb@example.net": "5.1.3", "li\\nne@example.net": "5.1.3",
                       "x@example.net": "5.1.7", "y@example.net": "5.1.7"}
    assert (q.root / "corrupt" / unstorable.id).exists()
    [event] = relay.events("recovered")
    assert event["reindexed"] == "1" and event["corrupt"] == "1"
    log = relay.new_log()
    assert "Traceback" not in log and "Task exception" not in log
    assert "event=delivery_error" not in log
    assert relay.stop() == 0
    assert q.sql("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]


# --- after a clean stop ---------------------------------------------------------------------

def test_clean_restart_keeps_queued_mail(tmp_path: Path, relay_factory, sink: Sink) -> None:
    """A clean stop skips the full check, but nothing queued is lost or sent twice."""
    relay = relay_factory(routes={"example.net": ["127.0.0.1:1"]}).start()  # unreachable
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        for n in range(3):
            smtp.sendmail("app@example.net", ["ap@example.net"],
                          f"Subject: queued-{n}\r\n\r\nbody\r\n".encode())
    assert relay.stop() == 0
    assert (relay.queue_dir / "clean-shutdown").exists()
    assert len(list((relay.queue_dir / "spool").iterdir())) == 3

    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    assert not (relay.queue_dir / "clean-shutdown").exists()  # until the next clean stop
    settle(relay, sink, 3)
    assert [s for s, _ in subjects(sink)] == ["queued-0", "queued-1", "queued-2"]
    assert relay.stop() == 0


# --- a damaged index ------------------------------------------------------------------------

def test_damaged_index_stops_with_a_hint_then_rebuild_delivers(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env = q.plant("survivor", ("a@example.net", "b@example.net"))
    q.spool.mark_final(env.id, [(0, "delivered")], sync=True)
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (q.root / name).unlink(missing_ok=True)
    (q.root / "index.sqlite").write_bytes(b"this is not a database" * 100)

    relay = relay_factory(routes={"example.net": [sink.address]})
    relay.start(wait=False)
    assert relay.proc.wait(15) == 78  # a restart loop would not help
    log = relay.new_log()
    assert "queue index is unusable" in log and "queue rebuild" in log, log
    assert "Traceback" not in log
    assert q.spool_ids() == {env.id}  # nothing was touched

    rebuilt = subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(relay.config), "queue", "rebuild"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert rebuilt.returncode == 0, rebuilt.stderr
    relay.start()
    settle(relay, sink, 1)
    assert subjects(sink) == [("survivor", ("b@example.net",))]
    assert q.states(env.id) == ["delivered", "delivered"]
    assert relay.stop() == 0
