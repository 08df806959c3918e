"""Delivery records: every attempt and final outcome, kept apart from the queue index.

`<queue.path>/records.sqlite` holds, per message, its envelope facts (sender, Message-ID,
X-Invoice-Id) and, per recipient, one row per attempt or final outcome: time, source address,
remote host and address, the reply verbatim, TLS, DKIM selectors and the SHA-256 of the bytes
sent. It is what `invoice-relay status` reads and what proves a delivery long after the spool
and the index forgot the message: `queue rebuild` never touches it, and rows go only when they
are older than `[queue] retention`.

Why a database file of its own rather than rows in the index: the index is a work queue that
`queue rebuild` may replace, and it must stay small and fast for claims; records grow for a
year or more and are read by auditors. Why SQLite rather than per-day text files: `status KEY`
needs lookups by queue id, Message-ID and invoice id in milliseconds over a year of mail, and
pruning is a DELETE by time, not a rewrite.

Written only by the delivery process's index thread, and copied, not written twice: every
outcome is first a row of the index's `attempts` table, in the transaction that records it
(relay/queue/index.py); `copy_from_index` then copies the rows it has not copied yet, in one
INSERT ... SELECT inside SQLite, and remembers in `copied` up to which row of which index file
(its `meta` id) it got. Why not write both at once: an insert into these indexed tables costs
60-100 us of CPU per row in small batches (each commit rewrites every touched page into the
write-ahead log; the Message-ID index touches a random page per row) and about a third of
that in batches of hundreds, which a copy every second makes of a busy relay's outcomes
(relay/delivery/store.py decides when: at once when idle, before any segment removal, at a
stop, and under load every COPY_SECONDS or COPY_ROWS rows). Nothing is lost in between: the
rows wait in the index, which is durable on the same terms, and the delivery process copies
what is left when it starts (after a crash) and `queue rebuild` before it moves the old index
aside. Made durable before any spool segment is removed. Rows are keyed (queue id, recipient,
time, state), so a row copied twice is stored once.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.queue.index import INDEX_FILE

WAL_CHECKPOINT_PAGES = 64  # as the index's (relay/queue/index.py)

RECORDS_FILE = "records.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received REAL NOT NULL,
    message_id TEXT,
    invoice_id TEXT,
    last REAL NOT NULL          -- time of its newest record: retention counts from here
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_invoice_id ON messages(invoice_id);
CREATE INDEX IF NOT EXISTS messages_last ON messages(last);
CREATE TABLE IF NOT EXISTS attempts (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    recipient TEXT NOT NULL,
    time REAL NOT NULL,
    state TEXT NOT NULL,        -- the recipient's state after it (delivered, deferred, ...)
    attempted INTEGER NOT NULL, -- 0: a final outcome without a connection (expiry, DNS)
    source TEXT,                -- our address:port of the connection
    host TEXT,
    address TEXT,
    reply TEXT,
    tls TEXT,
    tls_cipher TEXT,
    tls_verified INTEGER,
    dkim TEXT,                  -- "d/selector" of each signature, space-separated
    sha256 TEXT,                -- of the bytes sent, when the data went out
    UNIQUE (queue_id, idx, time, state)
);
CREATE INDEX IF NOT EXISTS attempts_time ON attempts(time);
CREATE TABLE IF NOT EXISTS durable_mark (n INTEGER NOT NULL);
INSERT INTO durable_mark SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM durable_mark);
-- How far the rows of each queue index file (its meta id) are copied (copy_from_index).
CREATE TABLE IF NOT EXISTS copied (index_id TEXT PRIMARY KEY, upto INTEGER NOT NULL);
"""

# The fields of one exported or shown record, in column order (CSV header, JSON keys).
FIELDS = ("time", "queue_id", "message_id", "invoice_id", "sender", "recipient", "state",
          "attempted", "source", "host", "address", "reply", "tls", "tls_cipher",
          "tls_verified", "dkim", "sha256")

