"""The jobs waiting for one destination, in priority order: a drop-in for a deque of jobs.

High goes first, then normal, then bulk; but while bulk jobs wait, at least one pop in
`BULK_SHARE` takes bulk, so a steady stream of urgent invoices never starves a newsletter run
(the contract: "bulk still gets at least a tenth of each path"). Within one priority the order
is first in, first out. Every operation is O(1): three deques and a counter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from relay.queue.envelope import BULK, HIGH, NORMAL

BULK_SHARE = 10  # bulk gets at least one pop in this many while it waits


class _HasPriority(Protocol):
    @property
    def priority(self) -> str: ...


_J = TypeVar("_J", bound=_HasPriority)


class JobQueue(Generic[_J]):
    """append/appendleft/popleft/len/bool/iter/clear as on a deque, popped by priority."""

    __slots__ = ("_bulk", "_high", "_lanes", "_normal", "_since_bulk")

    def __init__(self) -> None:
        self._high: deque[_J] = deque()
        self._normal: deque[_J] = deque()
        self._bulk: deque[_J] = deque()
        self._lanes = {HIGH: self._high, NORMAL: self._normal, BULK: self._bulk}
        # Pops of high or normal jobs in a row while bulk waited.
        self._since_bulk = 0

    def _lane(self, job: _J) -> deque[_J]:
        # An unknown value (never written by intake) counts as normal rather than failing.
        return self._lanes.get(job.priority, self._normal)

    def append(self, job: _J) -> None:
        self._lane(job).append(job)

    def appendleft(self, job: _J) -> None:
        """Put a popped job back in front of its priority (a hand-back: not sent yet).

        It gets its turn back: a bulk job handed back goes out at the next pop, and a high or
        normal one does not count against bulk's share."""
        lane = self._lane(job)
        lane.appendleft(job)
        if lane is self._bulk:
            self._since_bulk = BULK_SHARE - 1
        elif self._since_bulk > 0:
            self._since_bulk -= 1

    def popleft(self) -> _J:
        """The next job; IndexError when empty (as a deque)."""
        bulk = self._bulk
        if bulk and self._since_bulk >= BULK_SHARE - 1:
            self._since_bulk = 0
            return bulk.popleft()
        lane = self._high or self._normal
        if lane:
            if bulk:
                self._since_bulk += 1
            return lane.popleft()
        self._since_bulk = 0
        return bulk.popleft()  # IndexError when every lane is empty

    def clear(self) -> None:
        for lane in self._lanes.values():
            lane.clear()
        self._since_bulk = 0

    def __len__(self) -> int:
        return len(self._high) + len(self._normal) + len(self._bulk)

    def __bool__(self) -> bool:
        return bool(self._high or self._normal or self._bulk)

    def __iter__(self) -> Iterator[_J]:
        """Every waiting job, high first (not exactly the pop order: bulk's share is not
        interleaved)."""
        for lane in self._lanes.values():
            yield from lane

    def counts(self) -> dict[str, int]:
        """Waiting jobs per priority (for logs and metrics)."""
        return {name: len(lane) for name, lane in self._lanes.items()}
