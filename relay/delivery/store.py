"""The delivery process's side of the queue: claims work and records outcomes in batches.

One thread owns this process's index connection. Outcomes are recorded in batches (whatever
arrived while the previous batch was being written): DSNs for the batch's failures are made
durable first, then the index rows, then the spool is updated (files of finished messages are
removed, partial final states appended), with one folder fsync per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relay import log
from relay.addresses import address_problem
from relay.delivery.dsn import FailedRecipient, build_dsn, original_headers
from relay.queue.envelope import BOUNCED, EXPIRED, FINAL_STATES, Envelope, new_queue_id
from relay.queue.index import DueRecipient, Index, Outcome
from relay.queue.space import Reserve, is_disk_full
from relay.queue.spool import Spool

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Result:
    """An outcome plus what a DSN needs to describe it."""

    due: DueRecipient
    outcome: Outcome
    status: str   # enhanced status for the DSN, e.g. "5.1.1" or "4.4.7"


class DeliveryStore:
    def __init__(self, root: Path, db_path: Path, *, hostname: str, max_lifetime: float) -> None:
        self.spool = Spool(root)
        self.db_path = db_path
        self.hostname = hostname
        self.max_lifetime = max_lifetime
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self._janitor = Janitor(self.spool)
        self.reserve = Reserve(root)
        self._reserve_tried = 0.0
        self._index: Index | None = None
        self._pending: list[tuple[list[Result], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.on_recorded: Callable[[list[Result], int], None] | None = None
        self.syncs = 0

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        self._index = await self._run(Index, self.db_path)

    async def close(self, grace: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.flush(), grace)
        except TimeoutError:  # e.g. a full disk: those recipients are retried after restart
            log.event("record_abandoned", level=40, note="outcomes not recorded at shutdown")
        if self._index is not None:
            await self._run(self._index.close)
        self._thread.shutdown()
        await asyncio.to_thread(self._janitor.stop)

    async def claim(self, now: float, limit: int) -> list[DueRecipient]:
        assert self._index is not None
        return await self._run(self._index.claim_due, now, limit)

    async def next_due(self) -> float | None:
        assert self._index is not None
        return await self._run(self._index.next_due)

    async def release_claimed(self) -> int:
        """At a graceful stop, once every outcome is recorded: whatever is still claimed was
        never attempted, and is due again (the only delivery process is this one)."""
        assert self._index is not None
        return await self._run(self._index.release_active, time.time())

    async def read_message(self, queue_id: str) -> bytes:
        return await asyncio.to_thread(self.spool.read_message, queue_id)

    # --- recording ----------------------------------------------------------------------

    def submit(self, results: Sequence[Result]) -> asyncio.Future[None]:
        """Queue results for the next batch; the future resolves once they are recorded."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((list(results), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        return future

    async def flush(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            results = [r for group, _ in batch for r in group]
            dsns = await self._record_until_done(results) if results else 0
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            if self.on_recorded is not None:
                try:
                    self.on_recorded(results, dsns)
                except Exception as exc:  # recorded all the same; the next batch must go on
                    log.event("delivery_error", level=40, stage="recorded",
                              error=f"{type(exc).__name__}: {exc}")

    async def _record_until_done(self, results: list[Result]) -> int:
        """Record a batch, retrying (never dropping it) while the disk is full or failing.

        Until it is recorded the recipients stay 'active': nobody re-sends them meanwhile,
        and if the relay dies first they become due again at the next start."""
        made: set[str] = set()  # messages whose DSN is already queued: never make two
        delay = 0.5
        while True:
            try:
                dsns = await self._run(self._record, results, made)
            except Exception as exc:  # sqlite3.OperationalError, OSError (ENOSPC, EIO)
                if self.spend_reserve(exc):
                    continue
                log.event("record_failed", level=40, error=f"{type(exc).__name__}: {exc}",
                          outcomes=len(results), retry_in=f"{delay:g}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            return dsns

    def spend_reserve(self, exc: BaseException) -> bool:
        """On a full disk, free the reserve so that the index can be written: recording
        outcomes is what frees spool files, and without room for it nothing would."""
        if is_disk_full(exc) and self.reserve.release():
            log.event("reserve_released", level=30, error=str(exc))
            return True
        return False

    async def maintain(self) -> None:
        """Re-create the emergency reserve once the queue has drained enough (intake waits
        for it before taking new mail again)."""
        now = time.monotonic()
        if self.reserve.released and now - self._reserve_tried > 1.0:
            self._reserve_tried = now
            # The WAL file only shrinks when asked to; on a full disk it holds the room we need.
            with contextlib.suppress(Exception):
                await self._run(self._checkpoint)
            if await asyncio.to_thread(self.reserve.ensure):
                log.event("reserve_restored")

    def _checkpoint(self) -> None:
        assert self._index is not None
        self._index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- on the index thread ------------------------------------------------------------

    def _record(self, results: list[Result], made: set[str]) -> int:
        assert self._index is not None
        dsns = self._queue_dsns(results, made)
        finals: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for r in results:
            if r.outcome.state in FINAL_STATES:
                finals[r.outcome.msg].append((r.outcome.idx, r.outcome.state))

        def spool_partial_finals(finished: list[str]) -> None:
            # Written and fsynced before the index commits (synchronous=NORMAL, which a power
            # cut may undo): a message still pending keeps its final recipients in its file,
            # so nobody is sent twice. Finished messages lose their file instead.
            for msg in finals.keys() - set(finished):
                self.spool.mark_final(msg, finals[msg], sync=True)
                self.syncs += 1

        finished = self._index.record([r.outcome for r in results],
                                      before_commit=spool_partial_finals)
        if finished:
            self._janitor.remove(finished)
        return dsns

    def _queue_dsns(self, results: list[Result], made: set[str]) -> int:
        """One DSN per message and batch, listing every recipient that failed in it."""
        failed: dict[str, list[Result]] = defaultdict(list)
        for r in results:
            if r.outcome.state in (BOUNCED, EXPIRED) and r.due.sender and r.outcome.msg not in made:
                failed[r.outcome.msg].append(r)
        if not failed:
            return 0
        new: list[tuple[Envelope, int]] = []
        try:
            for msg, items in failed.items():
                made_dsn = self._dsn_or_none(msg, items)
                if made_dsn is None:
                    made.add(msg)  # none to make, now or when a failed batch is retried
                    continue
                envelope, data = made_dsn
                fd = self.spool.create(envelope, [data], complete=True)
                new.append((envelope, len(data)))
                try:
                    os.fdatasync(fd)
                    self.syncs += 1
                finally:
                    os.close(fd)
            if new:
                self.spool.sync_dir()
                self.syncs += 1
                assert self._index is not None
                self._index.insert(new, self.max_lifetime)
        except BaseException:
            for envelope, _ in new:  # not queued after all: the retry makes them again
                self.spool.remove(envelope.id)
            raise
        made.update(failed)
        return len(new)

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
            headers = original_headers(self.spool.read_message(msg)[:70_000])
        except OSError:
            headers = b""
        failures = [FailedRecipient(
            recipient=r.due.rcpt, status=r.status, diagnostic=r.outcome.reply,
            remote_mta=r.outcome.host, last_attempt=r.outcome.time) for r in items]
        data = build_dsn(reporting_mta=self.hostname, queue_id=msg, original_sender=first.sender,
                         arrival=first.received, original_headers=headers, failures=failures)
        now = time.time()
        envelope = Envelope(id=new_queue_id(), sender="", recipients=(first.sender,),
                            received=now, client="", helo="", body="8BITMIME"
                            if any(b > 127 for b in data) else None,
                            smtputf8=not first.sender.isascii())
        return envelope, data


class Janitor:
    """Removes the spool files of finished messages on its own thread, off the recording path.

    Unlinks are slow on some filesystems (journal locks, online discard); here they delay
    nobody. Each batch of removals ends with one folder fsync, so that a power cut cannot bring
    back more than the last batch of finished messages (the index commit is the other half:
    recovery also removes files whose message the index knows to be done)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._queue: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)
        self._thread.start()
        self.syncs = 0

    def remove(self, ids: Iterable[str]) -> None:
        self._queue.put(list(ids))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            ids = [i for group in batch if group for i in group]
            for queue_id in ids:
                self.spool.remove(queue_id)
            if ids:
                try:
                    self.spool.sync_dir()
                    self.syncs += 1
                except OSError as exc:
                    log.event("spool_sync_failed", error=str(exc))
