"""The webhook outbox in the queue index: delivery events waiting for their receiver.

Rows are added by the delivery store's writer, in the transaction that records the outcome
that caused them (so an event exists exactly when its outcome does), and taken, rescheduled
and deleted by the webhook worker (relay/delivery/webhooks.py) through the same thread. A row
is deleted only after its receiver's 2xx, or when it is given up on: at least once, none
invented.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox row as it is added or sent."""

    id: str
    policy: str
    body: bytes
    created: float
    tries: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of one send: gone (delivered or given up), or due again at `retry_at`."""

    id: str
    retry_at: float | None  # None: delete the row


@dataclass(frozen=True, slots=True)
class Exchange:
    """The worker's view after one exchange: rows to send now, how many wait, when the next."""

    due: list[Event]
    pending: int
    next_due: float | None


def add_in_transaction(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO outbox (id, policy, body, created, next_attempt)"
        " VALUES (?,?,?,?,?)", [(e.id, e.policy, e.body, e.created, e.created) for e in events])


def deferred_before(conn: sqlite3.Connection, msg: str, idx: int) -> bool:
    """Whether this recipient was deferred before (its first deferral alone is an event)."""
    return conn.execute(
        "SELECT 1 FROM attempts WHERE msg = ? AND idx = ? AND outcome = 'deferred' LIMIT 1",
        (msg, idx)).fetchone() is not None


def release_all(conn: sqlite3.Connection, now: float) -> int:
    """At start: every row is due now (what a dead worker had taken, and what waited out a
    back-off while the relay was down: a restart is a good moment to try again)."""
    return conn.execute("UPDATE outbox SET next_attempt = ? WHERE next_attempt > ?",
                        (now, now)).rowcount


def exchange(conn: sqlite3.Connection, settled: Sequence[Settled], now: float, limit: int,
             lease: float) -> Exchange:
    """Apply what the worker finished, then take up to `limit` due rows (due again after
    `lease` seconds, should the worker never settle them), in one short transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("DELETE FROM outbox WHERE id = ?",
                         [(s.id,) for s in settled if s.retry_at is None])
        conn.executemany("UPDATE outbox SET next_attempt = ?, tries = tries + 1 WHERE id = ?",
                         [(s.retry_at, s.id) for s in settled if s.retry_at is not None])
        rows = conn.execute(
            "UPDATE outbox SET next_attempt = ? WHERE id IN (SELECT id FROM outbox"
            " WHERE next_attempt <= ? ORDER BY next_attempt LIMIT ?)"
            " RETURNING id, policy, body, created, tries",
            (now + lease, now, limit)).fetchall() if limit > 0 else []
        pending = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        next_due = conn.execute("SELECT MIN(next_attempt) FROM outbox").fetchone()[0]
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return Exchange([Event(*row) for row in rows], pending, next_due)
