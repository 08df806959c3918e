"""Outbound source addresses: smooth weighted round-robin per message, as nginx does it.

Each pick adds every candidate's weight to its current value, takes the largest (the first
listed on a tie) and subtracts the total from it: weights 2:1 give a, b, a, a, b, a, ...
exactly, not only on average. A destination's `source_addresses` restricts it to a subset,
which keeps its own round-robin state (a subset shares nothing with the full pool).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from relay.config import IPAddress, SourceAddress

UNBINDABLE_MEMORY = 60.0  # an address that failed to bind is skipped this long


class SmoothWeighted:
    __slots__ = ("_current", "_total", "sources")

    def __init__(self, sources: Sequence[SourceAddress]) -> None:
        self.sources = tuple(sources)
        self._current = [0] * len(self.sources)
        self._total = sum(s.weight for s in self.sources)

    def pick(self, skip: Callable[[SourceAddress], bool] | None = None) -> SourceAddress | None:
        """The next source; with `skip`, the next among those it does not skip."""
        best = -1
        total = 0
        current = self._current
        for i, source in enumerate(self.sources):
            if skip is not None and skip(source):
                continue
            current[i] += source.weight
            total += source.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.sources[best]


class SourcePicker:
    """The pool of `[delivery] source_addresses`; empty: the kernel's choice (always None)."""

    def __init__(self, sources: Sequence[SourceAddress],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = tuple(sources)
        self.clock = clock
        self._by_address = {s.address: s for s in self.sources}
        self._rotations: dict[tuple[IPAddress, ...], SmoothWeighted] = {
            (): SmoothWeighted(self.sources)}
        self._unbindable: dict[IPAddress, float] = {}

    def __bool__(self) -> bool:
        return bool(self.sources)

    def pick(self, allowed: tuple[IPAddress, ...] = ()) -> SourceAddress | None:
        """The source for the next message; `allowed` (a destination's list) restricts it.

        A source that failed to bind lately is skipped while others remain."""
        if not self.sources:
            return None
        rotation = self._rotations.get(allowed)
        if rotation is None:
            rotation = SmoothWeighted([self._by_address[a] for a in allowed
                                       if a in self._by_address])
            self._rotations[allowed] = rotation
        if not self._unbindable:
            return rotation.pick()
        return rotation.pick(self._is_unbindable) or rotation.pick()

    def unbindable(self, source: SourceAddress) -> None:
        """`source` could not be bound (EADDRNOTAVAIL): skip it for a while."""
        self._unbindable[source.address] = self.clock() + UNBINDABLE_MEMORY

    def _is_unbindable(self, source: SourceAddress) -> bool:
        until = self._unbindable.get(source.address)
        if until is None:
            return False
        if until <= self.clock():
            del self._unbindable[source.address]
            return False
        return True

    def next_after(self, failed: set[IPAddress], allowed: tuple[IPAddress, ...] = ()
                   ) -> SourceAddress | None:
        """Another source for a message whose sources in `failed` could not be bound."""
        candidates = [self._by_address[a] for a in allowed if a in self._by_address] \
            if allowed else list(self.sources)
        rest = [s for s in candidates if s.address not in failed]
        return max(rest, key=lambda s: s.weight, default=None)