# From r_rows (open_readonly): one row per record with its message's facts, joined inside each
# arm of the view (a join of two UNION ALL views would make SQLite build one of them whole).
_SELECT = (
    "SELECT a.time, a.queue_id, a.message_id, a.invoice_id, a.sender, a.recipient, a.state,"
    " a.attempted, a.source, a.host, a.address, a.reply, a.tls, a.tls_cipher, a.tls_verified,"
    " a.dkim, a.sha256 FROM r_rows a")

_HEADER_LIMIT = 65536
_INVOICE_ID = re.compile(rb"(?im)^x-invoice-id:[ \t]*((?:[^\r\n]|\r\n[ \t])*)")


@dataclass(frozen=True, slots=True)
class Record:
    """One attempt or final outcome for one recipient."""

    queue_id: str
    idx: int
    recipient: str
    sender: str
    received: float
    message_id: str | None
    invoice_id: str | None
    state: str
    time: float
    attempted: bool
    source: str | None = None
    host: str | None = None
    address: str | None = None
    reply: str | None = None
    tls: str | None = None
    tls_cipher: str | None = None
    tls_verified: bool | None = None
    dkim: tuple[str, ...] = ()
    sha256: str | None = None


# The index's attempts rows (upto, last] as records. "WHERE ... ORDER BY" keeps the upsert's
# ON CONFLICT unambiguous after a SELECT (SQLite's parser needs a WHERE there).
_COPY_MESSAGES = (
    "INSERT INTO messages (queue_id, sender, received, message_id, invoice_id, last)"
    " SELECT a.msg, m.sender, m.received, m.message_id, a.invoice_id, a.time"
    " FROM idx.attempts a JOIN idx.messages m ON m.id = a.msg"
    " WHERE a.rowid > ? AND a.rowid <= ? ORDER BY a.rowid"
    " ON CONFLICT (queue_id) DO UPDATE SET last = MAX(last, excluded.last),"
    " message_id = COALESCE(message_id, excluded.message_id),"
    " invoice_id = COALESCE(invoice_id, excluded.invoice_id)")
_COPY_ATTEMPTS = (
    "INSERT OR IGNORE INTO attempts (queue_id, idx, recipient, time, state, attempted, source,"
    " host, address, reply, tls, tls_cipher, tls_verified, dkim, sha256)"
    " SELECT a.msg, a.idx, r.rcpt, a.time, a.outcome, COALESCE(a.attempted, 1), a.source,"
    " a.host, a.address, a.reply, a.tls, a.tls_cipher, a.tls_verified, a.dkim, a.sha256"
    " FROM idx.attempts a JOIN idx.recipients r ON r.msg = a.msg AND r.idx = a.idx"
    " WHERE a.rowid > ? AND a.rowid <= ?")


def copy_pending(index_path: Path, records_path: Path) -> int:
    """Copy what the index holds and the records do not yet (`queue rebuild`, before the old
    index is moved aside); how many rows. Raises sqlite3.Error on an unreadable index."""
    store = Records(records_path)
    try:
        store.attach_index(index_path)
        return store.copy_from_index()
    finally:
        store.close()


def invoice_id_of(data: bytes) -> str | None:
    """The message's X-Invoice-Id header (unfolded), read from its header block only."""
    end = data.find(b"\r\n\r\n", 0, _HEADER_LIMIT)
    head = data[:end + 2 if end >= 0 else _HEADER_LIMIT]
    match = _INVOICE_ID.search(head)
    if match is None:
        return None
    value = b" ".join(match.group(1).split()).decode("utf-8", "replace")
    return value or None


