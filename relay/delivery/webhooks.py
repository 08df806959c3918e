"""Signed delivery webhooks: events for `[[sender]] webhook`, kept in an outbox, sent by a worker.

`Webhooks` (a Runtime field) holds each sender policy's URL and secret, read at every config
(re)load. The delivery store's writer turns recorded outcomes into outbox rows in the same
transaction (`events_for`); `WebhookWorker`, a task in the delivery process, POSTs them signed
with HMAC-SHA256 and deletes a row only after a 2xx (at least once; `id` lets the receiver
drop repeats). A failure is retried with back-off (2 s, 10 s, 1 min, 5 min, 15 min, then
hourly) for up to 72 hours after the event, then dropped, logged and counted.

A receiver that refuses or hangs costs delivery nothing: sends are bounded (in all and per
URL), each has a 10 s total timeout, and the worker holds the index thread only for one short
transaction per exchange. Requests go through relay.delivery.httppost (keep-alive, one write per
request), not aiohttp's client: bench/observe measured the latter at about a quarter of the
delivery process's CPU per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay import log, metrics
from relay.addresses import domain_of
from relay.config import Config
from relay.config.policies import secret_file_problem
from relay.delivery.httppost import HttpError, PostClient
from relay.queue import outbox
from relay.queue.envelope import BOUNCED, DEFERRED, DELIVERED, EXPIRED
from relay.queue.outbox import Event, Settled

if TYPE_CHECKING:
    from relay.delivery.store import DeliveryStore, Result

SIGNATURE_HEADER = "X-Invoice-Relay-Signature"
EVENTS = {DELIVERED: "delivered", DEFERRED: "deferred", BOUNCED: "bounced", EXPIRED: "expired"}
BACKOFF = (2.0, 10.0, 60.0, 300.0, 900.0, 3600.0)  # then hourly
# For tests only: a shorter give-up age than the contract's 72 hours (seconds).
MAX_AGE_ENV = "INVOICE_RELAY_WEBHOOK_MAX_AGE"
MAX_AGE = 72 * 3600.0
TIMEOUT = 10.0          # seconds for one POST, connect to last byte
MAX_IN_FLIGHT = 64      # sends at once, all receivers together
PER_URL = 8             # sends at once to one URL
# A taken row is due again after this, should its send never settle (longer than the
# longest wait for a slot: MAX_IN_FLIGHT / PER_URL * TIMEOUT). A restart frees them at once.
LEASE = 300.0
IDLE_WAKE = 30.0        # the worker looks at the outbox at least this often
STOP_WAIT = 2.0         # seconds a stop waits for the worker and its sends to end


@dataclass(frozen=True)
class Target:
    url: str
    secret: bytes = field(repr=False)  # never in a log line or a repr


class SecretUnreadable(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Webhooks:
    """Each `[[sender]]` domain with a webhook -> where its events go and the signing key."""

    config: Config = field(repr=False)
    targets: dict[str, Target] = field(repr=False)

    @classmethod
    def from_config(cls, config: Config) -> Webhooks | None:
        """Read every secret now (at start and on each reload); None when no sender has a
        webhook (then outcomes cost nothing extra and no worker runs)."""
        targets: dict[str, Target] = {}
        problems: list[str] = []
        for sender in config.senders:
            hook = sender.webhook
            if hook is None:
                continue
            problem = secret_file_problem(hook.secret_file)
            if problem is not None:
                problems.append(f"{hook.where or config.source_name}: {problem}")
                continue
            targets[sender.domain] = Target(hook.url, hook.secret_file.read_bytes().strip())
        if problems:
            raise SecretUnreadable(problems)
        return cls(config, targets) if targets else None

    def policy_for(self, sender: str) -> str | None:
        """The policy domain whose webhook hears about mail from `sender`, if any."""
        policy = self.config.sender_for(domain_of(sender)) if sender else None
        return policy.domain if policy is not None and policy.domain in self.targets else None

    def target(self, policy: str) -> Target | None:
        return self.targets.get(policy)


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def rfc3339(t: float) -> str:
    stamp = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def events_for(results: Sequence[Result], webhooks: Webhooks, conn: Any,
               message_ids: dict[str, str]) -> list[Event]:
    """The outbox rows for `results` (on the index thread, inside the outcome's transaction,
    before its attempts are inserted: a deferral is an event only the first time)."""
    events = []
    for r in results:
        o, due = r.outcome, r.due
        name = EVENTS.get(o.state)  # type: ignore[call-overload]
        if name is None:
            continue
        policy = webhooks.policy_for(due.sender)
        if policy is None:
            continue
        if o.state == DEFERRED and outbox.deferred_before(conn, o.msg, o.idx):
            continue
        event_id = secrets.token_hex(16)
        body = {"id": event_id, "event": name, "time": rfc3339(o.time), "queue_id": o.msg,
                "message_id": message_ids.get(o.msg), "invoice_id": o.invoice_id,
                "sender": due.sender, "recipient": due.rcpt, "remote_host": o.host,
                "reply": o.reply, "attempt": max(1, due.attempts + int(o.attempted))}
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        events.append(Event(event_id, policy, data, o.time))
    return events


def max_age() -> float:
    raw = os.environ.get(MAX_AGE_ENV)
    return float(raw) if raw else MAX_AGE


def backoff(tries: int) -> float:
    """Seconds before the next try after `tries` failed ones (0: the first failure)."""
    return BACKOFF[min(tries, len(BACKOFF) - 1)]


class WebhookWorker:
    """Sends outbox rows; runs while a webhook is configured (`start`, `stop`)."""

    def __init__(self, store: DeliveryStore, webhooks: Webhooks) -> None:
        self.store = store
        self.webhooks = webhooks  # replaced on reload
        self.max_age = max_age()
        self._wake = asyncio.Event()
        self._settled: list[Settled] = []
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._per_url: dict[str, asyncio.Semaphore] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._client = PostClient()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop sending; what is not settled stays in the outbox for the next start. What did
        settle is written once more (a 2xx not written would only be sent again)."""
        if self._task is None:
            return
        # The flag as well as the cancel: Python 3.11's wait_for can swallow a cancellation
        # that arrives as the event it waits for is set (a wake at the stop), and the loop
        # would then run on while stop() waits for it.
        self._stopping = True
        self._wake.set()
        self._task.cancel()
        # Bounded: a stop never waits on a receiver (unsent rows stay in the outbox).
        await asyncio.wait({self._task}, timeout=STOP_WAIT)
        self._task = None
        for task in list(self._in_flight.values()):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight.values()), timeout=STOP_WAIT)
        await self._client.close()
        with contextlib.suppress(Exception):
            await self._exchange(limit=0)

    async def _run(self) -> None:
        await self.store.with_index(_release, time.time())
        while not self._stopping:
            try:
                wait = await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a busy index: the next turn tries again
                log.event("webhook_error", level=40, error=f"{type(exc).__name__}: {exc}")
                wait = 1.0
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    async def _turn(self) -> float:
        """Settle, take due rows, start their sends; seconds until the next look."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        found = await self._exchange(room)
        metrics.WEBHOOK_PENDING.set(found.pending)
        if self._stopping:
            return 0.0
        for event in found.due:
            if event.id not in self._in_flight:  # a lease ran out while it waited for a slot
                task = asyncio.get_running_loop().create_task(self._send(event))
                self._in_flight[event.id] = task
        if len(found.due) >= room > 0:
            return 0.0  # more may be due
        if found.next_due is None:
            return IDLE_WAKE
        return min(IDLE_WAKE, max(0.05, found.next_due - time.time()))

    async def _exchange(self, limit: int) -> outbox.Exchange:
        settled, self._settled = self._settled, []
        try:
            return await self.store.with_index(_exchange, settled, time.time(), limit, LEASE)
        except BaseException:
            self._settled[:0] = settled  # written by the next exchange
            raise

    async def _send(self, event: Event) -> None:
        error = None
        try:
            error = await self._post(event)
        finally:
            self._in_flight.pop(event.id, None)
        self._settled.append(self._settle(event, error))
        self._wake.set()

    async def _post(self, event: Event) -> str | None:
        """POST one event; None on a 2xx, else what went wrong."""
        target = self.webhooks.target(event.policy)
        if target is None:
            return f"no webhook configured for sender domain {event.policy}"
        limit = self._per_url.setdefault(target.url, asyncio.Semaphore(PER_URL))
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(target.secret, event.body)}
        async with limit:
            try:
                answer = await self._client.post(target.url, event.body, headers, TIMEOUT)
            except TimeoutError:
                return f"no answer within {TIMEOUT:g}s"
            except HttpError as exc:
                return str(exc)
        if 200 <= answer.status < 300:
            return None
        return f"HTTP {answer.status} {answer.reason}".strip()

    def _settle(self, event: Event, error: str | None) -> Settled:
        if error is None:
            return Settled(event.id, None)
        now = time.time()
        give_up = event.created + self.max_age
        if now >= give_up:
            url = t.url if (t := self.webhooks.target(event.policy)) is not None else ""
            log.event("webhook_dropped", level=40, id=event.id, url=url, tries=event.tries + 1,
                      error=error)
            metrics.WEBHOOK_DROPPED.inc()
            return Settled(event.id, None)
        if event.tries == 0:  # said once per event, not at every retry
            log.event("webhook_failed", level=30, id=event.id, error=error,
                      retry_in=f"{backoff(0):g}s")
        return Settled(event.id, min(now + backoff(event.tries), give_up))


def _release(index: Any, now: float) -> int:
    return outbox.release_all(index.conn, now)


def _exchange(index: Any, settled: list[Settled], now: float, limit: int,
              lease: float) -> outbox.Exchange:
    return outbox.exchange(index.conn, settled, now, limit, lease)
