"""Micro-benchmark: the delivery engine's own CPU per job (dispatch, queues, workers, outcome),
with a store, resolver and attempter that do nothing. Compare two checkouts:

    .venv/bin/python bench/engine_dispatch.py              # this checkout
    PYTHONPATH=/work/main .venv/bin/python bench/engine_dispatch.py   # another one

Prints microseconds of CPU per job for the default policy (the hot path), a 2-address source
pool, and a rated destination whose bucket never runs dry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from typing import Any

import uvloop

from relay.addresses import HostPort
from relay.config import Config, DeliveryConfig, DestinationPolicy, Rate, SourceAddress
from relay.delivery.attempt import Kind, Verdict
from relay.delivery.engine import DeliveryEngine
from relay.delivery.nexthop import NextHop
from relay.queue.index import DueRecipient

JOBS = 20_000
ROUTE = (HostPort("192.0.2.50", 25),)


class Store:
    def __init__(self) -> None:
        self.done = 0
        self.on_recorded: Any = None
        self.hostname = "relay.test"
        self.max_lifetime = 3600.0

    def submit(self, results: Sequence[Any]) -> None:
        self.done += len(results)

    def postpone(self, items: Sequence[Any]) -> None:
        raise AssertionError("nothing is handed back in this benchmark")

    async def room_to_record(self) -> None:
        return None

    async def read_message(self, due: DueRecipient) -> bytes:
        return b"Subject: x\r\n\r\nbody\r\n"

    async def flush(self) -> None:
        return None

    async def release_claimed(self) -> int:
        return 0


class Resolver:
    async def for_hosts(self, hosts: Sequence[HostPort], kind: str) -> list[NextHop]:
        return [NextHop(h.host, h.host, h.port, kind) for h in hosts]


class Attempter:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.smime = None
        self.draining = False

    async def deliver(self, job: Any, data: bytes, hops: Sequence[NextHop], conn: Any,
                      requirement: Any = None) -> tuple[list[Verdict], Any]:
        return [Verdict(d, Kind.DELIVERED, "250 ok", "2.0.0", hops[0])
                for d in job.recipients], None


async def run(policy: DestinationPolicy, sources: tuple[SourceAddress, ...]) -> float:
    config = Config(destinations=(policy,), delivery=DeliveryConfig(source_addresses=sources,
                                                                     spf="off"))
    store = Store()
    engine = DeliveryEngine(config, store, Resolver(), Attempter(config))  # type: ignore[arg-type]
    now = time.time()
    due = [DueRecipient(f"M{n}", 0, f"r{n}@x.test", "x.test", 0, "a@b.test", now, now + 3600,
                        None, False, None) for n in range(JOBS)]
    started = time.process_time()
    for start in range(0, JOBS, 500):  # as the claim loop hands them over
        engine.dispatch(due[start:start + 500])
        await asyncio.sleep(0)
    while store.done < JOBS:
        await asyncio.sleep(0)
    spent = time.process_time() - started
    await engine.drain(0.1)
    return spent / JOBS * 1e6


def main() -> None:
    pool = tuple(SourceAddress(ipaddress.ip_address(a), "out.test") for a in
                 ("127.0.0.2", "127.0.0.3"))
    cases = {
        "default policy": (DestinationPolicy("x.test", routes=ROUTE), ()),
        "2-address pool": (DestinationPolicy("x.test", routes=ROUTE), pool),
        "rate, never dry": (DestinationPolicy("x.test", routes=ROUTE,
                                              rate=Rate(10**9, 1.0), burst=10**9), ()),
    }
    for name, (policy, sources) in cases.items():
        best = min(uvloop.run(run(policy, sources)) for _ in range(5))
        print(f"{name:16} {best:6.1f} us CPU per job")


if __name__ == "__main__":
    main()
