"""Group commit: makes accepted messages durable in batches, on one writer thread.

Sessions hand over finished messages on the event loop. Whatever arrived while the previous
batch was being written forms the next batch (at most `max_batch`): one write of all its
records into this process's current spool segment, one fdatasync, one hop back to the loop,
and every session of the batch answers 250. An idle relay commits a lone message at once (no
timer). Nothing here touches the queue index: the delivery process owns it and learns of each
message from a notice sent after the batch is durable (relay.queue.notices).

A failed write or sync refuses the whole batch (451) and is never retried on that segment: the
kernel may have dropped dirty pages it said it would write. A message that cannot even be
serialised fails alone, before it joins a batch.

Messages over the streaming threshold are written while they arrive into a segment of their
own (`open_stream`), and synced on their own when DATA ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay import metrics
from relay.queue.envelope import Envelope
from relay.queue.segments import SEGMENT_SIZE, Location, SegmentWriter, SingleWriter
from relay.queue.worker import WorkerThread


class QueueWriteError(Exception):
    """The message could not be made durable; nothing was acknowledged."""


@dataclass(slots=True)
class _Pending:
    envelope: Envelope
    env: bytes                       # the envelope as written into the record
    parts: Sequence[bytes]
    size: int
    future: asyncio.Future[Location]


@dataclass
class CommitStats:
    batches: int = 0
    messages: int = 0
    syncs: int = 0
    failed_batches: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # latest


# (envelope JSON, location) of messages just made durable; segment names just sealed.
CommittedHook = Callable[[list[tuple[bytes, Location]]], None]
SealedHook = Callable[[list[str]], None]


class Committer:
    def __init__(self, spool_dir: Path, writer: int, *, max_batch: int = 64,
                 segment_size: int = SEGMENT_SIZE, sync: Callable[[int], None] = os.fdatasync,
                 on_committed: CommittedHook | None = None,
                 on_sealed: SealedHook | None = None) -> None:
        self.spool_dir = spool_dir
        self.writer_id = writer
        self.max_batch = max_batch
        self._sync = sync
        self._on_committed = on_committed
        self._on_sealed = on_sealed
        self._sealed: list[str] = []  # filled on the writer thread, read after each batch
        self._writer = SegmentWriter(spool_dir, writer, size=segment_size, sync=self._counted,
                                     on_sealed=self._sealed.append)
        self._thread = WorkerThread("commit")
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.may_allocate: Callable[[], bool] | None = None  # False: do not prepare a segment
        self.stats = CommitStats()

    def start(self) -> None:
        """Prepare the first segment before the first message waits for it."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._thread.call_blocking(self._writer.prepare_spare)

    def stop(self) -> None:
        """Seal the current segment (call once the sessions are gone)."""
        self._thread.call_blocking(self._writer.close)
        self._thread.stop()
        self._report_sealed()

    def _counted(self, fd: int) -> None:
        self._sync(fd)
        self.stats.syncs += 1

    # --- small messages: group commit ----------------------------------------------------------

    async def commit(self, envelope: Envelope, parts: Sequence[bytes], size: int) -> Location:
        """Return once the message is durable; QueueWriteError if it could not be made so.

        The envelope is serialised here, before the message joins a batch: a message that
        cannot be written for its own reasons fails alone, never its batch."""
        env = envelope.to_json()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Location] = loop.create_future()
        self._pending.append(_Pending(envelope, env, parts, size, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        # Shielded: a client vanishing now must not cancel the commit of a batch half-way.
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                records = [(p.env, p.parts) for p in batch]
                try:
                    locations = await self._thread.call(self._writer.append, records)
                except Exception as exc:
                    self.stats.failed_batches += 1
                    _resolve_all(batch, QueueWriteError(f"{type(exc).__name__}: {exc}"))
                    self._report_sealed()
                    continue
                self.stats.batches += 1
                self.stats.messages += len(batch)
                self.stats.batch_sizes.append(len(batch))
                metrics.COMMIT_BATCH.observe(len(batch))
                for pending, location in zip(batch, locations, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(location)
                if self._on_committed is not None:
                    self._on_committed([(p.env, loc) for p, loc in zip(batch, locations,
                                                                        strict=True)])
                self._report_sealed()
                if not self._pending:
                    await self._prepare_spare()
        finally:
            self._flusher = None

    async def _prepare_spare(self) -> None:
        """Between batches, not on anyone's way: create the next segment if one is due. On a
        full disk that fails: the next batch that needs it tries again, and gets its 451."""
        if not self._writer.needs_spare:
            return
        if self.may_allocate is not None and not self.may_allocate():
            return  # room the delivery process needs more (see relay.queue.space)
        with contextlib.suppress(OSError):
            await self._thread.call(self._writer.prepare_spare)

    def _report_sealed(self) -> None:
        if self._sealed and self._on_sealed is not None:
            sealed, self._sealed[:] = list(self._sealed), []
            self._on_sealed(sealed)

    # --- large messages: a segment of their own ------------------------------------------------

    def open_stream(self, envelope: Envelope, parts: Sequence[bytes]) -> SingleWriter:
        """Start the file of a message that is still arriving. Blocking: call in a thread."""
        single = SingleWriter(self.spool_dir, self.writer_id, envelope.to_json())
        try:
            single.append(parts)
        except BaseException:
            single.discard()
            raise
        return single

    async def finish_stream(self, single: SingleWriter, parts: Sequence[bytes]) -> Location:
        """Append the rest, write the header, sync file and folder; QueueWriteError if not.

        Runs to its end even if the client vanishes meanwhile: a message that became durable
        is always announced to delivery, acknowledged or not."""
        task = asyncio.get_running_loop().create_task(self._finish_stream(single, parts))
        return await asyncio.shield(task)

    async def _finish_stream(self, single: SingleWriter, parts: Sequence[bytes]) -> Location:
        def finish() -> Location:
            single.append(parts)
            return single.finish(sync=self._counted)

        try:
            # Its own sync, off the batch writer's thread: small messages do not wait for it.
            location = await asyncio.get_running_loop().run_in_executor(None, finish)
        except Exception as exc:
            await asyncio.to_thread(single.discard)
            raise QueueWriteError(f"{type(exc).__name__}: {exc}") from exc
        metrics.COMMIT_BATCH.observe(1)  # a commit of its own
        if self._on_committed is not None:
            self._on_committed([(single.envelope, location)])
        if self._on_sealed is not None:
            self._on_sealed([location.segment])  # nothing else ever goes into it
        return location


def _resolve_all(batch: list[_Pending], error: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
