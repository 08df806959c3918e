"""Group commit: makes accepted messages durable in batches on one dedicated thread.

Each new spool file is written and fdatasynced as soon as its DATA ends, on a pool of threads
(in parallel, so the filesystem merges the journal commits). A batch is every message whose file
became durable while the previous batch was being committed, up to `max_batch`; an idle relay
commits a lone message at once (no timer). Per batch the spool folder is fsynced once for all
the new names and the index rows go in one transaction.
Only then are the waiting SMTP sessions told to answer 250. Any failure refuses the whole batch:
a failed fsync is never retried (the kernel may have dropped the dirty pages), the files are
removed, and every session answers 451.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from relay.queue.envelope import Envelope
from relay.queue.index import Index
from relay.queue.spool import Spool


class QueueWriteError(Exception):
    """The message could not be made durable; nothing was acknowledged."""


@dataclass(slots=True)
class PendingMessage:
    envelope: Envelope
    parts: Sequence[bytes]            # message bytes not yet written
    size: int                         # total message length
    future: asyncio.Future[None]
    env: bytes | None = None          # the envelope as written into the file
    fd: int | None = None             # set when a large message was already streamed to its file
    env_len: int = 0
    error: BaseException | None = None  # writing or syncing its file failed


@dataclass
class CommitStats:
    batches: int = 0
    messages: int = 0
    file_syncs: int = 0
    dir_syncs: int = 0
    failed_batches: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # latest


_STOP = object()


class Committer:
    def __init__(self, spool: Spool, index_path: Path, *, max_lifetime: float,
                 max_batch: int = 64, sync: Callable[[int], None] = os.fdatasync,
                 on_committed: Callable[[list[Envelope]], None] | None = None) -> None:
        self.spool = spool
        self.index_path = index_path
        self.max_lifetime = max_lifetime
        self.max_batch = max_batch
        self._sync = sync
        self._on_committed = on_committed
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool-sync")
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = CommitStats()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._pool.shutdown()  # files being written still reach the committer's queue
        self._queue.put(_STOP)
        self._thread.join()

    async def commit(self, envelope: Envelope, parts: Sequence[bytes], size: int, *,
                     fd: int | None = None, env_len: int = 0) -> None:
        """Return once the message is durable; raise QueueWriteError if it could not be.

        The envelope is serialised here, before the message joins a batch: a message that
        cannot be written for its own reasons fails alone, never its batch."""
        env = envelope.to_json() if fd is None else None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # The file is written and synced at once, in parallel with the batch being committed;
        # the committer thread then only syncs the folder and the index for what is ready.
        self._pool.submit(self._write_then_queue,
                          PendingMessage(envelope, parts, size, future, env, fd, env_len))
        # Shielded: a client vanishing now must not cancel the commit of a batch half-way.
        await asyncio.shield(future)

    def _write_then_queue(self, pending: PendingMessage) -> None:
        try:
            self._write_one(pending)
        except Exception as exc:
            pending.error = exc
        self._queue.put(pending)

    # --- the committer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            index = Index(self.index_path)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                batch.append(more)
            self._commit(index, batch)  # type: ignore[arg-type]
        index.close()

    def _commit(self, index: Index, batch: list[PendingMessage]) -> None:
        try:
            failed = next((p.error for p in batch if p.error is not None), None)
            if failed is not None:
                raise failed  # one bad file refuses its whole batch: the disk is not to be trusted
            # The folder sync and the index rows are both needed before the 250 and do not
            # depend on each other: sync on a pool thread while the rows are inserted, and
            # commit the rows only once the sync succeeded (else they are rolled back).
            dir_synced = self._pool.submit(self._sync_dir)
            index.insert([(p.envelope, p.size) for p in batch], self.max_lifetime,
                         before_commit=dir_synced.result)
        except Exception as exc:
            self.stats.failed_batches += 1
            for pending in batch:
                self.spool.remove(pending.envelope.id)
            _resolve_all(batch, QueueWriteError(f"{type(exc).__name__}: {exc}"))
            return
        self.stats.batches += 1
        self.stats.messages += len(batch)
        self.stats.batch_sizes.append(len(batch))
        _resolve_all(batch, None)
        if self._on_committed is not None:
            self._on_committed([p.envelope for p in batch])

    def _write_one(self, pending: PendingMessage) -> None:
        if pending.fd is None:
            fd = self.spool.create(pending.envelope, pending.parts, complete=True,
                                   env=pending.env)
        else:
            fd = pending.fd
            self.spool.append(fd, pending.parts)
            self.spool.finish(fd, pending.env_len, pending.size)
        try:
            self._sync(fd)
            self.stats.file_syncs += 1
        finally:
            os.close(fd)

    def _sync_dir(self) -> None:
        fd = os.open(self.spool.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._sync(fd)
            self.stats.dir_syncs += 1
        finally:
            os.close(fd)


def _resolve_all(batch: list[PendingMessage], error: BaseException | None) -> None:
    for pending in batch:
        loop = pending.future.get_loop()
        if not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, pending.future, error)


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
