"""The delivery engine: claims due recipients, queues them per path, runs connections.

A job (one message's recipients at one domain) gets its source address when it is dispatched
(smooth weighted round-robin, relay/delivery/sources.py) and waits in the queue of its path,
(source address, destination) (relay/delivery/paths.py). A destination's next hops are
resolved before any of its workers starts; its workers, at most `max_connections` over all its
paths, each hold one connection of one path, reused for up to `max_messages_per_connection`
jobs, and take a token of the destination's bucket (`rate`) before each job. A throttled
destination keeps only a short window of jobs in memory and hands the rest back to the index,
due when its bucket will have tokens for them, with no attempt counted: it never holds the
in-flight room other destinations need.

Path health (relay/delivery/health.py): every attempt that draws a non-2xx reply or reaches no
next hop feeds its path's health and its destination's breaker. Only then is the destination
marked `troubled`; until the HealthBook forgets it again, its dispatch skips paths out of
rotation, its workers respect each path's connection cap and the breaker, and recipients
refused by a block or an `on_reply` rule go to another source at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay import log, metrics
from relay.addresses import address_problem, domain_of
from relay.config import Config, IPAddress, SourceAddress
from relay.config.policies import OnReply
from relay.delivery import retry
from relay.delivery.attempt import Attempter, Connection, Job, Kind, SourceUnusable, Verdict
from relay.delivery.egress import (
    Deferral,
    Egress,
    WarmupCounters,
    fetch_spf,
    pool_for,
)
from relay.delivery.health import (
    BLOCK,
    CLOSED,
    TRANSIENT,
    HealthBook,
    PathHealth,
    ReplyClass,
    ReplyKind,
    classify,
)
from relay.delivery.nexthop import DnsFailure, NextHop, NextHopResolver
from relay.delivery.paths import HANDBACK_HORIZON, Destination, Path
from relay.delivery.sources import SourcePicker
from relay.delivery.spf import SpfChecker
from relay.delivery.store import DeliveryStore, Result
from relay.delivery.tlspolicy import OPPORTUNISTIC, StsSource, TlsRequirement
from relay.queue.envelope import BOUNCED, DEFERRED, DELETED, DELIVERED, EXPIRED, UNKNOWN, State
from relay.queue.index import DueRecipient, Outcome
from relay.queue.notices import Committed
from relay.queue.records import invoice_id_of
from relay.queue.segments import SegmentCorrupt

if TYPE_CHECKING:  # only a node with [cluster] loads it (and redis)
    from relay.delivery.cluster import Cluster, Lease

MAX_IN_FLIGHT = 5000       # recipients held in memory at once; the rest wait in the index
CLAIM_BATCH = 500
IDLE_POLL = 1.0            # seconds between index polls when nothing wakes us
CONNECTION_IDLE = 2.0      # keep an idle connection this long for more jobs
RCPTS_PER_TRANSACTION = 50
MAX_HOPS = 50              # more Received headers than this: a mail loop (Postfix hopcount_limit)
STOP_WAIT = 2.0            # after the drain grace: for workers to record what they cut off
FLUSH_WAIT = 5.0           # at a stop: for the last outcomes to be recorded
LEASE_RETRY = 0.05         # a worker with no cluster connection slot asks again this soon
HANDBACK_MIN = 0.5         # a handed-back recipient is due again at the earliest this late
PRUNE_EVERY = 60.0         # seconds between HealthBook prunes (forget healthy paths)
_RETRY_ELSEWHERE = (ReplyKind.SUSPEND, ReplyKind.BLOCK)  # the recipient is not at fault
_DELIVERED = Kind.DELIVERED
_SETTLED = (Kind.DELIVERED, Kind.RELEASED, Kind.UNKNOWN)  # no reply to classify
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass
class Counters:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    unknown: int = 0
    released: int = 0   # claimed, then given back unattempted by a graceful stop
    handed_back: int = 0  # given back by a throttled destination, due later, unattempted
    deleted: int = 0    # `queue delete` by an operator

    def count(self, state: State) -> None:
        """One more outcome in `state` (the final states, deferred and unknown)."""
        if state == DELIVERED:
            self.delivered += 1
        elif state == DEFERRED:
            self.deferred += 1
        elif state == BOUNCED:
            self.bounced += 1
        elif state == EXPIRED:
            self.expired += 1
        elif state == UNKNOWN:
            self.unknown += 1
        elif state == DELETED:
            self.deleted += 1
        else:
            raise ValueError(f"not an outcome: {state}")


class DeliveryEngine:
    def __init__(self, config: Config, store: DeliveryStore, resolver: NextHopResolver,
                 attempter: Attempter, sts: StsSource | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time,
                 sources: SourcePicker | None = None,
                 spf: SpfChecker | None = None, egress: Egress | None = None,
                 cluster: Cluster | None = None) -> None:
        self.config = config
        # `[cluster] redis`: buckets and connection slots shared with the other nodes.
        self.cluster = cluster
        # Where `tls = "mta-sts"` destinations get their requirement; None: opportunistic
        # (relay/delivery/mtasts.py provides the real one).
        self.sts = sts
        self.store = store
        self.resolver = resolver
        self.attempter = attempter
        # Seams: `clock` (monotonic) drives the buckets, `now` (wall clock) the due times.
        self.clock = clock
        self.now = now
        self.sources = sources if sources is not None \
            else SourcePicker(config.delivery.source_addresses, clock)
        self.destinations: dict[str, Destination] = {}
        # Broken-STARTTLS memory per source address, keyed by remote address: it outlives
        # the destination objects, which come and go with their work.
        self.tls_memory: dict[IPAddress | None, dict[str, float]] = {}
        self.in_flight: set[tuple[str, int]] = set()
        self.wake = asyncio.Event()
        self.stopping = False
        self._stop = asyncio.Event()
        self.counters = Counters()
        self._workers: set[asyncio.Task[None]] = set()
        self._resolvers: set[asyncio.Task[None]] = set()
        self._running: dict[asyncio.Task[None], Job] = {}  # worker -> the job it runs now
        self._handback_due = float("inf")  # earliest due time of a handed-back recipient
        # Path health and breakers: kept across reloads (what the remotes said is not config).
        self.health = HealthBook.from_config(config)
        self._troubled: set[str] = set()         # destinations the book has state for
        self._down: set[tuple[str, str]] = set()  # paths logged path_down, not yet path_up
        # Recipient domain -> its `domain` metric label (relay.metrics.domain_label).
        self._domain_labels: dict[str, str] = {}
        self._pruned_at = clock()
        # SPF-aware egress and IP warm-up (relay/delivery/egress.py). The counters outlive a
        # reload (relay/serve.py hands in ones kept under the queue folder); without them
        # they are kept in memory only.
        self.egress = egress if egress is not None else Egress(WarmupCounters(None, now), now)
        self._egress_tasks: set[asyncio.Task[None]] = set()  # SPF lookups of cache misses
        self._counts_writer: asyncio.Task[None] | None = None
        self._egress_config(config, spf)
        store.on_recorded = self._recorded

    def apply(self, config: Config, spf: SpfChecker | None = None) -> None:
        """A reloaded config: the next job of every destination uses its new policy (routes,
        limits, rate), the next attempt the new settings, the next message the new source
        pool; open connections and the jobs in flight are kept. A new nameserver list gets
        a new resolver (and an empty cache). `spf` is the new Runtime's checker (None: built
        here when the config wants one); the warm-up counts are kept."""
        self._egress_config(config, spf)
        if config.dns.nameservers != self.config.dns.nameservers:
            self.resolver = NextHopResolver(config.dns.nameservers)
        if config.delivery.source_addresses != self.config.delivery.source_addresses:
            self.sources = SourcePicker(config.delivery.source_addresses, self.clock)
        self.config = config
        self._domain_labels = {}  # the policies may have changed
        self.attempter.config = config
        self.store.hostname = config.server.hostname
        self.store.max_lifetime = config.queue.max_lifetime
        self.health.apply(config)
        for dest in self.destinations.values():
            dest.apply(config.destination_for(dest.key))

    def _egress_config(self, config: Config, spf: SpfChecker | None) -> None:
        delivery = config.delivery
        # False (no pool, or spf = "off" without a warm-up source): dispatch as before.
        self._egress_needed = Egress.needed(delivery.source_addresses, delivery.spf)
        if delivery.spf != "enforce" or not delivery.source_addresses:
            spf = None
        elif spf is None:
            spf = SpfChecker.for_egress(config)
        self.spf = spf

    # --- the claim loop -----------------------------------------------------------------

    async def run(self) -> None:
        if self._counts_writer is None:  # warm-up counts reach the disk off the event loop
            self._counts_writer = asyncio.get_running_loop().create_task(
                self.egress.counters.run())
        while not self.stopping:
            try:
                more = await self._claim_round()
            except Exception as exc:  # a bug must not stop delivery for good
                log.event("delivery_error", level=40, error=_cause(exc), stage="claim")
                more = False
            if more:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: no task per wait (3.11's wait_for makes one)
                async with asyncio.timeout(self._poll_interval()):
                    await self.wake.wait()

    def _poll_interval(self) -> float:
        """IDLE_POLL, or less when handed-back recipients come due sooner."""
        wait = self._handback_due - self.now()
        if wait >= IDLE_POLL:
            return IDLE_POLL
        self._handback_due = float("inf")
        return max(0.0, wait)

    async def _claim_round(self) -> bool:
        """Claim and dispatch due recipients; True when more may be due right now."""
        self.wake.clear()
        room = MAX_IN_FLIGHT - len(self.in_flight)
        if room > 0:
            try:
                due = await self.store.claim(time.time(), min(room, CLAIM_BATCH))
            except Exception as exc:  # e.g. the disk is full: try again later, never die
                due = []
                if not await self.store.make_room(exc):
                    log.event("claim_failed", level=40, error=_cause(exc))
                    await asyncio.sleep(IDLE_POLL)
            if self.stopping:
                return False  # claimed during the stop: drain() gives them back
            self.dispatch(due)
            if len(due) == min(room, CLAIM_BATCH):
                return True
        self._prune_health()
        await self.store.maintain()
        return False

    def accept(self, committed: list[Committed]) -> None:
        """Messages intake just acknowledged: hand them to connections at once (no claim from
        the index), as far as there is room in flight; the rest wait in the index, queued."""
        if self.stopping:
            self.store.submit_new(committed, claimed=False)
            return
        room = MAX_IN_FLIGHT - len(self.in_flight)
        now: list[Committed] = []
        for c in committed:
            if room < len(c.envelope.recipients):
                break
            now.append(c)
            room -= len(c.envelope.recipients)
        later = committed[len(now):]
        if now:
            self.store.submit_new(now, claimed=True)
            self.dispatch([due for c in now for due in fresh_recipients(
                c, self.config.queue.max_lifetime)])
        if later:
            self.store.submit_new(later, claimed=False)

    def dispatch(self, due: list[DueRecipient]) -> None:
        jobs: dict[tuple[str, str, int | str], Job] = {}
        sizes: dict[tuple[str, str], int] = {}
        # Read per call, not kept: a reload replaces the attempter's S/MIME certificates.
        # (Some engine tests run dispatch without an attempter.)
        smime = self.attempter.smime if self.attempter is not None else None
        for d in due:
            if (d.msg, d.idx) in self.in_flight:
                continue
            self.in_flight.add((d.msg, d.idx))
            key: tuple[str, str, int | str]
            if smime is not None and smime.target(d.rcpt) is not None:
                # Its copy is encrypted to its own certificate: a transaction of its own.
                key = (d.msg, d.domain, f"rcpt{d.idx}")
                jobs[key] = Job(d.msg, [d])
                continue
            # At most RCPTS_PER_TRANSACTION recipients per transaction, as Postfix does: every
            # server must take 100, and a pipelined batch of replies stays small.
            count = sizes.get((d.msg, d.domain), 0)
            sizes[(d.msg, d.domain)] = count + 1
            key = (d.msg, d.domain, count // RCPTS_PER_TRANSACTION)
            if key in jobs:
                jobs[key].recipients.append(d)
            else:
                jobs[key] = Job(d.msg, [d])
        for (_, domain, _), job in jobs.items():
            self._enqueue(domain, job)

    def _destination(self, domain: str) -> Destination:
        dest = self.destinations.get(domain)
        if dest is None:
            dest = Destination.for_policy(domain, self.config.destination_for(domain),
                                          self.clock, cluster=self.cluster)
            dest.troubled = domain in self._troubled
            self.destinations[domain] = dest
        return dest

    def _enqueue(self, domain: str, job: Job) -> None:
        """Queue a job on its path (its source chosen now), or hand it back when its
        destination is throttled and already holds its window of jobs."""
        # The hot path (no rate, no source pool) is a few dict lookups: keep it so.
        dest = self.destinations.get(domain) or self._destination(domain)
        if self._egress_needed:
            self._enqueue_egress(dest, job)
            return
        if dest.troubled:
            self._enqueue_troubled(dest, job)
            return
        if dest.bucket is not None and dest.queued >= dest.window:
            self._hand_back(dest, job)
            return
        if self.sources.sources:
            path = dest.path_for(self.sources.pick(dest.allowed_sources), self.tls_memory)
        else:
            path = dest.paths.get(None) or dest.path_for(None, self.tls_memory)
        self._queue_on(dest, path, job)

    def _queue_on(self, dest: Destination, path: Path, job: Job) -> None:
        job.path = path
        path.jobs.append(job)
        dest.queued += 1
        if dest.hops is None:
            self._resolve(dest)  # its workers start once the next hops are known
        else:
            self._wake_path(dest, path)

    def _wake_path(self, dest: Destination, path: Path) -> None:
        if path.idle > 0:
            path.more.set()
        # Idle workers take one job each; more jobs than that need more connections (a
        # burst after a quiet spell would otherwise queue behind one idle connection).
        if len(path.jobs) > path.idle:
            if dest.workers < dest.max_connections and (
                    not dest.troubled or path.workers < self._path_cap(dest, path)):
                self._start_worker(dest, path)
            elif not path.workers:
                # Every slot is taken, by other paths: their idle connections make room.
                for other in dest.paths.values():
                    if other.idle:
                        other.more.set()

    def _hand_back(self, dest: Destination, job: Job) -> None:
        """Back to the index, due about when the bucket will have a token for it (a little
        before: the window refills in time), with no attempt counted."""
        bucket = dest.bucket
        assert bucket is not None
        now = self.now()
        delay = bucket.backlog_delay(dest.queued) - HANDBACK_HORIZON / 2
        # Each job handed back needs a token after those handed back before it.
        due = max(now + max(HANDBACK_MIN, delay), dest.handed_back_until + 1 / bucket.per_second)
        dest.handed_back_until = due
        self._postpone(job, due)

    def _postpone(self, job: Job, due: float) -> None:
        """Back to the index, due at `due` (wall clock), with no attempt counted."""
        self._release(job)
        self.store.postpone([(d.msg, d.idx, due) for d in job.recipients])
        for d in job.recipients:
            self.in_flight.discard((d.msg, d.idx))
        self.counters.handed_back += len(job.recipients)
        self._handback_due = min(self._handback_due, due)

    def _resolve(self, dest: Destination) -> None:
        if dest.resolving is None and not self.stopping:
            task = asyncio.get_running_loop().create_task(self._resolve_hops(dest))
            dest.resolving = task
            self._resolvers.add(task)
            task.add_done_callback(self._resolvers.discard)

    async def _resolve_hops(self, dest: Destination) -> None:
        """Resolve before any worker starts: a destination whose DNS fails takes no
        connection slot; its queued jobs get the DNS failure as their outcome."""
        try:
            dest.hops = await self._hops(dest)
        except DnsFailure as exc:
            kind = Kind.TEMPORARY if exc.temporary else Kind.PERMANENT
            reply = f"{'451' if exc.temporary else '550'} {exc.status} {exc.text}"
            self._fail_queued(dest, kind, reply, exc.status)
        except Exception as exc:
            log.event("delivery_error", level=40, error=_cause(exc), stage="resolve")
            self._fail_queued(dest, Kind.TEMPORARY,
                              f"451 4.3.0 Local delivery error: {_cause(exc)}", "4.3.0")
        else:
            for path in list(dest.paths.values()):
                # A connection per waiting job, up to the destination's cap.
                room = dest.max_connections - dest.workers
                if dest.troubled:
                    room = min(room, self._path_cap(dest, path) - path.workers)
                for _ in range(min(len(path.jobs), room)):
                    self._start_worker(dest, path)
        finally:
            dest.resolving = None
            self._forget_if_idle(dest)

    def _fail_queued(self, dest: Destination, kind: Kind, reply: str, status: str) -> None:
        for path in dest.paths.values():
            while path.jobs:
                job = path.jobs.popleft()
                dest.queued -= 1
                self._finish(job, [Verdict(d, kind, reply, status) for d in job.recipients])

    def _forget_if_idle(self, dest: Destination) -> None:
        """Drop a destination with nothing to do (kept while its bucket is not full: a new
        one would start full and let a burst through too early)."""
        if dest.workers or dest.queued or dest.resolving is not None:
            return
        if dest.bucket is not None and not dest.bucket.full():
            return
        if self.destinations.get(dest.key) is dest:
            del self.destinations[dest.key]

    def _start_worker(self, dest: Destination, path: Path) -> None:
        dest.workers += 1
        path.workers += 1
        task = asyncio.get_running_loop().create_task(self._worker(dest, path))
        self._workers.add(task)
        task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        # Jobs catch their own errors; this is for the worker's bookkeeping (and it retrieves
        # the exception, so asyncio never prints "Task exception was never retrieved").
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.event("delivery_error", level=40, error=_cause(exc), stage="worker")

    # --- connection workers ---------------------------------------------------------------

    async def _worker(self, dest: Destination, path: Path) -> None:
        conn: Connection | None = None
        lease: Lease | None = None  # this connection's slot among all nodes' ([cluster])
        try:
            while not self.stopping:
                if not path.jobs and (self.cluster is not None
                                      or not await self._wait_for_job(dest, path)):
                    # With [cluster] a connection is a slot other nodes may need: no idle
                    # keep-alive, the slot goes back as soon as this path has no job waiting.
                    break
                await self.store.room_to_record()
                if not path.jobs or self.stopping:
                    continue
                if dest.troubled and self._must_leave(dest, path):
                    break
                if lease is None and self.cluster is not None:
                    lease = await self.cluster.lease(dest.key, dest.max_connections)
                    if lease is None:  # other nodes hold every slot: wait for one
                        await self._pause(LEASE_RETRY)
                        continue
                if dest.bucket is not None:
                    delay = await dest.bucket.acquire()
                    if delay == 0 and dest.troubled and self._ramping(dest, path):
                        delay = await dest.bucket.acquire()  # half rate: a job costs two
                    if delay > 0:
                        if conn is not None and delay > CONNECTION_IDLE:
                            await conn.client.quit()
                            conn = None
                        await self._pause(delay)
                        continue
                job = path.jobs.popleft()
                dest.queued -= 1
                if dest.troubled and not self.health.breaker(dest.key).allow(self.clock()):
                    self._hold_destination(dest, job)
                    break
                conn = await self._attempt(dest, job, conn)
                if conn is not None and conn.sent >= dest.max_per_connection:
                    await conn.client.quit()
                    conn = None
        finally:
            dest.workers -= 1
            path.workers -= 1
            if conn is not None:
                await conn.client.quit()
            if lease is not None:
                await lease.release()
            self._worker_left(dest, path)

    def _worker_left(self, dest: Destination, path: Path) -> None:
        """A connection slot is free: a path of this destination that waits for one gets it."""
        if not path.workers and not path.jobs and dest.paths.get(path.key) is path:
            del dest.paths[path.key]
        if not self.stopping and dest.queued and dest.hops is not None:
            for other in list(dest.paths.values()):
                if other.jobs and not other.workers:
                    self._wake_path(dest, other)
        self._forget_if_idle(dest)

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless the engine stops first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _wait_for_job(self, dest: Destination, path: Path) -> bool:
        """Keep the connection open up to CONNECTION_IDLE for another job of this path,
        unless another path of the destination waits for a connection slot.

        Every idle worker wakes when a job arrives but only one takes it; the others wait on
        for the rest of their idle time instead of closing a reusable connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECTION_IDLE
        path.idle += 1
        try:
            while not path.jobs and not self.stopping and not _starving(dest):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                path.more.clear()
                try:
                    async with asyncio.timeout(remaining):  # no task per wait, as wait_for
                        await path.more.wait()
                except TimeoutError:
                    break
        finally:
            path.idle -= 1
        return bool(path.jobs) and not self.stopping

    async def _attempt(self, dest: Destination, job: Job, conn: Connection | None
                       ) -> Connection | None:
        """Run one job; whatever it raises, its recipients get an outcome and the worker lives.

        No outcome has been submitted when `_run_job` raises (`_finish` is its last step)."""
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = job
        try:
            return await self._run_job(dest, job, conn)
        except Exception as exc:
            # A bug or an input nobody foresaw: defer the job on the retry schedule (it
            # expires at max_lifetime as usual) and drop the connection, whose state is unknown.
            log.event("delivery_error", level=40, id=job.msg, error=_cause(exc), stage="job")
            _close(conn)
            reply = f"451 4.3.0 Local delivery error: {_cause(exc)}"
            self._finish(job, [Verdict(d, Kind.TEMPORARY, reply, "4.3.0") for d in job.recipients])
            return None
        finally:
            del self._running[task]

    async def _run_job(self, dest: Destination, job: Job, conn: Connection | None
                       ) -> Connection | None:
        screened = self._screen(job)
        if screened:
            self._finish(job, screened)
            if not job.recipients:
                return conn
        try:
            hops = await self._hops(dest)
        except DnsFailure as exc:
            kind = Kind.TEMPORARY if exc.temporary else Kind.PERMANENT
            code = "451" if exc.temporary else "550"
            self._finish(job, [Verdict(d, kind, f"{code} {exc.status} {exc.text}",
                                             exc.status) for d in job.recipients])
            return conn
        try:
            data = await self.store.read_message(job.first)
        except (OSError, SegmentCorrupt) as exc:
            log.event("spool_read_failed", level=40, id=job.msg, error=str(exc))
            self._finish(job, [Verdict(d, Kind.TEMPORARY, f"451 4.3.0 spool read failed: {exc}",
                                             "4.3.0") for d in job.recipients])
            return conn
        job.invoice_id = invoice_id_of(data)  # for the delivery records; header block only
        hops_seen = received_count(data)
        if hops_seen > MAX_HOPS:
            self._finish(job, [Verdict(d, Kind.PERMANENT, f"554 5.4.6 Too many hops:"
                                             f" {hops_seen} Received headers, mail loop?",
                                             "5.4.6") for d in job.recipients])
            return conn
        requirement = dest.tls if dest.tls is not None else await self._sts_requirement(dest)
        try:
            verdicts, conn = await self.attempter.deliver(job, data, hops, conn, requirement)
        except SourceUnusable as exc:
            self._next_source(dest, job, exc)
            return None
        if dest.troubled or job.unreachable or not _all_delivered(verdicts):
            verdicts = self._observe(dest, job, verdicts)
        self._finish(job, verdicts)
        return conn

    def _next_source(self, dest: Destination, job: Job, exc: SourceUnusable) -> None:
        """The job's source address cannot be bound: the job moves to another source (not
        to the next hop, which would fail the same way); with none left it is deferred."""
        self.sources.unbindable(exc.source)
        if job.path is not None:
            self._path_failed(dest, job.path, BLOCK, f"cannot bind: {exc}")
        job.unbindable += (exc.source.address,)
        if self._egress_needed:  # only to a source that is eligible too
            log.event("source_unusable", level=40, id=job.msg, source=str(exc.source.address),
                      error=str(exc))
            self._enqueue_egress(dest, job)
            return
        failed = set(job.unbindable)
        source = self.sources.next_after(failed, dest.allowed_sources)
        log.event("source_unusable", level=40, id=job.msg, source=str(exc.source.address),
                  error=str(exc), next=str(source.address) if source else None)
        if source is None:
            reply = f"451 4.4.0 Local source address problem: {exc}"
            self._finish(job, [Verdict(d, Kind.TEMPORARY, reply, "4.4.0")
                               for d in job.recipients])
            return
        self._queue_on(dest, dest.path_for(source, self.tls_memory), job)

    @staticmethod
    def _screen(job: Job) -> list[Verdict]:
        """Bounce the addresses that must never reach the wire, and take them out of the job.

        A control character (such as the bare CR an older intake let into a spool file), invalid
        UTF-8, non-ASCII without SMTPUTF8 or an over-long path would break the session or
        inject commands. A bad recipient bounces alone (5.1.3); a bad sender bounces every
        recipient (5.1.7), and gets no DSN: it could not be delivered safely either."""
        utf8 = job.first.smtputf8
        problem = address_problem(job.first.sender, smtputf8=utf8)
        if problem is not None:
            reply = f"553 5.1.7 Unusable sender address ({problem.value}); no DSN sent"
            screened = [Verdict(d, Kind.PERMANENT, reply, "5.1.7") for d in job.recipients]
            job.recipients = []
            return screened
        screened = []
        for d in job.recipients:
            problem = address_problem(d.rcpt, smtputf8=utf8)
            if problem is not None:
                screened.append(Verdict(d, Kind.PERMANENT, "553 5.1.3 Unusable recipient address"
                                        f" ({problem.value})", "5.1.3"))
        if screened:
            job.recipients = [d for d in job.recipients
                              if all(v.due is not d for v in screened)]
        return screened

    async def _sts_requirement(self, dest: Destination) -> TlsRequirement:
        """`tls = "mta-sts"`: the domain's policy (cached by the source, never raises)."""
        if self.sts is None:
            return OPPORTUNISTIC
        return await self.sts.requirement(dest.key)

    async def _hops(self, dest: Destination) -> list[NextHop]:
        port = self.config.delivery.port
        if dest.policy is not None and dest.policy.routes:
            hops = await self.resolver.for_hosts(dest.policy.routes, "route")
        else:
            hops = await self.resolver.for_domain(dest.key, port)
        fallback = self.config.delivery.fallback_relays
        if fallback:
            with contextlib.suppress(DnsFailure):
                hops = hops + await self.resolver.for_hosts(fallback, "fallback")
        return hops

    # --- path health ----------------------------------------------------------------------

    def _source_keys(self, dest: Destination) -> list[str]:
        """The sources a destination may use, as the HealthBook keys them."""
        if not self.sources.sources:
            return [""]
        allowed = dest.allowed_sources or [s.address for s in self.sources.sources]
        return [str(a) for a in allowed]

    def _enqueue_troubled(self, dest: Destination, job: Job) -> None:
        """`_enqueue` for a destination with health state: a breaker that is open holds the
        job back; a source out of rotation is never picked; none left: defer."""
        if self._egress_needed:
            self._enqueue_egress(dest, job)
            return
        if self._held_back(dest, job, breaker=True):
            return
        now = self.clock()
        book, key = self.health, dest.key
        source: SourceAddress | None = None
        if self.sources.sources:
            source = self.sources.pick(
                dest.allowed_sources,
                lambda s: not book.path(key, str(s.address)).available(now))
            available = source is not None
        else:
            available = book.path(key, "").available(now)
        if not available:
            self._defer_blocked(dest, job, now)
            return
        self._queue_on(dest, dest.path_for(source, self.tls_memory), job)

    def _defer_blocked(self, dest: Destination, job: Job, now: float) -> None:
        """Every source is out of rotation: defer with the reason, due no earlier than the
        first comes back (never bounced: the recipient is not at fault)."""
        deferral = self.health.deferral(dest.key, self._source_keys(dest), now)
        reason = deferral.reason if deferral else f"all sources of {dest.key} are blocked"
        until = deferral.until if deferral else now
        reply = f"451 4.7.1 {reason}"
        self._finish(job, [Verdict(d, Kind.TEMPORARY, reply, "4.7.1") for d in job.recipients],
                     not_before=self._wall(until, now))

    def _wall(self, monotonic: float, now: float) -> float:
        """A time of the health clock as a wall-clock due time."""
        return self.now() + max(0.0, monotonic - now)

    def _path_health(self, dest: Destination, path: Path) -> PathHealth:
        return self.health.path(dest.key, path.health_key)

    def _path_cap(self, dest: Destination, path: Path) -> int:
        return self._path_health(dest, path).connection_cap(
            self.clock(), dest.max_connections, dest.bucket is not None)

    def _ramping(self, dest: Destination, path: Path) -> bool:
        return self._path_health(dest, path).ramping(self.clock())

    def _must_leave(self, dest: Destination, path: Path) -> bool:
        """A worker of a troubled destination quits (freeing its slot) when the breaker is
        open (the work is held back) or its path carries fewer connections now (a path out
        of rotation moves its jobs to other sources first)."""
        now = self.clock()
        if self.health.breaker(dest.key).until(now) > now:
            self._hold_destination(dest, None)
            return True
        health = self._path_health(dest, path)
        if not health.available(now):
            self._evacuate(dest, path)
            return True
        return path.workers > health.connection_cap(now, dest.max_connections,
                                                    dest.bucket is not None)

    def _hold_destination(self, dest: Destination, job: Job | None) -> None:
        """The breaker is open: `job` and every queued job wait in the index until it
        half-opens (no attempt counted); its workers leave, holding no slots."""
        now = self.clock()
        due = self._wall(self.health.breaker(dest.key).until(now), now)
        if job is not None:
            self._postpone(job, due)
        for path in dest.paths.values():
            while path.jobs:
                dest.queued -= 1
                self._postpone(path.jobs.popleft(), due)

    def _evacuate(self, dest: Destination, path: Path) -> None:
        """A path left rotation: its queued jobs go to other sources at once (or defer)."""
        jobs = list(path.jobs)
        path.jobs.clear()
        dest.queued -= len(jobs)
        for job in jobs:
            self._enqueue_troubled(dest, job)

    def _observe(self, dest: Destination, job: Job, verdicts: list[Verdict]) -> list[Verdict]:
        """Feed an attempt's outcome to path health and the breaker; returns the verdicts to
        record. Recipients refused by a block or an `on_reply` rule are not among them:
        they go to another source at once, or defer when there is none."""
        path = job.path
        if path is None:
            return verdicts
        if job.unreachable:
            reply = verdicts[0].reply if verdicts else ""
            found = classify(reply, _rules(dest))
            if found.kind in _RETRY_ELSEWHERE:  # e.g. a greeting that names a block
                self._path_failed(dest, path, found, reply)
                self._retry_elsewhere(dest, job, verdicts)
                return []
            self._path_failed(dest, path, TRANSIENT, reply)
            self._breaker_failed(dest)
            return verdicts
        if job.answered:
            self._breaker_answered(dest)
        keep: list[Verdict] = []
        retry: list[Verdict] = []
        acted = False
        seen: dict[str, ReplyClass] = {}
        for v in verdicts:
            if v.kind in _SETTLED:
                keep.append(v)
                continue
            found = seen.get(v.reply) or seen.setdefault(v.reply, classify(v.reply, _rules(dest)))
            if found.path_action and not acted:
                acted = True
                self._path_failed(dest, path, found, v.reply)
            (retry if found.kind in _RETRY_ELSEWHERE else keep).append(v)
        if not acted and job.answered and dest.troubled:
            self._path_succeeded(dest, path)
        if retry:
            self._retry_elsewhere(dest, job, retry)
        return keep

    def _retry_elsewhere(self, dest: Destination, job: Job, verdicts: list[Verdict]) -> None:
        retry = Job(job.msg, [v.due for v in verdicts])
        self._enqueue_troubled(dest, retry)

    def _path_failed(self, dest: Destination, path: Path, found: ReplyClass,
                     reason: str) -> None:
        now = self.clock()
        self._watch(dest)
        health = self._path_health(dest, path)
        was_up = health.available(now)
        health.record(now, found, reason)
        if not was_up or health.available(now):
            return
        key = (dest.key, path.health_key)
        self._down.add(key)
        self._mark_suspended(key[1], key[0])
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall(health.until(now),
                                                                            now)))
        if found.kind is ReplyKind.SUSPEND:
            rule = next((r.match.pattern for r in _rules(dest) if r.match.search(reason)), "")
            log.event("path_suspended", level=30, destination=dest.key, source=key[1] or None,
                      rule=rule, duration=found.duration, reason=health.reason, until=until)
        else:
            log.event("path_down", level=30, destination=dest.key, source=key[1] or None,
                      reason=health.reason, until=until)
        self._evacuate(dest, path)

    def _path_succeeded(self, dest: Destination, path: Path) -> None:
        self._path_health(dest, path).success(self.clock())
        key = (dest.key, path.health_key)
        if key in self._down:
            self._down.discard(key)
            self._mark_suspended(key[1], key[0])
            log.event("path_up", destination=dest.key, source=key[1] or None)

    def _breaker_failed(self, dest: Destination) -> None:
        now = self.clock()
        breaker = self.health.breaker(dest.key)
        was = breaker.state(now)
        breaker.failure(now)
        if was == CLOSED and breaker.state(now) != CLOSED:
            until = self._wall(breaker.until(now), now)
            log.event("breaker_open", level=30, destination=dest.key,
                      until=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)))
        if breaker.until(now) > now:
            self._hold_destination(dest, None)

    def _breaker_answered(self, dest: Destination) -> None:
        if not dest.troubled:
            return  # no breaker state kept: nothing to close
        breaker = self.health.breaker(dest.key)
        if breaker.failures or breaker.state(self.clock()) != CLOSED:
            was_open = breaker.state(self.clock()) != CLOSED
            breaker.success(self.clock())
            if was_open:
                log.event("breaker_closed", destination=dest.key)

    def _watch(self, dest: Destination) -> None:
        """The destination has health state from now on: its dispatch consults it."""
        dest.troubled = True
        self._troubled.add(dest.key)

    def _prune_health(self) -> None:
        """Now and then, forget healthy paths and closed breakers: those destinations go
        back to the hot path."""
        now = self.clock()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        self.health.prune(now)
        self._troubled = self.health.destinations()
        forgotten = {k for k in self._down if k[0] not in self._troubled}
        self._down -= forgotten
        for destination, source in forgotten:
            self._mark_suspended(source, destination)
        for dest in self.destinations.values():
            dest.troubled = dest.key in self._troubled

    # --- SPF-aware egress and IP warm-up (relay/delivery/egress.py) ----------------------

    def _held_back(self, dest: Destination, job: Job, *, breaker: bool = False) -> bool:
        """True when the job went back to the queue instead: the destination's breaker is
        open (due when it half-opens; looked at when `breaker` or the destination is
        troubled), or its throttle window is full (handed back)."""
        if breaker or dest.troubled:
            now = self.clock()
            until = self.health.breaker(dest.key).until(now)
            if until > now:
                self._postpone(job, self._wall(until, now))
                return True
        if dest.bucket is not None and dest.queued >= dest.window:
            self._hand_back(dest, job)
            return True
        return False

    def _enqueue_egress(self, dest: Destination, job: Job) -> None:
        """`_enqueue` when the source must be eligible: SPF results from the checker's cache
        (a miss is looked up in a task, and the job placed when it is answered), then the
        warm-up caps. The job goes to an eligible source, is split at a cap, or defers."""
        self._release(job)  # a job moved from another source is counted afresh
        if self._held_back(dest, job):
            return
        pool = pool_for(self.sources.sources, dest.allowed_sources)
        spf: dict[IPAddress, str] | None = None
        if self.spf is not None:
            spf = self._cached_spf(self.spf, pool, job.first.sender)
            if spf is None:
                self._lookup_spf(dest.key, job, pool)
                return
        self._place(dest, job, pool, spf)

    @staticmethod
    def _cached_spf(checker: SpfChecker, pool: tuple[SourceAddress, ...], sender: str
                    ) -> dict[IPAddress, str] | None:
        """Every source's result for `sender` if all are cached (no DNS, no await)."""
        results: dict[IPAddress, str] = {}
        for s in pool:
            found = checker.cached(str(s.address), sender, s.hostname)
            if found is None:
                return None
            results[s.address] = found.result
        return results

    def _lookup_spf(self, domain: str, job: Job, pool: tuple[SourceAddress, ...]) -> None:
        task = asyncio.get_running_loop().create_task(self._spf_then_place(domain, job, pool))
        self._egress_tasks.add(task)
        task.add_done_callback(self._egress_tasks.discard)

    async def _spf_then_place(self, domain: str, job: Job,
                              pool: tuple[SourceAddress, ...]) -> None:
        checker = self.spf
        if checker is None:  # a reload turned SPF off meanwhile
            spf = None
        else:
            try:
                spf = await fetch_spf(checker, pool, job.first.sender)
            except Exception as exc:  # the checker never raises; a bug must not lose the job
                log.event("delivery_error", level=40, id=job.msg, error=_cause(exc), stage="spf")
                self._defer(job, f"451 4.3.0 Local delivery error: {_cause(exc)}", "4.3.0")
                return
        if not self.stopping:  # stopping: still claimed, drain() gives it back
            self._place(self._destination(domain), job, pool, spf)

    def _place(self, dest: Destination, job: Job, pool: tuple[SourceAddress, ...],
               spf: dict[IPAddress, str] | None) -> None:
        now = self.now()
        decision = self.egress.eligible(pool, dest.key, len(job.recipients), now, spf,
                                        job.first.sender)
        if isinstance(decision, Deferral):
            self._egress_deferral(dest, job, decision)
            return
        rest = None
        if decision.limit is not None and decision.limit < len(job.recipients):
            # The source with the most room takes what fits; the rest is decided again.
            rest = Job(job.msg, job.recipients[decision.limit:])
            job.recipients = job.recipients[:decision.limit]
        source = self._pick_eligible(dest, job, decision.sources) if decision.sources else None
        if source is None and decision.sources:
            if dest.troubled:
                self._defer_blocked(dest, job, self.clock())
            else:
                self._defer(job, "451 4.4.0 Local source address problem: no eligible source"
                            " address could be bound", "4.4.0")
        else:
            if source is not None:
                job.reservation = self.egress.counters.reserve(source, dest.key,
                                                               len(job.recipients), now)
            self._queue_on(dest, dest.path_for(source, self.tls_memory), job)
        if rest is not None:
            self._place(dest, rest, pool, spf)

    def _pick_eligible(self, dest: Destination, job: Job,
                       eligible: tuple[SourceAddress, ...]) -> SourceAddress | None:
        """The weighted round-robin's next source among `eligible`, skipping those that could
        not be bound for this job and, for a troubled destination, paths out of rotation."""
        allowed = {s.address for s in eligible}
        failed = job.unbindable
        book, key, now, troubled = self.health, dest.key, self.clock(), dest.troubled

        def unavailable(s: SourceAddress) -> bool:
            return s.address not in allowed or s.address in failed or (
                troubled and not book.path(key, str(s.address)).available(now))

        return self.sources.pick(dest.allowed_sources, unavailable)

    def _egress_deferral(self, dest: Destination, job: Job, deferral: Deferral) -> None:
        if deferral.until is not None:  # every source at its warm-up cap: no attempt counted
            log.event("warmup_capped", id=job.msg, destination=dest.key,
                      recipients=len(job.recipients), reply=deferral.reply,
                      next_attempt=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                 time.gmtime(deferral.until)))
            self._postpone(job, deferral.until)
        else:  # SPF: on the retry schedule, so a sender never authorised expires with a DSN
            self._defer(job, deferral.reply, deferral.status)

    def _defer(self, job: Job, reply: str, status: str) -> None:
        self._finish(job, [Verdict(d, Kind.TEMPORARY, reply, status) for d in job.recipients])

    def _release(self, job: Job) -> None:
        """Give back the job's warm-up reservation (it was not sent from that source)."""
        if job.reservation is not None:
            self.egress.counters.settle(job.reservation, 0)
            job.reservation = None

    def _settle(self, job: Job, verdicts: list[Verdict]) -> str | None:
        """Count the recipients the server accepted against the job's source (warm-up) and
        give back the rest; returns the source address for the attempt record."""
        path = job.path
        source = path.source if path is not None else None
        if source is None:
            return None
        if job.reservation is not None or source.warmup is not None:
            accepted = sum(1 for v in verdicts if v.kind is _DELIVERED)
            if job.reservation is not None:
                self.egress.counters.settle(job.reservation, accepted)
                job.reservation = None
            elif accepted:  # its reservation was settled earlier (a screened recipient)
                self.egress.counters.record(source, verdicts[0].due.domain, accepted,
                                            self.now())
        return str(source.address)

    # --- outcomes -----------------------------------------------------------------------

    def _finish(self, job: Job, verdicts: list[Verdict], not_before: float = 0.0) -> None:
        """Record the outcomes; a deferral is due no earlier than `not_before` (wall clock:
        when a blocked destination has a source back)."""
        now = time.time()
        schedule = self.config.queue.retry_schedule
        # One jitter draw per job: its deferred recipients come due together and are retried in
        # one transaction (per-recipient jitter split a message into one transaction each).
        seed = random.random()
        source = self._settle(job, verdicts)
        results = []
        # The labels once per job: its recipients share a domain and a source.
        domain = self._domain_label(verdicts[0].due.domain) if verdicts else metrics.OTHER
        source_label = metrics.source_label(source)
        for v in verdicts:
            due = v.due
            if v.kind == Kind.RELEASED:
                # Cut off by a graceful stop before its final dot: not an attempt. drain()
                # gives every claimed recipient that has no outcome back to the queue.
                self._log_released(due, v.hop, v.reply)
                continue
            status = v.status
            if v.kind == Kind.DELIVERED:
                state, next_at = DELIVERED, now
            elif v.kind == Kind.PERMANENT:
                state, next_at = BOUNCED, now
            else:
                state, next_at = retry.temporary_state(due.attempts, now, schedule, due.expires,
                                                       unknown=v.kind == Kind.UNKNOWN,
                                                       rng=random.Random(seed))
                if state == EXPIRED:
                    status = "4.4.7"
                elif next_at < not_before:
                    next_at = not_before
            hop = v.hop
            outcome = Outcome(due.msg, due.idx, state, now, next_at, v.reply,
                              host=hop.name if hop else None,
                              address=f"{hop.address}:{hop.port}" if hop else None, tls=v.tls,
                              sha256=v.sha256, tls_cipher=v.tls_cipher,
                              tls_verified=v.tls_verified if v.tls else None,
                              source=v.source or source, dkim=v.signed_by,
                              invoice_id=job.invoice_id, remote=v.remote)
            results.append(Result(due, outcome, status))
            metrics.add(metrics.DELIVERIES, state, domain)
            metrics.add(metrics.SOURCE_DELIVERIES, source_label, state)
            if state == DELIVERED:
                metrics.DELIVERY_LATENCY.observe(max(0.0, now - due.received))
        # Not awaited: the connection goes on with its next job while the outcome is recorded
        # in the next batch. The recipients stay in flight (claimed) until it is.
        if results:
            self.store.submit(results)

    def _domain_label(self, domain: str) -> str:
        """The `domain` label of a recipient domain: its destination policy's `domain`, or
        `other`. Looked up once per domain (until a reload)."""
        label = self._domain_labels.get(domain)
        if label is None:
            if len(self._domain_labels) >= 100_000:  # many unlisted domains: start over
                self._domain_labels.clear()
            policy = self.config.destination_for(domain)
            label = metrics.domain_label(policy.domain if policy is not None else None)
            self._domain_labels[domain] = label
        return label

    def _mark_suspended(self, source: str, destination: str) -> None:
        """`source_suspended{source,domain}` after a path went down or came back: 1 while
        any path from `source` to a domain of that label is down."""
        label = self._domain_label(destination)
        down = any(s == source and self._domain_label(d) == label for d, s in self._down)
        metrics.SOURCE_SUSPENDED.labels(metrics.source_label(source), label).set(1 if down else 0)

    def _recorded(self, results: list[Result], dsns: int) -> None:
        for r in results:
            self.in_flight.discard((r.outcome.msg, r.outcome.idx))
        if dsns or results:
            self.wake.set()
        for r in results:
            self._log(r)

    def _log(self, r: Result) -> None:
        o = r.outcome
        state = o.state
        self.counters.count(state)
        fields: dict[str, object] = {
            "id": o.msg, "rcpt": r.due.rcpt, "source": o.source, "host": o.host,
            "address": o.address,
            "tls": o.tls, "cipher": o.tls_cipher,
            "verified": ("yes" if o.tls_verified else "no") if o.tls else None,
            "status": r.status, "attempt": r.due.attempts + 1, "reply": o.reply,
            # The relay's own text (a connect error, a timeout, a policy), not the host's.
            "origin": None if o.remote else "relay",
        }
        if state not in (DELIVERED, BOUNCED, EXPIRED):
            fields["next_attempt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime(o.next_attempt))
        if state == UNKNOWN:
            fields["note"] = "no reply to the final dot; will retry (possible duplicate)"
        log.event(state, **fields)

    @staticmethod
    def _log_released(due: DueRecipient, hop: NextHop | None, why: str) -> None:
        log.event("released", id=due.msg, rcpt=due.rcpt, host=hop.name if hop else None,
                  address=f"{hop.address}:{hop.port}" if hop else None, reply=why,
                  attempt=due.attempts + 1, note="not counted as an attempt; due again")

    # --- queue control -------------------------------------------------------------------

    def forgive(self, domain: str | None) -> None:
        """`queue retry`: path cool-downs and open breakers (of `domain`, or all) are
        forgotten, so the retried recipients are attempted now, not deferred again."""
        now = self.clock()
        reset = self.health.forgive(domain, now)
        if reset:
            log.event("health_reset", domain=domain, reset=reset, note="queue retry")
        # Forgiven paths are in rotation again: `source_suspended` says so at once.
        back = {k for k in self._down if self.health.path(*k).available(now)}
        self._down -= back
        for destination, source in back:
            self._mark_suspended(source, destination)
            log.event("path_up", destination=destination, source=source or None,
                      note="queue retry")

    def control(self, msgs: frozenset[str]) -> frozenset[tuple[str, int]]:
        """`queue hold|delete|bounce`: drop these messages' jobs that wait for a connection
        (their attempt must not start); returns the recipients in an attempt now (it ends)."""
        busy = frozenset((d.msg, d.idx) for job in self._running.values() if job.msg in msgs
                         for d in job.recipients)
        for dest in self.destinations.values():
            for path in dest.paths.values():
                dropped = [job for job in path.jobs if job.msg in msgs]
                for job in dropped:
                    path.jobs.remove(job)
                    dest.queued -= 1
                    for d in job.recipients:
                        self.in_flight.discard((d.msg, d.idx))
        return busy

    # --- shutdown -----------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop taking work, then stop so that every claimed recipient has an outcome.

        No new final dot is sent. A transaction before its dot is given up at once (RSET when
        that is still possible, otherwise the connection is closed) and its recipients are
        released. A transaction whose dot is out may still get its reply within `grace`
        seconds; after that its recipients are recorded as unknown (retried: maybe a
        duplicate). Whatever else was claimed goes back to the queue unattempted."""
        self.stopping = True
        self.attempter.draining = True
        self.wake.set()
        for task in list(self._egress_tasks):
            task.cancel()  # their recipients are still claimed: given back below
        self._stop.set()  # workers waiting for a token stop waiting
        for task in list(self._resolvers):
            task.cancel()
        for dest in self.destinations.values():
            for path in dest.paths.values():
                path.more.set()  # idle workers quit their connections
        for task, job in list(self._running.items()):
            if job.client is None:  # resolving, reading the spool, connecting: nothing sent
                for due in job.recipients:
                    self._log_released(due, None, "relay stopping: no transaction started")
                task.cancel()
            else:
                job.client.abandon()
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=grace)
        # Grace over: stop waiting for replies. Closing makes a transaction whose dot is out
        # end as unknown, and one that was waiting to send RSET as released.
        for task, job in list(self._running.items()):
            if job.client is not None:
                job.client.close()
            else:
                task.cancel()
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=STOP_WAIT)
            for task in pending:
                task.cancel()
        await self._give_back()
        await self._stop_counts_writer()

    async def _stop_counts_writer(self) -> None:
        """The warm-up counts' last write (in the writer's `finally`)."""
        writer, self._counts_writer = self._counts_writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _give_back(self) -> None:
        """Record what the stop cut off, then release whatever is still claimed."""
        try:
            await asyncio.wait_for(self.store.flush(), FLUSH_WAIT)
        except TimeoutError:  # outcomes still being recorded must not be released under them
            log.event("release_skipped", level=30, note="outcomes not recorded yet; claimed"
                      " recipients become due again at the next start")
            return
        try:
            self.counters.released += await self.store.release_claimed()
        except Exception as exc:
            log.event("release_failed", level=40, error=_cause(exc),
                      note="claimed recipients become due again at the next start")


def _starving(dest: Destination) -> bool:
    """All of the destination's connection slots are taken and a path with jobs has none."""
    return dest.workers >= dest.max_connections and len(dest.paths) > 1 and any(
        p.jobs and not p.workers for p in dest.paths.values())


def _close(conn: Connection | None) -> None:
    if conn is not None:
        conn.client.close()


def _all_delivered(verdicts: list[Verdict]) -> bool:
    # The common case, one recipient delivered, without a generator.
    if len(verdicts) == 1:
        return verdicts[0].kind is _DELIVERED
    return all(v.kind is _DELIVERED for v in verdicts)


def _rules(dest: Destination) -> tuple[OnReply, ...]:
    return dest.policy.on_reply if dest.policy is not None else ()


def _cause(exc: BaseException) -> str:
    """`Type: message` on one line, for a log field or a recorded reply."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def fresh_recipients(c: Committed, max_lifetime: float) -> list[DueRecipient]:
    """The recipients of a message just acknowledged, as the index would give them."""
    env = c.envelope
    return [DueRecipient(env.id, idx, rcpt, domain_of(rcpt), 0, env.sender, env.received,
                         env.received + max_lifetime, env.body, env.smtputf8, c.location,
                         env.priority)
            for idx, rcpt in enumerate(env.recipients)]


def received_count(data: bytes) -> int:
    """Received header fields in the message's header block."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    return len(_RECEIVED.findall(head))
