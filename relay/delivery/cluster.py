"""Throttles shared by several relay nodes through one Redis (`[cluster] redis`).

A destination's rate and connection cap hold across every node using the same Redis:
- `SharedBucket`: the token bucket of relay/delivery/throttle.py, kept in Redis and taken by a
  Lua script (Redis's clock, one EVALSHA round trip per take of any number of tokens);
- `Cluster.lease`: a connection slot as a member of a per-destination sorted set scored by its
  expiry; a node killed with kill -9 stops renewing, so its slots come back after `lease_ttl`;
- a heartbeat (one script per `heartbeat` seconds) announces the node with a TTL key, renews
  its leases and counts the live nodes.
When Redis is unreachable, every node falls back to the limit divided by the number of nodes it
last saw (a local TokenBucket, a local connection count), logs `cluster_degraded`, retries in
the background and logs `cluster_restored` when sharing resumes. A delivery never waits more
than `timeout` on a dead Redis: after the first failure nobody asks Redis until the
background heartbeat gets through again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from relay import log, metrics
from relay.delivery.throttle import Clock, TokenBucket

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from relay.config import Config

PREFIX = "invoice-relay:"
HEARTBEAT = 2.0      # seconds between heartbeats (and reconnect attempts while degraded)
NODE_TTL = 10.0      # a node not heard of for this long no longer counts
LEASE_TTL = 15.0     # a connection slot of a node that stopped renewing comes back after this
TIMEOUT = 0.25       # longest wait on Redis for one command before falling back

# KEYS[1] the bucket hash; ARGV rate per second, burst, tokens wanted. Returns {wait, tokens}:
# wait "0" when the tokens were taken, else the seconds until that many are there (none taken).
# Times are Redis's own (TIME), so the nodes' clocks do not matter.
BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
end
local wait = 0
if tokens >= want - 1e-9 then
  tokens = math.max(0, tokens - want)
else
  wait = (want - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {string.format('%.17g', wait), string.format('%.17g', tokens)}
"""

# KEYS[1] the destination's lease set; ARGV member, max connections, lease ttl (ms).
# Returns -1 when the lease was taken, else the ms until the soonest lease runs out.
LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(first[2]) - now)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return -1
"""

# KEYS[1] the node set, KEYS[2] this node's key, KEYS[3..] lease sets; ARGV node id, node ttl
# (ms), lease ttl (ms), then one lease member per lease set. Renewing re-adds a lease that ran
# out (after an outage): the connection is real, so it counts until it is released.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node_ttl = tonumber(ARGV[2])
local lease_ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], now, 'PX', node_ttl)
redis.call('ZADD', KEYS[1], now + node_ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], node_ttl)
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], now + lease_ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], lease_ttl)
end
return redis.call('ZCARD', KEYS[1])
"""


class ClusterDown(Exception):
    """Redis did not answer within the timeout (or failed): use the local fallback."""


