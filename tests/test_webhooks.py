"""Signed delivery webhooks (`[[sender]] webhook`): the real relay, a real SMTP sink and a real
aiohttp receiver on loopback that records what it is sent.

The receiver checks nothing itself: each test verifies the HMAC signature as an app would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from relayproc import RelayProcess, free_port
from sink import Sink
from test_delivery import SENDER, message, send

from relay.exitcodes import EXIT_CONFIG

SECRET = b"hook-secret-0123456789"
RelayFactory = Callable[..., RelayProcess]
SinkFactory = Callable[..., Sink]


@dataclass
class Receiver:
    """An HTTP receiver on loopback. `statuses` are answered in turn (then 200); `hang` never
    answers. `posts` records (headers, body) of every request, answered or not."""

    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)  # bodies answered 2xx
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mail-events"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((dict(request.headers), body))
        if self.hang:
            await asyncio.sleep(3600)
        status = self.statuses.pop(0) if self.statuses else 200
        if 200 <= status < 300:
            self.accepted.append(json.loads(body))
        return web.Response(status=status)

    def start(self) -> Receiver:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/mail-events", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=0.1)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        def run() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def wait_for(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"{len(self.accepted)} of {count}: {self.posts}"
            time.sleep(0.02)
        return list(self.accepted)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def policies(tmp_path: Path, url: str) -> str:
    (tmp_path / "hook.key").write_bytes(SECRET + b"\n")
    return ('[[sender]]\ndomain = "invoices.test"\n'
            f'webhook = {{ url = "{url}", secret_file = "hook.key" }}\n')


def make_relay(relay_factory: RelayFactory, tmp_path: Path, sink: Sink, url: str) -> RelayProcess:
    return relay_factory(routes={"example.net": [sink.address]},
                         policies=policies(tmp_path, url))


def assert_signed(headers: dict[str, str], body: bytes) -> None:
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Invoice-Relay-Signature"], expected)
    assert headers["Content-Type"] == "application/json"


def outbox_rows(relay: RelayProcess) -> int:
    with sqlite3.connect(relay.queue_dir / "index.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


# ---------------------------------------------------------------------------- events


def test_delivered_and_bounced_events_are_signed_and_complete(
        relay_factory: RelayFactory, sinks: SinkFactory, receiver: Receiver,
        tmp_path: Path) -> None:
    sink = sinks(rcpt_reply=lambda a: "550 5.1.1 no such user" if a.startswith("gone") else None)
    with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
        queue_id = send(relay, ["ap@example.net", "gone@example.net"],
                        message(extra="X-Invoice-Id: INV-2026-0042\r\n"))
        # Mail from a sender without a webhook causes no event.
        send(relay, ["ap@example.net"], message(subject="other"), sender="x@elsewhere.test")
        events = receiver.wait_for(2)
        sink.wait_for(2)
        time.sleep(0.3)
    assert len(receiver.posts) == 2
    for headers, body in receiver.posts:
        assert_signed(headers, body)
    by_event = {e["event"]: e for e in events}
    delivered, bounced = by_event["delivered"], by_event["bounced"]
    common = {"queue_id": queue_id, "message_id": "<invoice-1@invoices.test>",
              "invoice_id": "INV-2026-0042", "sender": SENDER, "remote_host": "127.0.0.1",
              "attempt": 1}
    assert delivered.items() >= {**common, "recipient": "ap@example.net",
                                 "reply": "250 2.0.0 OK queued"}.items()
    assert bounced.items() >= {**common, "recipient": "gone@example.net"}.items()
    assert "550 5.1.1 no such user" in bounced["reply"]
    assert delivered["id"] != bounced["id"] and len(delivered["id"]) >= 16
    assert delivered["time"].endswith("Z") and delivered["time"][:4].isdigit()


def test_deferred_is_sent_once_then_delivered(relay_factory: RelayFactory, sinks: SinkFactory,
                                              receiver: Receiver, tmp_path: Path) -> None:
    refusals = iter(range(2))
    sink = sinks(rcpt_reply=lambda a: "451 4.3.0 try later" if next(refusals, None) is not None
                 else None)
    with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
        send(relay, ["ap@example.net"], message())
        sink.wait_for(1, timeout=15)
        events = receiver.wait_for(2)
        time.sleep(0.3)
    assert [e["event"] for e in events] == ["deferred", "delivered"]
    assert events[0]["reply"] == "451 4.3.0 try later" and events[0]["attempt"] == 1
    assert events[1]["attempt"] == 3
    assert len(receiver.posts) == 2


def test_failed_post_is_retried_within_seconds(relay_factory: RelayFactory, sink: Sink,
                                               receiver: Receiver, tmp_path: Path) -> None:
    receiver.statuses = [500]
    with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
        send(relay, ["ap@example.net"], message())
        started = time.monotonic()
        (event,) = receiver.wait_for(1)
        assert time.monotonic() - started < 6
        time.sleep(0.3)
        assert outbox_rows(relay) == 0
    bodies = [body for _, body in receiver.posts]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same event: same id, same bytes
    assert event["event"] == "delivered"


def test_events_survive_kill_9(relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    down = Receiver()  # nothing listens on its port yet
    relay = make_relay(relay_factory, tmp_path, sink, down.url).start()
    ids = [send(relay, [f"ap{n}@example.net"], message(subject=f"invoice {n}"))
           for n in range(3)]
    sink.wait_for(3)
    relay.wait_for_log("event=webhook_failed", count=3)
    relay.kill()
    assert outbox_rows(relay) == 3
    down.start()
    try:
        relay.start()
        events = down.wait_for(3)
        time.sleep(0.3)
        assert sorted(e["queue_id"] for e in events) == sorted(ids)
        assert len({e["id"] for e in events}) == 3
        assert outbox_rows(relay) == 0
        relay.stop()
    finally:
        down.stop()


def test_hanging_receiver_costs_delivery_nothing(relay_factory: RelayFactory, sink: Sink,
                                                 receiver: Receiver, tmp_path: Path) -> None:
    receiver.hang = True
    with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
        started = time.monotonic()
        for n in range(10):
            send(relay, [f"ap{n}@example.net"], message(subject=f"invoice {n}"))
        sink.wait_for(10)
        assert time.monotonic() - started < 3
        assert len(receiver.posts) >= 1  # the receiver was being called meanwhile
        began = time.monotonic()
        assert relay.stop() == 0
        assert time.monotonic() - began < 5  # a stop does not wait for the receiver
    assert outbox_rows(relay) == 10  # kept for the next start


def test_event_given_up_after_max_age(relay_factory: RelayFactory, sink: Sink,
                                      receiver: Receiver, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOICE_RELAY_WEBHOOK_MAX_AGE", "1")
    receiver.statuses = [503] * 10
    with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
        send(relay, ["ap@example.net"], message())
        (dropped,) = relay.events("webhook_dropped", at_least=1)
        assert dropped["url"] == receiver.url and dropped["error"].startswith("HTTP 503")
        time.sleep(0.2)
        assert outbox_rows(relay) == 0
        assert SECRET.decode() not in relay.log


# ---------------------------------------------------------------------------- config


def test_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    policy = policies(tmp_path, "http://127.0.0.1:9/e")
    relay = RelayProcess(tmp_path, policies=policy)
    (tmp_path / "hook.key").unlink()
    where = f"{tmp_path}/policies/test.toml: sender[0].webhook.secret_file"
    checked = subprocess.run([sys.executable, "-m", "relay", "--config", str(relay.config),
                              "check-config"], capture_output=True, text=True, timeout=30,
                             check=False, cwd=tmp_path)
    assert checked.returncode != 0
    assert f"{where}: file not found: {tmp_path}/hook.key" in checked.stdout + checked.stderr
    served = subprocess.run([sys.executable, "-m", "relay", "--config", str(relay.config),
                             "serve"], capture_output=True, text=True, timeout=30,
                            check=False, cwd=tmp_path)
    assert served.returncode == EXIT_CONFIG
    assert where in served.stderr


def test_a_reload_moves_events_to_a_new_url_and_secret(
        relay_factory: RelayFactory, sink: Sink, receiver: Receiver, tmp_path: Path) -> None:
    second = Receiver().start()
    try:
        with make_relay(relay_factory, tmp_path, sink, receiver.url) as relay:
            send(relay, ["ap@example.net"], message(subject="before"))
            receiver.wait_for(1)
            (tmp_path / "hook2.key").write_bytes(b"rotated-secret\n")
            policy = relay.dir / "policies" / "test.toml"
            policy.write_text(policy.read_text().replace(receiver.url, second.url)
                              .replace('"hook.key"', '"hook2.key"'))
            relay.signal(signal.SIGHUP)
            relay.wait_for_log(r"event=reloaded .*process=delivery")
            send(relay, ["ap@example.net"], message(subject="after"))
            second.wait_for(1)
            time.sleep(0.3)
        assert len(receiver.posts) == 1  # nothing more to the old URL
        (headers, body), = second.posts
        expected = "sha256=" + hmac.new(b"rotated-secret", body, hashlib.sha256).hexdigest()
        assert headers["X-Invoice-Relay-Signature"] == expected  # signed with the new secret
        assert SECRET.decode() not in relay.log
    finally:
        second.stop()


async def test_stop_ends_the_worker_even_when_woken_at_the_stop() -> None:
    """A wake that lands with the stop (Python 3.11's wait_for could swallow the cancel and
    keep the loop going) and a send that hangs: stop() still returns promptly, every time."""
    from relay.delivery.webhooks import STOP_WAIT, Target, Webhooks, WebhookWorker
    from relay.queue.outbox import Event, Exchange

    never = asyncio.Event()

    class Store:
        async def with_index(self, fn: Callable[..., Any], *args: object) -> Any:
            await asyncio.sleep(0)
            if fn.__name__ == "_release":
                return 0
            return Exchange(due=[Event("e1", "invoices.test", b"{}", time.time())], pending=1,
                            next_due=None)

    class Hooks(Webhooks):
        def target(self, policy: str) -> Target | None:
            return Target("http://127.0.0.1:9/never", b"k")

    for _ in range(20):
        worker = WebhookWorker(Store(), Hooks(None, {}))  # type: ignore[arg-type]

        async def hang(*args: object) -> None:
            await never.wait()
        worker._client.post = hang  # type: ignore[method-assign]  # a receiver that hangs
        worker.start()
        await asyncio.sleep(0.01)
        worker.wake()
        async with asyncio.timeout(STOP_WAIT + 1):  # fails rather than hangs
            await worker.stop()
        assert worker._task is None
