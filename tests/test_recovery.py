"""Startup recovery: plant what a crash, a power cut or an older release can leave in the queue,
then start the real relay on it and see what reaches a sink.

The queue is written with the queue's own classes (segments, Index) while no relay runs; a
queue of the first release (one spool file per message) is written in that release's format.
"""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from queuefiles import pending_ids, plant, stored_ids
from sink import Sink

from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.segments import SegmentWriter, SingleWriter, segment_files

LIFETIME = 5 * 86400


class Queue:
    """The relay's queue folder, planted by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = root / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.db = root / "index.sqlite"

    def message(self, marker: str, recipients: tuple[str, ...] = ("ap@example.net",),
                sender: str = "app@example.net") -> tuple[Envelope, bytes]:
        env = Envelope(id=new_queue_id(), sender=sender, recipients=recipients,
                       received=time.time(), client="127.0.0.1", helo="app.test",
                       message_id=f"<{marker}@invoices.test>")
        data = (f"From: <{sender}>\r\nMessage-ID: <{marker}@invoices.test>\r\n"
                f"Subject: {marker}\r\n\r\nbody of {marker}\r\n").encode()
        return env, data

    def plant(self, marker: str, recipients: tuple[str, ...] = ("ap@example.net",), *,
              index: bool = True) -> Envelope:
        """A message as intake and delivery leave it: synced in a segment and indexed (or,
        with index=False, as if its notice died with a killed delivery process)."""
        env, data = self.message(marker, recipients)
        plant(self.root, env, data, max_lifetime=LIFETIME, index=index)
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

    # --- the first release's format -------------------------------------------------------

    def legacy(self, env: Envelope, data: bytes, *, complete: bool = True,
               finals: tuple[tuple[int, str], ...] = (), tail: bytes = b"") -> Path:
        """A spool file of the first release: header line, envelope JSON, message, F records."""
        envelope = env.to_json() + b"\n"
        length = len(data) if complete else 999_999_999_999
        path = self.spool / env.id
        path.write_bytes(b"IRSPOOL1 %010d %012d\n" % (len(envelope), length) + envelope + data
                         + b"".join(b"F %d %s\n" % (i, s.encode()) for i, s in finals) + tail)
        return path

    def legacy_index(self, env: Envelope, data: bytes) -> None:
        """The first release's index rows: no segment, no offset."""
        conn = sqlite3.connect(self.db)
        try:
            conn.executescript(
                "CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, sender TEXT NOT NULL,"
                " received REAL NOT NULL, expires REAL NOT NULL, size INTEGER NOT NULL,"
                " message_id TEXT, client TEXT, auth TEXT, body TEXT,"
                " smtputf8 INTEGER NOT NULL DEFAULT 0, done REAL);"
                "CREATE TABLE IF NOT EXISTS recipients (msg TEXT NOT NULL, idx INTEGER NOT NULL,"
                " rcpt TEXT NOT NULL, domain TEXT NOT NULL, state TEXT NOT NULL,"
                " attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,"
                " last_reply TEXT, last_host TEXT, updated REAL NOT NULL, UNIQUE (msg, idx));")
            with conn:
                conn.execute("INSERT INTO messages (id, sender, received, expires, size)"
                             " VALUES (?,?,?,?,?)",
                             (env.id, env.sender, env.received, env.received + LIFETIME,
                              len(data)))
                conn.executemany(
                    "INSERT INTO recipients (msg, idx, rcpt, domain, state, next_attempt,"
                    " updated) VALUES (?,?,?,?,'queued',?,?)",
                    [(env.id, i, r, r.rpartition("@")[2], env.received, env.received)
                     for i, r in enumerate(env.recipients)])
        finally:
            conn.close()


def subjects(sink: Sink) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for m in list(sink.messages):
        subject = m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        out.append((subject, tuple(m.rcpt_tos)))
    return sorted(out)


def start(relay_factory, sink: Sink):  # type: ignore[no-untyped-def]
    return relay_factory(routes={"example.net": [sink.address]}).start()


def finish(relay, sink: Sink, deliveries: int) -> None:  # type: ignore[no-untyped-def]
    """Wait for `deliveries` delivered recipients, then stop cleanly: after a graceful stop,
    what the sink has and what the index says are final."""
    if deliveries:
        relay.wait_for_log("event=delivered", count=deliveries)
    assert relay.stop() == 0


