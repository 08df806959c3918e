"""Startup recovery: reconcile the spool (the truth) with the index after whatever happened.

- a spool file that is incomplete and not in the index was never acknowledged: it is removed
  (an incomplete one the index knows is quarantined like a damaged one);
- a complete spool file the index does not know (the index commit was lost) is indexed again;
- final states recorded in a spool file but lost by the index are re-applied (no re-sending);
- a pending index row whose spool file is gone is closed and logged (it cannot be delivered);
- recipients a dead delivery process had claimed ('active') become due again.
Addresses are not judged here: a file an older intake wrote with an unusable address (a bare CR)
is indexed like any other, and delivery bounces that recipient alone (5.1.3) when its turn comes.
A damaged spool file (readable header, unreadable envelope) is moved to `corrupt/`, never deleted.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from relay import log
from relay.queue.index import Index
from relay.queue.spool import Spool, SpoolCorrupt

CLEAN_MARK = "clean-shutdown"


@dataclass
class RecoveryReport:
    released: int = 0
    removed_incomplete: int = 0
    reindexed: int = 0
    finals_applied: int = 0
    missing: int = 0
    corrupt: int = 0


def recover(root: Path, db_path: Path, *, max_lifetime: float, full: bool | None = None
            ) -> RecoveryReport:
    spool = Spool(root)
    index = Index(db_path)
    report = RecoveryReport()
    mark = root / CLEAN_MARK
    if full is None:
        full = not mark.exists()  # after a crash or a power cut, check every file
    mark.unlink(missing_ok=True)
    now = time.time()
    try:
        report.released = index.release_active(now)
        pending = index.message_ids_pending()
        for queue_id in list(spool.ids()):
            if queue_id in pending and not full:
                continue  # after a clean stop the index is right about pending messages
            known = queue_id in pending or index.known_message(queue_id)
            if known and not full:
                if index.is_done(queue_id):  # its removal was still pending at the stop
                    spool.remove(queue_id)
                continue
            _check_file(spool, index, queue_id, known, max_lifetime, now, report)
        on_disk = set(spool.ids())
        for queue_id in pending - on_disk:
            index.mark_missing(queue_id, now)
            report.missing += 1
            log.event("spool_missing", id=queue_id, note="pending recipients closed as expired")
        if report.reindexed or report.removed_incomplete or report.missing or report.corrupt:
            spool.sync_dir()
    finally:
        index.close()
    return report


def _check_file(spool: Spool, index: Index, queue_id: str, known: bool, max_lifetime: float,
                now: float, report: RecoveryReport) -> None:
    try:
        entry = spool.read(queue_id)  # checks the size against the header too
    except SpoolCorrupt as exc:
        if exc.unfinished and not known:
            spool.remove(queue_id)  # never acknowledged: the crash came before the commit
            report.removed_incomplete += 1
        else:
            # A damaged file, or one the index holds (so it may have been acknowledged):
            # keep it for an operator; the index row is then closed as spool_missing.
            _quarantine(spool, queue_id)
            report.corrupt += 1
            log.event("spool_corrupt", id=queue_id, error=str(exc))
        return
    except OSError as exc:
        log.event("spool_unreadable", id=queue_id, error=str(exc))
        return
    if known and index.is_done(queue_id):
        spool.remove(queue_id)  # finished; the crash came between the commit and the unlink
        return
    if not known:
        try:
            index.insert([(entry.envelope, entry.message_length)], max_lifetime)
        except (ValueError, TypeError, AttributeError, sqlite3.ProgrammingError) as exc:
            # An envelope the index cannot hold (a lone surrogate in an address, a field of the
            # wrong type): keep the file for an operator, never crash the start.
            _quarantine(spool, queue_id)
            report.corrupt += 1
            log.event("spool_corrupt", id=queue_id, error=f"{type(exc).__name__}: {exc}")
            return
        report.reindexed += 1
        log.event("reindexed", id=queue_id, nrcpt=len(entry.envelope.recipients))
    if entry.finals:
        index.apply_finals(queue_id, entry.finals, now)
        report.finals_applied += len(entry.finals)
        if len(entry.finals) == len(entry.envelope.recipients):
            spool.remove(queue_id)


def _quarantine(spool: Spool, queue_id: str) -> None:
    corrupt = spool.dir.parent / "corrupt"
    corrupt.mkdir(exist_ok=True)
    os.replace(spool.path(queue_id), corrupt / queue_id)


def mark_clean_shutdown(root: Path) -> None:
    (root / CLEAN_MARK).touch()
