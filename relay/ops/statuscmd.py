"""`invoice-relay status KEY` and `status --export FROM TO`: the delivery records, read-only.

Works on a running or a stopped relay: it opens the records (and, for the current state of
recipients still in the queue, the index) read-only, and never writes.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import csv
import json
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from relay.config import load_or_report
from relay.exitcodes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE
from relay.queue import records
from relay.queue.index import INDEX_FILE
from relay.queue.records import FIELDS, RECORDS_FILE

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
DAY = 86400.0


def status_command(cli_config: str | None, args: argparse.Namespace) -> int:
    export = args.export
    if (export is None) == (args.key is None):
        print("status: give a KEY (queue id, Message-ID or X-Invoice-Id)"
              " or --export FROM TO", file=sys.stderr)
        return EXIT_USAGE
    span = None
    if export is not None:
        span = _span(*export)
        if span is None:
            return EXIT_USAGE
    config = load_or_report(cli_config)
    if config is None:
        return EXIT_PROBLEM
    root = config.queue.path
    path = root / RECORDS_FILE
    try:
        conn = records.open_readonly(path)
    except FileNotFoundError:
        print(f"{path}: no delivery records yet (nothing was delivered or attempted here)",
              file=sys.stderr)
        return EXIT_PROBLEM
    except sqlite3.DatabaseError as exc:
        print(f"{path}: cannot read the delivery records: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        if span is not None:
            return _export(conn, *span, args.format)
        return _status(conn, root / INDEX_FILE, args.key)
    except sqlite3.DatabaseError as exc:
        print(f"{path}: cannot read the delivery records: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        conn.close()


def _span(start: str, end: str) -> tuple[float, float] | None:
    """[start of FROM, end of TO) in UTC seconds; None (after saying why) when malformed."""
    bounds = []
    for text in (start, end):
        try:
            if not _DATE.fullmatch(text):
                raise ValueError
            day = time.strptime(text, "%Y-%m-%d")
        except ValueError:
            print(f"status --export: {text!r} is not a date (YYYY-MM-DD, UTC)", file=sys.stderr)
            return None
        bounds.append(float(calendar.timegm(day)))
    if bounds[1] < bounds[0]:
        print(f"status --export: {end} is before {start}", file=sys.stderr)
        return None
    return bounds[0], bounds[1] + DAY  # TO is inclusive: up to the end of that day


def _export(conn: sqlite3.Connection, start: float, end: float, fmt: str) -> int:
    out = sys.stdout
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
        for rec in records.between(conn, start, end):
            writer.writerow(_csv_row(rec))
    else:
        for rec in records.between(conn, start, end):
            out.write(json.dumps({**rec, "time": _when(rec["time"])}, ensure_ascii=False)
                      + "\n")
    return EXIT_OK


def _csv_row(rec: dict[str, object]) -> list[object]:
    row = []
    for name in FIELDS:
        value = rec[name]
        if name == "time":
            value = _when(value)
        elif name == "dkim":
            value = " ".join(value)  # type: ignore[arg-type]
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        row.append("" if value is None else value)
    return row


def _when(ts: object) -> str:
    """UTC, to the millisecond: an auditor compares it with the receiver's own logs."""
    seconds = float(ts)  # type: ignore[arg-type]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) \
        + f".{int(seconds * 1000) % 1000:03d}Z"


def _status(conn: sqlite3.Connection, index_path: Path, key: str) -> int:
    found = lookup(conn, index_path, key)
    if not found:
        print(f"{key}: no message with this queue id, Message-ID or X-Invoice-Id"
              " (in the queue or the delivery records)", file=sys.stderr)
        return EXIT_PROBLEM
    for n, status in enumerate(found):
        if n:
            print()
        _show(status)
    return EXIT_OK


def lookup(conn: sqlite3.Connection | None, index_path: Path, key: str
           ) -> list[dict[str, Any]]:
    """Every message `key` names (queue id, Message-ID or X-Invoice-Id), as plain data: what
    `status KEY` prints and `GET /api/messages/KEY` returns. `conn` is the delivery records
    (None: there are none yet, only the index is asked). Blocking: call it off the loop."""
    queued = _index_lookup(index_path, key)
    found = records.find(conn, key) if conn is not None else []
    return [_message(conn, index_path, queue_id)
            for queue_id in dict.fromkeys([*found, *queued])]


def as_json(status: dict[str, Any]) -> dict[str, Any]:
    """`status` with UTC ISO times (what the API sends)."""
    return {**status, "recipients": [
        {**r, "attempts": [{**a, "time": _when(a["time"])} for a in r["attempts"]]}
        for r in status["recipients"]]}


