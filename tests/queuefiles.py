"""What the spool holds, read the way startup recovery reads it (for tests)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from relay.queue.envelope import Envelope
from relay.queue.index import Index
from relay.queue.notices import Committed
from relay.queue.segments import (
    SINGLE_SUFFIX,
    Location,
    Record,
    SegmentWriter,
    read_at,
    scan,
    segment_files,
)


def _records(path: Path) -> list[Record]:
    """The intact records of one segment; none if it was recycled since it was listed (a
    running relay removes segments whose messages are all final)."""
    try:
        return list(scan(path))
    except FileNotFoundError:
        return []


def stored_ids(root: Path) -> list[str]:
    """Queue ids of every acknowledged (intact) message record in the spool segments."""
    spool = root / "spool"
    if not spool.is_dir():
        return []
    return sorted(json.loads(r.envelope)["id"]
                  for name in segment_files(spool) for r in _records(spool / name))


def partial_streams(root: Path) -> list[str]:
    """Segments of large messages still being streamed (no intact record yet)."""
    spool = root / "spool"
    if not spool.is_dir():
        return []
    return [name for name in segment_files(spool) if name.endswith(SINGLE_SUFFIX)
            and (spool / name).exists() and not _records(spool / name)]


def stored_message(root: Path, queue_id: str) -> bytes:
    spool = root / "spool"
    for name in segment_files(spool):
        for r in scan(spool / name):
            if json.loads(r.envelope)["id"] == queue_id:
                return read_at(spool, r.location)
    raise KeyError(queue_id)


def pending_ids(root: Path) -> list[str]:
    """Messages the index still has recipients to deliver for."""
    db = root / "index.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return sorted(row[0] for row in conn.execute(
            "SELECT DISTINCT msg FROM recipients WHERE state NOT IN"
            " ('delivered', 'bounced', 'expired', 'deleted')"))
    finally:
        conn.close()


def plant(root: Path, envelope: Envelope, data: bytes, *, max_lifetime: float = 3600.0,
          index: bool = True) -> Location:
    """A message as intake leaves it: synced in a (sealed) segment, and indexed unless
    `index` is False (as if its notice was lost)."""
    spool = root / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    sealed: list[str] = []
    writer = SegmentWriter(spool, 77, size=1 << 20, on_sealed=sealed.append)
    [location] = writer.append([(envelope.to_json(), [data])])
    writer.close()
    if index:
        idx = Index(root / "index.sqlite")
        try:
            idx.add([Committed(envelope, location)], max_lifetime)
            idx.seal(sealed)
        finally:
            idx.close()
    return location
