"""Delivery records and proof of delivery: `invoice-relay status KEY`, `status --export`, the
records' life apart from the queue (rebuild, a removed spool) and their retention.

The end-to-end test runs the real relay against a sink that answers with its own queue id (the
proof) and DKIM-signs with a real key: what `status` shows is compared with what the sink got.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dkimkeys import write_rsa
from relayproc import RelayProcess
from sink import Sink

from relay.queue.envelope import Envelope
from relay.queue.index import Index, Outcome
from relay.queue.notices import Committed
from relay.queue.records import (
    FIELDS,
    RECORDS_FILE,
    Record,
    Records,
    attempts,
    copy_pending,
    find,
    invoice_id_of,
    open_readonly,
)
from relay.queue.segments import Location

RelayFactory = Callable[..., RelayProcess]
SINK_REPLY = "250 2.0.0 Ok: queued as 4XyZ9sinkQ"


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, check=False,
                          cwd=config.parent)


def invoice(invoice_id: str, message_id: str) -> bytes:
    return (f"From: billing@invoices.test\r\nTo: ap@example.net\r\nSubject: invoice\r\n"
            f"Message-ID: {message_id}\r\nX-Invoice-Id: {invoice_id}\r\n\r\n"
            "Please find the invoice attached.\r\n").encode()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_status_proves_delivery_and_survives_rebuild_and_a_lost_spool(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    write_rsa(tmp_path / "s2026.pem")
    refused_once: set[str] = set()

    def rcpt_reply(address: str) -> str | None:
        if address.startswith("bad@"):
            return "550 5.1.1 <bad@example.net>: no such user here"
        if address.startswith("never@"):  # keeps the message (and its segment) queued
            return "451 4.2.1 mailbox busy, try again"
        if address.startswith("later@") and address not in refused_once:
            refused_once.add(address)
            return "451 4.2.1 mailbox busy, try again"
        return None

    with Sink(rcpt_reply=rcpt_reply, data_reply=lambda _: SINK_REPLY) as sink:
        relay = relay_factory(
            routes={"example.net": [sink.address]}, queue={"retry_schedule": ["1s", "1h"]},
            policies='[[sender]]\ndomain = "invoices.test"\n'
                     'dkim = [{ selector = "s2026", key = "s2026.pem" }]\n').start()
        sent_on = time.strftime("%Y-%m-%d", time.gmtime())
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("billing@invoices.test",
                            ["ap@example.net", "bad@example.net", "later@example.net",
                             "never@example.net"],
                            invoice("INV-2026-0042", "<inv42@invoices.test>"))
        relay.wait_for_log("event=received")
        queue_id = relay.events("received", at_least=1)[0]["id"]
        wait_until(lambda: len(sink.messages) == 2, 15, "both copies at the sink")
        relay.wait_for_log(r"event=delivered .*later@example.net", timeout=10)
        got = sink.messages[0].data
        sent_sha = hashlib.sha256(got).hexdigest()
        assert b"DKIM-Signature" in got

        shown = relay_cli(relay.config, "status", queue_id)
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        assert f"queue id:   {queue_id}" in out
        assert "message-id: <inv42@invoices.test>" in out
        assert "invoice id: INV-2026-0042" in out
        assert "<ap@example.net> delivered" in out
        assert "<bad@example.net> bounced" in out
        assert "<later@example.net> delivered" in out
        assert "<never@example.net> deferred" in out
        # the destination's own 250 reply verbatim is the proof; with the hash of what it got
        assert f"reply: {SINK_REPLY}" in out
        assert f"sent sha256={sent_sha}" in out
        assert "reply: 550 5.1.1 <bad@example.net>: no such user here" in out
        assert "reply: 451 4.2.1 mailbox busy, try again" in out  # every attempt is listed
        assert f"[127.0.0.1:{sink.port}]" in out and "from 127.0.0.1:" in out
        assert "dkim: invoices.test/s2026" in out
        # by Message-ID, with or without <>, and by invoice id: the same message
        for key in ("<inv42@invoices.test>", "inv42@invoices.test", "INV-2026-0042"):
            again = relay_cli(relay.config, "status", key)
            assert again.returncode == 0 and again.stdout == out, (key, again.stderr)
        unknown = relay_cli(relay.config, "status", "INV-NOPE")
        assert unknown.returncode == 1 and "INV-NOPE: no message" in unknown.stderr
        assert "Traceback" not in unknown.stderr
        assert relay.stop() == 0

    # A healthy index is not rebuilt by accident ...
    refused = relay_cli(relay.config, "queue", "rebuild")
    assert refused.returncode == 1 and "--force" in refused.stderr, refused.stderr
    # ... and a forced rebuild keeps every record, and does not queue again what was
    # delivered from a message the spool still holds (its last recipient is pending)
    rebuilt = relay_cli(relay.config, "queue", "rebuild", "--force")
    assert rebuilt.returncode == 0, rebuilt.stderr
    with sqlite3.connect(relay.queue_dir / "index.sqlite") as index:
        states = dict(index.execute("SELECT rcpt, state FROM recipients WHERE msg = ?",
                                    (queue_id,)).fetchall())
    assert states == {"ap@example.net": "delivered", "bad@example.net": "bounced",
                      "later@example.net": "delivered", "never@example.net": "queued"}
    after = relay_cli(relay.config, "status", queue_id).stdout
    assert after == out.replace("<never@example.net> deferred", "<never@example.net> queued")
    # the whole queue gone (spool and index): the proof stays
    shutil.rmtree(relay.queue_dir / "spool")
    for path in relay.queue_dir.glob("index.sqlite*"):
        path.unlink()
    assert relay_cli(relay.config, "status", "INV-2026-0042").stdout == out  # last record

    # export: the day's records, jsonl by default and csv; another day has none
    today = time.strftime("%Y-%m-%d", time.gmtime())  # the same day, unless it is midnight
    jsonl = relay_cli(relay.config, "status", "--export", sent_on, today)
    assert jsonl.returncode == 0, jsonl.stderr
    exported = [json.loads(line) for line in jsonl.stdout.splitlines()]
    rows = [r for r in exported if r["queue_id"] == queue_id]  # not the DSN's
    assert len(rows) == 6  # ap, bad, later and never twice
    assert [r["time"] for r in exported] == sorted(r["time"] for r in exported)
    proof = next(r for r in rows if r["recipient"] == "ap@example.net")
    assert proof["reply"] == SINK_REPLY and proof["sha256"] == sent_sha
    assert proof["invoice_id"] == "INV-2026-0042" and proof["dkim"] == ["invoices.test/s2026"]
    as_csv = relay_cli(relay.config, "status", "--export", sent_on, today, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["queue_id"], r["reply"], r["sha256"]) for r in table] == \
        [(r["queue_id"], r["reply"], r["sha256"] or "") for r in exported]
    assert relay_cli(relay.config, "status", "--export", "2001-01-01", "2001-01-02").stdout == ""


def test_bad_inputs_get_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[queue]\npath = "var"\n')
    (tmp_path / "var").mkdir()
    none_yet = relay_cli(config, "status", "ABC")
    assert none_yet.returncode == 1 and "no delivery records yet" in none_yet.stderr
    for dates in (("2026-13-01", "2026-12-31"), ("yesterday", "2026-01-01"),
                  ("2026-02-01", "2026-01-01")):
        bad = relay_cli(config, "status", "--export", *dates)
        assert bad.returncode == 2 and "status --export" in bad.stderr, bad.stderr
    assert relay_cli(config, "status").returncode == 2
    (tmp_path / "var" / RECORDS_FILE).write_bytes(b"not a database" * 500)
    damaged = relay_cli(config, "status", "ABC")
    assert damaged.returncode == 1 and "cannot read the delivery records" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    refused = relay_cli(config, "serve")  # says so before it starts, and no restart loop
    assert refused.returncode == 78 and "delivery records are unusable" in refused.stderr
    (tmp_path / "var" / "spool").mkdir(exist_ok=True)
    (tmp_path / "var" / "index.sqlite").write_bytes(b"garbage" * 1000)
    rebuilt = relay_cli(config, "queue", "rebuild")  # a damaged index needs no --force
    assert rebuilt.returncode == 0, rebuilt.stderr


def record(queue_id: str, when: float, invoice_id: str) -> Record:
    return Record(queue_id=queue_id, idx=0, recipient="ap@example.net",
                  sender="billing@invoices.test", received=when, message_id=None,
                  invoice_id=invoice_id, state="delivered", time=when, attempted=True,
                  reply="250 ok")


def test_records_older_than_the_retention_are_pruned_by_the_running_relay(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    relay = relay_factory(queue={"retention": "1d"})
    (relay.queue_dir).mkdir()
    store = Records(relay.queue_dir / RECORDS_FILE)
    now = time.time()
    store.add([record("0OLD", now - 2 * 86400, "INV-OLD"), record("0NEW", now - 3600, "INV-NEW")])
    store.add([record("0OLD", now - 2 * 86400, "INV-OLD")])  # written twice: stored once
    store.close()
    relay.start()
    relay.wait_for_log("event=records_pruned messages=1", timeout=10)
    assert relay_cli(relay.config, "status", "INV-OLD").returncode == 1
    assert "0NEW" in relay_cli(relay.config, "status", "INV-NEW").stdout
    assert relay.stop() == 0


@pytest.mark.parametrize(("data", "expected"), [
    (b"Subject: x\r\nX-Invoice-Id:  INV-1 \r\n\r\nbody", "INV-1"),
    (b"x-invoice-id: A\r\n B\r\n\r\n", "A B"),                  # folded
    (b"Subject: x\r\n\r\nX-Invoice-Id: in the body\r\n", None),  # not a header
    (b"Subject: x\r\n\r\n", None),
])
def test_invoice_id_is_read_from_the_header_block(data: bytes, expected: str | None) -> None:
    assert invoice_id_of(data) == expected


# --- outcomes reach the records through the index (relay/queue/records.py) -------------------

def _delivered(index: Index, queue_id: str, when: float, *, segment: str = "seg",
               message_id: str = "<inv-1@invoices.test>") -> None:
    """A message indexed in `segment` and delivered at `when` (so done since then)."""
    env = Envelope(id=queue_id, sender="billing@invoices.test", recipients=("ap@example.net",),
                   received=when - 5, message_id=message_id)
    index.add([Committed(env, Location(segment, 0, 100))], max_lifetime=3600)
    index.record([Outcome(msg=queue_id, idx=0, state="delivered", time=when, next_attempt=0,
                          reply="250 2.0.0 Ok: queued as 4XyZ", host="mx.example.net",
                          address="192.0.2.7:25", dkim=("invoices.test/s1",),
                          invoice_id="INV-7", source="192.0.2.1:40000")])


def _index_with_outcome(path: Path, queue_id: str, when: float) -> Index:
    index = Index(path)
    _delivered(index, queue_id, when)
    return index


def test_outcomes_recorded_in_the_index_are_copied_once_and_a_rebuilt_index_is_followed(
        tmp_path: Path) -> None:
    """What a killed relay recorded in the index but had not copied yet reaches the records at
    the next start; copying again adds nothing; a rebuilt index (new rows from 1) is copied
    from its start, not from where the old one ended."""
    now = time.time()
    _index_with_outcome(tmp_path / "index.sqlite", "0AAA", now).close()
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")
    # A new index met for the first time whose rows were written before: treated as copied
    # by a release that wrote records directly. This one was new at attach time:
    assert store.copy_from_index() == 0
    store.close()
    (tmp_path / "index.sqlite").unlink()
    for extra in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{extra}").unlink(missing_ok=True)

    index = Index(tmp_path / "index.sqlite")  # attached before any outcome, as serve does
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")
    index.close()
    _index_with_outcome(tmp_path / "index.sqlite", "0BBB", now).close()
    assert store.copy_from_index() == 1
    assert store.copy_from_index() == 0
    store.close()
    conn = open_readonly(tmp_path / RECORDS_FILE)
    rows = [dict(zip(FIELDS, r, strict=True)) for r in conn.execute(
        "SELECT a.time, a.queue_id, m.message_id, m.invoice_id, m.sender, a.recipient, a.state,"
        " a.attempted, a.source, a.host, a.address, a.reply, a.tls, a.tls_cipher,"
        " a.tls_verified, a.dkim, a.sha256 FROM attempts a JOIN messages m USING (queue_id)")]
    assert rows == [{
        "time": now, "queue_id": "0BBB", "message_id": "<inv-1@invoices.test>",
        "invoice_id": "INV-7", "sender": "billing@invoices.test", "recipient": "ap@example.net",
        "state": "delivered", "attempted": 1, "source": "192.0.2.1:40000",
        "host": "mx.example.net", "address": "192.0.2.7:25",
        "reply": "250 2.0.0 Ok: queued as 4XyZ", "tls": None, "tls_cipher": None,
        "tls_verified": None, "dkim": "invoices.test/s1", "sha256": None}]
    # Rebuilt: a new index file whose first rows have rowids the old one copied already.
    (tmp_path / "index.sqlite").rename(tmp_path / "old.sqlite")
    for extra in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{extra}").unlink(missing_ok=True)
    Index(tmp_path / "index.sqlite").close()
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")
    _index_with_outcome(tmp_path / "index.sqlite", "0CCC", now + 1).close()
    assert store.copy_from_index() == 1
    store.close()
    assert {r[0] for r in conn.execute("SELECT queue_id FROM attempts")} == {"0BBB", "0CCC"}
    conn.close()


def test_queue_rebuild_copies_what_a_killed_relay_left_in_the_index(
        tmp_path: Path) -> None:
    """`copy_pending` (run by `queue rebuild` before it moves the index aside) takes the rows
    a relay recorded after its last copy; readers see them before and after, once."""
    Index(tmp_path / "index.sqlite").close()
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")  # the running relay's start
    store.close()
    _index_with_outcome(tmp_path / "index.sqlite", "0DDD", time.time()).close()  # then killed
    # Readers see it already: the records plus what the index holds beyond the last copy.
    conn = open_readonly(tmp_path / RECORDS_FILE)
    assert find(conn, "<inv-1@invoices.test>") == ["0DDD"]
    assert [a["reply"] for a in attempts(conn, "0DDD")] == ["250 2.0.0 Ok: queued as 4XyZ"]
    conn.close()
    assert copy_pending(tmp_path / "index.sqlite", tmp_path / RECORDS_FILE) == 1
    assert copy_pending(tmp_path / "index.sqlite", tmp_path / RECORDS_FILE) == 0
    conn = open_readonly(tmp_path / RECORDS_FILE)
    assert find(conn, "INV-7") == ["0DDD"]
    assert len(attempts(conn, "0DDD")) == 1
    conn.close()


def test_finished_messages_leave_the_index_but_never_the_records(tmp_path: Path) -> None:
    """A message final for long enough whose segment file is gone leaves the index (which
    would otherwise grow by every message ever relayed); its records stay, and outcomes
    recorded afterwards are still copied (the newest attempts row is never removed)."""
    now = time.time()
    index = Index(tmp_path / "index.sqlite")
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")
    _delivered(index, "0OLD1", now - 3 * 86400, segment="seg-a",
               message_id="<0OLD1@invoices.test>")   # segment removed: goes
    _delivered(index, "0OLD2", now - 3 * 86400, segment="seg-b",
               message_id="<0OLD2@invoices.test>")   # segment still there: stays
    _delivered(index, "0NEW", now - 60, segment="seg-a",
               message_id="<0NEW@invoices.test>")    # final too recently: stays
    index.forget_segments(["seg-a"])
    store.copy_from_index()
    assert index.forget_finished(now - 86400, 0) == (1, 0)
    left = {row[0] for row in index.conn.execute("SELECT id FROM messages")}
    assert left == {"0OLD2", "0NEW"}
    for table in ("recipients", "attempts"):
        assert index.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE msg = '0OLD1'"
                                  ).fetchone() == (0,)
    # The newest attempts row stays even when its message could go.
    index.conn.execute("UPDATE messages SET done = ? WHERE id = '0NEW'", (now - 3 * 86400,))
    assert index.forget_finished(now - 86400, 0) == (0, 0)
    _delivered(index, "0NEXT", now, segment="seg-c",
               message_id="<0NEXT@invoices.test>")
    assert index.forget_finished(now - 86400, 0) == (1, 0)  # now 0NEW may go
    assert store.copy_from_index() == 1  # 0NEXT's row: a fresh rowid, copied
    index.close()
    store.close()
    conn = open_readonly(tmp_path / RECORDS_FILE)
    assert {row[0] for row in conn.execute("SELECT queue_id FROM attempts")} == {
        "0OLD1", "0OLD2", "0NEW", "0NEXT"}
    assert find(conn, "<0OLD1@invoices.test>") == ["0OLD1"]
    conn.close()


def test_readers_look_records_up_by_index_not_by_scanning(tmp_path: Path) -> None:
    """`status`, the API and `status --export` read the records and the index's rows not
    copied yet through views; each lookup must use an index on both files (a year of
    records is millions of rows), never read a whole table."""
    Index(tmp_path / "index.sqlite").close()
    Records(tmp_path / RECORDS_FILE).close()
    store = Records(tmp_path / RECORDS_FILE)
    store.attach_index(tmp_path / "index.sqlite")
    store.close()
    conn = open_readonly(tmp_path / RECORDS_FILE)
    lookups = [
        ("SELECT queue_id FROM r_messages WHERE queue_id = ? OR message_id = ?"
         " OR invoice_id = ?", ("Q", "<m>", "INV")),
        ("SELECT sender FROM r_messages WHERE queue_id = ?", ("Q",)),
        ("SELECT * FROM r_rows WHERE queue_id = ?", ("Q",)),
        ("SELECT * FROM r_rows WHERE time >= ? AND time < ?", (1.0, 2.0)),
    ]
    for query, args in lookups:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", args)]
        # Reading a view or a subquery's few rows ("SCAN r_rows", "SCAN a") is fine; a table or
        # a whole index ("SCAN main.messages", "SCAN a USING INDEX ...") is not.
        scans = [step for step in plan if step.startswith("SCAN")
                 and not (step.startswith("SCAN r_") or step == "SCAN a")]
        assert not scans, (query, plan)
    conn.close()
