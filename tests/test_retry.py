"""Retry scheduling (relay/delivery/retry.py): schedule steps, jitter, expiry."""

from __future__ import annotations

import random

import pytest

from relay.delivery.retry import JITTER, next_attempt, temporary_state
from relay.queue.envelope import DEFERRED, EXPIRED, UNKNOWN

SCHEDULE = (60.0, 300.0, 900.0, 3600.0, 14400.0)  # the contract's default 1m 5m 15m 1h 4h
NOW = 1_800_000_000.0
FAR = NOW + 5 * 86400


@pytest.mark.parametrize(("attempts_before", "step"), [
    (0, 60.0), (1, 300.0), (2, 900.0), (3, 3600.0), (4, 14400.0),
    (5, 14400.0), (6, 14400.0), (100, 14400.0),  # the last step repeats
])
def test_schedule_steps_and_last_step_repeats(attempts_before: int, step: float) -> None:
    rng = random.Random(1)
    for _ in range(200):
        delay = next_attempt(attempts_before, NOW, SCHEDULE, FAR, rng) - NOW
        assert step * (1 - JITTER) <= delay <= step * (1 + JITTER)


def test_jitter_is_about_ten_percent_and_spread() -> None:
    assert abs(JITTER - 0.1) < 1e-9
    rng = random.Random(7)
    delays = [next_attempt(0, NOW, SCHEDULE, FAR, rng) - NOW for _ in range(2000)]
    assert min(delays) >= 54.0 and max(delays) <= 66.0
    # Spread over the whole band, not clustered: a restart must not retry everything at once.
    assert min(delays) < 55.0 and max(delays) > 65.0
    assert len({round(d, 3) for d in delays}) > 1500
    assert sum(delays) / len(delays) == pytest.approx(60.0, abs=0.5)


def test_counts_from_the_end_of_the_previous_attempt() -> None:
    rng = random.Random(3)
    for now in (NOW, NOW + 1234.5):
        assert next_attempt(1, now, SCHEDULE, FAR, rng) - now == pytest.approx(300, rel=0.11)


def test_never_scheduled_after_expiry() -> None:
    expires = NOW + 100
    rng = random.Random(5)
    for attempts_before in range(10):
        at = next_attempt(attempts_before, NOW, SCHEDULE, expires, rng)
        assert NOW < at <= expires
    # A step that would overshoot lands exactly on the expiry, so the message expires on time.
    assert next_attempt(4, NOW, SCHEDULE, expires, rng) == expires
    assert next_attempt(0, NOW, SCHEDULE, NOW + 1000, rng) < NOW + 1000


def test_default_step_without_schedule() -> None:
    delay = next_attempt(0, NOW, (), FAR, random.Random(2)) - NOW
    assert 270 <= delay <= 330


def test_uses_module_random_without_rng() -> None:
    random.seed(11)
    a = next_attempt(0, NOW, SCHEDULE, FAR)
    random.seed(11)
    assert next_attempt(0, NOW, SCHEDULE, FAR) == a


def test_temporary_state_deferred_unknown_expired() -> None:
    state, at = temporary_state(0, NOW, SCHEDULE, FAR)
    assert state == DEFERRED and NOW + 54 <= at <= NOW + 66
    state, at = temporary_state(2, NOW, SCHEDULE, FAR, unknown=True)
    assert state == UNKNOWN and NOW + 810 <= at <= NOW + 990
    assert temporary_state(0, NOW, SCHEDULE, NOW) == (EXPIRED, NOW)
    assert temporary_state(3, NOW + 10, SCHEDULE, NOW) == (EXPIRED, NOW + 10)
    state, at = temporary_state(3, NOW, SCHEDULE, NOW + 30)
    assert state == DEFERRED and at == NOW + 30  # one last try at the expiry moment


def test_equal_seeds_give_one_retry_time_per_transaction() -> None:
    """The engine seeds one rng per transaction so its recipients come due together."""
    seed = 0.25
    times = {temporary_state(0, NOW, SCHEDULE, FAR, rng=random.Random(seed))[1]
             for _ in range(5)}
    assert len(times) == 1
    other = temporary_state(0, NOW, SCHEDULE, FAR, rng=random.Random(0.75))[1]
    assert other not in times
