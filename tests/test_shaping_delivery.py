"""Shaping end to end: the engine in process with its real store and index, the real SMTP
client, aiosmtpd sinks on loopback (127.0.0.2 and 127.0.0.3 as source addresses); `serve` and
`check-config` as subprocesses for the start-up check of source addresses."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from queuefiles import plant
from relayproc import RelayProcess, write_config
from sink import Sink
from test_config_status import run_relay

from relay.addresses import HostPort
from relay.config import (
    Config,
    DeliveryConfig,
    DestinationPolicy,
    QueueConfig,
    Rate,
    ServerConfig,
    SourceAddress,
)
from relay.delivery.attempt import Attempter
from relay.delivery.engine import DeliveryEngine
from relay.delivery.nexthop import NextHopResolver
from relay.delivery.store import DeliveryStore
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import Index

LIFETIME = 3600.0
UNBINDABLE = "192.0.2.10"  # TEST-NET-1: on no interface of a test machine


class Engine:
    def __init__(self, root: Path, destinations: tuple[DestinationPolicy, ...],
                 sources: tuple[SourceAddress, ...] = ()) -> None:
        self.root = root
        self.db = root / "index.sqlite"
        config = Config(server=ServerConfig(hostname="relay.test"),
                        queue=QueueConfig(path=root, retry_schedule=(60.0,),
                                          max_lifetime=LIFETIME),
                        delivery=DeliveryConfig(source_addresses=sources, spf="off"),
                        destinations=destinations)
        self.store = DeliveryStore(root, self.db, hostname="relay.test", max_lifetime=LIFETIME)
        self.engine = DeliveryEngine(config, self.store, NextHopResolver(),
                                     Attempter(config, own_listeners=set()))
        Index(self.db).close()

    def plant(self, domain: str, count: int) -> None:
        for n in range(count):
            env = Envelope(id=new_queue_id(), sender="app@invoices.test",
                           recipients=(f"r{n}@{domain}",), received=time.time(),
                           client="127.0.0.1", helo="app.test")
            plant(self.root, env, b"Subject: invoice\r\n\r\nPlease pay.\r\n",
                  max_lifetime=LIFETIME)

    def states(self) -> Counter[tuple[str, int]]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
            return Counter(db.execute("SELECT state, attempts FROM recipients").fetchall())


@contextlib.asynccontextmanager
async def running(relay: Engine) -> AsyncIterator[Engine]:
    await relay.store.start()
    runner = asyncio.get_running_loop().create_task(relay.engine.run())
    try:
        yield relay
    finally:
        await relay.engine.drain(2.0)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await relay.store.close()


async def until(condition: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Stamps:
    """Sink hook: when each final dot arrived, and the most sessions open at once."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.most_sessions = 0
        self.sink: Sink | None = None
        self._lock = threading.Lock()

    def __call__(self, content: bytes) -> None:
        with self._lock:
            self.times.append(time.monotonic())
            assert self.sink is not None
            self.most_sessions = max(self.most_sessions, len(self.sink._connections))


def stamped(sinks: Callable[..., Sink], **options: object) -> tuple[Sink, Stamps]:
    stamps = Stamps()
    sink = sinks(data_reply=stamps, **options)
    stamps.sink = sink
    return sink, stamps


def route(sink: Sink) -> tuple[HostPort, ...]:
    return (HostPort(sink.host, sink.port),)


def source(address: str, weight: int = 1) -> SourceAddress:
    return SourceAddress(ipaddress.ip_address(address), f"out-{address}.test", weight)


