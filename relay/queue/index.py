"""The SQLite queue index: which recipient is in which state, when to try it next, every attempt,
where each message's bytes are, and which spool segments are still needed.

One writer for the whole relay: the delivery process, on one thread (startup recovery and the
`queue` commands of a stopped relay write while no delivery process runs). Intake never waits
for the index: a message is durable in its segment before the 250, and indexed from the notice
that follows. Each segment row remembers how far its records are indexed (`indexed_upto`, in
the same transaction as the rows), so startup recovery reads only what was never indexed.

Commits are synchronous=NORMAL: a commit is in the write-ahead log (and so survives a killed
process) at once, without waiting for a disk sync; a power cut may take back the last commits,
never more than the log since its last checkpoint. Anything that relies on final states being
on disk first calls `make_durable` (a segment is removed only after that: it could not tell
the index again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from relay.addresses import domain_of
from relay.queue.envelope import (
    ACTIVE,
    DEFERRED,
    FINAL_STATES,
    NORMAL,
    PENDING_STATES,
    QUEUED,
    UNKNOWN,
    State,
)
from relay.queue.notices import Committed
from relay.queue.segments import Location

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received REAL NOT NULL,
    expires REAL NOT NULL,
    size INTEGER NOT NULL,
    message_id TEXT,
    client TEXT,
    auth TEXT,
    body TEXT,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    done REAL,
    segment TEXT,
    offset INTEGER
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_segment ON messages(segment);
-- A row make_durable() updates, so that it has something to commit with a sync.
CREATE TABLE IF NOT EXISTS durable_mark (n INTEGER NOT NULL);
INSERT INTO durable_mark SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM durable_mark);
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    messages INTEGER NOT NULL DEFAULT 0,      -- indexed messages in it
    finished INTEGER NOT NULL DEFAULT 0,      -- of which all recipients are final
    sealed INTEGER NOT NULL DEFAULT 0,        -- no writer appends to it any more
    indexed_upto INTEGER NOT NULL DEFAULT 0   -- records before this offset are indexed
);
CREATE TABLE IF NOT EXISTS recipients (
    msg TEXT NOT NULL,
    idx INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT,
    last_host TEXT,
    updated REAL NOT NULL,
    priority TEXT,  -- 'high' or 'bulk'; NULL is normal (most rows: it then takes no space)
    UNIQUE (msg, idx)
);
-- Finding due work reads only pending rows, in time order: no scan over delivered history.
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt)
    WHERE state IN ('queued', 'deferred', 'unknown');
-- Due high-priority rows, claimed before older mail: usually empty, so that costs one probe.
CREATE INDEX IF NOT EXISTS recipients_due_high ON recipients(next_attempt)
    WHERE state IN ('queued', 'deferred', 'unknown') AND priority = 'high';
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(domain, state);
-- Releasing claimed recipients (each start, each graceful stop) reads only those.
CREATE INDEX IF NOT EXISTS recipients_active ON recipients(state) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS attempts (
    msg TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    host TEXT,
    address TEXT,
    reply TEXT,
    tls TEXT,
    sha256 TEXT,  -- of the bytes sent (as signed), when the data went out: proof of delivery
    tls_cipher TEXT,
    tls_verified INTEGER,  -- 1: chain and host name checked; 0: not; NULL: plain text
    source TEXT,  -- the outbound address it left from; NULL: the kernel's choice (or none tried)
    -- For the delivery records only, which are copied from these rows (relay/queue/records.py):
    attempted INTEGER,  -- 0: no connection was tried (expiry, DNS failure)
    dkim TEXT,          -- "d/selector" of each signature of the bytes sent, space-separated
    invoice_id TEXT     -- the message's X-Invoice-Id header
);
CREATE INDEX IF NOT EXISTS attempts_msg ON attempts(msg, idx);
-- This index file's identity: the delivery records remember up to which attempts row they
-- copied from which index (a rebuilt index starts its rows from 1 again).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('id', lower(hex(randomblob(8))));
-- Delivery events waiting for their webhook (relay/queue/outbox.py): written in the transaction
-- of the outcome that caused them, deleted once the receiver answered 2xx.
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,       -- the [[sender]] domain whose webhook receives it
    body BLOB NOT NULL,         -- exactly the bytes POSTed and signed
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt);
"""



