"""Throttles shared through Redis (relay/delivery/cluster.py), against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio
from redisserver import BINARY, RedisServer

from relay.config import ClusterConfig, Config
from relay.delivery.cluster import Cluster, SharedBucket, redacted
from relay.delivery.throttle import TokenBucket

pytestmark = pytest.mark.skipif(
    BINARY is None, reason="redis-server is not installed (apt-get install redis-server)")

DOMAIN = "example.net"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
async def nodes(server: RedisServer) -> AsyncIterator[Callable[..., Cluster]]:
    """Make started Cluster nodes on `server`; all closed at the end."""
    made: list[Cluster] = []

    async def make(**kwargs: float) -> Cluster:
        node = Cluster(server.url, node_id=f"node{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(node)
        await node.start()
        return node

    yield make  # type: ignore[misc]
    for node in made:
        await node.close()


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def events(caplog: pytest.LogCaptureFixture, name: str, node: str = "node0") -> list[str]:
    return [line for r in caplog.records
            if f" event={name} node={node} " in (line := r.getMessage())]


async def drain(bucket: SharedBucket, seconds: float) -> int:
    """Take tokens as fast as the bucket allows for `seconds`; how many were taken."""
    taken = 0
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        delay = await bucket.acquire()
        if delay == 0:
            taken += 1
        else:
            await asyncio.sleep(min(delay, end - now))
    return taken


def test_without_cluster_section_nothing_needs_redis() -> None:
    config = Config()
    assert Cluster.from_config(config) is None
    url = "redis://:secret@127.0.0.1:6379/0"
    node = Cluster.from_config(dataclasses.replace(config, cluster=ClusterConfig(redis=url)))
    assert node is not None and node.url == url and not node.up  # nothing connected yet
    assert redacted(url) == "redis://127.0.0.1:6379/0"  # what the log says: no password


async def test_two_nodes_share_one_rate(nodes: Callable[..., Cluster]) -> None:
    a, b = await nodes(), await nodes()
    await until(lambda: a.nodes == 2 or b.nodes == 2)
    buckets = [a.bucket(DOMAIN, 20.0, 1), b.bucket(DOMAIN, 20.0, 1)]
    took = await asyncio.gather(*(drain(bucket, 2.0) for bucket in buckets))
    # 20/s for 2 s plus the burst of 1 = 41 together (two local buckets would let 82 through).
    assert 37 <= sum(took) <= 45, took


async def test_batch_take_and_one_round_trip_per_take(
        server: RedisServer, nodes: Callable[..., Cluster]) -> None:
    node = await nodes(heartbeat=60.0)  # no heartbeat during the count
    bucket = node.bucket(DOMAIN, 1000.0, 100)
    stats = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        before = await stats.info("commandstats")
        for _ in range(50):
            assert await bucket.acquire() == 0
        assert await bucket.acquire(40) == 0  # a batch: 40 tokens, one round trip
        wait = await bucket.acquire(100)       # not there yet: none taken, told how long
        assert 0 < wait <= 0.1
        after = await stats.info("commandstats")
    finally:
        await stats.aclose()
    calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
    calls.pop("cmdstat_info")
    # INFO counts the commands a script runs inside Redis too; the node sent EVALSHA only.
    inside = {"cmdstat_time", "cmdstat_hmget", "cmdstat_hset", "cmdstat_pexpire"}
    sent = {k: v for k, v in calls.items() if v and k not in inside}
    assert sent == {"cmdstat_evalsha": 52}
    with pytest.raises(ValueError):
        await bucket.acquire(101)  # more than the bucket can ever hold


async def test_leases_cap_connections_across_nodes_and_come_back_after_ttl(
        nodes: Callable[..., Cluster]) -> None:
    a = await nodes(heartbeat=0.1, lease_ttl=0.5)
    b = await nodes(heartbeat=0.1, lease_ttl=0.5)
    held_a = [await a.lease(DOMAIN, 3), await a.lease(DOMAIN, 3)]
    held_b = [await b.lease(DOMAIN, 3)]
    assert all(held_a + held_b)
    assert await a.lease(DOMAIN, 3) is None and await b.lease(DOMAIN, 3) is None
    await asyncio.sleep(1.0)  # two TTLs: the heartbeats renew live leases
    assert await b.lease(DOMAIN, 3) is None
    lease = held_b.pop()
    assert lease is not None
    await lease.release()  # a closed connection gives its slot back at once
    again = await b.lease(DOMAIN, 3)
    assert again is not None
    held_b.append(again)

    await a.close(release=False)  # node a is killed: its two slots wait for their TTL
    assert await b.lease(DOMAIN, 3) is None
    started = time.monotonic()
    while (extra := await b.lease(DOMAIN, 3)) is None:
        assert time.monotonic() - started < 2.0, "a dead node's leases never ran out"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.2
    assert await b.lease(DOMAIN, 3) is not None and b.held(DOMAIN) == 3 and extra
    assert await b.lease(DOMAIN, 3) is None


async def test_redis_down_falls_back_to_a_share_then_shares_again(
        server: RedisServer, nodes: Callable[..., Cluster],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    a = await nodes(heartbeat=0.1)
    await nodes(heartbeat=0.1)
    await until(lambda: a.nodes == 2)
    bucket = a.bucket(DOMAIN, 20.0, 4)
    assert await bucket.acquire() == 0 and a.up

    server.stop()
    started = time.monotonic()
    # Degraded: this node's share is 10/s with a burst of 2 (limit / the 2 nodes last seen).
    assert [await bucket.acquire() for _ in range(2)] == [0, 0]
    assert await bucket.acquire() == pytest.approx(0.1, abs=0.02)
    assert time.monotonic() - started < 0.5  # a dead Redis never holds a delivery long
    assert not a.up
    [line] = events(caplog, "cluster_degraded")
    assert "nodes=2" in line and f"redis://127.0.0.1:{server.port}/0" in line
    # Connections: 4 over the cluster -> 2 on this node.
    assert await a.lease(DOMAIN, 4) and await a.lease(DOMAIN, 4)
    assert await a.lease(DOMAIN, 4) is None

    server.start()  # an empty Redis on the same port
    await until(lambda: a.up)
    assert len(events(caplog, "cluster_restored")) == 1
    assert len(events(caplog, "cluster_degraded")) == 1  # logged once per outage
    # Shared again: a fresh shared bucket of 4, kept in Redis with a TTL.
    assert [await bucket.acquire() for _ in range(4)] == [0, 0, 0, 0]
    assert await bucket.acquire() > 0
    check = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        key = f"invoice-relay:bucket:{DOMAIN}"
        assert 0 < await check.pttl(key) <= 1200
        # The leases taken while down were re-registered by the heartbeat: they count.
        assert await check.zcard(f"invoice-relay:conn:{DOMAIN}") == 2
    finally:
        await check.aclose()


def test_local_bucket_takes_a_batch() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, 5, clock=lambda: now[0])
    assert bucket.try_take(5) == 0
    assert bucket.try_take(2) == pytest.approx(0.2)
    now[0] = 0.2
    assert bucket.try_take(2) == 0


async def test_close_ends_even_when_a_heartbeat_swallows_its_cancel(
        nodes: Callable[..., Cluster]) -> None:
    """Python 3.11 can lose a cancel (asyncio.timeout turning it into TimeoutError, which a
    heartbeat reports as Redis being down): close() must end all the same, not hang the
    delivery process's stop. Here the heartbeat swallows every cancel."""
    node = await nodes(heartbeat=0.05)
    beating = asyncio.Event()

    async def stubborn_beat() -> None:
        beating.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as a lost cancel
            await asyncio.sleep(30)

    node._beat = stubborn_beat  # type: ignore[method-assign]
    await asyncio.wait_for(beating.wait(), 5)
    started = time.monotonic()
    await asyncio.wait_for(node.close(), 10)
    assert time.monotonic() - started < 3