def open_records(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    # As the index: a short write-ahead log that is truncated back, so that on a nearly full
    # disk the records never hold megabytes the spool and the reserve need.
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit=1048576")
    conn.executescript(SCHEMA)
    return conn


class Records:
    """The writer's side (one thread: the delivery process's index thread)."""

    def __init__(self, path: Path) -> None:
        self.conn = open_records(path)
        self._index_id = ""  # of the index attached by attach_index

    def close(self) -> None:
        self.conn.close()

    def add(self, records: Sequence[Record]) -> None:
        """Store records directly, in one transaction (synchronous=NORMAL: see make_durable).
        The relay's outcomes arrive by copy_from_index; this is for records from elsewhere
        (older data to keep, tests)."""
        if not records:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT INTO messages (queue_id, sender, received, message_id, invoice_id, last)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (queue_id) DO UPDATE SET"
                " last = MAX(last, excluded.last),"
                " message_id = COALESCE(message_id, excluded.message_id),"
                " invoice_id = COALESCE(invoice_id, excluded.invoice_id)",
                [(r.queue_id, r.sender, r.received, r.message_id, r.invoice_id, r.time)
                 for r in records])
            self.conn.executemany(
                "INSERT OR IGNORE INTO attempts (queue_id, idx, recipient, time, state, attempted,"
                " source, host, address, reply, tls, tls_cipher, tls_verified, dkim, sha256)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.queue_id, r.idx, r.recipient, r.time, r.state, int(r.attempted), r.source,
                  r.host, r.address, r.reply, r.tls, r.tls_cipher,
                  None if r.tls_verified is None else int(r.tls_verified),
                  " ".join(r.dkim) or None, r.sha256) for r in records])
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def make_durable(self) -> None:
        """Everything committed so far is on disk (one small commit with synchronous=FULL
        syncs the write-ahead log, and so every commit before it): called before a spool
        segment is removed, so a record is on stable storage before what it describes goes."""
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            self.conn.execute("UPDATE durable_mark SET n = n + 1")
        finally:
            self.conn.execute("PRAGMA synchronous=NORMAL")

    def attach_index(self, index_path: Path) -> None:
        """Make the queue index readable as `idx` for `copy_from_index` (this connection only
        reads it: the index has one writer, the index thread's own connection)."""
        self.conn.execute("ATTACH DATABASE ? AS idx", (str(index_path),))
        if self.conn.execute("SELECT 1 FROM idx.sqlite_master WHERE name = 'meta'"
                             ).fetchone() is None:
            # An index of a release that wrote the records directly: nothing to copy from it.
            self.conn.execute("DETACH DATABASE idx")
            return
        self._index_id = self.conn.execute(
            "SELECT value FROM idx.meta WHERE key = 'id'").fetchone()[0]
        if self.conn.execute("SELECT 1 FROM copied WHERE index_id = ?",
                             (self._index_id,)).fetchone() is None:
            # An index these records never saw: a new (or rebuilt) one has no attempts yet; one
            # of a release that wrote records directly has them all here already.
            self.conn.execute("INSERT INTO copied SELECT ?, COALESCE(MAX(rowid), 0)"
                              " FROM idx.attempts", (self._index_id,))

    def copy_from_index(self) -> int:
        """Copy the attempts rows of the attached index not copied yet; how many."""
        if not self._index_id:
            return 0
        # Deferred: only the records are written; the index is only read (a snapshot).
        self.conn.execute("BEGIN")
        try:
            (upto,) = self.conn.execute("SELECT upto FROM copied WHERE index_id = ?",
                                        (self._index_id,)).fetchone()
            (last,) = self.conn.execute(
                "SELECT COALESCE(MAX(rowid), 0) FROM idx.attempts").fetchone()
            if last > upto:
                self.conn.execute(_COPY_MESSAGES, (upto, last))
                self.conn.execute(_COPY_ATTEMPTS, (upto, last))
                self.conn.execute("UPDATE copied SET upto = ? WHERE index_id = ?",
                                  (last, self._index_id))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return max(0, last - upto)

    def prune(self, before: float, limit: int = 5000) -> int:
        """Remove up to `limit` messages whose newest record is older than `before`, with
        their records; how many. Bounded, so the writer thread is never held for long."""
        self.conn.execute("BEGIN")  # not IMMEDIATE: that would lock the attached index too
        try:
            old = [row[0] for row in self.conn.execute(
                "SELECT queue_id FROM messages WHERE last < ? LIMIT ?", (before, limit))]
            self.conn.executemany("DELETE FROM attempts WHERE queue_id = ?",
                                  [(q,) for q in old])
            self.conn.executemany("DELETE FROM messages WHERE queue_id = ?",
                                  [(q,) for q in old])
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return len(old)


