"""Scale benchmark of invoice-relay (issue #6, item 2 "Memory and scale"), on this machine,
against the real relay process. Three measurements, each with its target:

1. memory: 100,000 messages of 1 KiB queued by smtp-source (32 sessions) into a relay whose
   only destination answers 451 to RCPT, so that everything stays queued or deferred; the
   peak RSS of the relay (VmHWM summed over its processes, as bench/bench.py reports it) and
   the RSS at the end. Target: peak < 150 MiB.
2. scheduler: a queue per K, prefilled (while no relay runs) with K recipients deferred until
   tomorrow (K = 0, 100k, 1M); then rounds that alternate between the Ks start that K's relay,
   warm it up and deliver the same fresh load: 4,000 x 4 KiB messages to smtp-sink plus 800 to
   bench/sink.py, which answers 451 once per message (retried after 1 s through the index's
   claim path). The delivery process's CPU per delivered message (utime+stime from /proc,
   median of 6 rounds) must stay within 10 % of K=0. Startup recovery time per K is reported
   too (every round starts the relay): a big queue must not make restarts slow.
3. latency: the peak end-to-end rate of smtp-source at 16 sessions with 4 KiB messages, then
   half that rate offered by bench/paced.py (open loop), timing final dot -> 250 of every
   message. Target: p99 < 50 ms.

    bench/scale            # full run, about 7-8 minutes on 2 cores
    bench/scale --quick    # about 2 minutes: 20,000 queued, K up to 100k, shorter loads

Prints a table with PASS/FAIL per target and writes bench/out/scale-<timestamp>.json. Needs
root (smtp-sink -u postfix) and Postfix's smtp-source/smtp-sink; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# bench/bench.py (next to this file): /proc helpers and the sinks, shared with bench/run
from bench import (
    CLK_TCK,
    BenchError,
    RealisticSink,
    Sink,
    cpu_ticks,
    free_port,
    git_state,
    kill_tree,
    machine_cpu,
    percentile,
    run_cli,
    tree,
    wait_smtp_banner,
    write_results,
)

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1024 * 1024
TARGET_PEAK_RSS_MIB = 150.0
TARGET_CPU_RATIO = 1.10     # delivery CPU per message at K / at K=0
TARGET_P99_MS = 50.0
DAY = 86400.0


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does."""

    queued: int                  # 1. messages queued (1 KiB each)
    queue_sessions: int
    hold_seconds: float          # 1. the relay runs on with the full queue, still sampled
    ks: tuple[int, ...]          # 2. deferred recipients prefilled, one relay each
    fresh_accepted: int          # 2. fresh 4 KiB messages to smtp-sink ...
    fresh_retried: int           #    ... and to bench/sink.py (451 once, then 250)
    sched_rounds: int            # 2. rounds per K, alternating between the Ks
    peak_messages: int           # 3. messages per peak run (two runs, the better one counts)
    paced_seconds: float         # 3. length of the half-rate run


FULL = Plan(queued=100_000, queue_sessions=32, hold_seconds=10.0, ks=(0, 100_000, 1_000_000),
            fresh_accepted=4000, fresh_retried=800, sched_rounds=6, peak_messages=3000,
            paced_seconds=30.0)
QUICK = Plan(queued=20_000, queue_sessions=32, hold_seconds=5.0, ks=(0, 100_000),
             fresh_accepted=2000, fresh_retried=400, sched_rounds=3, peak_messages=1000,
             paced_seconds=10.0)


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# /proc readings beyond bench.py's

