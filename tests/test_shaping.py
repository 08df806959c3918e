"""Shaping without sockets: token buckets and source rotation on a fake clock, and the engine's
dispatch (hand-back, connection caps, hops resolved first) with a fake store, resolver and
attempter. End to end on loopback sinks: tests/test_shaping_delivery.py."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from queuefiles import plant

from relay.addresses import HostPort
from relay.config import Config, DeliveryConfig, DestinationPolicy, Rate, SourceAddress
from relay.delivery.attempt import Connection, Job, Kind, Verdict
from relay.delivery.engine import DeliveryEngine
from relay.delivery.nexthop import DnsFailure, NextHop
from relay.delivery.sources import UNBINDABLE_MEMORY, SmoothWeighted, SourcePicker
from relay.delivery.store import DeliveryStore, Result
from relay.delivery.throttle import TokenBucket
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsRequirement
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import DueRecipient, Index


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def source(address: str, weight: int = 1) -> SourceAddress:
    return SourceAddress(ipaddress.ip_address(address), f"out-{address}.test", weight)


# --- the token bucket -------------------------------------------------------------------------

def test_bucket_lets_its_burst_through_then_one_token_per_period() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 3, clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.1)  # seconds until the next token
    clock.now += 0.05
    assert bucket.try_take() == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == pytest.approx(0.1)
    clock.now += 60
    assert [bucket.try_take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refills to burst only
    assert bucket.backlog_delay(9) == pytest.approx(1.0)  # nine more behind: tokens in 1 s


def test_bucket_reconfigured_keeps_its_tokens_up_to_the_new_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, 10, clock)
    bucket.reconfigure(100.0, 2)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.01)]
    with pytest.raises(ValueError):
        TokenBucket(1.0, 0, clock)


# --- smooth weighted round-robin ------------------------------------------------------------

def test_smooth_weighted_round_robin_is_nginx_exact() -> None:
    a, b, c = source("192.0.2.1", 5), source("192.0.2.2"), source("192.0.2.3")
    rotation = SmoothWeighted([a, b, c])
    # nginx's documented sequence for weights 5, 1, 1.
    assert [rotation.pick() for _ in range(7)] == [a, a, b, a, c, a, a]


def test_a_two_to_one_pool_is_two_to_one_in_every_three_messages() -> None:
    a, b = source("127.0.0.2", 2), source("127.0.0.3", 1)
    picker = SourcePicker([a, b])
    picks = [picker.pick() for _ in range(30)]
    for start in range(0, 30, 3):
        assert picks[start:start + 3].count(a) == 2
    assert picks.count(a) == 20 and picks.count(b) == 10


def test_a_destination_list_restricts_the_pool() -> None:
    a, b, c = source("192.0.2.1", 3), source("192.0.2.2", 1), source("192.0.2.3", 1)
    picker = SourcePicker([a, b, c])
    allowed = (b.address, c.address)
    picks = [picker.pick(allowed) for _ in range(10)]
    assert set(picks) == {b, c} and picks.count(b) == 5
    assert picker.pick() == a  # the full pool's rotation is its own
    assert not SourcePicker([]) and SourcePicker([]).pick() is None


def test_an_unbindable_source_is_skipped_for_a_while() -> None:
    clock = FakeClock()
    a, b = source("192.0.2.1", 2), source("192.0.2.2", 1)
    picker = SourcePicker([a, b], clock)
    picker.unbindable(a)
    assert {picker.pick() for _ in range(5)} == {b}
    assert picker.next_after({a.address}) == b
    assert picker.next_after({a.address, b.address}) is None
    clock.now += UNBINDABLE_MEMORY + 1
    assert a in {picker.pick() for _ in range(3)}


# --- the engine's dispatch, with fakes ---------------------------------------------------------

class FakeStore:
    """What the engine asks of a DeliveryStore, kept in lists."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.postponed: list[tuple[str, int, float]] = []
        self.on_recorded: Any = None
        self.hostname = "relay.test"
        self.max_lifetime = 3600.0

    def postpone(self, items: Sequence[tuple[str, int, float]]) -> None:
        self.postponed.extend(items)

    def submit(self, results: Sequence[Result]) -> None:
        self.results.extend(results)

    async def room_to_record(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def release_claimed(self) -> int:
        return 0

    async def read_message(self, due: DueRecipient) -> bytes:
        return b"Subject: x\r\n\r\nbody\r\n"


class FakeResolver:
    def __init__(self, fail: DnsFailure | None = None) -> None:
        self.fail = fail
        self.calls = 0

    async def for_hosts(self, hosts: Sequence[HostPort], kind: str) -> list[NextHop]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return [NextHop(h.host, h.host, h.port, kind) for h in hosts]

    async def for_domain(self, domain: str, port: int) -> list[NextHop]:
        return await self.for_hosts([HostPort("192.0.2.99", port)], "mx")


class FakeAttempter:
    """Delivers every job after `hold` is set; counts concurrent attempts per destination."""

    def __init__(self) -> None:
        self.config = Config()
        self.smime = None
        self.draining = False
        self.hold = asyncio.Event()
        self.hold.set()
        self.active = 0
        self.most = 0
        self.sources: list[str | None] = []

    async def deliver(self, job: Job, data: bytes, hops: Sequence[NextHop],
                      conn: Connection | None, requirement: TlsRequirement = OPPORTUNISTIC,
                      ) -> tuple[list[Verdict], Connection | None]:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await self.hold.wait()
        finally:
            self.active -= 1
        assert job.path is not None
        self.sources.append(str(job.path.source.address) if job.path.source else None)
        return [Verdict(d, Kind.DELIVERED, "250 ok", "2.0.0", hops[0])
                for d in job.recipients], None


def due(domain: str, n: int) -> list[DueRecipient]:
    now = time.time()
    return [DueRecipient(new_queue_id(), 0, f"r{i}@{domain}", domain, 0, "a@b.test", now,
                         now + 3600, None, False, None) for i in range(n)]


def engine_with(policy: DestinationPolicy, *, sources: tuple[SourceAddress, ...] = (),
                resolver: FakeResolver | None = None, clock: FakeClock | None = None
                ) -> tuple[DeliveryEngine, FakeStore, FakeAttempter]:
    config = Config(destinations=(policy,), delivery=DeliveryConfig(source_addresses=sources))
    store, attempter = FakeStore(), FakeAttempter()
    clock = clock or FakeClock()
    engine = DeliveryEngine(config, store, resolver or FakeResolver(), attempter,  # type: ignore[arg-type]
                            clock=clock, now=clock)
    return engine, store, attempter


ROUTE = (HostPort("192.0.2.50", 25),)


async def test_a_throttled_destination_keeps_a_window_and_hands_the_rest_back() -> None:
    clock = FakeClock()
    engine, store, attempter = engine_with(
        DestinationPolicy("slow.test", routes=ROUTE, rate=Rate(10, 1.0), burst=10), clock=clock)
    attempter.hold.clear()  # nothing finishes: what stays in memory is the window
    work = due("slow.test", 100)
    engine.dispatch(work)
    dest = engine.destinations["slow.test"]
    assert dest.window == 30  # its burst plus two seconds' worth
    assert dest.queued == 30 and len(store.postponed) == 70
    assert len(engine.in_flight) == 30  # the others do not hold in-flight room
    assert engine.counters.handed_back == 70
    dues = [when - clock.now for _, _, when in store.postponed]
    assert dues == sorted(dues)  # due in the order the bucket will have tokens for them
    # The first handed back needs the 21st token after the burst: due about 2 s from now
    # (a second early, so the window never runs dry); each next one a token (0.1 s) later.
    assert dues[0] == pytest.approx(1.1) and dues[-1] == pytest.approx(1.1 + 6.9)
    assert not store.results  # no attempt counted
    attempter.hold.set()
    await engine.drain(0.5)


async def test_an_unthrottled_destination_is_never_handed_back() -> None:
    engine, store, _attempter = engine_with(DestinationPolicy("fast.test", routes=ROUTE))
    engine.dispatch(due("fast.test", 300))
    assert engine.destinations["fast.test"].queued == 300 and not store.postponed
    await asyncio.wait_for(_until(lambda: len(store.results) == 300), 5)
    await engine.drain(0.5)


async def test_max_connections_hold_over_all_paths() -> None:
    pool = (source("192.0.2.1", 1), source("192.0.2.2", 1))
    engine, store, attempter = engine_with(
        DestinationPolicy("x.test", routes=ROUTE, max_connections=3), sources=pool)
    attempter.hold.clear()
    engine.dispatch(due("x.test", 20))
    await _until(lambda: attempter.active == 3)
    await asyncio.sleep(0.05)
    dest = engine.destinations["x.test"]
    assert dest.workers == 3 and attempter.most == 3
    attempter.hold.set()
    await asyncio.wait_for(_until(lambda: len(store.results) == 20), 5)
    assert attempter.most == 3
    assert sorted(set(attempter.sources)) == ["192.0.2.1", "192.0.2.2"]
    assert attempter.sources.count("192.0.2.1") == 10  # 1:1, per message
    await engine.drain(0.5)


async def test_a_destination_whose_dns_fails_takes_no_connection_slot() -> None:
    failure = DnsFailure(True, "4.4.3", "DNS lookup of x.test timed out")
    resolver = FakeResolver(failure)
    engine, store, attempter = engine_with(DestinationPolicy("x.test", routes=ROUTE),
                                           resolver=resolver)
    engine.dispatch(due("x.test", 5))
    assert engine.destinations["x.test"].workers == 0
    await asyncio.wait_for(_until(lambda: len(store.results) == 5), 5)
    assert attempter.most == 0 and resolver.calls == 1  # resolved once for all five
    assert {r.outcome.state for r in store.results} == {"deferred"}
    assert all("4.4.3" in (r.outcome.reply or "") for r in store.results)
    assert "x.test" not in engine.destinations
    await engine.drain(0.5)


async def test_a_reload_gives_destinations_their_new_rate_and_pool() -> None:
    clock = FakeClock()
    engine, _store, attempter = engine_with(DestinationPolicy("x.test", routes=ROUTE),
                                           clock=clock)
    attempter.hold.clear()
    engine.dispatch(due("x.test", 1))
    dest = engine.destinations["x.test"]
    assert dest.bucket is None
    pool = (source("192.0.2.7"),)
    new = Config(destinations=(DestinationPolicy("x.test", routes=ROUTE, rate=Rate(5, 60.0)),),
                 delivery=DeliveryConfig(source_addresses=pool))
    engine.apply(new)
    assert dest.bucket is not None and dest.bucket.per_second == pytest.approx(5 / 60)
    assert dest.bucket.burst == 5 and dest.window == 5
    assert engine.sources.pick() == pool[0]
    attempter.hold.set()
    await engine.drain(0.5)


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# --- the store's hand-back ------------------------------------------------------------------

async def test_a_handed_back_recipient_is_due_later_with_no_attempt_counted(
        tmp_path: Path) -> None:
    root = tmp_path / "var"
    env = Envelope(id=new_queue_id(), sender="a@b.test", recipients=("x@slow.test",),
                   received=time.time(), client="127.0.0.1", helo="app.test")
    plant(root, env, b"Subject: x\r\n\r\nbody\r\n")
    store = DeliveryStore(root, root / "index.sqlite", hostname="relay.test",
                          max_lifetime=3600.0)
    await store.start()
    [claimed] = await store.claim(time.time(), 10)
    later = time.time() + 30
    store.postpone([(claimed.msg, claimed.idx, later)])
    await store.flush()
    assert await store.claim(time.time(), 10) == []  # not due yet
    await store.close()
    index = Index(root / "index.sqlite")
    try:
        row = index.conn.execute("SELECT state, attempts, next_attempt FROM recipients"
                                 " WHERE msg = ?", (env.id,)).fetchone()
    finally:
        index.close()
    assert row[0] == "queued" and row[1] == 0 and row[2] == pytest.approx(later)


async def test_an_idle_connection_of_one_source_makes_room_for_another() -> None:
    pool = (source("192.0.2.1"), source("192.0.2.2"))
    engine, store, attempter = engine_with(
        DestinationPolicy("x.test", routes=ROUTE, max_connections=1), sources=pool)
    engine.dispatch(due("x.test", 1))
    await _until(lambda: len(store.results) == 1)
    assert engine.destinations["x.test"].paths  # its connection idles, kept for more jobs
    started = time.monotonic()
    engine.dispatch(due("x.test", 1))  # the other source's turn: no slot is free
    await _until(lambda: len(store.results) == 2)
    assert time.monotonic() - started < 0.5  # not after the idle connection timed out
    assert attempter.sources == ["192.0.2.1", "192.0.2.2"] and attempter.most == 1
    await engine.drain(0.5)


async def test_a_wildcard_policy_limits_each_matching_domain_separately() -> None:
    engine, store, attempter = engine_with(
        DestinationPolicy("*.example.org", routes=ROUTE, rate=Rate(10, 1.0)))
    attempter.hold.clear()
    engine.dispatch(due("a.example.org", 50) + due("b.example.org", 50))
    a, b = engine.destinations["a.example.org"], engine.destinations["b.example.org"]
    assert a.bucket is not b.bucket
    assert a.queued == b.queued == 30 and len(store.postponed) == 40
    attempter.hold.set()
    await engine.drain(0.5)
