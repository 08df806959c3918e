"""The delivery engine in process: real store, index and spool in a temporary folder, the real
SMTP client talking to an aiosmtpd sink on loopback. Faults are injected where the real relay
process cannot reach them (an attempt that raises; a drain grace of a fraction of a second)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from queuefiles import plant
from sink import Sink

from relay.addresses import HostPort
from relay.config import Config, DestinationPolicy, QueueConfig, ServerConfig
from relay.delivery.attempt import Attempter, Connection, Job, Verdict
from relay.delivery.engine import DeliveryEngine
from relay.delivery.nexthop import NextHop, NextHopResolver
from relay.delivery.store import DeliveryStore
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsRequirement
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import Index

SENDER = "app@invoices.test"
LIFETIME = 3600.0


class Relay:
    """An engine and its store on `root`, delivering example.net (and DSNs) to one sink."""

    def __init__(self, root: Path, sink: Sink, attempter: Attempter,
                 schedule: tuple[float, ...] = (0.2,)) -> None:
        self.root = root
        self.db = root / "index.sqlite"
        hop = (HostPort("127.0.0.1", sink.port),)
        self.config = Config(server=ServerConfig(hostname="relay.test"),
                             queue=QueueConfig(path=root, retry_schedule=schedule,
                                               max_lifetime=LIFETIME),
                             destinations=(DestinationPolicy("example.net", routes=hop),
                                           DestinationPolicy("invoices.test", routes=hop)))
        self.store = DeliveryStore(root, self.db, hostname="relay.test", max_lifetime=LIFETIME)
        self.engine = DeliveryEngine(self.config, self.store, NextHopResolver(), attempter)

    def plant(self, recipients: Sequence[str], received: float | None = None,
              head: bytes = b"") -> str:
        """A message as intake leaves it: synced spool file and index rows."""
        env = Envelope(id=new_queue_id(), sender=SENDER, recipients=tuple(recipients),
                       received=received or time.time(), client="127.0.0.1", helo="app.test")
        data = head + b"From: <app@invoices.test>\r\nSubject: invoice\r\n\r\nPlease pay.\r\n"
        plant(self.root, env, data, max_lifetime=LIFETIME)
        return env.id

    def rows(self, query: str, *args: object) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as db:
            return db.execute(query, args).fetchall()

    def states(self, msg: str) -> list[tuple[str, int]]:
        return self.rows("SELECT state, attempts FROM recipients WHERE msg = ? ORDER BY idx", msg)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, sink: Sink, attempter: Attempter | None = None
                  ) -> AsyncIterator[Relay]:
    relay = Relay(tmp_path / "var", sink, attempter or Attempter(Config(), own_listeners=set()))
    Index(relay.db).close()
    yield relay


async def start(relay: Relay) -> asyncio.Task[None]:
    await relay.store.start()
    return asyncio.get_running_loop().create_task(relay.engine.run())


async def stop(relay: Relay, runner: asyncio.Task[None], grace: float = 5.0) -> None:
    await relay.engine.drain(grace)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await relay.store.close()


async def until(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f" event={name} " in r.getMessage() + " "]


# --- a failing attempt -----------------------------------------------------------------------

class FailsOnce(Attempter):
    """Raises from the first delivery, as a bug deep in an attempt would."""

    calls = 0

    async def deliver(self, job: Job, data: bytes, hops: Sequence[NextHop],
                      conn: Connection | None, requirement: TlsRequirement = OPPORTUNISTIC,
                      ) -> tuple[list[Verdict], Connection | None]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected\r\nfailure")
        return await super().deliver(job, data, hops, conn, requirement)


async def test_a_failing_attempt_defers_its_job_and_the_worker_lives_on(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    attempter = FailsOnce(Config(), own_listeners=set())
    async with running(tmp_path, sink, attempter) as relay:
        msg = relay.plant(["a@example.net", "b@example.net", "c@example.net"])
        runner = await start(relay)
        await until(lambda: len(events(caplog, "delivered")) == 3)
        await stop(relay, runner)
    [error] = events(caplog, "delivery_error")
    assert f"id={msg}" in error and 'error="RuntimeError: injected failure"' in error
    assert "stage=job" in error
    assert not [r for r in caplog.records if r.exc_info]  # one line, no traceback
    # Deferred on the retry schedule with its cause, then delivered together on the retry.
    deferred = events(caplog, "deferred")
    assert len(deferred) == 3 and all("status=4.3.0" in e for e in deferred)
    assert all("Local delivery error: RuntimeError: injected failure" in e for e in deferred)
    assert [m.rcpt_tos for m in sink.messages] == [
        ["a@example.net", "b@example.net", "c@example.net"]]
    assert relay.states(msg) == [("delivered", 2)] * 3
    assert relay.rows("SELECT COUNT(*) FROM recipients WHERE state = 'active'") == [(0,)]
    assert relay.engine.counters.deferred == 3 and relay.engine.counters.delivered == 3


async def test_an_unusable_recipient_bounces_alone_in_one_transaction(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    async with running(tmp_path, sink) as relay:
        msg = relay.plant(["a@example.net", "bo\rb@example.net", "c@example.net"])
        runner = await start(relay)
        await until(lambda: len(events(caplog, "delivered")) == 3)  # two, and the DSN
        await stop(relay, runner)
    [bounced] = events(caplog, "bounced")
    assert 'rcpt="bo\\rb@example.net"' in bounced and "status=5.1.3" in bounced
    assert 'reply="553 5.1.3 Unusable recipient address (control character)"' in bounced
    mail, dsn = sorted(sink.messages, key=lambda m: m.rcpt_tos != ["a@example.net",
                                                                    "c@example.net"])
    assert mail.rcpt_tos == ["a@example.net", "c@example.net"]
    assert dsn.rcpt_tos == [SENDER] and dsn.mail_from in ("", "<>")
    assert b"Final-Recipient: utf-8; bo\\x{0D}b@example.net\r\nAction: failed\r\n" \
        b"Status: 5.1.3\r\n" in dsn.data
    assert b"\r" not in dsn.data.replace(b"\r\n", b"")  # no bare CR reached the DSN
    assert relay.states(msg) == [("delivered", 1), ("bounced", 1), ("delivered", 1)]
    assert not events(caplog, "delivery_error")


class AlwaysFails(Attempter):
    async def deliver(self, job: Job, data: bytes, hops: Sequence[NextHop],
                      conn: Connection | None, requirement: TlsRequirement = OPPORTUNISTIC,
                      ) -> tuple[list[Verdict], Connection | None]:
        raise KeyError("no such thing")


async def test_a_job_that_always_fails_expires_at_max_lifetime(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    async with running(tmp_path, sink, AlwaysFails(Config(), own_listeners=set())) as relay:
        msg = relay.plant(["a@example.net"], received=time.time() - LIFETIME + 1)
        runner = await start(relay)
        await until(lambda: events(caplog, "expired"))
        await stop(relay, runner)
    errors = [e for e in events(caplog, "delivery_error") if f"id={msg}" in e]
    assert len(errors) >= 2  # once per attempt, each with its cause
    assert all("error=\"KeyError: 'no such thing'\"" in e for e in errors)
    [expired] = events(caplog, "expired")
    assert "status=4.4.7" in expired and "Local delivery error: KeyError" in expired
    assert relay.states(msg) == [("expired", len(errors))]
    # The sender is told, as for any expiry (the DSN itself waits: every attempt fails here).
    assert relay.rows("SELECT COUNT(*) FROM messages WHERE sender = ''") == [(1,)]


# --- a graceful stop -------------------------------------------------------------------------

async def test_drain_records_unknown_when_the_reply_to_the_dot_never_comes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The dot is out and the server is silent: at the end of the grace the recipients are
    recorded as unknown (retried, maybe a duplicate), counted and logged, never left active."""
    caplog.set_level(logging.INFO, logger="invoice-relay")
    with Sink(hang="dot") as sink:
        async with running(tmp_path, sink) as relay:
            msg = relay.plant(["a@example.net", "b@example.net"])
            runner = await start(relay)
            await until(lambda: sink.hung == 1)
            started = time.monotonic()
            await stop(relay, runner, grace=0.3)
            assert time.monotonic() - started < 3
    assert relay.states(msg) == [("unknown", 1), ("unknown", 1)]
    assert relay.rows("SELECT outcome FROM attempts WHERE msg = ?", msg) == [("unknown",)] * 2
    unknown = events(caplog, "unknown")
    assert len(unknown) == 2
    assert all("relay stopped before the reply to the final dot" in e for e in unknown)
    assert all("possible duplicate" in e for e in unknown)
    assert relay.engine.counters.unknown == 2 and relay.engine.counters.released == 0
    assert not events(caplog, "released") and not events(caplog, "delivery_error")
    assert sink.messages == []


