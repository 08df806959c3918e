"""Backpressure on the real relay: connection limits (421 4.7.0) counted across both intake
processes with a tenth kept for trusted networks, the per-client message rate (450 4.7.1),
the queue depth (452 4.3.1), each resuming by itself; and 1,000 idle connections that do not
keep an app from being served."""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

from rawsmtp import QUEUED, Raw, send_raw, simple_message
from relayproc import RelayProcess, free_port
from sink import Sink

TOO_MANY = "421 4.7.0 Error: too many connections, try again later"
UNTRUSTED = {"trusted_networks": ["127.0.0.1/32"]}


def greeting(source: str, port: int) -> tuple[Raw, str]:
    raw = Raw(port, source=source, timeout=5)
    return raw, raw.greeting


def eventually(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "did not recover in time"
        time.sleep(0.02)


def test_connection_limits_across_processes_with_room_for_trusted(tmp_path: Path) -> None:
    server = {**UNTRUSTED, "max_connections": 10, "max_connections_per_client": 4}
    with RelayProcess(tmp_path, server=server) as relay:
        held: list[Raw] = []
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(4):
                raw, reply = greeting(source, relay.port)
                assert reply.startswith("220 "), reply
                held.append(raw)
            raw, reply = greeting(source, relay.port)  # the client's fifth
            assert reply == TOO_MANY
            raw.close()
        raw, reply = greeting("127.0.0.4", relay.port)  # the ninth: all untrusted may have
        assert reply.startswith("220 ")
        held.append(raw)
        raw, reply = greeting("127.0.0.4", relay.port)
        assert reply == TOO_MANY
        raw.close()
        trusted, reply = greeting("127.0.0.1", relay.port)  # the reserved tenth
        assert reply.startswith("220 ")
        raw, reply = greeting("127.0.0.1", relay.port)
        assert reply == TOO_MANY
        raw.close()
        trusted.ehlo()
        assert QUEUED.match(send_raw(trusted, simple_message()))
        # One of 127.0.0.2's goes, and the trusted one (whose slot counts in the total too).
        held.pop(0).close()
        trusted.close()

        def back() -> bool:
            raw, reply = greeting("127.0.0.2", relay.port)
            raw.close()
            return reply.startswith("220 ")

        eventually(back)
        for raw in held:
            raw.close()
        assert len(relay.events("rejected", at_least=4)) >= 4


def test_message_rate_per_client_at_mail(tmp_path: Path) -> None:
    with RelayProcess(tmp_path, server={"max_messages_per_client": "5/s"}) as relay, \
            Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(5):
            assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
            assert raw.cmd("RSET").startswith("250 ")
        assert raw.cmd("MAIL FROM:<a@sender.test>") == \
            "450 4.7.1 Error: too much mail from 127.0.0.1"

        def accepted() -> bool:
            return raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")

        eventually(accepted, 2.0)  # a token every 200 ms
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250 ")
        assert raw.cmd("DATA").startswith("354")
        raw.send(simple_message() + b".\r\n")
        assert QUEUED.match(raw.reply())


def test_max_queued_refuses_then_resumes_when_delivery_drains(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet: the messages stay queued
    with RelayProcess(tmp_path, routes={"example.net": [f"127.0.0.1:{port}"]},
                      queue={"max_queued": 2}) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(2):
            assert QUEUED.match(send_raw(raw, simple_message()))
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250 ")
        assert raw.cmd("DATA") == "452 4.3.1 Insufficient system storage: the queue is full"
        assert raw.cmd("RSET").startswith("250 ")
        with Sink(port=port) as sink:
            sink.wait_for(2)

            def accepted() -> bool:
                raw.cmd("MAIL FROM:<a@sender.test>")
                raw.cmd("RCPT TO:<b@example.net>")
                reply = raw.cmd("DATA")
                if reply.startswith("354"):
                    raw.send(simple_message() + b".\r\n")
                    return bool(QUEUED.match(raw.reply()))
                raw.cmd("RSET")
                return False

            eventually(accepted, 10.0)


def test_an_app_is_served_under_1000_idle_connections(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = {**UNTRUSTED, "max_connections": 1200, "max_connections_per_client": 1000}
    idle: list[socket.socket] = []
    try:
        with RelayProcess(tmp_path, server=server) as relay:
            limits = Path(f"/proc/{relay.proc.pid}/limits").read_text()  # type: ignore[union-attr]
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert line.split()[3] == line.split()[4]  # soft raised to the hard limit
            for _ in range(1000):
                sock = socket.socket()
                sock.bind(("127.0.0.2", 0))
                sock.settimeout(5)
                sock.connect(("127.0.0.1", relay.port))
                idle.append(sock)
            assert idle[-1].recv(100).startswith(b"220 ")  # the last one is in too
            started = time.monotonic()
            with Raw(relay.port) as app:
                app.ehlo()
                assert QUEUED.match(send_raw(app, simple_message()))
            assert time.monotonic() - started < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_trusted_apps_are_not_limited_per_client(tmp_path: Path) -> None:
    # The app's pool on a trusted host may hold more connections than the per-client limit.
    with RelayProcess(tmp_path, server={"max_connections_per_client": 2}) as relay:
        held = [greeting("127.0.0.1", relay.port) for _ in range(4)]
        try:
            assert all(reply.startswith("220 ") for _, reply in held)
        finally:
            for raw, _ in held:
                raw.close()
