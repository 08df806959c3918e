"""The SQLite queue index: which recipient is in which state, when to try it next, every attempt.

Each process owns one connection on one thread (sqlite objects are thread-bound). Writers in the
two processes share the database through WAL, a busy timeout and short transactions. Commits use
synchronous=NORMAL: the index can be rebuilt from the spool, which is fsynced before any 250.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from relay.addresses import domain_of
from relay.queue.envelope import ACTIVE, DEFERRED, FINAL_STATES, QUEUED, UNKNOWN, Envelope

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
    done REAL
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
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
    UNIQUE (msg, idx)
);
-- Finding due work reads only pending rows, in time order: no scan over delivered history.
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt)
    WHERE state IN ('queued', 'deferred', 'unknown');
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients(domain, state);
CREATE TABLE IF NOT EXISTS attempts (
    msg TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    host TEXT,
    address TEXT,
    reply TEXT,
    tls TEXT
);
CREATE INDEX IF NOT EXISTS attempts_msg ON attempts(msg, idx);
"""

PENDING_SQL = "('queued', 'deferred', 'unknown')"


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
    attempted: bool = True  # False when no connection was tried (e.g. expiry, DNS failure)


def open_db(path: Path) -> sqlite3.Connection:
    """Open the index on this thread: WAL, NORMAL sync, a busy timeout for the other process."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=True)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.enable_wal()
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(SCHEMA)
    return conn


class Index:
    def __init__(self, path: Path) -> None:
        self.conn = open_db(path)

    def close(self) -> None:
        self.conn.close()

    # --- intake ---------------------------------------------------------------------------

    def insert(self, messages: Sequence[tuple[Envelope, int]], max_lifetime: float, *,
               before_commit: Callable[[], object] | None = None) -> None:
        """Insert accepted messages and their recipients in one transaction; `before_commit`
        runs inside it, last, and rolls everything back if it raises."""
        msg_rows = []
        rcpt_rows = []
        for env, size in messages:
            msg_rows.append((env.id, env.sender, env.received, env.received + max_lifetime, size,
                             env.message_id, env.client, env.auth, env.body, int(env.smtputf8)))
            rcpt_rows.extend(
                (env.id, i, rcpt, domain_of(rcpt), QUEUED, env.received, env.received)
                for i, rcpt in enumerate(env.recipients)
            )
        with self._transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO messages (id, sender, received, expires, size, message_id,"
                " client, auth, body, smtputf8) VALUES (?,?,?,?,?,?,?,?,?,?)", msg_rows)
            self.conn.executemany(
                "INSERT OR IGNORE INTO recipients (msg, idx, rcpt, domain, state, next_attempt,"
                " updated) VALUES (?,?,?,?,?,?,?)", rcpt_rows)
            if before_commit is not None:
                before_commit()

    # --- delivery -------------------------------------------------------------------------

    def claim_due(self, now: float, limit: int) -> list[DueRecipient]:
        """Move up to `limit` due recipients to 'active' and return them with their envelope."""
        with self._transaction():
            claimed = self.conn.execute(
                f"UPDATE recipients SET state = '{ACTIVE}', updated = ? WHERE rowid IN ("
                f" SELECT rowid FROM recipients WHERE state IN {PENDING_SQL}"
                "  AND next_attempt <= ? ORDER BY next_attempt LIMIT ?)"
                " RETURNING msg, idx, rcpt, domain, attempts", (now, now, limit)).fetchall()
            if not claimed:
                return []
            envelopes = self._envelopes({row[0] for row in claimed})
        due = []
        for msg, idx, rcpt, domain, attempts in claimed:
            sender, received, expires, body, utf8 = envelopes[msg]
            due.append(DueRecipient(msg, idx, rcpt, domain, attempts, sender, received, expires,
                                    body, bool(utf8)))
        due.sort(key=lambda d: (d.msg, d.idx))
        return due

    def _envelopes(self, ids: Iterable[str]) -> dict[str, tuple]:
        ids = list(ids)
        found: dict[str, tuple] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                    "SELECT id, sender, received, expires, body, smtputf8 FROM messages"
                    f" WHERE id IN ({marks})", chunk):
                found[row[0]] = row[1:]
        return found

    def next_due(self) -> float | None:
        row = self.conn.execute(
            f"SELECT MIN(next_attempt) FROM recipients WHERE state IN {PENDING_SQL}").fetchone()
        return row[0]

    def record(self, outcomes: Sequence[Outcome], *,
               before_commit: Callable[[list[str]], object] | None = None) -> list[str]:
        """Store outcomes and attempts; return the ids of messages that became fully final.

        `before_commit(finished)` runs inside the transaction, last; if it raises, nothing
        is recorded."""
        touched = {o.msg for o in outcomes}
        with self._transaction():
            self.conn.executemany(
                "UPDATE recipients SET state = ?, attempts = attempts + ?, next_attempt = ?,"
                " last_reply = COALESCE(?, last_reply), last_host = COALESCE(?, last_host),"
                " updated = ? WHERE msg = ? AND idx = ?",
                [(o.state, int(o.attempted), o.next_attempt, o.reply, o.host, o.time, o.msg, o.idx)
                 for o in outcomes])
            self.conn.executemany(
                "INSERT INTO attempts (msg, idx, time, outcome, host, address, reply, tls)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [(o.msg, o.idx, o.time, o.state, o.host, o.address, o.reply, o.tls)
                 for o in outcomes])
            finished = [m for m in touched if self._all_final(m)]
            now = max(o.time for o in outcomes)
            self.conn.executemany("UPDATE messages SET done = ? WHERE id = ?",
                                  [(now, m) for m in finished])
            if before_commit is not None:
                before_commit(finished)
        return finished

    def _all_final(self, msg: str) -> bool:
        finals = ",".join(f"'{s}'" for s in FINAL_STATES)
        row = self.conn.execute(
            f"SELECT COUNT(*) FROM recipients WHERE msg = ? AND state NOT IN ({finals})",
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

    # --- recovery and inspection -------------------------------------------------------------

    def message_ids_pending(self) -> set[str]:
        finals = ",".join(f"'{s}'" for s in FINAL_STATES)
        return {row[0] for row in self.conn.execute(
            f"SELECT DISTINCT msg FROM recipients WHERE state NOT IN ({finals})")}

    def known_message(self, msg: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM messages WHERE id = ?", (msg,)).fetchone()
        return row is not None

    def is_done(self, msg: str) -> bool:
        row = self.conn.execute("SELECT done FROM messages WHERE id = ?", (msg,)).fetchone()
        return row is not None and row[0] is not None

    def mark_missing(self, msg: str, now: float) -> None:
        """A pending recipient whose spool file is gone cannot be delivered: say so, loudly."""
        finals = ",".join(repr(s) for s in FINAL_STATES)
        with self._transaction():
            self.conn.execute(
                "UPDATE recipients SET state = 'expired', last_reply = 'spool file missing',"
                f" updated = ? WHERE msg = ? AND state NOT IN ({finals})", (now, msg))
            self.conn.execute("UPDATE messages SET done = ? WHERE id = ?", (now, msg))

    def apply_finals(self, msg: str, finals: dict[int, str], now: float) -> None:
        """Bring the index in line with final states recorded in the spool file."""
        finals_sql = ",".join(repr(s) for s in FINAL_STATES)
        with self._transaction():
            self.conn.executemany(
                "UPDATE recipients SET state = ?, updated = ? WHERE msg = ? AND idx = ?"
                f" AND state NOT IN ({finals_sql})",
                [(state, now, msg, idx) for idx, state in finals.items()])
            if self._all_final(msg):
                self.conn.execute("UPDATE messages SET done = COALESCE(done, ?) WHERE id = ?",
                                  (now, msg))

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


__all__ = ["UNKNOWN", "DueRecipient", "Index", "Outcome", "open_db"]