def sql_list(states: Sequence[State]) -> str:
    """`('a', 'b')` for `state IN ...`: spelled as the partial indexes' WHERE clauses spell it,
    which SQLite needs to match a query to a partial index."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


PENDING_SQL = sql_list(PENDING_STATES)   # ('queued', 'deferred', 'unknown')
FINAL_SQL = sql_list(FINAL_STATES)
INDEX_FILE = "index.sqlite"  # in the queue folder
WAL_CHECKPOINT_PAGES = 64
WRITER_CACHE_KIB = 64 * 1024
FORGET_WINDOW = 20_000  # messages rows looked at per forget_finished call


@dataclass(frozen=True, slots=True)
class DueRecipient:
    msg: str
    idx: int
    rcpt: str
    domain: str
    attempts: int
    sender: str
    received: float
    expires: float
    body: str | None
    smtputf8: bool
    location: Location | None = None  # None only for a message the index lost track of
    priority: str = NORMAL  # high | normal | bulk


@dataclass(frozen=True, slots=True)
class SegmentRow:
    messages: int
    finished: int
    sealed: bool
    indexed_upto: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt for one recipient, as the delivery process records it."""

    msg: str
    idx: int
    state: str              # delivered | deferred | unknown | bounced | expired
    time: float
    next_attempt: float     # ignored for final states
    reply: str | None
    host: str | None = None
    address: str | None = None
    tls: str | None = None
    sha256: str | None = None  # of the bytes sent, when the data went out
    tls_cipher: str | None = None
    tls_verified: bool | None = None  # None: plain text (or no connection)
    attempted: bool = True  # False when no connection was tried (e.g. expiry, DNS failure)
    # For the delivery records (relay/queue/records.py), copied from the index's attempts:
    source: str | None = None          # our address:port of the connection
    dkim: tuple[str, ...] = ()         # "d/selector" per DKIM signature of the bytes sent
    invoice_id: str | None = None      # the message's X-Invoice-Id header
    # Whether `reply` is the remote server's text (False: the relay's own, e.g. a connect
    # error): a DSN names the host that "said" it only then.
    remote: bool = False


def _stored_priority(priority: str) -> str | None:
    """The recipients.priority column: NULL for normal."""
    return None if priority == NORMAL else priority


def open_db(path: Path) -> sqlite3.Connection:
    """Open the index on this thread: WAL, NORMAL sync, a busy timeout for readers."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.enable_wal()
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    # A small write-ahead log: a checkpoint every 256 KiB, and a log trimmed back to 1 MiB,
    # so that on a full disk the emergency reserve lets it cycle (relay.queue.space).
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit=1048576")
    # The delivery process's writer reads the index's hot pages (due recipients, the latest
    # messages, their segments) on every batch; SQLite's default page cache (2 MiB) holds a
    # few thousand messages' rows, so a busy queue re-read them from the OS with a system
    # call per page. 64 MiB is enough for the hot part of a queue of about a million.
    conn.execute(f"PRAGMA cache_size={-WRITER_CACHE_KIB}")
    _upgrade(conn)
    conn.executescript(SCHEMA)
    return conn


def _upgrade(conn: sqlite3.Connection) -> None:
    """Columns added since the first release (an index of per-message spool files)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if columns and "segment" not in columns:
        conn.execute("ALTER TABLE messages ADD COLUMN segment TEXT")
        conn.execute("ALTER TABLE messages ADD COLUMN offset INTEGER")
    attempts = {row[1] for row in conn.execute("PRAGMA table_info(attempts)")}
    if attempts and "sha256" not in attempts:
        conn.execute("ALTER TABLE attempts ADD COLUMN sha256 TEXT")
    if attempts and "tls_cipher" not in attempts:
        conn.execute("ALTER TABLE attempts ADD COLUMN tls_cipher TEXT")
        conn.execute("ALTER TABLE attempts ADD COLUMN tls_verified INTEGER")
    if attempts and "source" not in attempts:
        conn.execute("ALTER TABLE attempts ADD COLUMN source TEXT")
    if attempts and "attempted" not in attempts:
        conn.execute("ALTER TABLE attempts ADD COLUMN attempted INTEGER")
        conn.execute("ALTER TABLE attempts ADD COLUMN dkim TEXT")
        conn.execute("ALTER TABLE attempts ADD COLUMN invoice_id TEXT")
    recipients = {row[1] for row in conn.execute("PRAGMA table_info(recipients)")}
    if recipients and "priority" not in recipients:
        conn.execute("ALTER TABLE recipients ADD COLUMN priority TEXT")


