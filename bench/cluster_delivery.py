"""The cost of `[cluster] redis` end to end: msg/s of one real relay delivering to a loopback
sink with and without `[cluster]`, under a destination `rate` high enough never to bind (so
every message still takes a token, from Redis or locally, and every connection a lease).

    .venv/bin/python bench/cluster_delivery.py [--messages 2000] [--rounds 2]

Each round starts a relay (`python -m relay serve`, tests/relayproc.py) and a sink
(tests/sink.py, aiosmtpd in a thread), sends the messages over 4 SMTP sessions and times from
the first MAIL to the last message at the sink. Needs redis-server (Debian's package). The
sink and the clients share the 2 cores with the relay: compare the ratio, not the figures.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redisserver import RedisServer
from relayproc import RelayProcess
from sink import Sink

DOMAIN = "example.net"
SESSIONS = 4
BODY = "Subject: invoice\r\n\r\n" + "Please pay.\r\n" * 200  # about 2.6 KiB


def send(port: int, count: int, tag: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(count):
            client.sendmail("billing@one.test", [f"ap{tag}-{n}@{DOMAIN}"], BODY)


def one_round(directory: Path, messages: int, redis_url: str | None) -> float:
    directory.mkdir()
    with Sink() as sink:
        policy = (f'[[destination]]\ndomain = "{DOMAIN}"\nroutes = ["{sink.address}"]\n'
                  'rate = "100000/s"\nmax_connections = 8\n')
        relay = RelayProcess(directory, policies=policy)
        if redis_url is not None:
            with relay.config.open("a") as config:
                config.write(f'\n[cluster]\nredis = "{redis_url}"\n')
        with relay:
            per = messages // SESSIONS
            start = time.perf_counter()
            threads = [threading.Thread(target=send, args=(relay.port, per, t))
                       for t in range(SESSIONS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sink.wait_for(per * SESSIONS, timeout=300)
            return per * SESSIONS / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"local": [], "cluster": []}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        for r in range(args.rounds):
            for name, url in (("local", None), ("cluster", redis.url)):
                rate = one_round(Path(tmp) / f"{name}{r}", args.messages, url)
                results[name].append(rate)
                print(f"round {r} {name:8} {rate:8.0f} msg/s", flush=True)
    best = {name: max(rates) for name, rates in results.items()}
    print(f"best: without [cluster] {best['local']:.0f} msg/s, with {best['cluster']:.0f} msg/s,"
          f" ratio {best['cluster'] / best['local']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