def redacted(url: str) -> str:
    """The URL without user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(eq=False)
class Lease:
    """One connection slot of a destination; `release` when the connection closes."""

    cluster: Cluster
    key: str        # destination
    member: str     # this slot's name in the destination's lease set
    shared: bool    # False: taken from the local fallback cap while Redis was down

    async def release(self) -> None:
        await self.cluster.release(self)


class Cluster:
    """This node's membership: the Redis client, the heartbeat, and the degraded state."""

    def __init__(self, url: str, node_id: str | None = None, *, prefix: str = PREFIX,
                 heartbeat: float = HEARTBEAT, node_ttl: float = NODE_TTL,
                 lease_ttl: float = LEASE_TTL, timeout: float = TIMEOUT) -> None:
        self.url = url
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.node_ttl = node_ttl
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.up = False   # sharing through Redis now (the `redis_up` metric)
        self.nodes = 1    # live nodes at the last heartbeat, this one included
        self._redis: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._held: dict[str, set[str]] = {}  # destination -> lease members held by this node
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False  # close() began: the heartbeat loop ends at its next turn
        self._degraded_logged = False

    @classmethod
    def from_config(cls, config: Config) -> Cluster | None:
        """None without `[cluster] redis` (limits are per node; nothing needs Redis)."""
        url = config.cluster.redis
        return cls(url) if url else None

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and announce this node (at most `timeout`: a dead Redis means degraded from
        the start), then keep the heartbeat going in the background."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside the client: a failure is a fallback now and a retry at the next
        # heartbeat, never a delivery waiting on reconnects.
        self._redis = Redis.from_url(self.url, decode_responses=True,
                                     socket_timeout=self.timeout,
                                     socket_connect_timeout=self.timeout,
                                     retry=Retry(NoBackoff(), 0))
        for name, lua in (("bucket", BUCKET_LUA), ("lease", LEASE_LUA),
                          ("heartbeat", HEARTBEAT_LUA)):
            self._scripts[name] = self._redis.register_script(lua)
        await self._beat()
        self._loop_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def close(self, release: bool = True) -> None:
        """Stop the heartbeat; with `release`, give back this node's leases and announce the
        leave (release=False is a node that dies: its slots wait for their TTL)."""
        self._closing = True
        task, self._loop_task = self._loop_task, None
        while task is not None and not task.done():
            # A cancel can be lost (Python 3.11's asyncio.timeout may turn a cancel that meets
            # its own deadline into TimeoutError, which _guarded reports as ClusterDown): cancel
            # again until it ends; _closing ends the loop at its next turn in any case.
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if release and self.up and self._redis is not None:
            with contextlib.suppress(ClusterDown):
                await self._guarded(self._leave())
        if self._redis is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await self._redis.aclose()
            self._redis = None
        self.up = False

    async def _leave(self) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, members in self._held.items():
                if members:
                    pipe.zrem(self._lease_key(key), *members)
            pipe.zrem(f"{self.prefix}nodes", self.node_id)
            pipe.delete(f"{self.prefix}node:{self.node_id}")
            await pipe.execute()
        self._held.clear()

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat)
            if not self._closing:
                await self._beat()

    async def _beat(self) -> None:
        """Announce this node and renew its leases in one round trip; count the live nodes."""
        lease_keys, members = [], []
        for key, held in self._held.items():
            for member in held:
                lease_keys.append(self._lease_key(key))
                members.append(member)
        keys = [f"{self.prefix}nodes", f"{self.prefix}node:{self.node_id}", *lease_keys]
        args = [self.node_id, int(self.node_ttl * 1000), int(self.lease_ttl * 1000), *members]
        try:
            if not self.up and self._redis is not None:
                # Pooled connections to a Redis that went away fail once each: drop them all
                # (nothing else uses Redis while degraded). A restarted Redis forgot the
                # scripts: load them now, so that a take stays one round trip.
                await self._redis.connection_pool.disconnect()
                await self._guarded(self._load_scripts())
            count = await self._guarded(self._scripts["heartbeat"](keys=keys, args=args))
        except ClusterDown:
            return
        self.nodes = max(1, int(count))
        metrics.set_redis_up(True)  # each heartbeat: cheap, and right after any restart
        if not self.up:
            self.up = True
            if self._degraded_logged:
                log.event("cluster_restored", node=self.node_id, redis=redacted(self.url),
                          nodes=self.nodes)
                self._degraded_logged = False

    async def _load_scripts(self) -> None:
        assert self._redis is not None
        for script in self._scripts.values():
            await self._redis.script_load(script.script)

    async def _guarded(self, call: Any) -> Any:
        """Await a Redis call within `timeout`; any failure turns the node degraded."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except Exception as exc:  # redis errors, OSError, TimeoutError: all mean "not now"
            with contextlib.suppress(Exception):
                call.close()  # a coroutine never awaited (timeout before it ran)
            self._degrade(exc)
            raise ClusterDown(str(exc)) from None

    def _degrade(self, exc: BaseException) -> None:
        self.up = False
        metrics.set_redis_up(False)
        if not self._degraded_logged:
            self._degraded_logged = True
            log.event("cluster_degraded", level=logging.WARNING, node=self.node_id,
                      redis=redacted(self.url),
                      nodes=self.nodes, error=f"{type(exc).__name__}: {exc}".strip(": "))

    # --- rates --------------------------------------------------------------------------------

    def bucket(self, key: str, per_second: float, burst: int,
               clock: Clock = time.monotonic) -> SharedBucket:
        """The shared bucket of destination `key` (the same key on every node)."""
        return SharedBucket(self, key, per_second, burst, clock)

    async def take(self, key: str, per_second: float, burst: int,
                   count: int) -> tuple[float, float]:
        """(seconds to wait, tokens left) from the shared bucket; ClusterDown when down."""
        if not self.up:
            raise ClusterDown("degraded")
        wait, tokens = await self._guarded(self._scripts["bucket"](
            keys=[f"{self.prefix}bucket:{key}"], args=[per_second, burst, count]))
        return float(wait), float(tokens)

    # --- connections --------------------------------------------------------------------------

    async def lease(self, key: str, max_connections: int) -> Lease | None:
        """A connection slot of destination `key` under `max_connections` over all nodes; None
        when every slot is taken. Degraded: under max_connections / nodes on this node."""
        member = f"{self.node_id}:{secrets.token_hex(4)}"
        held = self._held.setdefault(key, set())
        shared = self.up
        if shared:
            try:
                left = await self._guarded(self._scripts["lease"](
                    keys=[self._lease_key(key)],
                    args=[member, max_connections, int(self.lease_ttl * 1000)]))
            except ClusterDown:
                shared = False
            else:
                if int(left) >= 0:
                    return None
        if not shared and len(held) >= max(1, max_connections // self.nodes):
            return None
        held.add(member)
        return Lease(self, key, member, shared)

    async def release(self, lease: Lease) -> None:
        held = self._held.get(lease.key)
        if held is None or lease.member not in held:
            return
        held.discard(lease.member)
        if not held:
            del self._held[lease.key]
        if self.up:
            # Down: the lease runs out by itself (and it is no longer renewed).
            assert self._redis is not None
            with contextlib.suppress(ClusterDown):
                await self._guarded(self._redis.zrem(self._lease_key(lease.key), lease.member))

    def held(self, key: str) -> int:
        """Connection slots of destination `key` this node holds."""
        return len(self._held.get(key, ()))

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}conn:{key}"


class SharedBucket:
    """A destination's token bucket shared by every node: the interface of TokenBucket
    (`acquire`, `backlog_delay`, `full`, `reconfigure`, `per_second`, `burst`), so the engine
    holds either. Taking `count` tokens is one round trip, for a whole batch of messages."""

    __slots__ = ("_at", "_fallback", "_fallback_nodes", "_tokens", "burst", "clock", "cluster",
                 "key", "per_second")

    def __init__(self, cluster: Cluster, key: str, per_second: float, burst: int,
                 clock: Clock = time.monotonic) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.cluster = cluster
        self.key = key
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        # What Redis said at the last take, for backlog_delay (an estimate: other nodes take too).
        self._tokens = float(burst)
        self._at = clock()
        self._fallback: TokenBucket | None = None
        self._fallback_nodes = 0

    async def acquire(self, count: int = 1) -> float:
        """Take `count` tokens: 0.0 when taken, else the seconds until they are there."""
        if count > self.burst:
            raise ValueError(f"cannot take {count} tokens from a bucket of depth {self.burst}")
        if self.cluster.up:
            try:
                wait, tokens = await self.cluster.take(self.key, self.per_second, self.burst,
                                                       count)
            except ClusterDown:
                pass
            else:
                self._fallback = None
                self._tokens, self._at = tokens, self.clock()
                return wait
        return self._local().try_take(count)

    def _local(self) -> TokenBucket:
        """The fallback while Redis is down: this node's share of the limit."""
        nodes = self.cluster.nodes
        if self._fallback is None or self._fallback_nodes != nodes:
            self._fallback = TokenBucket(self.per_second / nodes,
                                         max(1, self.burst // nodes), self.clock)
            self._fallback_nodes = nodes
        return self._fallback

    def backlog_delay(self, waiting: int) -> float:
        if self._fallback is not None:
            return self._fallback.backlog_delay(waiting)
        now = self.clock()
        tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        return max(0.0, (waiting + 1 - tokens) / self.per_second)

    def full(self) -> bool:
        """The shared state lives in Redis (with a TTL): forgetting this object lets nothing
        through early, unless it holds the fallback's tokens."""
        return self._fallback is None or self._fallback.full()

    def reconfigure(self, per_second: float, burst: int) -> None:
        """A reload: the next take sends the new limits (the script takes them as arguments)."""
        self.per_second = per_second
        self.burst = burst
        self._fallback = None
