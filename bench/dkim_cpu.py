"""Delivery-process CPU per message, signed (RSA-2048, and RSA+Ed25519) vs unsigned.

    .venv/bin/python bench/dkim_cpu.py [--messages 1000] [--size 4096]

Runs the real relay (tests/relayproc.py) three times into an aiosmtpd sink in this process,
sends the same messages over 4 connections, and reads the `relay-delivery` process's CPU time
(utime + stime from /proc) before and after: the cost the signing adds where it runs. Not a
throughput benchmark (bench/run is); the sink and the clients share the machine.
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dkimkeys import write_ed25519, write_rsa
from relayproc import RelayProcess
from sink import Sink

from bench import CLK_TCK, cpu_ticks, tree

CLIENTS = 4


def delivery_cpu(relay: RelayProcess) -> float:
    """CPU seconds used so far by the relay's delivery process."""
    assert relay.proc is not None
    for st in tree([relay.proc.pid]):
        if st["comm"] == "relay-delivery":
            return cpu_ticks(st, with_children=False) / CLK_TCK
    raise RuntimeError("no relay-delivery process")


def message(i: int, size: int) -> bytes:
    head = (f"From: Billing <billing@invoices.test>\r\nTo: ap@customer.test\r\n"
            f"Subject: Invoice {i}\r\nMessage-ID: <{i}@invoices.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def send_all(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for data in messages:
            smtp.sendmail("app@invoices.test", ["ap@customer.test"], data)


def run(folder: Path, policies: str, count: int, size: int) -> float:
    with Sink() as sink:
        relay = RelayProcess(folder, routes={"customer.test": [sink.address]}, policies=policies)
        with relay:
            warm = [message(-i, size) for i in range(1, 21)]
            send_all(relay.port, warm)
            sink.wait_for(len(warm), timeout=60)
            before = delivery_cpu(relay)
            batch = [message(i, size) for i in range(count)]
            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(lambda k: send_all(relay.port, batch[k::CLIENTS]),
                              range(CLIENTS)))
            sink.wait_for(len(warm) + count, timeout=300)
            time.sleep(0.5)  # the last outcomes recorded
            return (delivery_cpu(relay) - before) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "keys").mkdir()
        write_rsa(root / "keys" / "rsa.pem")
        write_ed25519(root / "keys" / "ed.pem")
        rsa = ('[[sender]]\ndomain = "invoices.test"\n'
               'dkim = [ { selector = "rsa", key = "keys/rsa.pem" } ]\n')
        both = rsa.replace(" ]", ', { selector = "ed", key = "keys/ed.pem" } ]')
        # Alternating rounds: a busy neighbour on a shared machine hits every variant alike.
        for round_no in range(args.rounds):
            for name, policies in (("unsigned", ""), ("RSA-2048", rsa), ("RSA+Ed25519", both)):
                folder = root / f"{name}-{round_no}"
                folder.mkdir()
                (folder / "keys").symlink_to(root / "keys")
                cpu = run(folder, policies, args.messages, args.size)
                results.setdefault(name, []).append(cpu)
                print(f"round {round_no + 1} {name:12} {cpu * 1e6:6.0f} us", flush=True)
    print(f"delivery CPU per message, median of {args.rounds} rounds ({args.size} bytes,"
          f" {args.messages} messages, {CLIENTS} clients):")
    for name, values in results.items():
        print(f"  {name:12} {statistics.median(values) * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
