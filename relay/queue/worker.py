"""One thread that runs blocking calls for an event loop, in order, with as little as possible
between the two: the group commit hands it a batch per fsync, so its overhead is paid per
batch, and a ThreadPoolExecutor's (locks, work items, idle-thread accounting and a chain of
future callbacks) showed up as a tenth of intake's CPU.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_STOP = object()


class WorkerThread:
    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the thread; its result, or its exception, on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return await future

    def call_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the thread and wait for it (outside an event loop)."""
        done = threading.Event()
        box: list[Any] = [None, None]  # error, result
        self._queue.put((None, (done, box), fn, args))
        done.wait()
        if box[0] is not None:
            raise box[0]
        return box[1]

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            loop, future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller
                result, error = None, exc
            if loop is None:
                done, box = future
                box[0], box[1] = error, result
                done.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
