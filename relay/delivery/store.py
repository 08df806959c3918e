"""The delivery process's side of the queue: the one writer of the index, in batches.

One thread owns the index connection. Whatever arrived while the previous batch was being
written goes into the next one, as one transaction: messages announced by intake (indexed
'active' when they are handed to connections at once), outcomes of attempts, the DSNs those
caused (appended to this process's own segment and synced first), segments intake sealed and
segments removed. After the commit, segments that are sealed and hold only finished messages
are removed (their folder synced before their rows go in the next batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from relay import log
from relay.addresses import address_problem
from relay.delivery.dsn import FailedRecipient, build_dsn, original_headers
from relay.queue import outbox
from relay.queue.envelope import BOUNCED, EXPIRED, Envelope, new_queue_id
from relay.queue.index import DueRecipient, Index, Outcome
from relay.queue.notices import Committed
from relay.queue.records import RECORDS_FILE, Records
from relay.queue.segments import (
    SEGMENT_SIZE,
    Location,
    SegmentCorrupt,
    SegmentReader,
    SegmentWriter,
    read_at,
    sync_dir,
)
from relay.queue.space import Reserve, is_disk_full
from relay.queue.worker import WorkerThread

if TYPE_CHECKING:
    from relay.delivery.webhooks import Webhooks

T = TypeVar("T")
DSN_WRITER = 90          # the writer number in the names of the DSN segments
# Outcomes waiting to be recorded beyond which connections wait before their next message:
# what a crash can make us send twice is what was sent but not yet recorded.
UNRECORDED_LIMIT = 32
FRESH_SECONDS = 120.0    # a message younger than this is read on the event loop (page cache)
PRUNE_EVERY = 600.0      # seconds between retention passes over the delivery records
# A finished message leaves the queue index this long after its last outcome (once its
# segment file is gone); `status` and the API read the delivery records, kept for
# [queue] retention. Without it the index would grow by every message ever relayed.
FINISHED_KEEP = 86400.0
FORGET_EVERY = 30.0      # seconds between passes over a window of the index (forget_finished)
# Outcomes are copied into the delivery records in bulk (relay/queue/records.py): at most
# this long after they were recorded (what `status` shows lags by that much), or once this
# many wait; and always before a spool segment is removed and at a stop.
COPY_SECONDS = 0.25
COPY_ROWS = 1000
DEFAULT_RETENTION = 400 * 86400.0


@dataclass(frozen=True, slots=True)
class Result:
    """An outcome plus what a DSN needs to describe it."""

    due: DueRecipient
    outcome: Outcome
    status: str   # enhanced status for the DSN, e.g. "5.1.1" or "4.4.7"


@dataclass
class _Batch:
    """Everything one index transaction writes."""

    claimed: list[Committed] = field(default_factory=list)
    queued: list[Committed] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    sealed: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    postponed: list[tuple[str, int, float]] = field(default_factory=list)
    futures: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.claimed or self.queued or self.results or self.sealed
                    or self.forgotten or self.postponed)


class DeliveryStore:
    def __init__(self, root: Path, db_path: Path, *, hostname: str, max_lifetime: float,
                 segment_size: int = SEGMENT_SIZE) -> None:
        self.spool_dir = root / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = db_path
        self.hostname = hostname
        self.max_lifetime = max_lifetime
        self._thread = WorkerThread("index")
        self.reader = SegmentReader(self.spool_dir)            # event loop
        self._index_reader = SegmentReader(self.spool_dir)     # index thread (DSN headers)
        self._dsn_sealed: list[str] = []
        self._retry_removal: list[str] = []
        self._dsn_writer = SegmentWriter(self.spool_dir, DSN_WRITER, size=segment_size,
                                         on_sealed=self._dsn_sealed.append)
        self.reserve = Reserve(root)
        self._reserve_tried = 0.0
        self._restarted = 0.0
        self._index: Index | None = None
        self._records: Records | None = None
        self._uncopied = 0          # outcomes recorded in the index, not yet in the records
        self._uncopied_since = 0.0  # monotonic time the oldest of them was recorded
        self._copied_at = -math.inf  # monotonic time of the last copy
        self._copy_timer: asyncio.TimerHandle | None = None
        self.retention = DEFAULT_RETENTION  # [queue] retention; set again by a reload
        self._pruned = -math.inf  # the first maintenance step prunes
        self._forgot = -math.inf   # last forget_finished pass (monotonic)
        self._forget_from = 0      # rowid where the next pass starts
        self._batch = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._unrecorded = 0
        self._progress = asyncio.Event()
        self.on_recorded: Callable[[list[Result], int], None] | None = None
        self.on_removed: Callable[[list[str]], None] | None = None
        # `[[sender]] webhook`s in force (set by serve, again on reload); None: no outbox rows.
        self.webhooks: Webhooks | None = None
        self.on_outbox: Callable[[], None] | None = None  # new outbox rows were committed
        self._outbox_added = False  # set on the index thread, read after its call returns

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._thread.call(fn, *args)

    async def start(self) -> None:
        self._index = await self._run(Index, self.db_path)
        self._records = await self._run(Records, self.db_path.parent / RECORDS_FILE)
        await self._run(self._records.attach_index, self.db_path)
        # What a killed relay recorded but had not copied yet.
        await self._run(self._copy_records)
        self._copied_at = -math.inf

    async def close(self, grace: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.flush(), grace)
        except TimeoutError:  # e.g. a full disk: those recipients are retried after restart
            log.event("record_abandoned", level=40, note="outcomes not recorded at shutdown")
        if self._copy_timer is not None:
            self._copy_timer.cancel()
        with contextlib.suppress(Exception):
            await self._run(self._copy_records)
        with contextlib.suppress(Exception):
            await self._run(self._dsn_writer.close)
            if self._dsn_sealed and self._index is not None:
                await self._run(self._index.seal, list(self._dsn_sealed))
        if self._index is not None:
            await self._run(self._index.close)
        if self._records is not None:
            await self._run(self._records.close)
        self._thread.stop()
        self.reader.close()

    async def with_index(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(index, *args)` on the index thread (an operator's action: relay.queue.operator)."""
        assert self._index is not None
        return await self._run(fn, self._index, *args)

    async def claim(self, now: float, limit: int) -> list[DueRecipient]:
        assert self._index is not None
        return await self._run(self._index.claim_due, now, limit)

    async def queued_messages(self) -> int:
        assert self._index is not None
        return await self._run(self._index.queued_messages)

    async def next_due(self) -> float | None:
        assert self._index is not None
        return await self._run(self._index.next_due)

    async def release_claimed(self) -> int:
        """At a graceful stop, once every outcome is recorded: whatever is still claimed was
        never attempted, and is due again (the only delivery process is this one)."""
        assert self._index is not None
        return await self._run(self._index.release_active, time.time())

    async def read_message(self, due: DueRecipient) -> bytes:
        """The message bytes. A fresh message was written moments ago and is in the page
        cache: read on the loop (no thread hop); an old one may need the disk."""
        location = due.location
        if location is None:
            raise SegmentCorrupt(f"{due.msg}: the index has no location for it")
        if time.time() - due.received < FRESH_SECONDS:
            return self.reader.read(location)
        return await asyncio.to_thread(read_at, self.spool_dir, location)

    # --- what goes into the next batch ----------------------------------------------------

    def submit_new(self, committed: Sequence[Committed], *, claimed: bool) -> None:
        """Index messages announced by intake; `claimed`: handed to connections right now."""
        (self._batch.claimed if claimed else self._batch.queued).extend(committed)
        self._kick()

    def postpone(self, items: Sequence[tuple[str, int, float]]) -> None:
        """Hand claimed recipients (msg, idx, due time) back to the index, no attempt counted.
        In the next batch, after the messages it indexes (a handed-back recipient may be one
        intake announced moments ago)."""
        self._batch.postponed.extend(items)
        self._kick()

    def submit_sealed(self, names: Sequence[str]) -> None:
        self._batch.sealed.extend(names)
        self._kick()

    def submit(self, results: Sequence[Result]) -> asyncio.Future[None]:
        """Queue results for the next batch; the future resolves once they are recorded."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.results.extend(results)
        self._unrecorded += len(results)
        self._batch.futures.append(future)
        self._kick()
        return future

    async def room_to_record(self) -> None:
        """Wait while too many outcomes are not recorded yet (see UNRECORDED_LIMIT)."""
        while self._unrecorded >= UNRECORDED_LIMIT:
            self._progress.clear()
            await self._progress.wait()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def flush(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush_loop(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, _Batch()
            dsns, removed = await self._write_until_done(batch)
            self._unrecorded -= len(batch.results)
            self._progress.set()
            for fut in batch.futures:
                if not fut.done():
                    fut.set_result(None)
            if self._copy_wait() <= 0:  # before on_recorded logs them
                await self._copy_records_or_wait()
            if removed:
                self._removed(removed)
            if self._outbox_added:
                self._outbox_added = False
                if self.on_outbox is not None:
                    self.on_outbox()
            if self.on_recorded is not None and (batch.results or dsns):
                try:
                    self.on_recorded(batch.results, dsns)
                except Exception as exc:  # recorded all the same; the next batch must go on
                    log.event("delivery_error", level=40, stage="recorded",
                              error=f"{type(exc).__name__}: {exc}")
        if self._uncopied and self._copy_timer is None:
            self._copy_timer = asyncio.get_running_loop().call_later(
                max(0.0, self._copy_wait()), self._copy_soon)

    def _copy_wait(self) -> float:
        """Seconds until the outcomes not copied yet are due in the delivery records (`inf`:
        nothing to copy). They are copied in bulk (relay/queue/records.py says why): at most
        COPY_SECONDS after the oldest was recorded, or once COPY_ROWS wait; and at once when
        nothing else waits to be written and the last copy is COPY_SECONDS old, so that a
        quiet relay's records are current when its log says `delivered`."""
        if not self._uncopied:
            return math.inf
        now = time.monotonic()
        if self._uncopied >= COPY_ROWS or (
                not self._batch and now - self._copied_at >= COPY_SECONDS):
            return 0.0
        return self._uncopied_since + COPY_SECONDS - now

    def _copy_soon(self) -> None:
        self._copy_timer = None
        if self._flusher is None or self._flusher.done():  # else the flush loop copies
            self._flusher = asyncio.get_running_loop().create_task(self._copy_then_flush())

    async def _copy_then_flush(self) -> None:
        await self._copy_records_or_wait()
        await self._flush_loop()  # what was submitted meanwhile (its _kick saw us running)

    async def _copy_records_or_wait(self) -> None:
        try:
            await self._run(self._copy_records)
        except Exception as exc:  # e.g. a full disk: the rows wait in the index, tried again
            log.event("records_copy_failed", level=30, error=f"{type(exc).__name__}: {exc}")

    def _copy_records(self) -> None:
        """On the index thread: the index's new attempts rows into the delivery records."""
        if self._records is not None:
            self._records.copy_from_index()
        self._uncopied = 0
        self._copied_at = time.monotonic()

    def _removed(self, names: list[str]) -> None:
        for name in names:
            self.reader.forget(name)
        self._batch.forgotten.extend(names)
        if self.on_removed is not None:
            self.on_removed(names)

    async def _write_until_done(self, batch: _Batch) -> tuple[int, list[str]]:
        """Write a batch, retrying (never dropping it) while the disk is full or failing.

        Until it is written its recipients stay 'active' in memory: nobody re-sends them
        meanwhile, and if the relay dies first they become due again at the next start."""
        made: dict[str, Committed | None] = {}  # message -> its DSN: never make two
        delay = 0.5
        while True:
            try:
                return await self._run(self._write, batch, made)
            except Exception as exc:  # sqlite3.OperationalError, OSError (ENOSPC, EIO)
                if await self.make_room(exc):
                    continue
                log.event("record_failed", level=40, error=f"{type(exc).__name__}: {exc}",
                          outcomes=len(batch.results), retry_in=f"{delay:g}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def make_room(self, exc: BaseException) -> bool:
        """On a full disk, find room for the index; True when worth trying again at once.

        Recording outcomes is what frees spool segments, so it must go on when the disk is
        full. First the write-ahead log is checkpointed, so that new commits can reuse its
        space instead of growing it; if that is not enough the reserve is freed (new mail
        then waits until it is back). The reserve is sized to let the log cycle."""
        if not is_disk_full(exc):
            return False
        now = time.monotonic()
        if now - self._restarted > 1.0:
            self._restarted = now
            with contextlib.suppress(Exception):
                await self._run(self._checkpoint, "PASSIVE")
                return True
        if self.reserve.release():
            log.event("reserve_released", level=30, error=str(exc))
            return True
        return False

    async def maintain(self) -> None:
        """Re-create the emergency reserve once the queue has drained enough (intake waits
        for it before taking new mail again)."""
        now = time.monotonic()
        if now - self._pruned > PRUNE_EVERY and self._records is not None:
            self._pruned = now
            await self._prune()
        if now - self._forgot > FORGET_EVERY and self._index is not None:
            self._forgot = now
            await self._forget_finished()
        if self.reserve.released and now - self._reserve_tried > 1.0:
            self._reserve_tried = now
            # The WAL file only shrinks when asked to; on a full disk it holds the room we need.
            with contextlib.suppress(Exception):
                await self._run(self._checkpoint, "TRUNCATE")
            if await asyncio.to_thread(self.reserve.ensure, 3.0):
                log.event("reserve_restored")

    async def _prune(self) -> None:
        """Remove delivery records older than the retention, a bounded batch at a time."""
        assert self._records is not None
        if self.retention <= 0:  # "0": off, records are kept for ever
            return
        before = time.time() - self.retention
        try:
            removed = await self._run(self._records.prune, before)
        except (OSError, sqlite3.Error) as exc:  # e.g. a full disk: the next pass tries again
            log.event("records_prune_failed", level=30, error=str(exc))
            return
        if removed:
            log.event("records_pruned", messages=removed)
            if removed >= 5000:
                self._pruned = -math.inf  # more to do: the next maintenance step goes on

    async def _forget_finished(self) -> None:
        """Remove from the index messages final for FINISHED_KEEP (see Index.forget_finished):
        one window of rows per pass, their outcomes copied into the records first."""
        try:
            removed = await self._run(self._forget_window, time.time() - FINISHED_KEEP)
        except (OSError, sqlite3.Error) as exc:  # e.g. a full disk: the next pass tries again
            log.event("index_forget_failed", level=30, error=str(exc))
            return
        if removed:
            log.event("index_forgot", messages=removed)

    def _forget_window(self, before: float) -> int:
        assert self._index is not None
        self._copy_records()  # the attempts rows about to go are in the records first
        removed, self._forget_from = self._index.forget_finished(before, self._forget_from)
        return removed

    def _checkpoint(self, mode: str) -> None:
        assert self._index is not None
        if self._records is not None:  # its log takes room on the same disk
            self._records.conn.execute(f"PRAGMA wal_checkpoint({mode})")
        busy, _, _ = self._index.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        if busy:
            raise OSError("checkpoint blocked by a reader")

    # --- on the index thread ------------------------------------------------------------

    def _write(self, batch: _Batch, made: dict[str, Committed | None]) -> tuple[int, list[str]]:
        """One transaction for the whole batch; (DSNs queued, segment files removed)."""
        index = self._index
        assert index is not None
        dsns = self._queue_dsns(batch.results, made)
        sealed = batch.sealed + self._dsn_sealed
        webhooks = self.webhooks
        with index._transaction():
            index.add_in_transaction(batch.claimed, self.max_lifetime, claimed=True)
            index.add_in_transaction(batch.queued + dsns, self.max_lifetime)
            if webhooks is not None and batch.results:
                # Before the attempts go in: a deferral is an event only the first time.
                self._add_events(batch.results, webhooks)
            _, removable = index.record_in_transaction([r.outcome for r in batch.results])
            if batch.postponed:
                index.postpone_in_transaction(batch.postponed)
            removable += index.seal_in_transaction(sealed)
            index.forget_in_transaction(batch.forgotten)
        self._dsn_sealed.clear()
        if batch.results and not self._uncopied:
            self._uncopied_since = time.monotonic()
        self._uncopied += len(batch.results)
        removable += self._retry_removal
        self._retry_removal = []
        return len(dsns), self._remove_segments(sorted(set(removable)))

    def _add_events(self, results: list[Result], webhooks: Webhooks) -> None:
        """Webhook events for these outcomes, in their transaction (relay.queue.outbox)."""
        from relay.delivery.webhooks import events_for

        assert self._index is not None
        message_ids = self._index.message_ids({r.outcome.msg for r in results})
        events = events_for(results, webhooks, self._index.conn, message_ids)
        if events:
            outbox.add_in_transaction(self._index.conn, events)
            self._outbox_added = True

    def _remove_segments(self, names: list[str]) -> list[str]:
        """Remove segments whose messages are all final, once the commit that says so is on
        disk; their rows go in the next batch, after the folder sync made the removal durable."""
        if not names:
            return []
        assert self._index is not None
        try:
            if self._records is not None:
                self._copy_records()  # a record is on disk before the file it describes goes
                self._records.make_durable()
            self._index.make_durable()
        except (OSError, sqlite3.Error) as exc:  # a reader in the way: the next batch retries
            log.event("segment_remove_postponed", segments=len(names), error=str(exc))
            self._retry_removal.extend(names)
            return []
        removed = []
        for name in names:
            try:
                os.unlink(self.spool_dir / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.event("segment_remove_failed", level=40, segment=name, error=str(exc))
                continue
            self._index_reader.forget(name)
            removed.append(name)
        if removed:
            try:
                sync_dir(self.spool_dir)
            except OSError as exc:  # the rows stay; recovery removes the files again if needed
                log.event("spool_sync_failed", level=40, error=str(exc))
                return []
        return removed

    def _queue_dsns(self, results: list[Result], made: dict[str, Committed | None]
                    ) -> list[Committed]:
        """One DSN per message and batch, listing every recipient that failed in it, appended
        to this process's segment and synced before the transaction that indexes it."""
        failed: dict[str, list[Result]] = defaultdict(list)
        for r in results:
            if r.outcome.state in (BOUNCED, EXPIRED) and r.due.sender and r.outcome.msg not in made:
                failed[r.outcome.msg].append(r)
        built: list[tuple[str, Envelope, bytes]] = []
        for msg, items in failed.items():
            made_dsn = self._dsn_or_none(msg, items)
            if made_dsn is None:
                made[msg] = None  # none to make, now or when a failed batch is retried
            else:
                built.append((msg, *made_dsn))
        if built:
            locations = self._dsn_writer.append(
                [(env.to_json(), [data]) for _, env, data in built])
            for (msg, env, _), location in zip(built, locations, strict=True):
                made[msg] = Committed(env, location)
                # The link an operator follows from a bounce to its DSN, and back.
                log.event("dsn_queued", id=env.id, original=msg, rcpt=env.recipients[0])
        # A batch retried after a failed commit indexes the DSNs it made the first time.
        in_batch = {r.outcome.msg for r in results}
        return [c for m, c in made.items() if c is not None and m in in_batch]

    def _dsn_or_none(self, msg: str, items: list[Result]) -> tuple[Envelope, bytes] | None:
        """The DSN for `items`, or None when none can be sent: to an unusable sender (it would
        bounce itself, or carry the sender's control characters into a new envelope), or
        when building it fails. The bounces are recorded either way: one message's DSN must
        never hold up the recording of every other outcome."""
        first = items[0].due
        problem = address_problem(first.sender, smtputf8=first.smtputf8)
        if problem is not None:
            log.event("dsn_skipped", level=30, id=msg, reason=f"unusable sender ({problem.value})")
            return None
        try:
            return self._dsn(msg, items)
        except (ValueError, UnicodeError) as exc:
            log.event("dsn_failed", level=40, id=msg, error=f"{type(exc).__name__}: {exc}")
            return None

    def _dsn(self, msg: str, items: list[Result]) -> tuple[Envelope, bytes]:
        first = items[0].due
        try:
            location = first.location
            head = self._index_reader.read(Location(location.segment, location.offset,
                                                    min(location.length, 70_000))) \
                if location is not None else b""
            headers = original_headers(head)
        except (OSError, SegmentCorrupt):
            headers = b""
        failures = [FailedRecipient(
            recipient=r.due.rcpt, status=r.status, diagnostic=r.outcome.reply,
            remote_mta=r.outcome.host if r.outcome.remote else None,
            last_attempt=r.outcome.time) for r in items]
        data = build_dsn(reporting_mta=self.hostname, queue_id=msg, original_sender=first.sender,
                         arrival=first.received, original_headers=headers, failures=failures)
        now = time.time()
        envelope = Envelope(id=new_queue_id(), sender="", recipients=(first.sender,),
                            received=now, client="", helo="", body="8BITMIME"
                            if any(b > 127 for b in data) else None,
                            smtputf8=not first.sender.isascii())
        return envelope, data