async def test_drain_releases_a_transaction_before_its_dot_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server never answers RCPT: the transaction is given up as the stop begins (the
    grace is not waited for), no dot is sent, no attempt is counted, the recipients are due."""
    caplog.set_level(logging.INFO, logger="invoice-relay")
    with Sink(hang="rcpt") as sink:
        async with running(tmp_path, sink) as relay:
            msg = relay.plant(["a@example.net", "b@example.net"])
            runner = await start(relay)
            await until(lambda: sink.hung == 1)
            started = time.monotonic()
            await stop(relay, runner, grace=30)
            assert time.monotonic() - started < 3
            assert sink.dots == 0
    assert relay.states(msg) == [("queued", 0), ("queued", 0)]
    assert relay.rows("SELECT COUNT(*) FROM attempts") == [(0,)]
    released = events(caplog, "released")
    assert len(released) == 2 and all(f"id={msg}" in e for e in released)
    assert all("not counted as an attempt" in e for e in released)
    assert relay.engine.counters.released == 2 and relay.engine.counters.unknown == 0
    assert not events(caplog, "deferred") and not events(caplog, "unknown")


async def test_drain_gives_back_claimed_jobs_that_never_started(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One connection, busy with a hung transaction: the other messages wait in the engine's
    queue, claimed. The stop puts every one of them back, unattempted."""
    caplog.set_level(logging.INFO, logger="invoice-relay")
    with Sink(hang="rcpt") as sink:
        async with running(tmp_path, sink) as relay:
            policy = DestinationPolicy("example.net", max_connections=1,
                                       routes=(HostPort("127.0.0.1", sink.port),))
            relay.engine.config = Config(queue=relay.config.queue, destinations=(policy,))
            msgs = [relay.plant([f"ap{n}@example.net"]) for n in range(4)]
            runner = await start(relay)
            await until(lambda: sink.hung == 1)
            await stop(relay, runner)
    assert [relay.states(m) for m in msgs] == [[("queued", 0)]] * 4
    assert relay.engine.counters.released == 4
    assert len(events(caplog, "released")) == 1  # the one cut off; the others never started


