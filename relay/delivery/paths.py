"""Who owns what in shaping: a `Destination` (one recipient domain) and its `Path`s.

A destination owns its token bucket (`rate`, `burst`), its connection cap (`max_connections`,
counted over all its paths) and its next hops. A path is one (source address, destination)
pair: it owns its queue of jobs, its connections (workers) and its TLS broken-host memory.
A wildcard policy such as `*.example.org` gives each matching domain a destination of its
own, so its limits apply to each domain separately, as Postfix does per destination.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.config import DestinationPolicy, IPAddress, SourceAddress
from relay.delivery.jobqueue import JobQueue
from relay.delivery.throttle import TokenBucket
from relay.delivery.tls import static_requirement
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsRequirement

if TYPE_CHECKING:
    from relay.delivery.attempt import Job
    from relay.delivery.cluster import Cluster, SharedBucket
    from relay.delivery.nexthop import NextHop

DEFAULT_MAX_CONNECTIONS = 20
DEFAULT_MAX_PER_CONNECTION = 100
# A throttled destination keeps in memory what its rate lets out in this many seconds (plus
# its burst); the rest goes back to the index, due when the bucket will have tokens for it.
HANDBACK_HORIZON = 2.0


@dataclass(eq=False)
class Path:
    source: SourceAddress | None  # None: the kernel's choice
    jobs: JobQueue[Job] = field(default_factory=JobQueue)
    workers: int = 0
    idle: int = 0
    more: asyncio.Event = field(default_factory=asyncio.Event)
    # Remote address -> until when its STARTTLS is known broken (plain text meanwhile).
    tls_broken: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> IPAddress | None:
        return self.source.address if self.source is not None else None

    @property
    def health_key(self) -> str:
        """The source as the HealthBook keys it ("" for the kernel's choice)."""
        return str(self.source.address) if self.source is not None else ""


@dataclass(eq=False)
class Destination:
    key: str
    policy: DestinationPolicy | None
    clock: Callable[[], float] = time.monotonic
    paths: dict[IPAddress | None, Path] = field(default_factory=dict)
    workers: int = 0   # connections over all paths
    queued: int = 0    # jobs waiting over all paths
    # Fixed by the policy's `tls`; None: `mta-sts`, asked of the StsSource per attempt.
    tls: TlsRequirement | None = OPPORTUNISTIC
    bucket: TokenBucket | SharedBucket | None = None
    # `[cluster] redis`: the bucket is shared with the other nodes (and so are the
    # connection slots, leased by the engine's workers); None: limits are this node's own.
    cluster: Cluster | None = None
    hops: list[NextHop] | None = None       # resolved before any worker starts
    resolving: asyncio.Task[None] | None = None
    handed_back_until: float = 0.0  # wall-clock due time of the last job handed back
    # Path health or its breaker has state for this destination (relay/delivery/health.py):
    # dispatch and workers consult it. False on the hot path, which then pays nothing.
    troubled: bool = False

    def __post_init__(self) -> None:
        self.bucket = _bucket(self.policy, self.clock, self.key, self.cluster)

    @classmethod
    def for_policy(cls, key: str, policy: DestinationPolicy | None,
                   clock: Callable[[], float] = time.monotonic,
                   cluster: Cluster | None = None) -> Destination:
        return cls(key, policy, clock, tls=static_requirement(policy), cluster=cluster)

    @property
    def max_connections(self) -> int:
        return self.policy.max_connections if self.policy else DEFAULT_MAX_CONNECTIONS

    @property
    def max_per_connection(self) -> int:
        return self.policy.max_messages_per_connection if self.policy \
            else DEFAULT_MAX_PER_CONNECTION

    @property
    def allowed_sources(self) -> tuple[IPAddress, ...]:
        return self.policy.source_addresses if self.policy else ()

    @property
    def window(self) -> int:
        """Jobs kept in memory when throttled (at least one)."""
        bucket = self.bucket
        if bucket is None:
            return 1 << 30
        return max(1, bucket.burst + int(bucket.per_second * HANDBACK_HORIZON))

    def path_for(self, source: SourceAddress | None,
                 tls_memory: dict[IPAddress | None, dict[str, float]]) -> Path:
        """The path from `source`; its TLS memory is the one kept for that source."""
        key = source.address if source is not None else None
        path = self.paths.get(key)
        if path is None:
            broken = tls_memory.get(key)
            if broken is None:
                broken = tls_memory[key] = {}
            path = self.paths[key] = Path(source, tls_broken=broken)
        return path

    def apply(self, policy: DestinationPolicy | None) -> None:
        """A reload: new limits for the next job; the bucket keeps its tokens."""
        self.policy = policy
        self.tls = static_requirement(policy)
        self.hops = None  # routes may have changed: resolved again before the next job
        rate = policy.rate if policy else None
        if rate is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = _bucket(policy, self.clock, self.key, self.cluster)
        else:
            self.bucket.reconfigure(rate.per_second, _burst(policy))


def _burst(policy: DestinationPolicy) -> int:
    assert policy.rate is not None
    return policy.burst if policy.burst is not None else max(1, policy.rate.count)


def _bucket(policy: DestinationPolicy | None, clock: Callable[[], float], key: str,
            cluster: Cluster | None) -> TokenBucket | SharedBucket | None:
    if policy is None or policy.rate is None:
        return None
    if cluster is not None:
        # The same key on every node: the destination (a wildcard policy's domains each
        # get their own, as locally).
        return cluster.bucket(key, policy.rate.per_second, _burst(policy), clock)
    return TokenBucket(policy.rate.per_second, _burst(policy), clock)
