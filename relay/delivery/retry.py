"""When to try a deferred recipient again, and when to give up."""

from __future__ import annotations

import random
from collections.abc import Sequence

from relay.queue.envelope import DEFERRED, EXPIRED, UNKNOWN

JITTER = 0.1  # ±10 %, so that a restart does not retry everything at the same moment


def next_attempt(attempts_before: int, now: float, schedule: Sequence[float], expires: float,
                 rng: random.Random | None = None) -> float:
    """Time of the next attempt after the (attempts_before + 1)-th failed one.

    The schedule counts from the end of the previous attempt; its last step repeats. The last
    try is never scheduled after the message expires, so it expires on time."""
    step = schedule[min(attempts_before, len(schedule) - 1)] if schedule else 300.0
    jitter = 1 + (rng or random).uniform(-JITTER, JITTER)
    return min(now + step * jitter, expires)


def temporary_state(attempts_before: int, now: float, schedule: Sequence[float], expires: float,
                    *, unknown: bool = False, rng: random.Random | None = None
                    ) -> tuple[str, float]:
    """(state, next_attempt) after a temporary failure: deferred/unknown, or expired.

    Pass equally seeded `rng`s for the recipients of one transaction so that they get the same
    jitter and stay together: one retry transaction rather than one per recipient."""
    if now >= expires:
        return EXPIRED, now
    return (UNKNOWN if unknown else DEFERRED), next_attempt(attempts_before, now, schedule,
                                                             expires, rng)
