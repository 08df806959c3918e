"""`/healthz`: is this relay accepting and delivering? Local faults only.

503 with a one-line reason when an intake process stopped beating or free space is below
`[queue] min_free_space` (not accepting), when the delivery process stopped beating, or when the
queue index is not writable or cannot be read. Never because a remote destination is down: the
relay is healthy while it queues and retries.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from relay.notify import Heartbeats
from relay.queue.index import INDEX_FILE
from relay.queue.space import FreeSpaceGuard


@dataclass(frozen=True)
class HealthSources:
    """What the http process can see of the others: their heartbeats in the shared page
    (made before the fork) and the queue folder."""

    root: Path
    beats: Heartbeats
    delivery_slots: tuple[int, ...]
    intake_slots: tuple[int, ...]
    space: FreeSpaceGuard  # the same floor (and reserve rule) intake applies

    @property
    def index(self) -> Path:
        return self.root / INDEX_FILE


def problem(src: HealthSources) -> str | None:
    """The first local fault, as one line; None when healthy. Blocking (statvfs, sqlite):
    call it off the event loop."""
    stale = set(src.beats.stale())
    if stale & set(src.intake_slots):
        return "not accepting: an intake process stopped responding"
    if not src.space.ok():
        return "not accepting: free space on the queue's filesystem is below min_free_space"
    if stale & set(src.delivery_slots):
        return "delivery process down: it stopped responding"
    return _index_problem(src.root, src.index)


def _index_problem(root: Path, index: Path) -> str | None:
    # The folder too: SQLite creates its journal and WAL files beside the index.
    for path in (root, index):
        if not os.access(path, os.W_OK):
            return f"index not writable: {path}"
    try:
        conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=2)
        try:
            conn.execute("SELECT 1 FROM messages LIMIT 1").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"index unreadable: {exc}"
    return None
