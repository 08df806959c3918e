"""`invoice-relay serve`: recover the queue, then run intake and delivery on both cores.

Process model: the main process recovers the queue, binds the listeners, forks the delivery
process and a second intake process (on a machine with two cores or more), then runs SMTP intake
itself; both intake processes accept from the same sockets. Intake wakes delivery through a pipe
after every committed batch. The children die with their parent (PR_SET_PDEATHSIG), so a killed
relay never leaves a stray worker delivering on its own. If any process dies unexpectedly, the
whole relay exits non-zero and the service manager restarts it; startup recovery then makes the
queue consistent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from relay import log, metrics, notify
from relay.config import load_or_exit, unbindable_sources
from relay.exitcodes import EXIT_CONFIG
from relay.notify import Heartbeats
from relay.queue.committer import Committer
from relay.queue.dedupe import FILE_NAME as DEDUPE_FILE
from relay.queue.dedupe import DedupeTable
from relay.queue.index import INDEX_FILE
from relay.queue.notices import Committed, NoticeWriter, read_pipes
from relay.queue.recovery import recover
from relay.queue.space import FreeSpaceGuard, Reserve, floor_bytes
from relay.reload import Reloader
from relay.runtime import BuildFailed, Live, Runtime
from relay.smtp.anvil import Anvil
from relay.smtp.authlimit import AuthFailureLimiter

if TYPE_CHECKING:
    from relay.config import Config
    from relay.delivery.mtasts import MtaStsResolver

DRAIN_GRACE = 30.0
DELIVERY_START_TIMEOUT = 30.0
QUEUE_COUNT_INTERVAL = 1.0  # how often delivery tells intake the queue depth ([queue] max_queued)
# Heartbeats without a systemd watchdog: /healthz calls a process down after this long.
HEALTH_INTERVAL = 2.0
INTAKE_PROCESSES = max(1, min(2, os.cpu_count() or 1))
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# Failures that go away by themselves or by a fix outside the config (exit 1, not 78).
_TRANSIENT = {errno.EADDRINUSE, errno.EACCES, errno.EPERM, errno.EAGAIN}
# Tasks nobody awaits (closing a replaced MTA-STS source): held so they are not collected.
_background: set[asyncio.Task[None]] = set()
# Held back until each process has its handlers: the default action of all three is to die.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve(cli_config: str | None) -> int:
    config = load_or_exit(cli_config)
    try:
        # Keys and certificates are loaded before the fork (the children inherit them); one
        # that fails stops the start: a relay must never sign nothing silently.
        runtime = Runtime.build(config)
    except BuildFailed as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    log.setup(fmt=config.log.format)
    _raise_open_files()
    for line in config.warnings:  # keys set but not enforced yet: said once, at start
        log.event("config_warning", level=30, warning=line)
    unbindable = unbindable_sources(config)
    if unbindable:
        # Not EX_CONFIG: the address may come up later (an interface still being configured).
        for line in unbindable:
            log.event("source_unbindable", level=40, error=line)
            print(line, file=sys.stderr)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the forked child inherits this
    root = config.queue.path
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock_queue(root)
    except OSError as exc:
        print(f"{root}: cannot use the queue folder: {exc.strerror or exc}", file=sys.stderr)
        # Permissions get fixed and a lock held by a relay that is stopping goes away: exit 1,
        # which systemd restarts; only a path that can never work (a file, ...) is the config's.
        return 1 if exc.errno in _TRANSIENT else EXIT_CONFIG
    db_path = root / INDEX_FILE
    started = time.monotonic()
    try:
        report = recover(root, db_path, max_lifetime=config.queue.max_lifetime,
                         segment_size=config.queue.segment_size)
    except sqlite3.DatabaseError as exc:
        # Damage does not heal by restarting: say what to do, and stop a restart loop (78).
        transient = isinstance(exc, sqlite3.OperationalError)
        hint = "" if transient else "; stop the relay and run `invoice-relay queue rebuild`"
        log.event("index_unusable", level=40, path=db_path, error=str(exc))
        print(f"{db_path}: the queue index is unusable: {exc}{hint}", file=sys.stderr)
        return 1 if transient else EXIT_CONFIG
    except OSError as exc:
        print(f"{root}: startup recovery failed: {exc}", file=sys.stderr)
        return 1
    from relay.queue.records import RECORDS_FILE, records_problem

    problem = records_problem(root / RECORDS_FILE)
    if problem is not None:  # damage does not heal by restarting (78 stops a restart loop)
        print(problem, file=sys.stderr)
        return EXIT_CONFIG
    # Every count, zeros too: "released=0 reindexed=0" says the last stop was clean.
    log.event("recovered", seconds=round(time.monotonic() - started, 3), **vars(report))
    # Before intake takes any mail: the room delivery needs to record outcomes on a full disk.
    reserve = Reserve(root)
    # Before the fork: every process then writes its samples under <queue>/metrics.
    metrics.setup(root)
    metrics.declare(config)
    metrics.set_certificates(config)
    if not reserve.ensure():
        log.event("reserve_missing", level=30, path=root,
                  note="not enough free space for the emergency reserve")
    from relay.smtp.server import bind_listeners

    try:
        listeners = bind_listeners(config.server.listen, config.server.listen_tls)
    except OSError as exc:
        message = exc.strerror or str(exc)  # "cannot listen on HOST:PORT: why"
        log.event("listen_failed", level=40, error=message)
        print(message, file=sys.stderr)
        # A port still held by a process that is going away frees up, and a missing capability
        # is granted by a drop-in: exit 1, which systemd restarts. An address this machine does
        # not have is the config's: 78.
        return 1 if exc.errno in _TRANSIENT else EXIT_CONFIG
    try:
        http_sock = _bind_http(config)
    except OSError as exc:
        for sock, _ in listeners:
            sock.close()
        log.event("listen_failed", level=40, error=exc.strerror or str(exc))
        print(exc.strerror or str(exc), file=sys.stderr)
        return 1 if exc.errno in _TRANSIENT else EXIT_CONFIG
    reserve_path = reserve.path if reserve.path.exists() else None
    limit = config.server.auth_failure_limit
    # Created before the fork: every intake process shares the same buckets.
    auth_limiter = AuthFailureLimiter(limit.count, limit.period) if limit else None
    anvil = Anvil()  # connection and rate limits, the queue depth: shared the same way
    try:
        dedupe = DedupeTable(root / DEDUPE_FILE)
    except OSError as exc:
        print(f"{root / DEDUPE_FILE}: cannot use the duplicate table: {exc}", file=sys.stderr)
        return 1
    if not dedupe.persistent:
        log.event("dedupe_in_memory", level=30, path=root / DEDUPE_FILE,
                  note="no room for the file: duplicates are remembered until the next start")
    # One notice pipe per intake process, read by the delivery process (see relay.queue.notices).
    pipes = [os.pipe() for _ in range(INTAKE_PROCESSES)]
    read_ends, write_ends = [r for r, _ in pipes], [w for _, w in pipes]
    parent = os.getpid()
    ready_read, ready_write = os.pipe()
    interval = notify.watchdog_interval()
    # Slot 0: delivery; slot N < INTAKE_PROCESSES: intake process N; then the main process
    # (intake 0, which pings systemd) and the http process. Always made: /healthz reads it.
    beats = Heartbeats(INTAKE_PROCESSES + 1 + (http_sock is not None),
                       interval or HEALTH_INTERVAL)
    listener_fds = [sock.fileno() for sock, _ in listeners]
    delivery = _fork(lambda: _delivery_main(Live(runtime), read_ends, ready_write, anvil), parent,
                     "relay-delivery", heartbeat=(beats, 0),
                     close=[*write_ends, ready_read, *listener_fds,
                            *([http_sock.fileno()] if http_sock else [])])
    for fd in (*read_ends, ready_write):
        os.close(fd)
    if not _wait_ready(ready_read, DELIVERY_START_TIMEOUT):
        log.event("child_died", level=40, process="delivery", note="it never became ready")
        _wait_child(delivery, 1)
        lock.close()
        return 1
    http = _fork_http(runtime, http_sock, parent, beats, reserve_path,
                      close=[*write_ends, *listener_fds]) if http_sock is not None else None
    # More intake processes accept from the same listening sockets, so that SMTP intake, the
    # busiest stage, is spread over the cores; delivery runs beside them.
    helpers = [_fork_intake(runtime, slot, write_ends, listeners, reserve_path, auth_limiter,
                            parent, beats, anvil, dedupe) for slot in range(1, INTAKE_PROCESSES)]
    for fd in write_ends[1:]:
        os.close(fd)
    _name_process("relay-intake")
    children = [delivery, *helpers, *([http] if http else [])]
    try:
        code = uvloop.run(_intake_main(Live(runtime), 0, write_ends[0], listeners, reserve_path,
                                       auth_limiter, children=children, beats=beats,
                                       anvil=anvil, dedupe=dedupe, watchdog=bool(interval)))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            _wait_child(pid, DRAIN_GRACE + 10)
        lock.close()
        metrics.flush()
        log.flush()
    return code


def _bind_http(config: Config) -> socket.socket | None:
    """The `[http] listen` socket, bound before the fork; None when HTTP is off."""
    hp = config.http.listen
    if hp is None:
        return None
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    try:
        sock = socket.create_server((hp.host, hp.port), family=family)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {hp} ([http] listen):"
                                 f" {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _fork_http(runtime: Runtime, sock: socket.socket, parent: int, beats: Heartbeats,
               reserve: Path | None, close: Sequence[int]) -> int:
    """The http process: /healthz, /metrics, the API. It only reads the queue; the main
    process closes its copy of the socket."""
    from relay.ops.http.health import HealthSources

    root = runtime.config.queue.path
    sources = HealthSources(
        root=root, beats=beats, delivery_slots=(0,),
        intake_slots=(*range(1, INTAKE_PROCESSES), INTAKE_PROCESSES),
        space=FreeSpaceGuard(root, floor_bytes(root, runtime.config.queue.min_free_space),
                             reserve))

    async def main() -> int:
        from relay.ops.http.server import http_main  # aiohttp: only in this process

        return await http_main(Live(runtime), sock, sources)

    pid = _fork(main, parent, "relay-http", close=close,
                heartbeat=(beats, INTAKE_PROCESSES + 1))
    sock.close()
    return pid


def _raise_open_files() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every idle client holds a descriptor, and
    max_connections (1,000 by default) is over the usual soft limit of 1,024 with the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wait_ready(fd: int, timeout: float) -> bool:
    """Wait for the delivery process to say it reads notices (before any mail is taken)."""
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable) and os.read(fd, 1) == b"R"
    finally:
        os.close(fd)


def _fork_intake(runtime: Runtime, slot: int, write_ends: Sequence[int],
                 listeners: Sequence[tuple[socket.socket, bool]], reserve: Path | None,
                 auth_limiter: AuthFailureLimiter | None, parent: int,
                 beats: Heartbeats | None, anvil: Anvil | None = None,
                 dedupe: DedupeTable | None = None) -> int:
    """Another intake process: segment writer number `slot`, its own notice pipe."""
    return _fork(lambda: _intake_main(Live(runtime), slot, write_ends[slot], listeners, reserve,
                                      auth_limiter, anvil=anvil, dedupe=dedupe),
                 parent, "relay-intake", close=[w for i, w in enumerate(write_ends) if i != slot],
                 heartbeat=(beats, slot) if beats else None)


def _fork(main: Callable[[], Coroutine[Any, Any, int]], parent: int, name: str,
          close: Sequence[int] = (), heartbeat: tuple[Heartbeats, int] | None = None) -> int:
    """Run `main` on uvloop in a child process that dies with its parent (and, under a
    systemd watchdog, beats from its event loop into its heartbeat slot)."""
    pid = os.fork()
    if pid:
        return pid
    for fd in close:
        os.close(fd)
    _die_with_parent()
    _name_process(name)
    code = 1
    try:
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        code = uvloop.run(_beating(main(), heartbeat))
    except Exception as exc:
        # A bug or an unforeseen condition: one line saying why this process ended (the
        # main process then stops the relay, and the service manager restarts it).
        log.event("process_failed", level=50, process=name,
                  error=f"{type(exc).__name__}: {exc}",
                  where=_where(exc))
    finally:
        metrics.flush()  # the last half second of counts (os._exit skips atexit)
        log.flush()
        os._exit(code)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc`, for the one log line."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


async def _beating(main: Coroutine[Any, Any, int],
                   heartbeat: tuple[Heartbeats, int] | None) -> int:
    if heartbeat is None:
        return await main
    beats, slot = heartbeat
    beating = asyncio.get_running_loop().create_task(beats.beat_forever(slot))
    try:
        return await main
    finally:
        beating.cancel()


def _lock_queue(root: Path):  # type: ignore[no-untyped-def]
    """One relay per queue folder: a second one would deliver the same recipients twice."""
    handle = open(root / "lock", "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EAGAIN, f"another invoice-relay is using {root}") from None
    return handle


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _name_process(name: str) -> None:
    """Name the process for ps/top (`comm`, 15 bytes): relay-intake or relay-delivery."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15])