# --- the retry schedule ----------------------------------------------------------------------

async def test_each_deferral_takes_the_next_step_of_the_schedule(tmp_path: Path) -> None:
    """The second failure waits the second step, not the first again (the review found that
    only the function was tested, not the engine's use of the attempt count)."""
    with Sink(data_reply=lambda _data: "451 4.3.0 try later") as sink:
        relay = Relay(tmp_path / "var", sink, Attempter(Config(), own_listeners=set()),
                      schedule=(0.2, 30.0))
        Index(relay.db).close()
        msg = relay.plant(["a@example.net"])
        runner = await start(relay)
        await until(lambda: relay.states(msg) == [("deferred", 2)])
        await stop(relay, runner)
    [(waits,)] = relay.rows("SELECT next_attempt - updated FROM recipients WHERE msg = ?", msg)
    assert 27.0 <= waits <= 33.0  # the second step, with its ±10 % jitter
    assert len(sink.messages) == 0


# --- loops -----------------------------------------------------------------------------------

async def test_a_message_past_the_hop_limit_bounces_with_a_dsn(tmp_path: Path, sink: Sink) -> None:
    """Intake refuses such messages first, so only a queue file reaches this check (a message
    queued by an older release, or one whose Received headers came in another way)."""
    hops = b"".join(b"Received: from hop%d.test by relay.test; Sun, 29 Nov 2026\r\n" % n
                    for n in range(51))
    synced: list[str] = []  # the DSN writer's syncs, by file name

    def sync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        os.fdatasync(fd)

    async with running(tmp_path, sink) as relay:
        relay.store._dsn_writer._sync = sync
        msg = relay.plant(["a@example.net"], head=hops)
        runner = await start(relay)
        await until(lambda: len(sink.messages) == 1)
        await stop(relay, runner)
    assert relay.states(msg) == [("bounced", 1)]
    # The DSN was synced into the delivery process's own segment before it was indexed.
    [(segment,)] = relay.rows("SELECT segment FROM messages WHERE sender = ''")
    assert segment in synced, (segment, synced)
    [dsn] = sink.messages
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == [SENDER]  # the DSN, not the message
    assert b"5.4.6" in dsn.data
