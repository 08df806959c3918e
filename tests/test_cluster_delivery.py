"""Two real relays (`serve` subprocesses) sharing one real redis-server: a destination's rate and
connection cap hold across both, and each falls back to its share while Redis is gone."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import BINARY, RedisServer
from relayproc import RelayProcess
from sink import Received, Sink

pytestmark = pytest.mark.skipif(
    BINARY is None, reason="redis-server is not installed (apt-get install redis-server)")

DOMAIN = "example.net"
RATE = 10.0  # messages a second, for both relays together
SENDERS = ("billing@one.test", "billing@two.test")  # which relay a message came through


class CountingSink(Sink):
    """A sink that notes when each message arrived and how many sessions were open then."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, str, int]] = []  # (monotonic, sender, open sessions)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.arrivals.append((time.monotonic(), received.mail_from, len(self._connections)))
        super()._record(received)

    def times(self, sender: str | None = None, since: float = 0.0) -> list[float]:
        with self._lock:
            return [t for t, s, _ in self.arrivals if t >= since and sender in (None, s)]


def rate_of(times: list[float], skip: int) -> float:
    """Messages a second over `times`, leaving out the first `skip` (the bucket's burst)."""
    steady = times[skip:]
    assert len(steady) >= 10, f"too few messages to measure: {len(times)}"
    return (len(steady) - 1) / (steady[-1] - steady[0])


def submit(relay: RelayProcess, sender: str, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for n in range(count):
            client.sendmail(sender, [f"ap{n}@{DOMAIN}"],
                            f"From: {sender}\r\nSubject: invoice {n}\r\n\r\nPlease pay.\r\n")


def clustered(directory: Path, sink: Sink, redis_url: str | None) -> RelayProcess:
    directory.mkdir()
    policy = (f'[[destination]]\ndomain = "{DOMAIN}"\nroutes = ["{sink.address}"]\n'
              f'rate = "{int(RATE)}/s"\nmax_connections = 2\n')
    relay = RelayProcess(directory, policies=policy)
    if redis_url is not None:
        with relay.config.open("a") as config:
            config.write(f'\n[cluster]\nredis = "{redis_url}"\n')
    return relay


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    with CountingSink() as s:
        yield s


def test_two_relays_share_the_rate_and_the_connection_cap_and_fall_back_without_redis(
        tmp_path: Path, sink: CountingSink) -> None:
    with RedisServer() as redis, \
            clustered(tmp_path / "one", sink, redis.url) as one, \
            clustered(tmp_path / "two", sink, redis.url) as two:
        for relay in (one, two):
            assert "event=cluster_degraded" not in relay.log
        # A backlog on both nodes: together they deliver at the destination's rate, not twice.
        submit(one, SENDERS[0], 30)
        submit(two, SENDERS[1], 30)
        sink.wait_for(60, timeout=15)
        together = rate_of(sink.times(), skip=15)
        assert RATE * 0.85 <= together <= RATE * 1.15, together
        # max_connections = 2 holds over both nodes (counted by the sink at each message).
        assert max(n for _, _, n in sink.arrivals) <= 2

        # Redis gone: each node keeps delivering at its share, limit / nodes it last saw.
        redis.stop()
        outage = time.monotonic()
        submit(one, SENDERS[0], 25)
        submit(two, SENDERS[1], 25)
        sink.wait_for(110, timeout=15)
        for relay, sender in zip((one, two), SENDERS, strict=True):
            alone = rate_of(sink.times(sender, since=outage), skip=5)
            assert RATE / 2 * 0.8 <= alone <= RATE / 2 * 1.2, (sender, alone)
            [degraded] = relay.events("cluster_degraded", at_least=1)
            assert degraded["nodes"] == "2" and degraded["redis"] == redis.url
        assert max(n for t, _, n in sink.arrivals if t >= outage) <= 2


def test_without_cluster_section_nothing_needs_redis(tmp_path: Path,
                                                      sink: CountingSink) -> None:
    with clustered(tmp_path / "alone", sink, None) as relay:
        submit(relay, SENDERS[0], 3)
        sink.wait_for(3, timeout=10)
        assert "event=cluster_" not in relay.log and "redis" not in relay.log