class Index:
    def __init__(self, path: Path) -> None:
        self.conn = open_db(path)

    def close(self) -> None:
        self.conn.close()

    # --- new messages ---------------------------------------------------------------------

    def add(self, messages: Sequence[Committed], max_lifetime: float, *,
            claimed: bool = False) -> None:
        """Index messages made durable in their segments, in one transaction. `claimed`: the
        delivery process is handing them to connections right away (state 'active')."""
        with self._transaction():
            self.add_in_transaction(messages, max_lifetime, claimed=claimed)

    def add_in_transaction(self, messages: Sequence[Committed], max_lifetime: float, *,
                           claimed: bool = False) -> None:
        state = ACTIVE if claimed else QUEUED
        by_segment: dict[str, list[Committed]] = {}
        for c in messages:
            by_segment.setdefault(c.location.segment, []).append(c)
        for segment, group in by_segment.items():
            inserted = self.conn.executemany(
                "INSERT OR IGNORE INTO messages (id, sender, received, expires, size, message_id,"
                " client, auth, body, smtputf8, segment, offset) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(c.envelope.id, c.envelope.sender, c.envelope.received,
                  c.envelope.received + max_lifetime, c.location.length, c.envelope.message_id,
                  c.envelope.client, c.envelope.auth, c.envelope.body, int(c.envelope.smtputf8),
                  segment, c.location.offset) for c in group]).rowcount
            self.conn.executemany(
                "INSERT OR IGNORE INTO recipients (msg, idx, rcpt, domain, state, next_attempt,"
                " updated, priority) VALUES (?,?,?,?,?,?,?,?)",
                [(c.envelope.id, i, rcpt, domain_of(rcpt), state, c.envelope.received,
                  c.envelope.received, _stored_priority(c.envelope.priority))
                 for c in group for i, rcpt in enumerate(c.envelope.recipients)])
            end = max(c.location.offset + c.location.length for c in group)
            self.conn.execute(
                "INSERT INTO segments (name, messages, indexed_upto) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET messages = messages + excluded.messages,"
                " indexed_upto = MAX(indexed_upto, excluded.indexed_upto)",
                (segment, max(inserted, 0), end))

    # --- delivery -------------------------------------------------------------------------

    def claim_due(self, now: float, limit: int) -> list[DueRecipient]:
        """Move up to `limit` due recipients to 'active' and return them with their envelope.

        Due high-priority recipients come first, whatever waited longer: under a backlog an
        urgent invoice must not queue behind a bulk run in the index before delivery can
        put it first. They take at most nine tenths of a batch, so older mail still moves."""
        with self._transaction():
            claimed = self._claim(now, max(1, limit * 9 // 10), " AND priority = 'high'")
            if len(claimed) < limit:
                claimed += self._claim(now, limit - len(claimed), "")
            if not claimed:
                return []
            envelopes = self._envelopes({row[0] for row in claimed})
        due = []
        for msg, idx, rcpt, domain, attempts, priority in claimed:
            sender, received, expires, body, utf8, segment, offset, size = envelopes[msg]
            location = Location(segment, offset, size) if segment is not None else None
            due.append(DueRecipient(msg, idx, rcpt, domain, attempts, sender, received, expires,
                                    body, bool(utf8), location, priority or NORMAL))
        due.sort(key=lambda d: (d.msg, d.idx))
        return due

    def _claim(self, now: float, limit: int, only: str) -> list[tuple]:
        return self.conn.execute(
            f"UPDATE recipients SET state = '{ACTIVE}', updated = ? WHERE rowid IN ("
            f" SELECT rowid FROM recipients WHERE state IN {PENDING_SQL}{only}"
            "  AND next_attempt <= ? ORDER BY next_attempt LIMIT ?)"
            " RETURNING msg, idx, rcpt, domain, attempts, priority",
            (now, now, limit)).fetchall()

    def _envelopes(self, ids: Iterable[str]) -> dict[str, tuple]:
        return self._rows(
            "sender, received, expires, body, smtputf8, segment, offset, size", ids)

    def message_ids(self, ids: Iterable[str]) -> dict[str, str]:
        """The Message-ID header of each of these messages that has one."""
        return {msg: mid for msg, (mid,) in self._rows("message_id", ids).items()
                if mid is not None}

    def _rows(self, columns: str, ids: Iterable[str]) -> dict[str, tuple]:
        ids = list(ids)
        found: dict[str, tuple] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                    f"SELECT id, {columns} FROM messages WHERE id IN ({marks})", chunk):
                found[row[0]] = row[1:]
        return found

    def next_due(self) -> float | None:
        row = self.conn.execute(
            f"SELECT MIN(next_attempt) FROM recipients WHERE state IN {PENDING_SQL}").fetchone()
        return row[0]

    def record(self, outcomes: Sequence[Outcome], *, dsns: Sequence[Committed] = (),
               max_lifetime: float = 0.0) -> tuple[list[str], list[str]]:
        """Store outcomes and attempts, and index the DSNs they caused, in one transaction.

        Returns (ids of messages that became fully final, segments that may now be removed:
        sealed, and every message in them final)."""
        with self._transaction():
            if dsns:
                self.add_in_transaction(dsns, max_lifetime)
            return self.record_in_transaction(outcomes)

    def record_in_transaction(self, outcomes: Sequence[Outcome]) -> tuple[list[str], list[str]]:
        if not outcomes:
            return [], []
        touched = {o.msg for o in outcomes}
        self.conn.executemany(
            # An operator's `queue hold` during the attempt stands unless it delivered.
            "UPDATE recipients SET state = CASE WHEN state = 'hold' AND ? IN"
            " ('deferred', 'unknown') THEN 'hold' ELSE ? END, attempts = attempts + ?,"
            " next_attempt = ?,"
            " last_reply = COALESCE(?, last_reply), last_host = COALESCE(?, last_host),"
            " updated = ? WHERE msg = ? AND idx = ?",
            [(o.state, o.state, int(o.attempted), o.next_attempt, o.reply, o.host, o.time,
              o.msg, o.idx) for o in outcomes])
        self.conn.executemany(
            "INSERT INTO attempts (msg, idx, time, outcome, host, address, reply, tls, sha256,"
            " tls_cipher, tls_verified, source, attempted, dkim, invoice_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(o.msg, o.idx, o.time, o.state, o.host, o.address, o.reply, o.tls, o.sha256,
              o.tls_cipher, None if o.tls_verified is None else int(o.tls_verified), o.source,
              int(o.attempted), " ".join(o.dkim) or None, o.invoice_id)
             for o in outcomes])
        finished = [m for m in touched if self._all_final(m)]
        now = max(o.time for o in outcomes)
        removable = self._finish_messages(finished, now)
        return finished, removable

    def _finish_messages(self, finished: Sequence[str], now: float) -> list[str]:
        """Mark messages done and count them in their segments; the segments now removable."""
        if not finished:
            return []
        counts: dict[str, int] = {}
        for start in range(0, len(finished), 500):
            chunk = list(finished[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for (segment,) in self.conn.execute(
                    f"SELECT segment FROM messages WHERE done IS NULL AND id IN ({marks})",
                    chunk).fetchall():
                if segment is not None:
                    counts[segment] = counts.get(segment, 0) + 1
        self.conn.executemany("UPDATE messages SET done = ? WHERE id = ? AND done IS NULL",
                              [(now, m) for m in finished])
        self.conn.executemany("UPDATE segments SET finished = finished + ? WHERE name = ?",
                              [(n, name) for name, n in counts.items()])
        return self._removable(counts)

    def _removable(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if self.conn.execute(
            "SELECT 1 FROM segments WHERE name = ? AND sealed AND finished >= messages",
            (name,)).fetchone()]

    def seal(self, names: Sequence[str]) -> list[str]:
        """No writer appends to these segments any more; those that may now be removed."""
        with self._transaction():
            return self.seal_in_transaction(names)

    def seal_in_transaction(self, names: Sequence[str]) -> list[str]:
        self.conn.executemany(
            "INSERT INTO segments (name, sealed) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET sealed = 1", [(n,) for n in names])
        return self._removable(names)

    def make_durable(self) -> None:
        """Everything committed so far is on disk.

        One small commit with synchronous=FULL: its sync of the write-ahead log covers every
        commit before it in the log, whatever readers hold (a checkpoint cannot copy past a
        reader's snapshot, and would then sync nothing)."""
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction():
                self.conn.execute("UPDATE durable_mark SET n = n + 1")
        finally:
            self.conn.execute("PRAGMA synchronous=NORMAL")

    def forget_segments(self, names: Sequence[str]) -> None:
        """The segment files are gone (removed after their messages were final)."""
        with self._transaction():
            self.forget_in_transaction(names)

    def forget_in_transaction(self, names: Sequence[str]) -> None:
        self.conn.executemany("DELETE FROM segments WHERE name = ?", [(n,) for n in names])

    def forget_finished(self, before: float, after: int, window: int = FORGET_WINDOW
                        ) -> tuple[int, int]:
        """Remove from the index the messages (with their recipients and attempts) final
        before `before` whose segment file is gone: the delivery records hold their history
        (copy them first: relay/queue/records.py). Looks at the messages rows with rowid in
        (`after`, `after` + `window`], so one call is short; returns (messages removed, where
        the next call starts: 0 once past the last row).

        The attempts row with the highest rowid always stays: the records remember how far
        they copied by rowid, and SQLite would give a new row a rowid already copied if the
        highest one were deleted."""
        with self._transaction():
            found = [row[0] for row in self.conn.execute(
                "SELECT id FROM messages m WHERE rowid > ? AND rowid <= ? AND done < ?"
                " AND segment IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM segments s WHERE s.name = m.segment)",
                (after, after + window, before))]
            newest = self.conn.execute(
                "SELECT msg FROM attempts WHERE rowid = (SELECT MAX(rowid) FROM attempts)"
            ).fetchone()
            gone = [(m,) for m in found if newest is None or m != newest[0]]
            self.conn.executemany("DELETE FROM attempts WHERE msg = ?", gone)
            self.conn.executemany("DELETE FROM recipients WHERE msg = ?", gone)
            self.conn.executemany("DELETE FROM messages WHERE id = ?", gone)
            (last,) = self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()
        return len(gone), (after + window if after + window < last else 0)

    def segments(self) -> dict[str, SegmentRow]:
        return {name: SegmentRow(messages, finished, bool(sealed), upto)
                for name, messages, finished, sealed, upto in self.conn.execute(
                    "SELECT name, messages, finished, sealed, indexed_upto FROM segments")}

    def queued_messages(self) -> int:
        """Messages not final yet: one small row per segment to add up ([queue] max_queued)."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(messages - finished), 0) FROM segments").fetchone()
        return int(row[0])

    def _all_final(self, msg: str) -> bool:
        row = self.conn.execute(
            f"SELECT COUNT(*) FROM recipients WHERE msg = ? AND state NOT IN {FINAL_SQL}",
            (msg,)).fetchone()
        return row[0] == 0

    def release_active(self, now: float) -> int:
        """Make every claimed recipient due again, without counting an attempt: at startup
        (whatever a dead process had claimed), and at the end of a graceful stop (whatever
        the delivery process claimed and never attempted)."""
        with self._transaction():
            cur = self.conn.execute(
                f"UPDATE recipients SET state = CASE WHEN attempts = 0 THEN '{QUEUED}'"
                f" ELSE '{DEFERRED}' END, next_attempt = ? WHERE state = '{ACTIVE}'", (now,))
        return cur.rowcount

    def postpone_in_transaction(self, items: Sequence[tuple[str, int, float]]) -> None:
        """Give claimed recipients back, due at the time given, without counting an attempt
        (a throttled destination hands back what it cannot send soon)."""
        self.conn.executemany(
            f"UPDATE recipients SET state = CASE WHEN attempts = 0 THEN '{QUEUED}'"
            f" ELSE '{DEFERRED}' END, next_attempt = ? WHERE msg = ? AND idx = ?"
            f" AND state = '{ACTIVE}'", [(due, msg, idx) for msg, idx, due in items])

    # --- recovery and inspection -------------------------------------------------------------

    def pending_in_segments(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Messages not yet done, per segment, for segments in `names`."""
        found: dict[str, list[str]] = {}
        for name in names:
            rows = self.conn.execute(
                "SELECT id FROM messages WHERE segment = ? AND done IS NULL", (name,))
            ids = [row[0] for row in rows]
            if ids:
                found[name] = ids
        return found

    def pending_without_segment(self) -> list[str]:
        return [row[0] for row in self.conn.execute(
            "SELECT id FROM messages WHERE segment IS NULL AND done IS NULL")]

    def location(self, msg: str) -> Location | None:
        row = self.conn.execute("SELECT segment, offset, size FROM messages WHERE id = ?",
                                (msg,)).fetchone()
        return Location(*row) if row is not None and row[0] is not None else None

    def mark_missing(self, msgs: Sequence[str], now: float) -> None:
        """Pending recipients whose segment is gone cannot be delivered: say so, loudly."""
        with self._transaction():
            self.conn.executemany(
                "UPDATE recipients SET state = 'expired', last_reply = 'spool segment missing',"
                f" updated = ? WHERE msg = ? AND state NOT IN {FINAL_SQL}",
                [(now, m) for m in msgs])
            self.conn.executemany("UPDATE messages SET done = ? WHERE id = ?",
                                  [(now, m) for m in msgs])

    def apply_finals(self, msg: str, finals: dict[int, str], now: float) -> None:
        """Final states a legacy spool file recorded (see relay.queue.legacy)."""
        with self._transaction():
            self.conn.executemany(
                "UPDATE recipients SET state = ?, updated = ? WHERE msg = ? AND idx = ?"
                f" AND state NOT IN {FINAL_SQL}",
                [(state, now, msg, idx) for idx, state in finals.items()])
            if self._all_final(msg):
                self._finish_messages([msg], now)

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (IMMEDIATE avoids upgrade deadlocks)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


__all__ = ["UNKNOWN", "DueRecipient", "Index", "Outcome", "SegmentRow", "open_db"]