def records_problem(path: Path) -> str | None:
    """Why the delivery records cannot be written (None: fine, or created now): checked by
    `serve` before it starts, so a damaged file is a clear message and not a dead child."""
    try:
        Records(path).close()
    except sqlite3.DatabaseError as exc:
        return (f"{path}: the delivery records are unusable: {exc}; move the file aside to"
                " start a new one (keep it: it holds the proof of past deliveries)")
    return None


# --- readers (`invoice-relay status`): a read-only connection, the relay running or not ---


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection; sqlite3.Error when the file is missing or not a database.

    Its queries read the views `r_messages` and `r_attempts`: the records, plus the outcomes
    the queue index beside them holds and the delivery process has not copied yet (at most a
    fraction of a second's: a webhook receiver asking the API right after a `delivered` event
    sees the delivery)."""
    if not path.exists():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.execute("SELECT 1 FROM messages LIMIT 1").fetchall()  # fails on a damaged file
    pending = _attach_index_readonly(conn, path.parent / INDEX_FILE)
    conn.execute(f"CREATE TEMP VIEW r_attempts AS {_RECORDED_ATTEMPTS}"
                 + (f" UNION ALL {_PENDING_ATTEMPTS}" if pending else ""))
    conn.execute(f"CREATE TEMP VIEW r_messages AS {_RECORDED_MESSAGES}"
                 + (f" UNION ALL {_PENDING_MESSAGES}" if pending else ""))
    conn.execute(f"CREATE TEMP VIEW r_rows AS {_RECORDED_ROWS}"
                 + (f" UNION ALL {_PENDING_ROWS}" if pending else ""))
    return conn


def _attach_index_readonly(conn: sqlite3.Connection, index: Path) -> bool:
    """Attach the queue index as `idx` if it is there and copies to these records."""
    if not index.exists():
        return False
    try:
        conn.execute("ATTACH DATABASE ? AS idx", (f"file:{index}?mode=ro",))
        if conn.execute("SELECT 1 FROM idx.sqlite_master WHERE name = 'meta'").fetchone():
            return True
    except sqlite3.Error:  # damaged or being rebuilt: the records alone
        pass
    with contextlib.suppress(sqlite3.Error):
        conn.execute("DETACH DATABASE idx")
    return False


_RECORDED_ATTEMPTS = (
    "SELECT queue_id, idx, recipient, time, state, attempted, source, host, address, reply,"
    " tls, tls_cipher, tls_verified, dkim, sha256 FROM main.attempts")
_RECORDED_MESSAGES = (
    "SELECT queue_id, sender, received, message_id, invoice_id, last FROM main.messages")
# The index's attempts rows after the last copy (none when these records never copied from
# this index file).
_NOT_COPIED = ("a.rowid > (SELECT upto FROM main.copied"
               " WHERE index_id = (SELECT value FROM idx.meta WHERE key = 'id'))")
_PENDING_ATTEMPTS = (
    "SELECT a.msg, a.idx, r.rcpt, a.time, a.outcome, COALESCE(a.attempted, 1), a.source,"
    " a.host, a.address, a.reply, a.tls, a.tls_cipher, a.tls_verified, a.dkim, a.sha256"
    " FROM idx.attempts a JOIN idx.recipients r ON r.msg = a.msg AND r.idx = a.idx"
    f" WHERE {_NOT_COPIED}")
# The LIMIT keeps SQLite from flattening the subquery into the GROUP BY, which would read every
# attempts row in msg order instead of the few after the last copy.
_PENDING_MESSAGES = (
    "SELECT a.msg, m.sender, m.received, m.message_id, MAX(a.invoice_id), MAX(a.time)"
    " FROM (SELECT msg, invoice_id, time FROM idx.attempts a"
    f" WHERE {_NOT_COPIED} LIMIT -1) a"
    " JOIN idx.messages m ON m.id = a.msg"
    " WHERE NOT EXISTS (SELECT 1 FROM main.messages x WHERE x.queue_id = a.msg) GROUP BY a.msg")
_RECORDED_ROWS = (
    "SELECT a.time AS time, a.queue_id AS queue_id, m.message_id AS message_id,"
    " m.invoice_id AS invoice_id, m.sender AS sender, a.recipient AS recipient,"
    " a.state AS state, a.attempted AS attempted, a.source AS source, a.host AS host,"
    " a.address AS address, a.reply AS reply, a.tls AS tls, a.tls_cipher AS tls_cipher,"
    " a.tls_verified AS tls_verified, a.dkim AS dkim, a.sha256 AS sha256, a.idx AS idx"
    " FROM main.attempts a JOIN main.messages m ON m.queue_id = a.queue_id")
_PENDING_ROWS = (
    "SELECT a.time, a.msg, m.message_id, a.invoice_id, m.sender, r.rcpt, a.outcome,"
    " COALESCE(a.attempted, 1), a.source, a.host, a.address, a.reply, a.tls, a.tls_cipher,"
    " a.tls_verified, a.dkim, a.sha256, a.idx"
    " FROM idx.attempts a JOIN idx.recipients r ON r.msg = a.msg AND r.idx = a.idx"
    f" JOIN idx.messages m ON m.id = a.msg WHERE {_NOT_COPIED}")


def find(conn: sqlite3.Connection, key: str) -> list[str]:
    """Queue ids whose queue id, Message-ID (with or without <>) or X-Invoice-Id is `key`."""
    bare = key.strip()
    msgid = bare if bare.startswith("<") else f"<{bare}>"
    rows = conn.execute(
        "SELECT queue_id FROM r_messages WHERE queue_id = ? OR message_id = ? OR invoice_id = ?"
        " ORDER BY received", (bare.upper(), msgid, bare))
    return [row[0] for row in rows]


def message(conn: sqlite3.Connection, queue_id: str) -> dict[str, object] | None:
    row = conn.execute("SELECT sender, received, message_id, invoice_id FROM r_messages"
                       " WHERE queue_id = ?", (queue_id,)).fetchone()
    if row is None:
        return None
    return dict(zip(("sender", "received", "message_id", "invoice_id"), row, strict=True))


def attempts(conn: sqlite3.Connection, queue_id: str) -> list[dict[str, object]]:
    """Every record of one message, by recipient (`idx`, its place in the envelope) and time."""
    select = _SELECT.replace(" FROM", ", a.idx FROM", 1)
    rows = conn.execute(f"{select} WHERE a.queue_id = ? ORDER BY a.idx, a.time", (queue_id,))
    return [{**_as_dict(row[:-1]), "idx": row[-1]} for row in rows]


def between(conn: sqlite3.Connection, start: float, end: float
            ) -> Iterator[dict[str, object]]:
    """Records with start <= time < end, in time order (streamed: an export may be large)."""
    for row in conn.execute(f"{_SELECT} WHERE a.time >= ? AND a.time < ?"
                            " ORDER BY a.time, a.queue_id, a.idx", (start, end)):
        yield _as_dict(row)


OUTCOMES = ("delivered", "deferred", "bounced")  # what the status page charts
# Our address without the port: "192.0.2.1:40312" -> "192.0.2.1", "[2001:db8::1]:40312" ->
# "[2001:db8::1]" (the inner rtrim stops at the port's colon, the outer removes it).
_SOURCE_ADDRESS = "rtrim(rtrim(a.source, '0123456789'), ':')"


def outcomes_since(conn: sqlite3.Connection, start: float, bucket: float
                   ) -> list[tuple[int, str, str, int]]:
    """(bucket number from `start`, recipient domain, state, count) of the delivered,
    deferred and bounced records since `start`: the status page's last hour. Aggregated in
    SQLite over the time index, so a busy hour costs one range scan, not a row per record."""
    marks = ",".join("?" * len(OUTCOMES))
    return conn.execute(
        "SELECT CAST((a.time - ?) / ? AS INTEGER),"
        " lower(substr(a.recipient, instr(a.recipient, '@') + 1)), a.state, COUNT(*)"
        f" FROM r_attempts a WHERE a.time >= ? AND a.state IN ({marks}) GROUP BY 1, 2, 3",
        (start, bucket, start, *OUTCOMES)).fetchall()


def sources_since(conn: sqlite3.Connection, start: float
                  ) -> list[tuple[str, dict[str, int], str, float]]:
    """Per source address (without its port) that made attempts since `start`: its counts by
    state, the state after its latest attempt and that attempt's time."""
    counts: dict[str, dict[str, int]] = {}
    for address, state, n in conn.execute(
            f"SELECT {_SOURCE_ADDRESS}, a.state, COUNT(*) FROM r_attempts a"
            " WHERE a.time >= ? AND a.source IS NOT NULL GROUP BY 1, 2", (start,)):
        counts.setdefault(address, {})[state] = n
    # SQLite's bare columns beside MAX(): the state of the row with the latest time.
    latest = conn.execute(
        f"SELECT {_SOURCE_ADDRESS}, a.state, MAX(a.time) FROM r_attempts a"
        " WHERE a.time >= ? AND a.source IS NOT NULL GROUP BY 1", (start,)).fetchall()
    return [(address, counts.get(address, {}), state, when) for address, state, when in latest]


