"""Queue control (`queue retry|hold|release|delete|bounce`) carried out by the index's writer.

While the relay runs, the delivery process listens on `queue.path/control.sock` (a unix
stream socket, mode 0600: only the queue's owner, or root acting as it, may connect). A
command sends one JSON request line and reads one JSON reply line. The delivery process
does the work itself: it stays the index's only writer (no second writer racing its batches)
and it is the one that must drop a held recipient from its in-memory queues before an
attempt starts. With the relay stopped, the command runs `execute` itself, under the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from relay import log
from relay.delivery.store import DeliveryStore, Result
from relay.queue.envelope import BOUNCED, DELETED
from relay.queue.index import Outcome
from relay.queue.operator import (
    BOUNCE_REPLY,
    BOUNCE_STATUS,
    DELETE_REPLY,
    Change,
    Request,
    UnknownIds,
    apply,
)

SOCKET_NAME = "control.sock"
REQUEST_LIMIT = 16 * 1024 * 1024  # a request line: up to some 500,000 queue ids
# Drops the jobs of these messages waiting in memory; returns the recipients in an attempt.
Dropper = Callable[[frozenset[str]], frozenset[tuple[str, int]]]


async def execute(store: DeliveryStore, req: Request, drop: Dropper | None = None) -> Change:
    """Carry out `req` through the store (its one index thread); UnknownIds changes nothing."""
    await store.flush()  # messages announced moments ago are in the index first
    busy: frozenset[tuple[str, int]] = frozenset()
    if drop is not None and req.verb in ("hold", "delete", "bounce"):
        busy = drop(frozenset(req.ids))
    change = await store.with_index(apply, req, time.time(), busy)
    if change.picked:
        state, reply, status = ((DELETED, DELETE_REPLY, "")
                                if req.verb == "delete" else (BOUNCED, BOUNCE_REPLY, BOUNCE_STATUS))
        now = time.time()
        # Recorded like any outcome (an attempts row says who decided, and when); a bounce
        # gets its DSN from the store, one per message, as for a remote refusal.
        await store.submit([Result(d, Outcome(d.msg, d.idx, state, now, now, reply,
                                              attempted=False), status)
                            for d in change.picked])
    return change


class ControlServer:
    """The delivery process's end of `queue.path/control.sock`."""

    def __init__(self, root: Path, store: DeliveryStore, drop: Dropper,
                 wake: Callable[[], None],
                 forgive: Callable[[str | None], None] | None = None) -> None:
        self.path = root / SOCKET_NAME
        self.store = store
        self.drop = drop
        self.wake = wake
        self.forgive = forgive  # `retry`: forget path cool-downs (of --domain D, or all)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a relay that was killed: we hold the queue lock
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=REQUEST_LIMIT)
        except OSError as exc:
            # A filesystem without unix sockets (some FUSE mounts): delivery goes on; queue
            # commands then say the running relay cannot be reached.
            log.event("control_unavailable", level=30, path=self.path,
                      error=os.strerror(exc.errno) if exc.errno else str(exc),
                      note="queue commands cannot reach the running relay")
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(await reader.readline())
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            log.event("control_failed", level=30, error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, object]:
        try:
            req = Request.from_json(line)
        except (ValueError, TypeError, AttributeError) as exc:
            return {"error": f"bad request: {exc}"}
        try:
            change = await execute(self.store, req, self.drop)
        except UnknownIds as exc:
            return {"error": "unknown", "ids": exc.ids}
        if req.verb == "retry" and self.forgive is not None:
            self.forgive(req.domain)  # else a resting path would defer the retry again
        if req.verb in ("retry", "release"):
            self.wake()  # look at the index now: the retry goes out within a second
        log.event("queue_" + req.verb, ids=",".join(req.ids[:20]) or None,
                  domain=req.domain, all=req.all or None, **change.to_dict())
        return change.to_dict()


__all__ = ["SOCKET_NAME", "ControlServer", "execute"]
