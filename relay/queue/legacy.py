"""Spool files of the first release (one file per message), moved into segments at startup.

Layout of such a file: a 34-byte header line `IRSPOOL1 <envelope length> <message length>\\n`,
the envelope as JSON and a newline, the message bytes, then appended records `F <index>
<state>\\n` for recipients that reached a final state. A header that still carries the
sentinel length, or a file shorter than its header says, was never acknowledged.

A queue left by that release is taken over once, before anything else runs: each complete file
is appended to a segment (synced), indexed with its final states, and only then removed, so a
crash in the middle repeats the move rather than losing a message.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from relay import log
from relay.queue.envelope import FINAL_STATES, Envelope
from relay.queue.index import Index
from relay.queue.notices import Committed
from relay.queue.segments import SegmentWriter, sync_dir

MAGIC = b"IRSPOOL1"
HEADER_LEN = len(MAGIC) + 1 + 10 + 1 + 12 + 1
INCOMPLETE = 999_999_999_999
MIGRATION_WRITER = 99


@dataclass(frozen=True, slots=True)
class LegacyMessage:
    envelope: Envelope
    message: bytes
    finals: dict[int, str]


class LegacyUnreadable(Exception):
    """`unfinished`: never completed (so never acknowledged); otherwise damaged."""

    def __init__(self, message: str, *, unfinished: bool) -> None:
        super().__init__(message)
        self.unfinished = unfinished


def is_legacy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read(path: Path) -> LegacyMessage:
    raw = path.read_bytes()
    fields = raw[:HEADER_LEN].split()
    if len(fields) != 3 or fields[0] != MAGIC:
        raise LegacyUnreadable(f"{path.name}: bad header", unfinished=True)
    env_len, msg_len = int(fields[1]), int(fields[2])
    start = HEADER_LEN + env_len
    if msg_len == INCOMPLETE or len(raw) < start + msg_len:
        raise LegacyUnreadable(f"{path.name}: incomplete", unfinished=True)
    try:
        envelope = Envelope.from_json(raw[HEADER_LEN:start])
        envelope.to_json()  # text that cannot be written again cannot be queued again
    except (ValueError, TypeError, KeyError) as exc:
        raise LegacyUnreadable(f"{path.name}: bad envelope ({exc})", unfinished=False) from None
    finals: dict[int, str] = {}
    for line in raw[start + msg_len:].split(b"\n"):
        parts = line.split()
        if len(parts) == 3 and parts[0] == b"F" and parts[1].isdigit():
            state = parts[2].decode(errors="replace")
            if state in FINAL_STATES:
                finals[int(parts[1])] = state
    return LegacyMessage(envelope, raw[start:start + msg_len], finals)


def migrate(spool_dir: Path, index: Index, max_lifetime: float, now: float,
            segment_size: int) -> tuple[int, int]:
    """Move every legacy file into a segment; (messages moved, files set aside as damaged)."""
    names = [e.name for e in os.scandir(spool_dir)
             if e.is_file() and not e.name.startswith(".") and "." not in e.name
             and is_legacy(spool_dir / e.name)]
    if not names:
        return 0, 0
    sealed: list[str] = []
    writer = SegmentWriter(spool_dir, MIGRATION_WRITER, size=segment_size,
                           on_sealed=sealed.append)
    moved, damaged, done = 0, 0, []
    try:
        for name in names:
            outcome = _migrate_one(spool_dir / name, writer, index, max_lifetime, now)
            damaged += outcome == "damaged"
            moved += outcome == "moved"
            if outcome != "damaged":
                done.append(name)
    finally:
        writer.close()
    index.seal(sealed)
    for name in done:  # only now: every moved message is synced in its segment and indexed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool_dir / name)
    sync_dir(spool_dir)
    return moved, damaged


def _migrate_one(path: Path, writer: SegmentWriter, index: Index, max_lifetime: float,
                 now: float) -> str:
    queue_id = path.name
    try:
        legacy = read(path)
    except LegacyUnreadable as exc:
        if exc.unfinished and index.location(queue_id) is None and not _known(index, queue_id):
            return "dropped"  # never acknowledged
        _quarantine(path)
        log.event("spool_corrupt", id=queue_id, error=str(exc))
        return "damaged"
    if _done(index, queue_id):
        return "dropped"
    [location] = writer.append([(legacy.envelope.to_json(), [legacy.message])])
    with index._transaction():
        index.conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
        index.add_in_transaction([Committed(legacy.envelope, location)], max_lifetime)
    if legacy.finals:
        index.apply_finals(queue_id, legacy.finals, now)
    log.event("migrated", id=queue_id, segment=location.segment)
    return "moved"


def _known(index: Index, queue_id: str) -> bool:
    return index.conn.execute("SELECT 1 FROM messages WHERE id = ?",
                              (queue_id,)).fetchone() is not None


def _done(index: Index, queue_id: str) -> bool:
    row = index.conn.execute("SELECT done FROM messages WHERE id = ?", (queue_id,)).fetchone()
    return row is not None and row[0] is not None


def _quarantine(path: Path) -> None:
    corrupt = path.parent.parent / "corrupt"
    corrupt.mkdir(exist_ok=True)
    os.replace(path, corrupt / path.name)
