"""A stand-in for `invoice-relay serve`, to test the harness itself (not a benchmark subject).

    RELAY_CMD="python3 bench/fake_relay.py" bench/run --quick

Same shape as the real relay: the main process accepts SMTP (asyncio) and spools each message
to var/ with fsync; a forked child polls var/ and delivers with smtplib to the first route of
the recipient domain's [[destination]] in policies/*.toml, one connection per message, retries
a 4xx after the first step of [queue] retry_schedule and answers a 5xx with a (minimal) DSN to
the sender.  Stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import sys
import time
import tomllib
from pathlib import Path


def load(config: Path) -> tuple[str, int, Path, dict[str, tuple[str, int]], float]:
    cfg = tomllib.loads(config.read_text())
    host, port = cfg["server"]["listen"][0].rsplit(":", 1)
    base = config.parent
    spool = base / cfg["queue"]["path"]
    retry = cfg["queue"].get("retry_schedule", ["60s"])[0]
    retry_s = float(retry[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[retry[-1]]
    pol = base / cfg["policies"]["path"]
    routes: dict[str, tuple[str, int]] = {}
    for f in sorted(pol.glob("*.toml")):
        for d in tomllib.loads(f.read_text()).get("destination", []):
            rhost, rport = d["routes"][0].rsplit(":", 1)
            routes.setdefault(d["domain"].lower(), (rhost, int(rport)))
    return host, int(port), spool, routes, retry_s


def send(routes: dict[str, tuple[str, int]], sender: str, rcpt: str, body: bytes) -> None:
    rhost, rport = routes[rcpt.rsplit("@", 1)[-1].lower()]
    with smtplib.SMTP(rhost, rport) as s:
        s.sendmail(sender, [rcpt], body)


def deliver_forever(spool: Path, routes: dict[str, tuple[str, int]], retry_s: float) -> None:
    """One connection per message; 4xx (or no connection): again after retry_s; 5xx: a DSN
    to the sender (routed by its domain), then the message is dropped."""
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    due: dict[Path, float] = {}
    while True:
        now = time.monotonic()
        files = sorted(p for p in spool.iterdir() if p.suffix == ".msg"
                       and due.get(p, 0) <= now)
        if not files:
            time.sleep(0.01)
            continue
        for p in files:
            data = p.read_bytes()
            sender, rcpt, body = data.split(b"\n", 2)
            try:
                send(routes, sender.decode(), rcpt.decode(), body)
            except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused,
                    OSError) as e:
                code = getattr(e, "smtp_code", 0) or next(
                    (c for c, _ in getattr(e, "recipients", {}).values()), 0)
                if not 500 <= code < 600:
                    due[p] = time.monotonic() + retry_s
                    continue
                if sender:
                    dsn = (f"From: MAILER-DAEMON\r\nTo: <{sender.decode()}>\r\n"
                           f"Subject: Undelivered Mail\r\n\r\n<{rcpt.decode()}>: {code} "
                           f"{e}\r\n").encode()
                    # a stand-in: a lost DSN shows up in the harness's checks
                    with contextlib.suppress(smtplib.SMTPException, OSError, KeyError):
                        send(routes, "", sender.decode(), dsn)
            due.pop(p, None)
            p.unlink()


class Session(asyncio.Protocol):
    counter = 0

    def __init__(self, spool: Path):
        self.spool = spool
        self.buf = b""
        self.data: list[bytes] | None = None
        self.sender = self.rcpt = b""

    def connection_made(self, t):
        self.t = t
        t.write(b"220 fake-relay ESMTP\r\n")

    def data_received(self, chunk):
        self.buf += chunk
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.data is not None:
                if line == b".":
                    self.finish()
                else:
                    self.data.append(line[1:] if line.startswith(b"..") else line)
                continue
            cmd = line[:4].upper()
            if cmd in (b"HELO", b"EHLO"):
                self.t.write(b"250 fake-relay\r\n")
            elif cmd == b"MAIL":
                self.sender = line.split(b":", 1)[1].strip().strip(b"<>").split(b">")[0]
                self.t.write(b"250 ok\r\n")
            elif cmd == b"RCPT":
                self.rcpt = line.split(b":", 1)[1].strip().strip(b"<>").split(b">")[0]
                self.t.write(b"250 ok\r\n")
            elif cmd == b"DATA":
                self.data = []
                self.t.write(b"354 go\r\n")
            elif cmd == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 ok\r\n")

    def finish(self):
        Session.counter += 1
        name = f"{os.getpid()}-{Session.counter:09d}"
        tmp = self.spool / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.sender + b"\n" + self.rcpt + b"\n" + b"\r\n".join(self.data) + b"\r\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.spool / (name + ".msg"))
        self.data = None
        self.t.write(b"250 queued\r\n")


def main() -> int:
    config = Path(sys.argv[sys.argv.index("--config") + 1]).resolve()
    host, port, spool, routes, retry_s = load(config)
    spool.mkdir(parents=True, exist_ok=True)
    if os.fork() == 0:
        if os.environ.get("FAKE_RELAY_NO_DELIVERY"):  # to test the harness's round timeout
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
            while True:
                time.sleep(1)
        deliver_forever(spool, routes, retry_s)
        os._exit(0)

    async def run():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(lambda: Session(spool), host, port, backlog=1000)
        async with server:
            await stop

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
