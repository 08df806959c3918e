"""Startup recovery: make the index agree with the spool segments (the truth) again.

Runs in the main process before any other starts, so it is the index's only writer then:
- recipients a dead delivery process had claimed ('active') become due again;
- a queue of the first release (one spool file per message) is moved into segments;
- records the index never heard of (a notice lost with a killed delivery process, or index
  commits lost with a power cut) are indexed, reading each segment only past the point its
  row says is indexed;
- a streamed segment that was never completed was never acknowledged: it is removed, as is a
  spare segment that never received a message;
- every segment is sealed (the intake processes start new ones) and those whose messages are
  all final are removed;
- pending messages whose segment is gone cannot be delivered: they are closed and logged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from relay import log
from relay.queue import legacy
from relay.queue.envelope import Envelope
from relay.queue.index import Index, SegmentRow
from relay.queue.notices import Committed
from relay.queue.segments import (
    SEGMENT_SIZE,
    SINGLE_SUFFIX,
    make_spool_dir,
    scan,
    segment_files,
    sync_dir,
)


@dataclass
class RecoveryReport:
    released: int = 0
    reindexed: int = 0
    removed_incomplete: int = 0
    removed_segments: int = 0
    migrated: int = 0
    missing: int = 0
    corrupt: int = 0


def recover(root: Path, db_path: Path, *, max_lifetime: float,
            segment_size: int = SEGMENT_SIZE) -> RecoveryReport:
    spool_dir = root / "spool"
    make_spool_dir(spool_dir)
    index = Index(db_path)
    report = RecoveryReport()
    now = time.time()
    try:
        report.released = index.release_active(now)
        report.migrated, report.corrupt = legacy.migrate(spool_dir, index, max_lifetime, now,
                                                         segment_size)
        on_disk = _index_segments(spool_dir, index, max_lifetime, report)
        rows = index.segments()
        removable = index.seal([name for name in rows if name in on_disk])
        _remove(spool_dir, index, removable, report)
        _close_missing(index, rows, on_disk, now, report)
        if report.removed_incomplete or report.removed_segments:
            sync_dir(spool_dir)
    finally:
        index.close()
    return report


def _index_segments(spool_dir: Path, index: Index, max_lifetime: float,
                    report: RecoveryReport) -> set[str]:
    """Index every acknowledged record the index does not know; the segments kept."""
    known = index.segments()
    kept: set[str] = set()
    for name in segment_files(spool_dir):
        row = known.get(name)
        records = list(scan(spool_dir / name, row.indexed_upto if row else 0))
        if row is None and not records:
            # A streamed message never completed, or a spare never used: nothing acknowledged.
            os.unlink(spool_dir / name)
            if name.endswith(SINGLE_SUFFIX):
                report.removed_incomplete += 1
            continue
        kept.add(name)
        found = []
        for record in records:
            try:
                found.append(Committed(Envelope.from_json(record.envelope), record.location))
            except (ValueError, TypeError, KeyError) as exc:  # intact bytes, unusable envelope
                report.corrupt += 1
                log.event("spool_corrupt", segment=name, offset=record.location.offset,
                          error=f"{type(exc).__name__}: {exc}")
        if found:
            index.add(found, max_lifetime)
            report.reindexed += len(found)
            for c in found:
                log.event("reindexed", id=c.envelope.id, nrcpt=len(c.envelope.recipients))
    return kept


def _remove(spool_dir: Path, index: Index, names: list[str], report: RecoveryReport) -> None:
    if names:
        index.make_durable()  # the final states that allow it are on disk first
    for name in names:
        os.unlink(spool_dir / name)
    if names:
        sync_dir(spool_dir)  # gone for good before the rows that remember them go
        index.forget_segments(names)
        report.removed_segments += len(names)


def _close_missing(index: Index, rows: dict[str, SegmentRow], on_disk: set[str], now: float,
                   report: RecoveryReport) -> None:
    gone = [name for name in rows if name not in on_disk]
    pending = index.pending_in_segments(gone)
    nowhere = index.pending_without_segment()  # a legacy file that was not there to move
    if nowhere:
        pending["(none)"] = nowhere
    for name, ids in pending.items():
        index.mark_missing(ids, now)
        report.missing += len(ids)
        for queue_id in ids:
            log.event("spool_missing", id=queue_id, segment=name,
                      note="pending recipients closed as expired")
    index.forget_segments(gone)
