"""`invoice-relay queue ...`: look into the queue and repair its index (read-mostly tools)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.config import Config, load_or_report
from relay.exitcodes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE
from relay.queue.envelope import ACTIVE, DEFERRED, FINAL_STATES, HOLD, QUEUED, UNKNOWN
from relay.queue.index import FINAL_SQL, INDEX_FILE
from relay.queue.operator import VERBS
from relay.queue.records import RECORDS_FILE, apply_recorded_finals, copy_pending
from relay.queue.recovery import recover
from relay.queue.segments import Location, SegmentCorrupt, read_at

SUMMARY_STATES = (QUEUED, ACTIVE, DEFERRED, UNKNOWN, HOLD)


def queue_command(cli_config: str | None, args: argparse.Namespace) -> int:
    config = load_or_report(cli_config)
    if config is None:
        return EXIT_PROBLEM
    root = config.queue.path
    if args.queue_verb == "rebuild":
        return _rebuild(config, force=getattr(args, "force", False))
    db = root / INDEX_FILE
    if not db.exists():
        hint = ("if mail was queued here, run `invoice-relay queue rebuild`"
                if (root / "spool").is_dir() else "nothing was ever queued here?")
        print(f"{db}: no queue index ({hint})", file=sys.stderr)
        return EXIT_PROBLEM
    if args.queue_verb in VERBS:
        from relay.ops.queuectl import control_command

        return control_command(config, args)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        if args.queue_verb == "list":
            return _list(conn, args)
        if args.queue_verb == "summary":
            return _summary(conn, args.json)
        if args.queue_verb == "show":
            return _show(conn, root / "spool", args.id)
    except sqlite3.DatabaseError as exc:
        transient = isinstance(exc, sqlite3.OperationalError)  # e.g. locked: try again
        hint = "" if transient else "; stop the relay and run `invoice-relay queue rebuild`"
        print(f"{db}: cannot read the queue index: {exc}{hint}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        conn.close()
    return EXIT_USAGE


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def _list(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    """One line per recipient, in queue id order; by default those not final yet."""
    rows = list_rows(conn, args.state, args.domain, args.limit, max(args.offset, 0))
    printed = 0
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            if not printed:
                print(f"{'QUEUE ID':22}  {'STATE':9}  {'ATTEMPTS':>8}  {'NEXT ATTEMPT':20}"
                      "  RECIPIENT / LAST RESPONSE")
            last = " / ".join((row["last_response"] or "-").splitlines())
            print(f"{row['queue_id']:22}  {row['state']:9}  {row['attempts']:>8}"
                  f"  {row['next_attempt'] or '-':20}  <{row['recipient']}>")
            print(f"{'':22}  {'':9}  {'':>8}  {'':20}  {last}")
        printed += 1
    if not printed and not args.json:
        print("queue is empty" if not (args.state or args.domain or args.offset)
              else "no recipient matches")
    return EXIT_OK


def list_rows(conn: sqlite3.Connection, state: str | None, domain: str | None,
              limit: int | None, offset: int = 0) -> Iterator[dict[str, object]]:
    """The rows of `queue list` (and `GET /api/queue`): one per recipient, in queue id order,
    by default those not final yet; `limit` None = all. Streamed (a queue may hold millions);
    blocking: call it off the loop."""
    where, params = _filters(state, domain)
    params += [limit if limit is not None else -1, offset]
    rows = conn.execute(
        "SELECT msg, state, rcpt, attempts, next_attempt, last_reply FROM recipients"
        f" WHERE {where} ORDER BY msg, idx LIMIT ? OFFSET ?", params)
    for msg, st, rcpt, attempts, next_at, reply in rows:
        pending = st not in FINAL_STATES and st != HOLD
        yield {"queue_id": msg, "state": st, "recipient": rcpt, "attempts": attempts,
               "next_attempt": _when(next_at) if pending else None, "last_response": reply}


def _filters(state: str | None, domain: str | None) -> tuple[str, list[object]]:
    where, params = [], []
    if state:
        where.append("state = ?")
        params.append(state)
    else:
        where.append(f"state NOT IN {FINAL_SQL}")
    if domain:
        where.append("domain = ?")
        params.append(domain.lower())
    return " AND ".join(where), params


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts of recipients not final yet, by state and by domain (most first, as a list of
    (domain, {state: n})), and the age of the oldest message that has one: what `queue
    summary` prints and the status page shows. Blocking: call it off the loop."""
    by_state = dict(conn.execute(
        f"SELECT state, COUNT(*) FROM recipients WHERE state NOT IN {FINAL_SQL}"
        " GROUP BY state").fetchall())
    by_domain: dict[str, dict[str, int]] = {}
    for domain, st, n in conn.execute(
            f"SELECT domain, state, COUNT(*) FROM recipients WHERE state NOT IN {FINAL_SQL}"
            " GROUP BY domain, state"):
        by_domain.setdefault(domain, {})[st] = n
    oldest = conn.execute("SELECT MIN(received) FROM messages WHERE done IS NULL").fetchone()[0]
    age = max(0, int(time.time() - oldest)) if oldest is not None else None
    ranked = sorted(by_domain.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return {"total": sum(by_state.values()), "by_state": by_state, "oldest_age_seconds": age,
            "by_domain": ranked}


def _summary(conn: sqlite3.Connection, as_json: bool) -> int:
    """Postfix's qshape, without the age buckets."""
    found = summary(conn)
    total, by_state, age, ranked = (found["total"], found["by_state"],
                                    found["oldest_age_seconds"], found["by_domain"])
    if as_json:
        print(json.dumps({"total": total, "by_state": by_state, "oldest_age_seconds": age,
                          "by_domain": {d: {"total": sum(c.values()), **c} for d, c in ranked}},
                         ensure_ascii=False))
        return EXIT_OK
    if not total:
        print("queue is empty")
        return EXIT_OK
    states = [s for s in SUMMARY_STATES if s in by_state]
    print(f"{total} recipients queued; oldest message {age_text(age)} old")
    print(f"{'DOMAIN':32} {'TOTAL':>8}" + "".join(f" {s.upper():>9}" for s in states))
    for domain, counts in [("TOTAL", by_state), *ranked]:
        print(f"{domain:32} {sum(counts.values()):>8}"
              + "".join(f" {counts.get(s, 0):>9}" for s in states))
    return EXIT_OK


def age_text(seconds: int | None) -> str:
    """`3d4h`, `2h5m`, `7m`, `42s`."""
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def _show(conn: sqlite3.Connection, spool_dir: Path, queue_id: str) -> int:
    msg = conn.execute("SELECT id, sender, received, expires, size, message_id, client, auth,"
                       " body, smtputf8, done, segment, offset FROM messages WHERE id = ?",
                       (queue_id,)).fetchone()
    if msg is None:
        print(f"{queue_id}: no such message", file=sys.stderr)
        return EXIT_PROBLEM
    (_, sender, received, expires, size, message_id, client, auth, body, utf8, done, segment,
     offset) = msg
    print(f"queue id:   {queue_id}")
    print(f"sender:     <{sender}>")
    print(f"received:   {_when(received)} from {client or '-'}"
          f"{' (auth ' + auth + ')' if auth else ''}")
    print(f"size:       {size}  body={body or '7BIT'}  smtputf8={'yes' if utf8 else 'no'}")
    print(f"message-id: {message_id or '-'}")
    print(f"priority:   {_priority(conn, queue_id)}")
    print(f"expires:    {_when(expires)}" + (f"  (done {_when(done)})" if done else ""))
    print("headers:")
    try:
        if segment is None:
            raise SegmentCorrupt("no segment")
        data = read_at(spool_dir, Location(segment, offset, min(size, 65536)))
        end = data.find(b"\r\n\r\n")
        head = data[: end if end >= 0 else 8192]
        for line in head.decode("utf-8", "replace").split("\r\n"):
            print(f"  {line}")
    except (OSError, SegmentCorrupt):
        print("  (spool segment gone: the message is finished)")
    print("recipients:")
    # An index the relay has not opened since a column was added (read-only here).
    present = {row[1] for row in conn.execute("PRAGMA table_info(attempts)")}
    extra = ", ".join(c if c in present else "NULL"
                      for c in ("sha256", "tls_cipher", "tls_verified", "source"))
    for idx, rcpt, state, attempts, next_at, reply, host in conn.execute(
            "SELECT idx, rcpt, state, attempts, next_attempt, last_reply, last_host"
            " FROM recipients WHERE msg = ? ORDER BY idx", (queue_id,)):
        nxt = f" next={_when(next_at)}" if state not in FINAL_STATES else ""
        print(f"  [{idx}] <{rcpt}> {state} attempts={attempts}{nxt} host={host or '-'}")
        if reply:
            print(f"      last reply: {reply.replace(chr(10), ' / ')}")
        for (t, outcome, a_host, address, a_reply, tls, sha256, cipher, verified,
             source) in conn.execute(
                f"SELECT time, outcome, host, address, reply, tls, {extra} FROM attempts"
                " WHERE msg = ? AND idx = ? ORDER BY time", (queue_id, idx)):
            via = f" from {source}" if source else ""
            print(f"      {_when(t)} {outcome} {a_host or '-'} {address or ''}{via}"
                  f" {_tls_summary(tls, cipher, verified)}:"
                  f" {(a_reply or '').replace(chr(10), ' / ')}")
            if sha256:  # proof of delivery: the SHA-256 of the bytes sent (as signed)
                print(f"        sent sha256={sha256}")
    return EXIT_OK


def _priority(conn: sqlite3.Connection, queue_id: str) -> str:
    """The message's delivery priority (kept per recipient; the same for all of them)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(recipients)")}
    if "priority" not in columns:  # an index the relay has not opened since it was added
        return "normal"
    row = conn.execute("SELECT priority FROM recipients WHERE msg = ? LIMIT 1",
                       (queue_id,)).fetchone()
    return (row[0] if row is not None else None) or "normal"


def _tls_summary(version: str | None, cipher: str | None, verified: int | None) -> str:
    """`tls=TLSv1.3 cipher=... verified=yes`, or `tls=no` for plain text."""
    if not version:
        return "tls=no"
    text = f"tls={version}"
    if cipher:
        text += f" cipher={cipher}"
    if verified is not None:  # NULL: recorded before the relay kept it
        text += f" verified={'yes' if verified else 'no'}"
    return text


def _rebuild(config: Config, *, force: bool = False) -> int:
    """Move the damaged index aside and rebuild it from the spool segments.

    The delivery records (records.sqlite) first get the outcomes only the old index holds
    and lose nothing; recipients they show as final stay final in the new index, so a
    rebuild never sends a delivered invoice again."""
    root = config.queue.path
    if not (root / "spool").is_dir():
        print(f"{root}: no spool folder", file=sys.stderr)
        return EXIT_PROBLEM
    db = root / INDEX_FILE
    problem = _index_problem(db)
    if problem is None and not force:
        print(f"{db}: the queue index is healthy; `queue rebuild` is for a lost or damaged"
              " index (add --force to rebuild it anyway)", file=sys.stderr)
        return EXIT_PROBLEM
    with open(root / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{root}: the relay is running; stop it before `queue rebuild`",
                  file=sys.stderr)
            return EXIT_PROBLEM
        db = root / INDEX_FILE
        _copy_outcomes(db, root / RECORDS_FILE)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{db}{suffix}")
            if old.exists():
                old.rename(Path(f"{db}.broken-{stamp}{suffix}"))
        report = recover(root, db, max_lifetime=config.queue.max_lifetime,
                         segment_size=config.queue.segment_size)
        final = apply_recorded_finals(db, root / RECORDS_FILE)
        _give_to_queue_owner(root)
    print(f"rebuilt {db}: {report.reindexed} messages from the spool segments,"
          f" {report.removed_incomplete} incomplete streamed messages removed,"
          f" {report.corrupt} damaged records skipped,"
          f" {final} recipients final according to the delivery records")
    return EXIT_OK


def _copy_outcomes(db: Path, records: Path) -> None:
    """Outcomes the old index holds and the delivery records do not yet (a relay killed
    within a second of recording them): copied before the index is moved aside."""
    if not db.exists():
        return
    try:
        copied = copy_pending(db, records)
    except sqlite3.Error as exc:  # a damaged index: what it alone held cannot be read
        print(f"{db}: could not copy its latest outcomes into the delivery records: {exc}",
              file=sys.stderr)
        return
    if copied:
        print(f"copied {copied} outcomes from the old index into the delivery records")


def _index_problem(db: Path) -> str | None:
    """Why the index needs a rebuild, or None when it looks healthy."""
    if not db.exists():
        return "missing"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            (check,) = conn.execute("PRAGMA quick_check").fetchone()
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if check != "ok":
        return str(check)
    missing = {"messages", "recipients", "segments"} - tables
    return f"tables missing: {', '.join(sorted(missing))}" if missing else None


def _give_to_queue_owner(root: Path) -> None:
    """Run as root (as operators do), a rebuild would leave a root-owned index the service
    user cannot open: hand what it created to the owner of the queue folder."""
    owner = root.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    for path in [*root.glob("index.sqlite*"), root / "lock"]:
        if path.exists() and path.stat().st_uid != owner.st_uid:
            os.chown(path, owner.st_uid, owner.st_gid)
