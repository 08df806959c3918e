"""Accept-latency probe: final dot -> 250, measured from the client, one message per connection.

    python3 bench/probe.py --port P --size BYTES [--interval 0.04] [--to probe@probe.test]

smtp-source reports no latency, so the harness runs this next to it during each measured round.
Open loop: a new session starts every --interval seconds whatever the earlier ones are doing
(up to --max-inflight at once), so a stall shows up as slow samples rather than as fewer ones.
Each session is plain SMTP like smtp-source's (EHLO, MAIL, RCPT, DATA, message, QUIT, one
message per connection, no pipelining).  The clock starts when the message's last data line
is in the kernel and the final ".\\r\\n" is handed to send(), and stops when the complete reply
line has arrived.

Prints {"ready": true} once running; on EOF on stdin it stops starting sessions, waits up to
10 s for those in flight and prints {"sent": N, "ok": N, "errors": N, "lat_us": [...],
"first_errors": [...]} as one JSON line.  Every message has a unique Message-Id.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def body_of(size: int, to: str, sender: str, msgid: str) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{to}>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-Id: <{msgid}>\r\nSubject: bench latency probe\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply; returns its last line."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed (buffer {self.buf[:60]!r})")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line


def one(port: int, size: int, sender: str, to: str, msgid: str) -> int:
    """Send one message; return final-dot -> reply time in ns (raises on any failure)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r = Reader(s)

        def expect(cmd: bytes | None, code: bytes) -> None:
            if cmd is not None:
                s.sendall(cmd)
            line = r.reply()
            if not line.startswith(code):
                raise RuntimeError(f"{(cmd or b'greeting').strip()[:30]!r} -> {line[:120]!r}")

        expect(None, b"220")
        expect(b"EHLO probe.bench.test\r\n", b"250")
        expect(f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
        expect(f"RCPT TO:<{to}>\r\n".encode(), b"250")
        expect(b"DATA\r\n", b"354")
        s.sendall(body_of(size, to, sender, msgid))
        t0 = time.perf_counter_ns()
        s.sendall(b".\r\n")
        line = r.reply()
        t1 = time.perf_counter_ns()
        if not line.startswith(b"250"):
            raise RuntimeError(f"final dot -> {line[:120]!r}")
        try:
            s.sendall(b"QUIT\r\n")
            r.reply()
        except OSError:
            pass
        return t1 - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--interval", type=float, default=0.04)
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--from", dest="sender", default="from@bench.test")
    ap.add_argument("--to", default="probe@probe.test")
    args = ap.parse_args()

    lat: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = 0
    stop = threading.Event()
    tag = f"{os.getpid()}.{time.time_ns()}"

    def task(i: int) -> None:
        try:
            ns = one(args.port, args.size, args.sender, args.to, f"probe.{tag}.{i}@bench.test")
        except Exception as e:
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
            return
        with lock:
            lat.append(ns // 1000)

    pool = ThreadPoolExecutor(args.max_inflight)

    def schedule() -> None:
        nonlocal sent
        nxt = time.monotonic()
        while not stop.is_set():
            pool.submit(task, sent)
            sent += 1
            nxt += args.interval
            delay = nxt - time.monotonic()
            if delay < 0:  # fell behind (the machine is saturated): don't burst to catch up
                nxt, delay = time.monotonic(), 0
            stop.wait(delay)

    th = threading.Thread(target=schedule, daemon=True)
    th.start()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()  # until EOF
    stop.set()
    th.join()
    pool.shutdown(wait=False, cancel_futures=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if len(lat) + len(errors) >= sent:
                break
        time.sleep(0.01)
    with lock:
        out = {"sent": sent, "ok": len(lat), "errors": len(errors),
               "unfinished": sent - len(lat) - len(errors), "lat_us": lat,
               "first_errors": errors[:5]}
    print(json.dumps(out), flush=True)
    os._exit(0)  # don't wait for sessions still hanging (they were reported as unfinished)


if __name__ == "__main__":
    sys.exit(main())