def _as_dict(row: tuple) -> dict[str, object]:
    record = dict(zip(FIELDS, row, strict=True))
    record["attempted"] = bool(record["attempted"])
    if record["tls_verified"] is not None:
        record["tls_verified"] = bool(record["tls_verified"])
    record["dkim"] = str(record["dkim"]).split() if record["dkim"] else []
    return record


# --- `queue rebuild`: what the records know that the spool does not -----------------------

FINAL = ("delivered", "bounced", "expired", "deleted")


def apply_recorded_finals(index_path: Path, records_path: Path) -> int:
    """In a rebuilt index, make final every recipient whose latest record is final (the spool
    still holds a message until its whole segment is done); how many. Without this, a
    rebuild would queue delivered invoices again."""
    from relay.queue.index import Index  # the index imports nothing of this module

    if not records_path.exists():
        return 0
    index = Index(index_path)
    try:
        conn = open_readonly(records_path)
    except sqlite3.DatabaseError:
        index.close()
        return 0
    count = 0
    try:
        pending = [row[0] for row in index.conn.execute(
            "SELECT id FROM messages WHERE done IS NULL")]
        for start in range(0, len(pending), 500):
            chunk = pending[start:start + 500]
            marks = ",".join("?" * len(chunk))
            latest: dict[str, dict[int, str]] = {}
            for queue_id, idx, state in conn.execute(
                    f"SELECT queue_id, idx, state FROM attempts WHERE queue_id IN ({marks})"
                    " ORDER BY time", chunk):
                latest.setdefault(queue_id, {})[idx] = state
            for queue_id, states in latest.items():
                finals = {i: s for i, s in states.items() if s in FINAL}
                if finals:
                    index.apply_finals(queue_id, finals, time.time())
                    count += len(finals)
    finally:
        conn.close()
        index.close()
    return count
