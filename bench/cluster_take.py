"""The cost of `[cluster] redis`: takes per second from a destination's shared token bucket
(one EVALSHA round trip each) against the node-local bucket, on a redis-server on loopback.

    .venv/bin/python bench/cluster_take.py [--seconds 2.0] [--concurrency 1,16]

Runs on uvloop, as the relay does, and starts its own redis-server on a free port (Debian's
package). Prints one line per figure: sequential takes show the round-trip latency; concurrent
takes (as many workers as a destination has connections) the throughput one node gets.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import time

import uvloop

from relay.delivery.cluster import Cluster
from relay.delivery.throttle import TokenBucket

RATE = 1e9  # never the limit: what is measured is the take itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def takes_per_second(take: object, seconds: float, workers: int) -> float:
    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await take()  # type: ignore[operator]
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - started)


async def measure(url: str, seconds: float, concurrency: list[int]) -> None:
    local = TokenBucket(RATE, 1 << 30)
    node = Cluster(url, node_id="bench", heartbeat=60.0)
    await node.start()
    shared = node.bucket("bench.example", RATE, 1 << 30)
    try:
        for workers in concurrency:
            for name, bucket in (("local", local), ("redis", shared)):
                rate = await takes_per_second(bucket.acquire, seconds, workers)
                print(f"{name:5} workers={workers:<3} takes/s={rate:10.0f} "
                      f"us/take={1e6 / rate:8.1f}")
    finally:
        await node.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        concurrency = [int(n) for n in args.concurrency.split(",")]
        uvloop.run(measure(f"redis://127.0.0.1:{port}/0", args.seconds, concurrency))
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