def _wait_child(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        return  # already reaped by _watch_child


def _install_signals(stop: asyncio.Event, reloader: Reloader) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log.loop_exception)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones arrive now


def intake_settings(rt: Runtime) -> dict[str, Any]:
    """The IntakeContext fields that come from the config (the rest is this process's)."""
    server = rt.config.server
    return {"hostname": server.hostname, "trusted": server.trusted_networks,
            "max_message_size": server.max_message_size, "users": rt.users,
            "tls_context": rt.server_tls, "error_soft_limit": server.error_soft_limit,
            "error_hard_limit": server.error_hard_limit, "error_delay": server.error_delay,
            "idle_timeout": server.idle_timeout, "sender_auth": rt.sender_auth,
            "smime": rt.smime, "sender_priority": rt.sender_priority,
            "max_connections": server.max_connections,
            "max_connections_per_client": server.max_connections_per_client,
            "max_messages_per_client": server.max_messages_per_client,
            "max_queued": rt.config.queue.max_queued,
            "dedupe_window": rt.config.queue.dedupe_window}


# --- intake (main process) -------------------------------------------------------------------

async def _intake_main(live: Live, slot: int, notice_fd: int,
                       listeners: Sequence[tuple[socket.socket, bool]],
                       reserve: Path | None = None, auth_limiter: AuthFailureLimiter | None = None,
                       children: Sequence[int] = (), beats: Heartbeats | None = None,
                       anvil: Anvil | None = None, dedupe: DedupeTable | None = None,
                       watchdog: bool = False) -> int:
    """SMTP intake. In the main process (`children` given) it also watches the other
    processes: if one dies unexpectedly, the relay stops so that the service manager restarts
    it and startup recovery runs."""
    from relay.smtp.server import Intake, IntakeContext

    stop = asyncio.Event()
    # Only the main process forwards a reload, and only one that succeeded in it.
    reloader = Reloader(live, "intake", children=children)
    _install_signals(stop, reloader)
    config = live.config
    root = config.queue.path

    notices = NoticeWriter(notice_fd)
    await notices.open()
    committer = Committer(root / "spool", slot, segment_size=config.queue.segment_size,
                          on_committed=notices.committed, on_sealed=notices.sealed)
    await asyncio.to_thread(committer.start)
    space = FreeSpaceGuard(root, floor_bytes(root, config.queue.min_free_space), reserve)
    ctx = IntakeContext(committer=committer, space=space, auth_limiter=auth_limiter,
                        anvil=anvil, dedupe=dedupe, **intake_settings(live.current))
    committer.may_allocate = space.ok
    intake = Intake(ctx, config.server.listen, config.server.listen_tls)
    await intake.start(listeners)
    # What a reload changes: the settings of the next session (open ones keep theirs).
    async def apply(rt: Runtime) -> None:
        await intake.apply(dataclasses.replace(intake.ctx, _trust_cache={},
                                               **intake_settings(rt)))
        if children:  # the main process speaks for all: the certificates' expiry
            await asyncio.to_thread(metrics.set_certificates, rt.config)

    reloader.start(apply)
    log.event("listening", addresses=" ".join(f"{h}:{p}" for h, p in intake.bound()),
              hostname=config.server.hostname, pid=os.getpid())
    loop = asyncio.get_running_loop()
    watchers = {loop.create_task(_watch_child(pid)) for pid in children}
    if children:  # the main process: the only one systemd listens to (NotifyAccess=main)
        notify.notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=accepting mail")
    pinger = None
    if children and beats:
        # Beat the main process's own slot (for /healthz); ping systemd only under a watchdog.
        pinger = loop.create_task(_watchdog(beats, children) if watchdog
                                  else beats.beat_forever(INTAKE_PROCESSES))
    stopper = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({*watchers, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stopper not in done:
        log.event("child_died", level=40, note="stopping so the service manager restarts us")
        code = 1
    if children:
        notify.notify("STOPPING=1", "STATUS=draining")
    log.event("draining", process="intake")
    for pid in children:  # the others drain at the same time
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    await intake.drain(DRAIN_GRACE)
    await asyncio.to_thread(committer.stop)
    notices.close()
    for task in (*watchers, stopper, *([pinger] if pinger else [])):
        task.cancel()
    log.event("stopped", process="intake")
    return code


async def _watchdog(beats: Heartbeats, children: Sequence[int]) -> None:
    """WATCHDOG=1 while every child's loop turns; a stuck one is logged. The main process
    beats its own slot too (INTAKE_PROCESSES), for /healthz."""
    # Slot -> pid: children are [delivery, intake helpers..., http?], the main process's slot
    # sits between the intake helpers and http.
    pids = [*children[:INTAKE_PROCESSES], os.getpid(), *children[INTAKE_PROCESSES:]]

    def stuck(slots: list[int]) -> None:
        log.event("watchdog_withheld", level=40, pids=",".join(str(pids[s]) for s in slots),
                  note="a process stopped beating; systemd restarts the relay after WatchdogSec")

    async def beat_main() -> None:
        await beats.beat_forever(INTAKE_PROCESSES)

    beating = asyncio.get_running_loop().create_task(beat_main())
    try:
        await beats.watchdog(stuck)
    finally:
        beating.cancel()


async def _watch_child(pid: int) -> None:
    while True:
        done, _ = _poll_child(pid)  # WNOHANG: never blocks
        if done:
            return
        await asyncio.sleep(0.5)


def _poll_child(pid: int) -> tuple[int, int]:
    try:
        return os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return pid, 0


# --- delivery (child process) ----------------------------------------------------------------

async def _count_queue(store: Any, anvil: Anvil | None) -> None:
    """Tell intake the queue depth ([queue] max_queued) about once a second, from the index
    (on its thread: one small row per segment to add up)."""
    if anvil is None:
        return
    while True:
        try:
            anvil.set_queued(await store.queued_messages())
        except Exception as exc:  # a busy or full index: keep the last count, try again
            log.event("queue_count_failed", level=30, error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(QUEUE_COUNT_INTERVAL)


def _sts_for(config: Config, current: MtaStsResolver | None) -> MtaStsResolver | None:
    """The MTA-STS source for `config` (built only when a destination uses it: it loads the
    system CAs); a replaced one is closed in the background."""
    from relay.delivery.mtasts import MtaStsResolver  # aiohttp: only in the delivery process

    chosen = MtaStsResolver.for_config(config, current)
    if current is not None and chosen is not current:
        task = asyncio.get_running_loop().create_task(current.close())
        _background.add(task)
        task.add_done_callback(_background.discard)
    return chosen


async def _delivery_main(live: Live, notice_fds: Sequence[int], ready_fd: int,
                         anvil: Anvil | None = None) -> int:
    from relay.delivery.attempt import Attempter
    from relay.delivery.cluster import Cluster
    from relay.delivery.control import ControlServer
    from relay.delivery.egress import Egress
    from relay.delivery.engine import DeliveryEngine
    from relay.delivery.nexthop import NextHopResolver
    from relay.delivery.store import DeliveryStore
    from relay.delivery.webhooks import WebhookWorker

    stop = asyncio.Event()
    reloader = Reloader(live, "delivery")
    _install_signals(stop, reloader)
    config = live.config
    root = config.queue.path
    store = DeliveryStore(root, root / INDEX_FILE, hostname=config.server.hostname,
                          max_lifetime=config.queue.max_lifetime,
                          segment_size=config.queue.segment_size)
    store.retention = config.queue.retention  # delivery records ([queue] retention)
    await store.start()
    # `[cluster] redis` is read at start only (a restart key): not a Runtime field.
    cluster = Cluster.from_config(config)
    if cluster is not None:
        await cluster.start()  # at most its timeout: a dead Redis starts degraded
    listeners = {(hp.host, hp.port) for hp in (*config.server.listen, *config.server.listen_tls)}
    sts = _sts_for(config, None)
    # Warm-up counts of today, kept under the queue folder across restarts.
    egress = await asyncio.to_thread(Egress.under, root)
    hooks: WebhookWorker | None = None

    def apply_webhooks(rt: Runtime) -> None:
        """The outbox gets rows, and a worker sends them, while some sender has a webhook."""
        nonlocal hooks
        store.webhooks = rt.webhooks
        if rt.webhooks is None:
            return  # a running worker goes on with what is queued, to the URLs it knew
        if hooks is None:
            hooks = WebhookWorker(store, rt.webhooks)
            store.on_outbox = hooks.wake
            hooks.start()
        hooks.webhooks = rt.webhooks

    apply_webhooks(live.current)
    engine = DeliveryEngine(config, store, NextHopResolver(config.dns.nameservers),
                            Attempter(config, listeners, signer=live.current.signer,
                                      smime=live.current.smime, tls=live.current.client_tls),
                            sts=sts, spf=live.current.spf, egress=egress, cluster=cluster)

    def apply(rt: Runtime) -> None:
        """A reload: the next job and attempt use the new policies, keys and settings."""
        nonlocal sts
        engine.apply(rt.config, spf=rt.spf)
        store.retention = rt.config.queue.retention
        engine.attempter.signer = rt.signer
        engine.attempter.smime = rt.smime
        engine.attempter.tls = rt.client_tls
        sts = engine.sts = _sts_for(rt.config, sts)
        apply_webhooks(rt)

    reloader.start(apply)

    def on_notices(messages: list[Committed], sealed: list[str]) -> None:
        if messages:
            engine.accept(messages)
        if sealed:
            store.submit_sealed(sealed)

    # Every intake process gone: the relay is stopping (or broken; the main process knows).
    read_pipes(notice_fds, on_notices, stop.set)
    os.write(ready_fd, b"R")  # intake may start: what it announces is read from now on
    os.close(ready_fd)
    runner = asyncio.get_running_loop().create_task(engine.run())
    control = ControlServer(root, store, engine.control, engine.wake.set, engine.forgive)
    await control.start()
    counter = asyncio.get_running_loop().create_task(_count_queue(store, anvil))
    await stop.wait()
    counter.cancel()
    if hooks is not None:  # unsent events stay in the outbox for the next start
        await hooks.stop()
    await control.close()
    log.event("draining", process="delivery")
    await engine.drain(DRAIN_GRACE)
    if cluster is not None:
        await cluster.close()  # gives this node's connection slots back at once
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await store.close()
    if sts is not None:
        await sts.close()
    done = engine.counters  # outcomes of this process's life, and what the stop gave back
    log.event("stopped", process="delivery", delivered=done.delivered, deferred=done.deferred,
              bounced=done.bounced, expired=done.expired, unknown=done.unknown,
              released=done.released)
    return 0
