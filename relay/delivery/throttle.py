"""A destination's message rate: a token bucket (`rate`, `burst`) with an injectable clock.

The interface is "take a token now, or say how long until one is there", so a bucket shared
by several relay nodes (issue 10: the same algorithm in Redis) can replace this one behind
`acquire`, which is async for that reason; this node-local bucket never awaits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

Clock = Callable[[], float]
_EPSILON = 1e-9


class Throttle(Protocol):
    async def acquire(self) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is there (none taken)."""
        ...

    def backlog_delay(self, waiting: int) -> float:
        """Seconds until `waiting` more tokens than there are now have been refilled."""
        ...


class TokenBucket:
    """`per_second` tokens a second, at most `burst` kept; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "clock", "per_second")

    def __init__(self, per_second: float, burst: int, clock: Clock = time.monotonic) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> float:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        return self._tokens

    def try_take(self, count: int = 1) -> float:
        """0.0 and `count` tokens fewer, or the seconds until `count` whole tokens are there."""
        tokens = self._refill()
        if tokens >= count - _EPSILON:  # float steps of the clock must not cost a period
            self._tokens = max(0.0, tokens - count)
            return 0.0
        return (count - tokens) / self.per_second

    async def acquire(self) -> float:
        return self.try_take()

    def backlog_delay(self, waiting: int) -> float:
        missing = waiting + 1 - self._refill()
        return max(0.0, missing / self.per_second)

    def full(self) -> bool:
        """As good as new: forgetting this bucket lets nothing through too early."""
        return self._refill() >= self.burst

    def reconfigure(self, per_second: float, burst: int) -> None:
        """A reload: the new limits, keeping the tokens there are (capped at the new burst)."""
        self._refill()
        self.per_second = per_second
        self.burst = burst
        self._tokens = min(self._tokens, float(burst))
