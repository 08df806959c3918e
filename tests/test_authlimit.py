"""Failed-AUTH token buckets: per client (IPv6 per /64), refilled at the configured rate, and
shared between processes that forked after the limiter was made."""

from __future__ import annotations

import os

from relay.smtp.authlimit import AuthFailureLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take_all(limiter: AuthFailureLimiter, address: str) -> int:
    taken = 0
    while limiter.try_take(address) and taken < 100:
        taken += 1
    return taken


def test_depth_then_rate() -> None:
    clock = Clock()
    limiter = AuthFailureLimiter(30, 3600, clock=clock)  # one token per 120 s
    assert take_all(limiter, "192.0.2.1") == 5
    clock.now += 119
    assert not limiter.try_take("192.0.2.1")
    clock.now += 2
    assert limiter.try_take("192.0.2.1")
    assert not limiter.try_take("192.0.2.1")
    clock.now += 24 * 3600
    assert take_all(limiter, "192.0.2.1") == 5  # refills up to the depth, never beyond


def test_clients_are_separate_and_success_gives_back() -> None:
    limiter = AuthFailureLimiter(30, 3600, clock=Clock())
    assert take_all(limiter, "192.0.2.1") == 5
    assert limiter.try_take("192.0.2.2")
    limiter.give_back("192.0.2.2")
    assert take_all(limiter, "192.0.2.2") == 5


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    limiter = AuthFailureLimiter(30, 3600, clock=Clock())
    assert take_all(limiter, "2001:db8:1:2::1") == 5
    assert not limiter.try_take("2001:db8:1:2:ffff::9")   # same /64
    assert limiter.try_take("2001:db8:1:3::1")            # another /64
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7")


def test_a_full_table_forgets_the_fullest_bucket_first() -> None:
    clock = Clock()
    limiter = AuthFailureLimiter(30, 3600, slots=8, clock=clock)
    assert take_all(limiter, "192.0.2.1") == 5       # the guesser: empty bucket
    for n in range(2, 40):                            # many others with one failure each
        assert limiter.try_take(f"192.0.2.{n}")
    assert not limiter.try_take("192.0.2.1")         # still remembered


def test_shared_across_fork() -> None:
    limiter = AuthFailureLimiter(30, 3600)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if take_all(limiter, "198.51.100.9") == 5 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not limiter.try_take("198.51.100.9")  # the child's failures count here too