async def test_a_rated_domain_gets_its_rate_while_another_flows_at_full_speed(
        tmp_path: Path, sinks: Callable[..., Sink]) -> None:
    slow_sink, slow = stamped(sinks)
    fast_sink, fast = stamped(sinks)
    relay = Engine(tmp_path / "var", (
        DestinationPolicy("slow.test", routes=route(slow_sink), rate=Rate(10, 1.0)),
        DestinationPolicy("fast.test", routes=route(fast_sink))))
    relay.plant("slow.test", 45)   # a backlog: 10 in the first burst, then 3.5 s at 10/s
    relay.plant("fast.test", 60)
    async with running(relay):
        start = time.monotonic()
        await until(lambda: len(fast.times) == 60)
        await until(lambda: len(slow.times) == 45)
    # No head-of-line blocking: the other domain was done while the rated one had barely begun.
    assert max(fast.times) - start < 1.0
    assert sum(t < max(fast.times) for t in slow.times) <= 20
    # After the burst (the bucket starts full, 10 deep), 10/s within 10 %.
    steady = sorted(slow.times)[10:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 9.0 <= rate <= 11.0, rate
    # What waited in the index was handed back without counting an attempt.
    assert relay.engine.counters.handed_back > 0
    assert relay.states() == {("delivered", 1): 105}


async def test_max_connections_and_messages_per_connection_hold_exactly(
        tmp_path: Path, sinks: Callable[..., Sink]) -> None:
    sink, stamps = stamped(sinks, accept_delay=0.02)
    relay = Engine(tmp_path / "var", (DestinationPolicy(
        "x.test", routes=route(sink), max_connections=3, max_messages_per_connection=4),))
    relay.plant("x.test", 36)
    async with running(relay):
        await until(lambda: len(sink.messages) == 36)
    assert stamps.most_sessions == 3
    per_connection = Counter(m.peer for m in sink.messages)
    assert max(per_connection.values()) == 4 and len(per_connection) >= 9


async def test_a_two_to_one_pool_is_exact_and_each_source_says_its_own_hostname(
        tmp_path: Path, sinks: Callable[..., Sink]) -> None:
    sink = sinks()
    pool = (source("127.0.0.2", 2), source("127.0.0.3", 1))
    relay = Engine(tmp_path / "var", (DestinationPolicy("x.test", routes=route(sink)),), pool)
    relay.plant("x.test", 30)
    async with running(relay):
        await until(lambda: len(sink.messages) == 30)
    by_source = Counter(m.peer[0] for m in sink.messages)
    assert by_source == {"127.0.0.2": 20, "127.0.0.3": 10}
    assert {(m.peer[0], m.helo) for m in sink.messages} == {
        ("127.0.0.2", "out-127.0.0.2.test"), ("127.0.0.3", "out-127.0.0.3.test")}


async def test_a_destination_source_list_restricts_it(
        tmp_path: Path, sinks: Callable[..., Sink]) -> None:
    sink = sinks()
    pool = (source("127.0.0.2", 5), source("127.0.0.3", 1))
    restricted = (ipaddress.ip_address("127.0.0.3"),)
    relay = Engine(tmp_path / "var", (DestinationPolicy(
        "x.test", routes=route(sink), source_addresses=restricted),), pool)
    relay.plant("x.test", 5)
    async with running(relay):
        await until(lambda: len(sink.messages) == 5)
    assert {m.peer[0] for m in sink.messages} == {"127.0.0.3"}


async def test_an_unbindable_source_moves_the_message_to_the_next_source(
        tmp_path: Path, sinks: Callable[..., Sink], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    sink = sinks()
    pool = (source(UNBINDABLE, 3), source("127.0.0.2", 1))
    relay = Engine(tmp_path / "var", (DestinationPolicy("x.test", routes=route(sink)),), pool)
    relay.plant("x.test", 8)
    async with running(relay):
        await until(lambda: len(sink.messages) == 8)
    assert {m.peer[0] for m in sink.messages} == {"127.0.0.2"}
    assert relay.states() == {("delivered", 1): 8}  # no deferral, no extra attempt
    moved = [r.getMessage() for r in caplog.records if "event=source_unusable" in r.getMessage()]
    assert moved and f"source={UNBINDABLE}" in moved[0] and "next=127.0.0.2" in moved[0]


def test_serve_refuses_an_unbindable_source_and_check_config_only_warns(
        tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, delivery={"source_addresses": [{"address": UNBINDABLE}]})
    relay.start(wait=False)
    assert relay.proc is not None
    assert relay.proc.wait(30) == 1  # not 78: the address may come up later
    assert f"delivery.source_addresses[0].address: cannot bind {UNBINDABLE}" in relay.log
    checked = run_relay("--config", str(relay.config), "check-config", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"cannot bind {UNBINDABLE}" in checked.stderr and checked.stdout.startswith("OK")


def test_check_config_is_quiet_about_bindable_sources(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"queue": {"path": "var"}, "delivery": {
        "source_addresses": [{"address": "127.0.0.2"}]}})
    checked = run_relay("--config", str(config), "check-config", cwd=tmp_path)
    assert checked.returncode == 0 and "cannot bind" not in checked.stderr


async def test_broken_starttls_is_remembered_per_source(sinks: Callable[..., Sink]) -> None:
    from relay.delivery.nexthop import NextHop
    from relay.delivery.paths import Path as DeliveryPath

    dest = sinks(broken_tls=True)
    attempter = Attempter(Config(), own_listeners=set())
    hop = NextHop("mx.x.test", dest.host, dest.port, "route")
    first, second = DeliveryPath(source("127.0.0.2")), DeliveryPath(source("127.0.0.3"))
    conn = await attempter.connect(hop, path=first)
    await conn.client.quit()
    assert dest.host in first.tls_broken and not second.tls_broken
    assert not attempter.tls_broken  # not the attempter's: the path's