# --- (a) what was never acknowledged ------------------------------------------------------------

def test_unfinished_streamed_message_and_unused_spare_are_removed(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env, data = q.message("streaming")
    streaming = SingleWriter(q.spool, 0, env.to_json())   # killed before its header was written
    streaming.append([data])
    os.close(streaming.fd)
    spare = q.spool / "0000000000000000-01-0000.seg"       # preallocated, never written
    spare.write_bytes(b"\0" * 65536)
    good = q.plant("good")

    relay = start(relay_factory, sink)
    finish(relay, sink, 1)
    assert subjects(sink) == [("good", ("ap@example.net",))]
    assert not (q.spool / streaming.name).exists() and not spare.exists()
    [event] = relay.events("recovered", at_least=1)
    assert event["removed_incomplete"] == "1"
    assert q.states(good.id) == ["delivered"]


def test_records_after_a_damaged_one_were_never_acknowledged(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    """Records go in order and each batch is synced before the next is written: behind the
    first damaged record (a torn write at a power cut) nothing was ever acknowledged."""
    q = Queue(tmp_path / "var")
    env, data = q.message("first")
    second, data2 = q.message("torn")
    third, data3 = q.message("after-the-tear")
    writer = SegmentWriter(q.spool, 5, size=1 << 20)
    writer.append([(env.to_json(), [data])])
    [torn] = writer.append([(second.to_json(), [data2])])
    writer.append([(third.to_json(), [data3])])
    writer.close()
    path = q.spool / torn.segment
    raw = bytearray(path.read_bytes())
    raw[torn.offset + 3] ^= 0xFF
    path.write_bytes(bytes(raw))

    relay = start(relay_factory, sink)
    finish(relay, sink, 1)
    assert subjects(sink) == [("first", ("ap@example.net",))]
    assert relay.events("recovered", at_least=1)[0]["reindexed"] == "1"


# --- (b) acknowledged, but the index never heard of it --------------------------------------

def test_record_the_index_missed_is_indexed_and_delivered_once(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    indexed = q.plant("indexed")
    orphan = q.plant("orphan", ("a@example.net", "b@example.net"), index=False)

    relay = start(relay_factory, sink)
    finish(relay, sink, 3)
    assert subjects(sink) == [("indexed", ("ap@example.net",)),
                              ("orphan", ("a@example.net", "b@example.net"))]
    [event] = relay.events("recovered", at_least=1)
    assert event["reindexed"] == "1"
    assert [e["id"] for e in relay.events("reindexed", at_least=1)] == [orphan.id]
    assert q.states(orphan.id) == ["delivered", "delivered"]
    assert q.states(indexed.id) == ["delivered"]
    assert q.sql("SELECT sender, message_id FROM messages WHERE id = ?", orphan.id) == [
        ("app@example.net", "<orphan@invoices.test>")]


def test_lost_index_is_rebuilt_from_the_segments(tmp_path: Path, relay_factory,
                                                 sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    first = q.plant("first")
    second = q.plant("second", ("a@example.net", "b@example.net"))
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (q.root / name).unlink(missing_ok=True)

    relay = start(relay_factory, sink)
    finish(relay, sink, 3)
    assert subjects(sink) == [("first", ("ap@example.net",)),
                              ("second", ("a@example.net", "b@example.net"))]
    assert q.states(first.id) == ["delivered"]
    assert q.states(second.id) == ["delivered", "delivered"]
    assert stored_ids(q.root) == []  # the segments were sealed and, all final, removed


# --- (c) the index knows it, the spool does not ---------------------------------------------

def test_pending_message_whose_segment_is_gone_is_closed(tmp_path: Path, relay_factory,
                                                        sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    gone = q.plant("gone")
    [segment] = segment_files(q.spool)
    (q.spool / segment).unlink()
    kept = q.plant("kept")

    relay = start(relay_factory, sink)
    finish(relay, sink, 1)
    assert subjects(sink) == [("kept", ("ap@example.net",))]
    [event] = relay.events("spool_missing", at_least=1)
    assert event["id"] == gone.id
    assert q.states(gone.id) == ["expired"]
    assert q.sql("SELECT last_reply FROM recipients WHERE msg = ?", gone.id) == [
        ("spool segment missing",)]
    assert q.states(kept.id) == ["delivered"]


def test_finished_segment_left_behind_is_removed(tmp_path: Path, relay_factory,
                                                 sink: Sink) -> None:
    # Killed between the index commit of the last outcome and the unlink of the segment.
    q = Queue(tmp_path / "var")
    done = q.plant("finished")
    q.sql("UPDATE recipients SET state = 'delivered', attempts = 1")
    q.sql("UPDATE messages SET done = ?", time.time())
    q.sql("UPDATE segments SET finished = messages")

    relay = start(relay_factory, sink)
    assert relay.events("recovered", at_least=1)[0]["removed_segments"] == "1"
    finish(relay, sink, 0)
    assert subjects(sink) == [] and stored_ids(q.root) == []
    assert q.states(done.id) == ["delivered"]


# --- (d) recipients a killed delivery process had claimed ---------------------------------

def test_active_recipients_are_delivered_after_restart(tmp_path: Path, relay_factory,
                                                       sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    fresh = q.plant("fresh-active")
    retried = q.plant("retried-active")
    q.sql("UPDATE recipients SET state = 'active'")
    q.sql("UPDATE recipients SET attempts = 2, next_attempt = ? WHERE msg = ?",
          time.time() + 3600, retried.id)

    relay = start(relay_factory, sink)
    finish(relay, sink, 2)
    assert subjects(sink) == [("fresh-active", ("ap@example.net",)),
                              ("retried-active", ("ap@example.net",))]
    assert q.states(fresh.id) == ["delivered"]
    assert q.states(retried.id) == ["delivered"]
    assert q.sql("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]
    [event] = relay.events("recovered", at_least=1)
    assert event["released"] == "2"


# --- (e) a queue left by the first release (one spool file per message) ---------------------

def test_first_release_queue_is_moved_into_segments(tmp_path: Path, relay_factory,
                                                    sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env, data = q.message("old-indexed", ("a@example.net", "b@example.net"))
    q.legacy(env, data, finals=((0, "delivered"),))   # recipient 0 was delivered back then
    q.legacy_index(env, data)
    orphan, odata = q.message("old-unindexed")
    q.legacy(orphan, odata)
    torn, tdata = q.message("old-torn", ("c@example.net", "d@example.net"))
    q.legacy(torn, tdata, finals=((0, "delivered"),), tail=b"F 1 deliv")  # cut mid-append
    done, ddata = q.message("old-all-final", ("e@example.net",))
    q.legacy(done, ddata, finals=((0, "bounced"),))
    streaming, sdata = q.message("old-streaming")
    q.legacy(streaming, sdata, complete=False)

    relay = start(relay_factory, sink)
    finish(relay, sink, 3)
    assert subjects(sink) == [("old-indexed", ("b@example.net",)),
                              ("old-torn", ("d@example.net",)),
                              ("old-unindexed", ("ap@example.net",))]
    assert q.states(env.id) == ["delivered", "delivered"]
    assert q.states(torn.id) == ["delivered", "delivered"]
    assert q.states(done.id) == ["bounced"]
    assert not [p for p in q.spool.iterdir() if "." not in p.name]  # every old file is gone
    assert relay.events("recovered", at_least=1)[0]["migrated"] == "4"
    assert pending_ids(q.root) == []


def test_damaged_first_release_files_are_quarantined(tmp_path: Path, relay_factory,
                                                     sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env, data = q.message("damaged")
    path = q.legacy(env, data)
    header = 34
    raw = bytearray(path.read_bytes())
    raw[header:header + 8] = b"#garbage"  # the JSON envelope no longer parses
    path.write_bytes(bytes(raw))
    q.legacy_index(env, data)
    cut, cdata = q.message("cut-short")
    path = q.legacy(cut, cdata)
    os.truncate(path, path.stat().st_size - 10)
    q.legacy_index(cut, cdata)   # the index holds it, so it may have been acknowledged
    good = q.plant("good")

    relay = start(relay_factory, sink)
    finish(relay, sink, 1)
    assert subjects(sink) == [("good", ("ap@example.net",))]
    corrupt = q.root / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == sorted([env.id, cut.id])
    assert (corrupt / env.id).read_bytes()[header:header + 8] == b"#garbage"
    assert {e["id"] for e in relay.events("spool_corrupt", at_least=2)} == {env.id, cut.id}
    assert q.states(env.id) == ["expired"] and q.states(cut.id) == ["expired"]
    assert q.states(good.id) == ["delivered"]
    assert "Traceback" not in relay.log


def test_unusable_addresses_in_old_spool_files_bounce_alone(tmp_path: Path, relay_factory,
                                                            sink: Sink) -> None:
    """Older intake let a bare CR or LF into an address. Such a recipient bounces alone (5.1.3,
    with a DSN); a message whose sender is unusable bounces whole (5.1.7) without a DSN; an
    envelope that cannot even be stored again is quarantined. Nothing crashes, nothing stays
    active."""
    q = Queue(tmp_path / "var")
    mixed, data = q.message("mixed", ("ok1@example.net", "bo\rb@example.net",
                                      "li\nne@example.net", "ok2@example.net"))
    q.legacy(mixed, data)
    q.legacy_index(mixed, data)
    bad_sender, data = q.message("bad-sender", ("x@example.net", "y@example.net"),
                                 sender="ap\rp@example.net")
    q.legacy(bad_sender, data)
    # A lone surrogate in the JSON (same length as the placeholder it replaces).
    unstorable, data = q.message("unstorable", ("XXXXXX@example.net",))
    path = q.legacy(unstorable, data)
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
    assert q.sql("SELECT COUNT(*) FROM messages") == [(3,)]  # one DSN, none to ap\rp@
    bounced = {e["rcpt"]: e["status"] for e in relay.events("bounced", at_least=4)}
    assert bounced == {"bo\\rb@example.net": "5.1.3", "li\\nne@example.net": "5.1.3",
                       "x@example.net": "5.1.7", "y@example.net": "5.1.7"}
    assert (q.root / "corrupt" / unstorable.id).exists()
    [event] = relay.events("recovered", at_least=1)
    assert event["migrated"] == "2" and event["corrupt"] == "1"
    log = relay.new_log()
    assert "Traceback" not in log and "Task exception" not in log
    assert "event=delivery_error" not in log
    assert relay.stop() == 0
    assert q.sql("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]


# --- after a clean stop ---------------------------------------------------------------------

def test_clean_restart_keeps_queued_mail(tmp_path: Path, relay_factory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": ["127.0.0.1:1"]}).start()  # unreachable
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        for n in range(3):
            smtp.sendmail("app@example.net", ["ap@example.net"],
                          f"Subject: queued-{n}\r\n\r\nbody\r\n".encode())
    assert relay.stop() == 0
    assert len(stored_ids(relay.queue_dir)) == 3 and len(pending_ids(relay.queue_dir)) == 3

    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    finish(relay, sink, 3)
    assert [s for s, _ in subjects(sink)] == ["queued-0", "queued-1", "queued-2"]
    assert pending_ids(relay.queue_dir) == []


# --- a damaged index ------------------------------------------------------------------------

def test_damaged_index_stops_with_a_hint_then_rebuild_delivers(
        tmp_path: Path, relay_factory, sink: Sink) -> None:
    q = Queue(tmp_path / "var")
    env = q.plant("survivor", ("a@example.net", "b@example.net"))
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (q.root / name).unlink(missing_ok=True)
    (q.root / "index.sqlite").write_bytes(b"this is not a database" * 100)

    relay = relay_factory(routes={"example.net": [sink.address]})
    relay.start(wait=False)
    assert relay.proc.wait(15) == 78  # a restart loop would not help
    log = relay.new_log()
    assert "queue index is unusable" in log and "queue rebuild" in log, log
    assert "Traceback" not in log
    assert stored_ids(q.root) == [env.id]  # nothing was touched

    rebuilt = subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(relay.config), "queue", "rebuild"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "1 messages from the spool segments" in rebuilt.stdout
    relay.start()
    finish(relay, sink, 2)
    assert subjects(sink) == [("survivor", ("a@example.net", "b@example.net"))]
    assert q.states(env.id) == ["delivered", "delivered"]