def status_kib(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of a process (KiB), and Pss from smaps_rollup: the
    RSS sums count pages shared by the forked processes once per process, Pss splits them."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    return out


def maps_numpy(pid: int) -> bool:
    """Whether numpy is loaded in a process: sqlite_utils (the relay's dependency) imports it
    when it is installed, as the bench extra (matplotlib) does; a plain install has none."""
    try:
        return "/numpy/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def runqueue_wait_ns(pid: int) -> int:
    """Time the threads of a process spent runnable but waiting for a CPU (schedstat field 2):
    on a shared machine, the wait that neighbours add to every reply."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
    return total


class Window:
    """CPU over one measured interval: the host, the relay by role, the load generators (this
    script's children and the sinks) and this script; `other` is the rest (neighbours)."""

    def __init__(self, relay: Relay, sinks: list) -> None:
        self.relay, self.sinks = relay, sinks
        self.t0 = time.monotonic()
        self.host0 = machine_cpu()
        self.relay0 = relay.cpu()
        self.wait0 = relay.runqueue_wait()
        self.sinks0 = sum(s.cpu_ticks() for s in sinks)
        self.children0 = _rusage_s(resource.RUSAGE_CHILDREN)
        self.self0 = _rusage_s(resource.RUSAGE_SELF)

    def close(self) -> dict:
        seconds = time.monotonic() - self.t0
        busy1, _, total1, irq1 = machine_cpu()
        busy0, _, total0, irq0 = self.host0
        relay1 = self.relay.cpu()
        relay_s = {k: (relay1[k] - self.relay0[k]) / CLK_TCK for k in relay1}
        loadgen_s = ((sum(s.cpu_ticks() for s in self.sinks) - self.sinks0) / CLK_TCK
                     + _rusage_s(resource.RUSAGE_CHILDREN) - self.children0
                     + _rusage_s(resource.RUSAGE_SELF) - self.self0)
        host_s = (busy1 - busy0) / CLK_TCK
        wait1 = self.relay.runqueue_wait()
        irq_s = (irq1 - irq0) / CLK_TCK
        return {"seconds": round(seconds, 3),
                "host_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
                "relay_cpu_s": {k: round(v, 3) for k, v in relay_s.items()},
                "relay_runqueue_wait_s": {k: round((wait1[k] - self.wait0.get(k, 0)) / 1e9, 3)
                                          for k in wait1},
                "loadgen_cores": round(loadgen_s / seconds, 2),
                "other_cores": round((host_s - irq_s - sum(relay_s.values()) - loadgen_s)
                                     / seconds, 2)}


def _rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def host_busy(seconds: float = 2.0) -> float:
    b0, _, t0, _ = machine_cpu()
    time.sleep(seconds)
    b1, _, t1, _ = machine_cpu()
    return round(100 * (b1 - b0) / max(1, t1 - t0), 1)


# --------------------------------------------------------------------------------------
# The relay under test

ROUTINE = {b"received", b"delivered", b"deferred"}


class Relay:
    """`invoice-relay serve` in its own process group with a config of its own. Its log is
    read as it comes (and kept in relay.stderr): the moment `recovered` and the first
    `listening` appear, and how many `received`/`deferred`/`delivered` events there were."""

    def __init__(self, workdir: Path, name: str, relay_cmd: list[str], routes: dict[str, int],
                 *, retry: list[str] | None = None, queue: Path | None = None,
                 autogroup_nice: int | None = None,
                 limits: dict[str, str] | None = None) -> None:
        self.name = name
        self.autogroup_nice = autogroup_nice
        self.dir = workdir / name
        (self.dir / "policies").mkdir(parents=True)
        self.queue = queue or self.dir / "var"
        self.port = free_port()
        retry_line = f"retry_schedule = {json.dumps(retry)}\n" if retry else ""
        # max_connections_per_client: all load comes from 127.0.0.1 (as in bench/bench.py)
        (self.dir / "relay.toml").write_text(
            f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nmax_connections_per_client = 1000\n'
            f'[queue]\npath = "{self.queue}"\n{retry_line}'
            f'[http]\nlisten = "127.0.0.1:{free_port()}"\n[policies]\npath = "policies"\n')
        # limits: more TOML lines for a domain's [[destination]] (bench/shaping.py: its rate)
        (self.dir / "policies" / "bench.toml").write_text("".join(
            f'[[destination]]\ndomain = "{dom}"\nroutes = ["127.0.0.1:{port}"]\n'
            f'{(limits or {}).get(dom, "")}'
            for dom, port in routes.items()))
        self.cmd = [*relay_cmd, "serve", "--config", str(self.dir / "relay.toml")]
        self.lock = threading.Lock()
        self.events: Counter[bytes] = Counter()
        self.first: dict[str, float] = {}
        self.recovered_line = ""
        self.notable: deque[str] = deque(maxlen=40)
        self.proc: subprocess.Popen | None = None
        self.t_start = 0.0

    def start(self, timeout: float = 300.0) -> None:
        log(f"{self.name}: starting the relay (queue {self.queue})")
        with self.lock:  # a restart counts afresh
            self.events.clear()
            self.first.clear()
            self.recovered_line = ""
        self.t_start = time.monotonic()
        with open(self.dir / "relay.stdout", "wb") as stdout:  # the child keeps its copy
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                stdout=stdout, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if self.autogroup_nice is not None:
            # --autogroup-nice (a diagnostic): the relay is a session of its own, and so a
            # scheduler autogroup of its own; this weighs it against the neighbours' groups
            Path(f"/proc/{self.proc.pid}/autogroup").write_text(f"{self.autogroup_nice}\n")
        try:
            wait_smtp_banner(self.port, timeout, self.proc, f"invoice-relay ({self.name})")
        except BenchError as e:
            raise BenchError(f"{e}\n{self.describe()}") from e
        # the banner can come before the reader thread has seen the `listening` line
        deadline = time.monotonic() + 10
        while "listening" not in self.first and time.monotonic() < deadline:
            time.sleep(0.01)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.dir / "relay.stderr", "ab") as out:
            for line in self.proc.stderr:
                now = time.monotonic()
                out.write(line)
                # "time=... event=NAME key=value ..."; an event without fields ends at the NL
                words = line.rstrip(b"\n").split(b" ", 2)
                event = words[1][6:] if len(words) > 1 else b""
                with self.lock:
                    self.events[event] += 1
                    name = event.decode(errors="replace")
                    if name in ("recovered", "listening") and name not in self.first:
                        self.first[name] = now - self.t_start
                        if name == "recovered":
                            self.recovered_line = line.decode(errors="replace").strip()
                if event not in ROUTINE:
                    self.notable.append(line.decode(errors="replace").rstrip())

    def count(self, event: str) -> int:
        with self.lock:
            return self.events[event.encode()]

    def startup(self) -> dict:
        """Seconds from starting the command to its `recovered` and first `listening` event."""
        with self.lock:
            return {"recovered_s": round(self.first.get("recovered", float("nan")), 3),
                    "listening_s": round(self.first.get("listening", float("nan")), 3),
                    "recovered_event": self.recovered_line}

    def procs(self) -> list[dict]:
        assert self.proc is not None
        return [p for p in tree([self.proc.pid], [self.proc.pid]) if p["state"] != "Z"]

    def cpu(self) -> dict[str, int]:
        """CPU ticks by role: the processes name themselves relay-intake / relay-delivery (the
        main process is an intake process; before it names itself it is recovering)."""
        assert self.proc is not None
        ticks = {"intake": 0, "delivery": 0}
        for p in self.procs():
            role = "delivery" if p["comm"] == "relay-delivery" else "intake"
            ticks[role] += cpu_ticks(p, with_children=False)
        return ticks

    def runqueue_wait(self) -> dict[str, int]:
        """Nanoseconds the relay's threads waited for a CPU, by role (see runqueue_wait_ns)."""
        waits = {"intake": 0, "delivery": 0}
        for p in self.procs():
            role = "delivery" if p["comm"] == "relay-delivery" else "intake"
            waits[role] += runqueue_wait_ns(p["pid"])
        return waits

    def memory(self) -> dict:
        """Per process and summed: VmHWM (peak), VmRSS, RssAnon, RssFile, Pss (KiB)."""
        per = {str(p["pid"]): {"comm": p["comm"], **status_kib(p["pid"])} for p in self.procs()}
        keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Pss")
        return {"sum_kib": {k: sum(v.get(k, 0) for v in per.values()) for k in keys},
                "processes": per}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        code = self.proc.returncode if self.proc else "?"
        state = "running" if self.alive() else f"exited {code}"
        return (f"invoice-relay ({self.name}) is {state}; its last notable log lines:\n"
                + "\n".join(self.notable))

    def stop(self) -> float:
        """SIGTERM (the relay drains), SIGKILL after 45 s; the seconds it took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        kill_tree(self.name, [self.proc.pid], [self.proc.pid], 45)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.reader.join(5)
        return round(time.monotonic() - t0, 3)


def index_states(queue: Path) -> dict[str, int]:
    """Recipients per state in a stopped relay's index (a read-only look)."""
    conn = sqlite3.connect(f"file:{queue / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state"))
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Load and destinations

