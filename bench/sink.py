"""A fast SMTP sink that refuses a deterministic share of messages: the realistic destination.

    python3 bench/sink.py [--port 0] [--temp-pct 5] [--perm-pct 2] [--dsn-domain bench.test]
                          [--sample-dir DIR]

smtp-sink accepts everything, which hides queue build-up and retry cost.  This sink decides
per message, from a hash of its Message-Id header (smtp-source writes a unique one, and both
systems pass it on unchanged):

- `--perm-pct` percent get 550 after the final dot, on every attempt (the system bounces them
  and sends a DSN to the sender);
- `--temp-pct` percent get 451 after the final dot on their first attempt and 250 on any later
  attempt (the system must queue and retry them);
- the rest, and every message to a recipient in `--dsn-domain` or with the null sender (the
  DSNs the systems send for the 550s), get 250.  DSNs are counted on their own, never as
  outcomes.

A message's *outcome* is final when it was accepted, or refused with 550: a round is complete
when the outcome count reaches the round's N.  Messages without a Message-Id are accepted.

Control (one line per command on stdin; answers are JSON lines on stdout):

    arm T outcomes|replies   print {"reached": T, "t": MONOTONIC} once the count reaches T;
                             `replies` counts every reply after a final dot to a non-DSN
                             message (for a direct smtp-source round, which never retries)
    stats                    print {"stats": {...}} now
    shares off|on            off: accept every message (a direct smtp-source round measures
                             the sink's ceiling that way: smtp-source stops at the first
                             refusal); on: the refusing shares again (the default)
    sample EVERY MAX         keep every EVERY-th non-DSN message in full (dot-stuffed, as on the
                             wire) as --sample-dir/NNNNNN.eml, at most MAX files from now on;
                             `sample 0 0` stops; answers {"sampling": [EVERY, MAX]}

Every non-DSN message whose header section has a DKIM-Signature field counts in `dkim_signed`
(the signed scenario of bench/run checks that every message of a signed round was signed, and
verifies the kept samples with dkimpy).

Besides, a {"stats": {...}} line is pushed at most every 50 ms while counters change (the
harness's "current" view), and {"ready": PORT} once listening.  time.monotonic() is the
system-wide CLOCK_MONOTONIC, comparable with the harness's.  EOF on stdin or SIGTERM stops it.

Stdlib asyncio with uvloop when it is importable.  The data phase never stores a message: it
keeps its first 16 KiB (headers) and the last 4 bytes (to find "\\r\\n.\\r\\n" across reads),
except for the few messages `sample` asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import sys
import time

HEAD_KEEP = 16384
MSGID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
DKIM_SIG = re.compile(rb"^dkim-signature:", re.IGNORECASE | re.MULTILINE)
EHLO = (b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250 DSN\r\n")


class Stats:
    def __init__(self) -> None:
        self.accepted: set[bytes] = set()      # Message-Ids answered 250 (non-DSN)
        self.refused: set[bytes] = set()       # Message-Ids answered 550
        self.deferred: set[bytes] = set()      # Message-Ids answered 451 once
        self.c = {"sessions": 0, "open": 0, "accepted": 0, "accepted_dup": 0, "no_msgid": 0,
                  "temp": 0, "retried_ok": 0, "perm": 0, "perm_repeat": 0, "dsn": 0,
                  "replies": 0, "bytes": 0, "dkim_signed": 0, "sampled": 0}
        self.arms: list[tuple[int, str]] = []
        self.changed = False
        self.sample_every = 0     # keep every N-th non-DSN message in full (0: none)
        self.sample_left = 0
        self.sample_seen = 0

    def take_sample(self) -> bool:
        """Whether the message whose DATA starts now is to be kept in full."""
        if not self.sample_every or self.sample_left <= 0:
            return False
        self.sample_seen += 1
        if (self.sample_seen - 1) % self.sample_every:
            return False
        self.sample_left -= 1
        return True

    def outcomes(self) -> int:
        return len(self.accepted) + len(self.refused) + self.c["no_msgid"]

    def snapshot(self) -> dict:
        d = dict(self.c)
        d["outcomes"] = self.outcomes()
        d["t"] = time.monotonic()
        return d

    def check_arms(self) -> None:
        if not self.arms:
            return
        now = time.monotonic()
        values = {"outcomes": self.outcomes(), "replies": self.c["replies"]}
        left = []
        for target, what in self.arms:
            if values[what] >= target:
                emit({"reached": target, "what": what, "t": now})
            else:
                left.append((target, what))
        self.arms = left


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Decider:
    def __init__(self, temp_pct: float, perm_pct: float, dsn_domain: bytes) -> None:
        self.perm = int(perm_pct * 100)             # out of 10,000
        self.temp = self.perm + int(temp_pct * 100)
        self.dsn_suffix = b"@" + dsn_domain.lower()
        self.on = True

    def bucket(self, msgid: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(msgid, digest_size=8).digest(), "big") % 10000


class Session(asyncio.Protocol):
    def __init__(self, stats: Stats, decider: Decider, sample_dir: str | None) -> None:
        self.stats, self.decider, self.sample_dir = stats, decider, sample_dir
        self.full: bytearray | None = None  # the whole message, when it is a sample
        self.buf = b""
        self.in_data = False
        self.head = bytearray()
        self.tail = b""
        self.size = 0
        self.sender = b""
        self.rcpts: list[bytes] = []
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.t = transport
        self.stats.c["open"] += 1
        transport.write(b"220 bench-sink ESMTP\r\n")

    def connection_lost(self, exc) -> None:
        self.stats.c["open"] -= 1
        self.stats.c["sessions"] += 1
        self.stats.changed = True

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            data = self._data(data)
            if data is None:
                return
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            i = buf.find(b"\r\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 2:]
            reply = self._command(line)
            if reply is None:  # QUIT
                self.t.write(b"".join(out) + b"221 2.0.0 Bye\r\n")
                self.t.close()
                return
            out.append(reply)
            if self.in_data:
                self.t.write(b"".join(out))
                out = []
                rest = self._data(buf)
                if rest is None:
                    self.buf = b""
                    return
                buf = rest
        if out:
            self.t.write(b"".join(out))
        if len(buf) > 4096:
            self.t.write(b"500 5.5.0 line too long\r\n")
            self.t.close()
            return
        self.buf = buf

    def _command(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return EHLO
        if verb == b"HELO":
            return b"250 bench-sink\r\n"
        if verb == b"MAIL":
            arg = line[10:].strip() if line[:10].upper() == b"MAIL FROM:" else b""
            self.sender = arg.split(b">", 1)[0].lstrip(b"<")
            self.rcpts = []
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            arg = line[8:].strip() if line[:8].upper() == b"RCPT TO:" else b""
            self.rcpts.append(arg.split(b">", 1)[0].lstrip(b"<").lower())
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self.rcpts:
                return b"503 5.5.1 Error: need RCPT command\r\n"
            self.in_data = True
            self.head = bytearray()
            self.tail = b"\r\n"  # the CRLF of the DATA line: "." alone ends an empty message
            self.size = 0
            # DSNs are never sampled; MAIL's sender is known here
            keep = self.sample_dir and self.sender and self.stats.take_sample()
            self.full = bytearray() if keep else None
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"RSET":
            self.rcpts = []
            return b"250 2.0.0 Ok\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            return None
        return b"502 5.5.2 Error: command not recognized\r\n"

    def _data(self, chunk: bytes) -> bytes | None:
        """Consume message data; return what follows the final dot, or None if not there yet."""
        window = self.tail + chunk
        i = window.find(b"\r\n.\r\n")
        if i < 0:
            if self.full is not None:
                self.full += chunk
            if len(self.head) < HEAD_KEEP:
                self.head += chunk[:HEAD_KEEP - len(self.head)]
            self.size += len(chunk)
            self.tail = window[-4:]
            return None
        body_end = i + 2 - len(self.tail)  # end of the message within chunk (may be < 0)
        if body_end > 0 and len(self.head) < HEAD_KEEP:
            self.head += chunk[:min(body_end, HEAD_KEEP - len(self.head))]
        self.size += max(body_end, 0)
        if self.full is not None:
            self._keep_sample(chunk, body_end)
        rest = window[i + 5:]
        self.in_data = False
        self.t.write(self._decide())
        return rest

    def _keep_sample(self, chunk: bytes, body_end: int) -> None:
        """Write the sampled message (up to and including the CRLF before the final dot)."""
        full = self.full
        self.full = None
        if body_end >= 0:
            full += chunk[:body_end]
        else:  # the message ended inside the bytes already kept
            del full[len(full) + body_end:]
        st = self.stats
        st.c["sampled"] += 1
        # a bench sink writing a few small files: blocking here costs microseconds
        with open(os.path.join(self.sample_dir, f"{st.c['sampled']:06d}.eml"), "wb") as f:
            f.write(full)

    def _decide(self) -> bytes:
        st, c = self.stats, self.stats.c
        st.changed = True
        c["bytes"] += self.size
        d = self.decider
        if not self.sender or any(r.endswith(d.dsn_suffix) for r in self.rcpts):
            c["dsn"] += 1
            return b"250 2.0.0 Ok: dsn\r\n"
        c["replies"] += 1
        hdr_end = self.head.find(b"\r\n\r\n")
        m = MSGID.search(self.head, 0, hdr_end if hdr_end >= 0 else len(self.head))
        if m is None:
            c["no_msgid"] += 1
            c["accepted"] += 1
            st.check_arms()
            return b"250 2.0.0 Ok: queued (no Message-Id)\r\n"
        msgid = m.group(1).strip()
        if DKIM_SIG.search(self.head, 0, hdr_end if hdr_end >= 0 else len(self.head)):
            c["dkim_signed"] += 1
        b = d.bucket(msgid) if d.on else 10000
        if b < d.perm:
            if msgid in st.refused:
                c["perm_repeat"] += 1
            else:
                st.refused.add(msgid)
                c["perm"] += 1
            st.check_arms()
            return b"550 5.7.1 bench-sink: refused (deterministic permanent share)\r\n"
        if b < d.temp and msgid not in st.deferred:
            st.deferred.add(msgid)
            c["temp"] += 1
            st.check_arms()
            return b"451 4.3.0 bench-sink: try again later (deterministic temporary share)\r\n"
        c["accepted"] += 1
        if b < d.temp:
            c["retried_ok"] += 1
        if msgid in st.accepted:
            c["accepted_dup"] += 1
        else:
            st.accepted.add(msgid)
        st.check_arms()
        return b"250 2.0.0 Ok: queued\r\n"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--temp-pct", type=float, default=5.0)
    ap.add_argument("--perm-pct", type=float, default=2.0)
    ap.add_argument("--dsn-domain", default="bench.test")
    ap.add_argument("--sample-dir", default=None,
                    help="folder for the messages `sample` asks to keep in full")
    args = ap.parse_args()
    loop = asyncio.get_running_loop()
    stats = Stats()
    decider = Decider(args.temp_pct, args.perm_pct, args.dsn_domain.encode())
    server = await loop.create_server(lambda: Session(stats, decider, args.sample_dir),
                                      args.host, args.port, backlog=1000, reuse_address=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGINT, lambda: stop.done() or stop.set_result(None))
    pending = b""

    def on_stdin() -> None:
        nonlocal pending
        chunk = os.read(0, 4096)
        if not chunk:
            loop.remove_reader(0)
            if not stop.done():
                stop.set_result(None)
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            parts = line.decode().split()
            if parts[:1] == ["arm"] and len(parts) >= 2:
                what = parts[2] if len(parts) > 2 else "outcomes"
                stats.arms.append((int(parts[1]), what))
                stats.check_arms()
            elif parts[:1] == ["shares"] and len(parts) == 2:
                decider.on = parts[1] == "on"
                emit({"shares": decider.on})
            elif parts[:1] == ["sample"] and len(parts) == 3:
                stats.sample_every, stats.sample_left = int(parts[1]), int(parts[2])
                stats.sample_seen = 0
                emit({"sampling": [stats.sample_every, stats.sample_left]})
            elif parts[:1] == ["stats"]:
                emit({"stats": stats.snapshot()})

    loop.add_reader(0, on_stdin)

    async def push() -> None:
        while True:
            await asyncio.sleep(0.05)
            if stats.changed:
                stats.changed = False
                emit({"stats": stats.snapshot()})

    pusher = asyncio.ensure_future(push())
    emit({"ready": server.sockets[0].getsockname()[1],
          "loop": type(loop).__module__.split(".")[0]})
    await stop
    pusher.cancel()
    server.close()
    emit({"stats": stats.snapshot(), "final": True})


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
