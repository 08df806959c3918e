"""Paced SMTP load: start messages at a fixed rate and time final dot -> 250 for every one.

    python3 bench/paced.py --port P --rate 150 --seconds 30 [--size 4096] [--to to@example.net]

bench/scale.py runs it for the accept-latency measurement. smtp-source sends as fast as it can,
so it cannot offer "half of peak"; this client starts one message every 1/rate seconds
whatever the earlier ones are doing (open loop, up to --max-inflight at once), so a stall of
the relay shows up as slow messages, not as fewer messages. Each message is one connection,
as with smtp-source: EHLO, MAIL, RCPT, DATA, the message, QUIT, no pipelining. The clock
starts when the final ".\\r\\n" is handed to the kernel (the message's data already written
and drained) and stops when the complete reply line has been read.

When done it prints one JSON line: {"sent", "ok", "errors", "skipped" (a start found
--max-inflight sessions open), "lat_us": [...], "start_lag_ms": {p50, p99, max} (how late
sessions started against the plan: the generator's own health), "cpu_s", "wall_s",
"first_errors"}. Stdlib asyncio, on uvloop when it is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time


def message(size: int, to: str, sender: str, msgid: str) -> bytes:
    """A message of about `size` bytes with a unique Message-Id, ready for DATA (no dot)."""
    head = (f"From: <{sender}>\r\nTo: <{to}>\r\nMessage-Id: <{msgid}>\r\n"
            f"Subject: bench paced load\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * (max(0, size - len(head)) // len(line) + 1)


async def reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def one(port: int, body: bytes, sender: str, to: str) -> int:
    """One message on its own connection; final dot -> reply in ns (raises on any failure)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cmd, code in ((None, b"220"), (b"EHLO paced.bench.test\r\n", b"250"),
                          (f"MAIL FROM:<{sender}>\r\n".encode(), b"250"),
                          (f"RCPT TO:<{to}>\r\n".encode(), b"250"), (b"DATA\r\n", b"354")):
            if cmd:
                writer.write(cmd)
            line = await reply(reader)
            if not line.startswith(code):
                raise RuntimeError(f"{(cmd or b'greeting').strip()[:20]!r} -> {line[:100]!r}")
        writer.write(body)
        await writer.drain()
        t0 = time.perf_counter_ns()
        writer.write(b".\r\n")
        line = await reply(reader)
        elapsed = time.perf_counter_ns() - t0
        if not line.startswith(b"250"):
            raise RuntimeError(f"final dot -> {line[:100]!r}")
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reply(reader), 5)
        return elapsed
    finally:
        writer.close()


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile (the same rule as bench.percentile)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, -(-len(sorted_vals) * p // 100) - 1))
    return sorted_vals[int(k)]


async def run(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    tag = f"{os.getpid()}.{time.time_ns()}"
    total = int(args.rate * args.seconds)
    lat: list[int] = []
    errors: list[str] = []
    lags: list[float] = []
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()

    async def task(i: int) -> None:
        body = message(args.size, args.to, args.sender, f"paced.{tag}.{i}@bench.test")
        try:
            lat.append(await one(args.port, body, args.sender, args.to) // 1000)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    start = loop.time() + 0.05
    for i in range(total):
        planned = start + i / args.rate
        delay = planned - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, loop.time() - planned) * 1000)
        if len(tasks) >= args.max_inflight:
            skipped += 1  # the relay holds this many sessions open: a stall, counted
            continue
        t = loop.create_task(task(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    wall = loop.time() - start
    if tasks:
        await asyncio.wait(set(tasks), timeout=30)
    lags.sort()
    return {"sent": total - skipped, "ok": len(lat), "errors": len(errors), "skipped": skipped,
            "unfinished": total - skipped - len(lat) - len(errors), "lat_us": lat,
            "start_lag_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99),
                             "max": lags[-1] if lags else 0.0},
            "wall_s": round(wall, 3), "first_errors": errors[:5]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True, help="messages started per second")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--max-inflight", type=int, default=256)
    ap.add_argument("--from", dest="sender", default="from@bench.test")
    ap.add_argument("--to", default="to@example.net")
    args = ap.parse_args()
    try:
        import uvloop  # the relay's dependency; optional here
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = runner(run(args))
    t = os.times()
    out["cpu_s"] = round(t.user + t.system, 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