@dataclass(frozen=True)
class Tools:
    smtp_source: str
    smtp_sink: str
    relay_cmd: list[str]
    python: str
    autogroup_nice: int | None = None  # --autogroup-nice


def start_source(tools: Tools, port: int, n: int, sessions: int, size: int,
                 rcpt: str) -> subprocess.Popen:
    """smtp-source: n messages over `sessions` concurrent sessions, one message a session."""
    return subprocess.Popen(
        [tools.smtp_source, "-s", str(sessions), "-m", str(n), "-l", str(size),
         "-f", "from@bench.test", "-t", rcpt, f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_source(proc: subprocess.Popen, timeout: float) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        raise BenchError(f"smtp-source did not finish within {timeout:.0f}s") from e
    if proc.returncode != 0 or err.strip():
        raise BenchError(f"smtp-source exited {proc.returncode}: "
                         f"{err.decode(errors='replace')[:500]}")


class RejectingSink:
    """smtp-sink answering every RCPT with a temporary refusal: mail for it stays queued."""

    name = "reject-sink"

    def __init__(self, workdir: Path, smtp_sink: str) -> None:
        self.port = free_port()
        # -r RCPT: soft (4xx) reject of RCPT with the -b reply; -u postfix: needed as root
        with open(workdir / "reject-sink.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [smtp_sink, "-r", "RCPT", "-b", "451 4.7.1 Try again later (bench)",
                 "-u", "postfix", f"127.0.0.1:{self.port}", "1000"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        wait_smtp_banner(self.port, 10, self.proc, "smtp-sink -r RCPT")

    def cpu_ticks(self) -> int:
        return sum(cpu_ticks(p) for p in tree([self.proc.pid], [self.proc.pid]))

    def stop(self) -> None:
        kill_tree(self.name, [self.proc.pid], [self.proc.pid], 5)


def wait_for(what: str, done, timeout: float, relay: Relay, poll: float = 0.2) -> float:
    """Poll `done()` until true; the seconds it took. Fails early if the relay died."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"timeout after {timeout:.0f}s waiting for {what}")
        if not relay.alive():
            raise BenchError(f"the relay died while waiting for {what}\n{relay.describe()}")
        time.sleep(poll)
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------
# 1. memory with a big queue

def measure_memory(plan: Plan, tools: Tools, workdir: Path) -> dict:
    sink = RejectingSink(workdir, tools.smtp_sink)
    relay = Relay(workdir, "memory", tools.relay_cmd, {"example.net": sink.port},
                  autogroup_nice=tools.autogroup_nice)
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        # once a second: how far queuing got, and the relay's memory (a growth curve)
        t0 = time.monotonic()
        while not stop.wait(1.0):
            m = relay.memory()["sum_kib"]
            samples.append({"t": round(time.monotonic() - t0, 1),
                            "received": relay.count("received"),
                            "deferred_events": relay.count("deferred"),
                            "rss_kib": m["VmRSS"], "hwm_kib": m["VmHWM"], "pss_kib": m["Pss"]})

    try:
        relay.start()
        time.sleep(1.0)
        idle = relay.memory()
        numpy = any(maps_numpy(p["pid"]) for p in relay.procs())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        window = Window(relay, [sink])
        log(f"memory: queuing {plan.queued:,} x 1 KiB with {plan.queue_sessions} sessions "
            f"(the destination answers 451 to RCPT)")
        t0 = time.monotonic()
        src = start_source(tools, relay.port, plan.queued, plan.queue_sessions, 1024,
                           "to@example.net")
        finish_source(src, timeout=max(600.0, plan.queued / 50))
        queue_s = time.monotonic() - t0
        # Hold the full queue a while: delivery is still working through first attempts (it
        # falls behind intake against a refusing destination) and, after 1 min, retries
        # claimed from the index (up to 5,000 recipients in flight): the sampler goes on.
        time.sleep(plan.hold_seconds)
        cpu = window.close()
        end = relay.memory()
        stop.set()
        sampler.join(3)
        stop_s = relay.stop()
        states = index_states(relay.queue)
    finally:
        stop.set()
        relay.stop()
        sink.stop()
    pending = sum(v for k, v in states.items() if k in ("queued", "deferred", "unknown"))
    log(f"memory: queued in {queue_s:.1f}s; peak {end['sum_kib']['VmHWM'] / 1024:.1f} MiB; "
        f"index {states}")
    return {"messages": plan.queued, "sessions": plan.queue_sessions, "size": 1024,
            "queue_seconds": round(queue_s, 2), "accepted_per_s": round(plan.queued / queue_s, 1),
            "held_after_s": plan.hold_seconds, "attempts": relay.count("deferred"),
            "idle_after_start": idle, "end": end, "numpy_loaded": numpy, "samples": samples,
            "cpu": cpu,
            "index_states_at_stop": states, "pending_at_stop": pending,
            "stop_seconds": stop_s, "relay_events": {k.decode(): v for k, v in
                                                     relay.events.most_common(12)}}


# --------------------------------------------------------------------------------------
# 2. scheduler CPU against the size of the deferred queue

def prefill(queue: Path, k: int, per_message: int = 1000) -> dict:
    """K recipients deferred until tomorrow, written as intake and delivery would leave them:
    messages of up to `per_message` recipients appended to a spool segment, indexed, then
    marked deferred after one attempt. Runs while no relay uses `queue`."""
    from relay.queue.envelope import Envelope, new_queue_id  # the relay (in the venv)
    from relay.queue.index import Index
    from relay.queue.notices import Committed
    from relay.queue.segments import SegmentWriter

    t0 = time.monotonic()
    spool = queue / "spool"
    spool.mkdir(parents=True)
    index = Index(queue / "index.sqlite")
    sealed: list[str] = []
    writer = SegmentWriter(spool, 80, on_sealed=sealed.append)
    body = (b"From: <prefill@bench.test>\r\nSubject: deferred for a day\r\n\r\n"
            + b"x" * 960 + b"\r\n")
    now, left, made = time.time(), k, 0
    while left > 0:
        batch = []
        for _ in range(10):  # ten messages (up to 10,000 recipients) per transaction
            n = min(per_message, left)
            if n <= 0:
                break
            left -= n
            # 50 domains, as a queue for many destinations would have
            rcpts = tuple(f"r{i}@d{made % 50}.deferred.test" for i in range(n))
            batch.append(Envelope(id=new_queue_id(), sender="prefill@bench.test",
                                  recipients=rcpts, received=now))
            made += 1
        locations = writer.append([(env.to_json(), [body]) for env in batch])
        index.add([Committed(env, loc) for env, loc in zip(batch, locations, strict=True)],
                  5 * DAY)
    writer.close()
    index.seal(sealed)
    # one statement, one transaction: as if every recipient had failed once a moment ago
    index.conn.execute("UPDATE recipients SET state = 'deferred', attempts = 1,"
                       " next_attempt = ? WHERE state = 'queued'", (now + DAY,))
    index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    index.close()
    return {"messages": made, "recipients": k, "seconds": round(time.monotonic() - t0, 2),
            "index_mib": round((queue / "index.sqlite").stat().st_size / MIB, 1)}


def deliver_round(relay: Relay, k: int, rnd: int, n_ok: int, n_retry: int, tools: Tools,
                  sink: Sink, retry_sink: RealisticSink) -> dict:
    """The fresh load through one relay: every message delivered (the 451-once share after
    its retry); the delivery process's CPU over the round, per delivered message."""
    base_ok, base = sink.current(), retry_sink.fresh_stats()
    sink.arm(base_ok + n_ok)
    window = Window(relay, [sink, retry_sink])
    sources = [start_source(tools, relay.port, n_ok, 16, 4096, "to@example.net"),
               start_source(tools, relay.port, n_retry, 4, 4096, "to@example.org")]
    for src in sources:
        finish_source(src, timeout=300)
    if sink.wait(base_ok + n_ok, time.monotonic() + 120) is None:
        raise BenchError(f"K={k}: smtp-sink has {sink.current() - base_ok} of {n_ok} messages")
    wait_for(f"K={k}: the retried messages", lambda: retry_sink.fresh_stats()["outcomes"]
             - base["outcomes"] >= n_retry, 120, relay)
    time.sleep(1.0)  # the last outcomes recorded: their cost belongs to this round
    cpu = window.close()
    after = retry_sink.fresh_stats()
    delivered = n_ok + n_retry
    r = {"k": k, "round": rnd, "t": window.t0, "delivered": delivered, "window": cpu,
         "delivery_us_per_msg": round(cpu["relay_cpu_s"]["delivery"] * 1e6 / delivered, 1),
         "intake_us_per_msg": round(cpu["relay_cpu_s"]["intake"] * 1e6 / delivered, 1),
         "deferred_once": after["temp"] - base["temp"],
         "retried_ok": after["retried_ok"] - base["retried_ok"],
         "duplicates": after["accepted_dup"] - base["accepted_dup"]}
    what = f"round {rnd + 1}" if rnd >= 0 else "warm-up"
    log(f"scheduler K={k:,} {what}: delivery {r['delivery_us_per_msg']:,.0f} us/msg, "
        f"intake {r['intake_us_per_msg']:,.0f} us/msg (host {cpu['host_busy_pct']:.0f}% busy)")
    return r


def measure_scheduler(plan: Plan, tools: Tools, workdir: Path) -> dict:
    """A prefilled queue per K; rounds alternate between them (K ascending, then descending,
    ...), so that a neighbour's drift hits every K alike. Every round starts that K's relay
    afresh (a recovery time each), warms it up and stops it after: one Python process can run
    10 % cheaper or dearer than the next for the whole of its life (hash seed, memory layout),
    intake as much as delivery, so a K measured on one relay process would carry that too."""
    sink = Sink(workdir, tools.smtp_sink, name="accept-sink")
    retry_sink = RealisticSink(workdir, tools.python, temp_pct=100, perm_pct=0)
    routes = {"example.net": sink.port, "example.org": retry_sink.port,
              "bench.test": retry_sink.port}
    relays: dict[int, Relay] = {}
    result: dict = {"ks": {}, "rounds": []}
    try:
        for k in plan.ks:
            queue = workdir / f"queue-k{k}"
            filled = {"messages": 0, "recipients": 0, "seconds": 0.0, "index_mib": 0.0}
            if k:
                log(f"scheduler: prefilling {k:,} deferred recipients")
                filled = prefill(queue, k)
                log(f"scheduler: prefilled in {filled['seconds']:.1f}s "
                    f"({filled['index_mib']} MiB index)")
            relays[k] = Relay(workdir, f"sched-k{k}", tools.relay_cmd, routes, retry=["1s"],
                              queue=queue, autogroup_nice=tools.autogroup_nice)
            result["ks"][k] = {"prefill": filled, "starts": [], "stops_s": []}
        for rnd in range(plan.sched_rounds):
            order = plan.ks if rnd % 2 == 0 else tuple(reversed(plan.ks))
            for k in order:
                result["rounds"].append(scheduler_round(relays[k], k, rnd, plan, tools, sink,
                                                        retry_sink, result["ks"][k]))
        for k, relay in relays.items():
            result["ks"][k]["index_states"] = index_states(relay.queue)
    finally:
        for relay in relays.values():
            relay.stop()
        retry_sink.stop()
        sink.stop()
    summarize_scheduler(result, plan)
    for k in plan.ks:
        shutil.rmtree(workdir / f"queue-k{k}", ignore_errors=True)  # 1M: about 250 MB
    return result


def scheduler_round(relay: Relay, k: int, rnd: int, plan: Plan, tools: Tools, sink: Sink,
                    retry_sink: RealisticSink, entry: dict) -> dict:
    """Start the relay of K, warm it up, measure one round, stop it."""
    relay.start()
    entry["starts"].append(relay.startup())
    # not counted: the first deliveries of a process pay for lazy imports, first
    # connections and cold caches
    deliver_round(relay, k, -1, 300, 60, tools, sink, retry_sink)
    if rnd == 0:
        # idle: what the scheduler costs with K deferred and nothing due (index polls)
        idle = Window(relay, [])
        time.sleep(3.0)
        c = idle.close()
        entry["idle_delivery_cores"] = round(c["relay_cpu_s"]["delivery"] / c["seconds"], 4)
    r = deliver_round(relay, k, rnd, plan.fresh_accepted, plan.fresh_retried, tools, sink,
                      retry_sink)
    entry["memory_kib"] = relay.memory()["sum_kib"]  # the last round's stays
    entry["stops_s"].append(relay.stop())
    return r


def drift_corrected(rounds: list[dict], k: int) -> list[float]:
    """Each round of K against K=0 at the same moment: the K=0 figure interpolated linearly
    between the K=0 rounds before and after it. Neighbours drift over minutes; this cancels a
    drift that the median of each K alone keeps."""
    zero = [(r["t"], r["delivery_us_per_msg"]) for r in rounds if r["k"] == 0]
    ratios = []
    for r in rounds:
        if r["k"] != k:
            continue
        before = [z for z in zero if z[0] <= r["t"]]
        after = [z for z in zero if z[0] >= r["t"]]
        (t0, v0), (t1, v1) = (before or after)[-1 if before else 0], (after or before)[0]
        ref = v0 if t1 == t0 else v0 + (v1 - v0) * (r["t"] - t0) / (t1 - t0)
        ratios.append(round(r["delivery_us_per_msg"] / ref, 3))
    return ratios


def summarize_scheduler(result: dict, plan: Plan) -> None:
    """Median CPU per message per K, its ratio to K=0, and the drift-corrected ratios."""
    def us(k: int) -> list[float]:
        return [r["delivery_us_per_msg"] for r in result["rounds"] if r["k"] == k]

    reference = statistics.median(us(0))
    for k in plan.ks:
        entry = result["ks"][k]
        entry["delivery_us_per_msg"] = us(k)
        entry["median_us"] = round(statistics.median(us(k)), 1)
        entry["ratio_to_k0"] = round(entry["median_us"] / reference, 3)
        entry["drift_corrected"] = drift_corrected(result["rounds"], k)
        entry["drift_corrected_median"] = round(statistics.median(entry["drift_corrected"]), 3)
        entry["intake_us_per_msg"] = [r["intake_us_per_msg"] for r in result["rounds"]
                                      if r["k"] == k]
        entry["start_median"] = {key: statistics.median(r[key] for r in entry["starts"])
                                 for key in ("recovered_s", "listening_s")}
        entry["stop_median_s"] = statistics.median(entry["stops_s"])
        deferred = entry["index_states"].get("deferred", 0)
        if deferred != k:
            raise BenchError(f"K={k}: {deferred} deferred recipients after the rounds, expected "
                             f"the {k} prefilled ones untouched: {entry['index_states']}")
    zero = us(0)
    result["k0_spread_pct"] = round(100 * (max(zero) - min(zero)) / reference, 1)
    result["ks"] = {str(k): v for k, v in result["ks"].items()}  # JSON keys


# --------------------------------------------------------------------------------------
# 3. accept latency at half of peak

def measure_latency(plan: Plan, tools: Tools, workdir: Path) -> dict:
    sink = Sink(workdir, tools.smtp_sink, name="latency-sink")
    relay = Relay(workdir, "latency", tools.relay_cmd, {"example.net": sink.port},
                  autogroup_nice=tools.autogroup_nice)
    try:
        relay.start()
        # warm-up: processes, caches and delivery connections exist, as in bench/run
        run_to_sink(tools, relay, sink, 300, 16)
        peaks = [run_to_sink(tools, relay, sink, plan.peak_messages, 16) for _ in range(2)]
        peak = max(p["e2e_per_s"] for p in peaks)
        rate = peak / 2
        log(f"latency: peak {peak:.0f} msg/s end to end; offering {rate:.0f} msg/s for "
            f"{plan.paced_seconds:.0f}s")
        base = sink.current()
        window = Window(relay, [sink])
        paced = subprocess.run(
            [tools.python, str(BENCH_DIR / "paced.py"), "--port", str(relay.port),
             "--rate", f"{rate:.2f}", "--seconds", str(plan.paced_seconds), "--size", "4096"],
            capture_output=True, timeout=plan.paced_seconds + 120)
        if paced.returncode != 0:
            raise BenchError(f"bench/paced.py failed: {paced.stderr.decode()[-2000:]}")
        out = json.loads(paced.stdout.decode().strip().splitlines()[-1])
        sink.settle(quiet=1.0, limit=20)
        cpu = window.close()
        delivered = sink.current() - base
    finally:
        relay.stop()
        sink.stop()
    lat = sorted(out.pop("lat_us"))
    pcts = {f"p{p}": round(percentile(lat, p) / 1000, 2) for p in (50, 95, 99)}
    pcts["max"] = round(lat[-1] / 1000, 2) if lat else float("nan")
    log(f"latency: p50/p95/p99 {pcts['p50']}/{pcts['p95']}/{pcts['p99']} ms over {len(lat)} "
        f"messages")
    return {"peak_runs": peaks, "peak_e2e_per_s": round(peak, 1), "offered_per_s": round(rate, 1),
            "paced": out, "latency_ms": pcts, "samples": len(lat), "window": cpu,
            "delivered": delivered, "paced_cores": round(out["cpu_s"] / cpu["seconds"], 2)}


def run_to_sink(tools: Tools, relay: Relay, sink: Sink, n: int, sessions: int) -> dict:
    """smtp-source into the relay, timed until the sink has all n (end to end)."""
    base = sink.current()
    sink.arm(base + n)
    t0 = time.monotonic()
    finish_source(start_source(tools, relay.port, n, sessions, 4096, "to@example.net"), 300)
    accepted = time.monotonic() - t0
    reached = sink.wait(base + n, time.monotonic() + 120)
    if reached is None:
        raise BenchError(f"smtp-sink has {sink.current() - base} of {n} messages after 120 s")
    sink.settle(quiet=0.3, limit=3)
    return {"n": n, "sessions": sessions, "accepted_per_s": round(n / accepted, 1),
            "e2e_per_s": round(n / (reached - t0), 1)}


# --------------------------------------------------------------------------------------
# The report

def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def render(results: dict) -> str:
    rows: list[tuple[str, str, str, str]] = []
    mem = results.get("memory")
    if mem:
        s = mem["end"]["sum_kib"]
        peak = s["VmHWM"] / 1024
        n = mem["messages"]
        note = "" if n >= 100_000 else " (quick; target: 100k)"
        rows.append((f"1 peak RSS, {n:,} x 1 KiB queued{note}", f"{peak:.1f} MiB",
                     f"< {TARGET_PEAK_RSS_MIB:.0f} MiB", verdict(peak < TARGET_PEAK_RSS_MIB)))
        rows.append(("  RSS at the end: sum VmRSS / sum Pss",
                     f"{s['VmRSS'] / 1024:.1f} / {s['Pss'] / 1024:.1f} MiB", "", ""))
        i = mem["idle_after_start"]["sum_kib"]
        rows.append(("  idle relay before the load: sum VmRSS / sum Pss",
                     f"{i['VmRSS'] / 1024:.1f} / {i['Pss'] / 1024:.1f} MiB", "", ""))
        per = " + ".join(f"{v['VmHWM'] / 1024:.0f}" for v in mem["end"]["processes"].values())
        rows.append(("  peak per process (MiB)", per, "", ""))
        rows.append((f"  queuing time, {mem['sessions']} sessions",
                     f"{mem['queue_seconds']:.1f} s ({mem['accepted_per_s']:,.0f} msg/s)", "", ""))
        rows.append((f"  delivery attempts by {mem['held_after_s']:.0f} s after queuing "
                     "(all refused)", f"{mem['attempts']:,}", "", ""))
        rows.append(("  pending recipients in the index at the stop",
                     f"{mem['pending_at_stop']:,}", "", ""))
        if mem["numpy_loaded"]:
            rows.append(("  numpy loaded in the relay (by sqlite_utils; bench/README.md)", "yes",
                         "", ""))
    sched = results.get("scheduler")
    if sched:
        ks = sched["ks"]
        rounds = len(ks["0"]["delivery_us_per_msg"])
        rows.append((f"2 delivery CPU per delivered msg, K=0 (median of {rounds} rounds)",
                     f"{ks['0']['median_us']:,.0f} us", "", ""))
        for key, e in ks.items():
            if key != "0":
                rows.append((f"  K={int(key):,} deferred (drift-corrected "
                             f"{e['drift_corrected_median']:.2f}x)",
                             f"{e['median_us']:,.0f} us ({e['ratio_to_k0']:.2f}x)",
                             f"<= {TARGET_CPU_RATIO:.2f}x",
                             verdict(e["ratio_to_k0"] <= TARGET_CPU_RATIO)))
        for key, e in ks.items():
            st, med = e["starts"][0], e["start_median"]
            rows.append((f"  K={int(key):,}: recovered / listening; first start (median)",
                         f"{st['recovered_s']:.2f} / {st['listening_s']:.2f} "
                         f"({med['recovered_s']:.2f} / {med['listening_s']:.2f}) s", "", ""))
    lat = results.get("latency")
    if lat:
        p = lat["latency_ms"]
        rows.append(("3 peak: smtp-source 16 sessions, 4 KiB, end to end",
                     f"{lat['peak_e2e_per_s']:,.0f} msg/s", "", ""))
        rows.append((f"  accept latency at {lat['offered_per_s']:,.0f} msg/s: p50 / p95 / p99",
                     f"{p['p50']:.1f} / {p['p95']:.1f} / {p['p99']:.1f} ms",
                     f"p99 < {TARGET_P99_MS:.0f} ms", verdict(p["p99"] < TARGET_P99_MS)))
        rows.append(("  max; messages timed", f"{p['max']:.1f} ms; {lat['samples']:,}", "", ""))
        # the relay's intake threads, runnable but without a CPU (neighbours, load generators)
        wait = lat["window"]["relay_runqueue_wait_s"]["intake"]
        rows.append(("  intake threads waiting for a CPU, per message",
                     f"{1000 * wait / max(1, lat['samples']):.1f} ms", "", ""))
    w = max(len(r[0]) for r in rows) if rows else 40
    lines = [f"{'measure':<{w}}  {'figure':>26}  {'target':>13}  result",
             "-" * (w + 52)]
    lines += [f"{a:<{w}}  {b:>26}  {c:>13}  {d}".rstrip() for a, b, c, d in rows]
    lines.append("")
    lines += context_lines(results)
    return "\n".join(lines) + "\n"


def context_lines(results: dict) -> list[str]:
    """How busy the machine was, per phase: the figures above are only as good as that."""
    out = [f"host CPU busy before the run: {results['host_busy_pct_before']:.0f}% of "
           f"{results['cpus']} CPUs" + (" (neighbours: expect noise)"
                                        if results["host_busy_pct_before"] > 10 else "")]
    phases = []
    if "memory" in results:
        phases.append(("memory: queuing", results["memory"]["cpu"]))
    for r in results.get("scheduler", {}).get("rounds", []):
        phases.append((f"scheduler K={r['k']:,} round {r['round'] + 1}", r["window"]))
    if "latency" in results:
        phases.append(("latency: paced run", results["latency"]["window"]))
    out.append("  per phase: host busy; relay, load generators and anything else (neighbours) "
               "in cores; how long the relay's threads waited for a CPU, as a share of their "
               "CPU time")
    for name, c in phases:
        relay = sum(c["relay_cpu_s"].values())
        wait = sum(c["relay_runqueue_wait_s"].values())
        out.append(f"  {name:<30} host {c['host_busy_pct']:3.0f}%; relay "
                   f"{relay / c['seconds']:.2f}, load gen {c['loadgen_cores']:.2f}, else "
                   f"{c['other_cores']:.2f}; waited {100 * wait / max(relay, 0.01):.0f}%")
    sched = results.get("scheduler")
    if sched:
        out.append(f"  scheduler: K=0 rounds spread {sched['k0_spread_pct']:.1f}% (noise)")
        for key, e in sched["ks"].items():
            out.append(f"  scheduler K={int(key):,}: delivery us/msg per round "
                       f"{', '.join(f'{x:,.0f}' for x in e['delivery_us_per_msg'])}; "
                       f"against K=0 at the same time "
                       f"{', '.join(f'{x:.2f}' for x in e['drift_corrected'])}; intake "
                       f"us/msg {', '.join(f'{x:,.0f}' for x in e['intake_us_per_msg'])}; idle "
                       f"delivery {100 * e['idle_delivery_cores']:.1f}% of a core; stop "
                       f"{e['stop_median_s']:.2f}s (median); relay VmHWM sum "
                       f"{e['memory_kib']['VmHWM'] / 1024:.0f} MiB, Pss "
                       f"{e['memory_kib']['Pss'] / 1024:.0f} MiB")
    lat = results.get("latency")
    if lat:
        pc = lat["paced"]
        out.append(f"  latency: paced.py sent {pc['sent']:,} ({pc['ok']:,} ok, {pc['errors']} "
                   f"errors, {pc['skipped']} skipped), start lag p99 "
                   f"{pc['start_lag_ms']['p99']:.1f} ms, {lat['paced_cores']:.2f} cores")
    return out


# --------------------------------------------------------------------------------------

def find_tools() -> Tools:
    def tool(name: str) -> str:
        path = shutil.which(name) or (f"/usr/sbin/{name}"
                                      if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
        if not path:
            raise BenchError(f"{name} not found: apt-get install postfix (see bench/README.md)")
        return path

    relay = os.environ.get("RELAY_CMD", "").split()
    if not relay:
        beside = Path(sys.executable).parent / "invoice-relay"
        found = str(beside) if beside.exists() else shutil.which("invoice-relay")
        if not found:
            raise BenchError("no invoice-relay command: .venv/bin/pip install -e . or set "
                             "RELAY_CMD")
        relay = [found]
    return Tools(tool("smtp-source"), tool("smtp-sink"), relay, sys.executable)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 2 minutes: smaller loads")
    ap.add_argument("--only", choices=["memory", "scheduler", "latency"], action="append",
                    help="run only this measurement (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, queues)")
    ap.add_argument("--autogroup-nice", type=int, metavar="N",
                    help="diagnostic on a shared machine: set the relay's scheduler autogroup "
                         "to nice N (e.g. -15) so that neighbours take less CPU from it; the "
                         "figures are then not the default ones")
    ap.add_argument("--out", default=str(BENCH_DIR / "out"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise BenchError("must run as root (smtp-sink -u postfix needs it)")
    plan = QUICK if args.quick else FULL
    tools = replace(find_tools(), autogroup_nice=args.autogroup_nice)
    wanted = args.only or ["memory", "scheduler", "latency"]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="invoice-relay-scale-"))
    workdir.chmod(0o755)
    results: dict = {"started": stamp, "quick": args.quick, "plan": asdict(plan),
                     "cpus": os.cpu_count(), "git": git_state(), "relay_cmd": tools.relay_cmd,
                     "autogroup_nice": args.autogroup_nice,
                     "targets": {"peak_rss_mib": TARGET_PEAK_RSS_MIB,
                                 "cpu_ratio": TARGET_CPU_RATIO, "p99_ms": TARGET_P99_MS}}
    t0 = time.monotonic()
    status = 0
    try:
        log(f"work dir {workdir}")
        results["host_busy_pct_before"] = host_busy()
        log(f"host CPU busy before start: {results['host_busy_pct_before']:.0f}%")
        steps = {"memory": measure_memory, "scheduler": measure_scheduler,
                 "latency": measure_latency}
        for name in ("memory", "scheduler", "latency"):
            if name in wanted:
                results[name] = steps[name](plan, tools, workdir)
    except BenchError as e:
        log(f"FAILED: {e}")
        results["error"] = str(e)
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        results["error"] = "interrupted"
        status = 130
    finally:
        if args.keep or status == 1:
            log(f"kept {workdir} (configs, relay logs); remove it when done")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["wall_seconds"] = round(time.monotonic() - t0, 1)
    g = results["git"]
    header = (f"invoice-relay scale benchmark{' (--quick)' if args.quick else ''}; checkout "
              f"{g['commit'][:10] or '?'}{' (dirty)' if g['dirty_files'] else ''}; "
              f"{results['cpus']} CPUs; wall time {results['wall_seconds']:.0f}s"
              + (f"; DIAGNOSTIC: relay autogroup nice {args.autogroup_nice}"
                 if args.autogroup_nice is not None else "")
              + ("  [INCOMPLETE]" if status else ""))
    if "host_busy_pct_before" in results:
        results["table"] = header + "\n" + render(results)
        print("\n" + results["table"], end="")
    path = write_results(Path(args.out), f"scale-{stamp}.json", results)
    log(f"results written to {path}")
    return status


if __name__ == "__main__":
    run_cli(main, "scale")