def _index_lookup(index_path: Path, key: str) -> list[str]:
    """Queue ids in the index by queue id or Message-ID: a message not attempted yet has no
    record. A missing or unreadable index only means nothing is found there."""
    if not index_path.exists():
        return []
    bare = key.strip()
    msgid = bare if bare.startswith("<") else f"<{bare}>"
    try:
        with _readonly(index_path) as idx:
            return [row[0] for row in idx.execute(
                "SELECT id FROM messages WHERE id = ? OR message_id = ? ORDER BY received",
                (bare.upper(), msgid))]
    except sqlite3.DatabaseError:
        return []


def _readonly(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30))


def _current(index_path: Path, queue_id: str) -> dict[int, tuple[str, str]]:
    """idx -> (recipient, state) from the index, for a message the queue still holds."""
    if not index_path.exists():
        return {}
    try:
        with _readonly(index_path) as idx:
            return {i: (rcpt, state) for i, rcpt, state in idx.execute(
                "SELECT idx, rcpt, state FROM recipients WHERE msg = ?", (queue_id,))}
    except sqlite3.DatabaseError:
        return {}


def _message(conn: sqlite3.Connection | None, index_path: Path, queue_id: str
             ) -> dict[str, Any]:
    head = (records.message(conn, queue_id) if conn is not None else None) or {}
    current = _current(index_path, queue_id)
    rows = records.attempts(conn, queue_id) if conn is not None else []
    sender = head.get("sender")
    if sender is None and rows:
        sender = rows[0]["sender"]
    by_rcpt: dict[int, list[dict[str, object]]] = {}
    for rec in rows:
        by_rcpt.setdefault(int(rec["idx"]), []).append(rec)  # type: ignore[call-overload]
    names = {i: rcpt for i, (rcpt, _) in current.items()}
    for i, recs in by_rcpt.items():
        names.setdefault(i, str(recs[0]["recipient"]))
    recipients = []
    for i in sorted(names):
        recs = by_rcpt.get(i, [])
        # The queue's state while it holds the message; afterwards the last record's.
        state = current[i][1] if i in current else str(recs[-1]["state"])
        attempts = [{k: v for k, v in rec.items() if k in _ATTEMPT_FIELDS} for rec in recs]
        recipients.append({"recipient": names[i], "state": state, "attempts": attempts})
    return {"queue_id": queue_id, "sender": sender, "message_id": head.get("message_id"),
            "invoice_id": head.get("invoice_id"), "recipients": recipients}


# Per attempt: the record without the message's facts (said once, above the recipients).
_ATTEMPT_FIELDS = ("time", "state", "attempted", "source", "host", "address", "reply", "tls",
                   "tls_cipher", "tls_verified", "dkim", "sha256")


def _show(status: dict[str, Any]) -> None:
    sender = status["sender"]
    print(f"queue id:   {status['queue_id']}")
    print(f"sender:     <{sender if sender is not None else '?'}>")
    print(f"message-id: {status['message_id'] or '-'}")
    print(f"invoice id: {status['invoice_id'] or '-'}")
    print("recipients:")
    for rcpt in status["recipients"]:
        print(f"  <{rcpt['recipient']}> {rcpt['state']}")
        if not rcpt["attempts"]:
            print("      no attempt yet")
        for rec in rcpt["attempts"]:
            _print_attempt(rec)


def _print_attempt(rec: dict[str, object]) -> None:
    remote = f"{rec['host'] or '-'} [{rec['address'] or '-'}]" if rec["attempted"] \
        else "(no connection)"
    print(f"      {_when(rec['time'])} {rec['state']} from {rec['source'] or '-'}"
          f" to {remote} {_tls(rec)}")
    print(f"        reply: {str(rec['reply'] or '-').replace(chr(10), ' / ')}")
    if rec["dkim"]:
        print(f"        dkim: {' '.join(rec['dkim'])}")  # type: ignore[arg-type]
    if rec["sha256"]:  # the bytes sent, as signed: with a 250 reply, the proof of delivery
        print(f"        sent sha256={rec['sha256']}")


def _tls(rec: dict[str, object]) -> str:
    if not rec["tls"]:
        return "tls=no"
    text = f"tls={rec['tls']}"
    if rec["tls_cipher"]:
        text += f" cipher={rec['tls_cipher']}"
    if rec["tls_verified"] is not None:
        text += f" verified={'yes' if rec['tls_verified'] else 'no'}"
    return text
