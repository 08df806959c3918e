"""Shaping benchmark of invoice-relay (issue 9, "Bounds"), on this machine, against the real
relay process. Two measurements, each with its target:

1. head-of-line: 20 destination domains, each routed (`[[destination]] routes`) to its own
   smtp-sink on 127.0.0.1; one of them throttled to `rate = "600/min"`. A relay process runs
   three phases; in each, smtp-source (one process per domain, all at once) queues the phase's
   mail while the relay's delivery process is stopped (SIGSTOP), so that what is measured is
   the delivery of a backlog and nothing else; then delivery resumes (SIGCONT) and the harness
   times the 19 unthrottled domains until the last of their mail is at its sink. The phases:
   a warm-up (1,000 messages, not counted), `without` (the 19 domains' 47,500 messages) and
   `with` (the same plus the throttled domain's 2,500: 50,000 spread evenly over the 20). The
   ratio with / without of the 19's end-to-end msg/s must be >= 0.95 (the throttled domain
   must not slow the others down); the throttled domain's own rate at its sink, after its
   burst, must be 10/s within 10 %. `--control` runs `without` twice (A/A: the noise).
2. scheduler: delivery CPU per delivered message with 100,000 deferred recipients in the queue
   against an empty queue, within 10 %: bench/scale.py's "scheduler" measurement, called as it
   is (measure_scheduler), with K = 0 and 100,000 only.

    bench/shaping            # full run: 50,000 messages, 3-4 minutes on 2 cores
    bench/shaping --quick    # 5,000 messages and one scheduler round per K: under a minute

Prints a table with PASS/FAIL per target and writes bench/out/shaping-<timestamp>.json. Needs
root (smtp-sink -u postfix) and Postfix's smtp-source/smtp-sink; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# bench/bench.py and bench/scale.py (next to this file): sinks, /proc, the relay, the load
import scale
from scale import Relay, Tools, Window, find_tools, finish_source, host_busy, start_source

from bench import BenchError, Sink, cpu_ticks, git_state, read_stat, run_cli, write_results

BENCH_DIR = Path(__file__).resolve().parent
DOMAINS = 20
RATE = "600/min"            # the throttled domain's `rate` (the figure) ...
RATE_PER_S = 10.0           # ... per second
TARGET_RATIO = 0.95         # end to end of the 19 with / without the throttled domain's mail
TARGET_RATE_TOLERANCE = 0.10
TARGET_CPU_RATIO = scale.TARGET_CPU_RATIO
SAMPLE_S = 0.05             # the throttled sink's counter is read this often
WARM_UP_MESSAGES = 1000
NEIGHBOURS_BUSY = 0.25      # cores used by others during a phase: its timing is suspect


@dataclass(frozen=True)
class Plan:
    """How much a run does."""

    messages: int           # queued in the `with` phase, over all 20 domains
    size: int               # bytes per message (smtp-source -l)
    sessions: int           # smtp-source sessions per domain while queuing
    pairs: int              # relay processes, each a (without, with) pair of phases
    watch_s: float          # the throttled domain is watched at least this long after its burst
    burst: int              # the throttled domain's `burst` (token-bucket depth)
    throttled_share: float  # share of the messages that go to the throttled domain
    sched: scale.Plan       # bench/scale's scheduler measurement (only its fields for it)


def sched_plan(fresh_accepted: int, fresh_retried: int, rounds: int) -> scale.Plan:
    """bench/scale's Plan with the scheduler's fields set: K = 0 and 100,000 only."""
    return scale.Plan(queued=0, queue_sessions=0, hold_seconds=0.0, ks=(0, 100_000),
                      fresh_accepted=fresh_accepted, fresh_retried=fresh_retried,
                      sched_rounds=rounds, peak_messages=0, paced_seconds=0.0)


FULL = Plan(messages=50_000, size=4096, sessions=2, pairs=1, watch_s=30.0, burst=10,
            throttled_share=1 / DOMAINS, sched=sched_plan(4000, 800, 4))
QUICK = Plan(messages=5_000, size=4096, sessions=2, pairs=1, watch_s=6.0, burst=10,
             throttled_share=1 / DOMAINS, sched=sched_plan(1000, 200, 1))


def log(msg: str) -> None:
    print(f"[shaping {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def domain_names() -> list[str]:
    """The 20 destination domains; the first is the throttled one."""
    return ["throttled.shaping.test"] + [f"d{i:02}.shaping.test" for i in range(1, DOMAINS)]


def split(plan: Plan) -> dict[str, int]:
    """Messages per domain: the throttled share to the first, the rest evenly over the 19."""
    names = domain_names()
    slow = round(plan.messages * plan.throttled_share)
    each = (plan.messages - slow) // (DOMAINS - 1)
    return {names[0]: slow, **{d: each for d in names[1:]}}


# --------------------------------------------------------------------------------------
# 1. head-of-line blocking: the 19 with and without the throttled domain's mail

class ThrottledWatch:
    """Reads the throttled sink's counter every SAMPLE_S in a thread: (seconds since the
    resume, messages) at every change, from which its rate after the burst is taken."""

    def __init__(self, sink: Sink, base: int, t0: float) -> None:
        self.sink, self.base, self.t0 = sink, base, t0
        self.points: list[tuple[float, int]] = [(0.0, 0)]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.read()

    def latest(self) -> int:
        """The count at the thread's last reading."""
        return self.points[-1][1]

    def read(self) -> int:
        """Only from the thread (and after it has stopped): the points stay in time order."""
        count = self.sink.current() - self.base
        if count != self.points[-1][1]:
            self.points.append((round(time.monotonic() - self.t0, 3), count))
        return count

    def close(self) -> list[tuple[float, int]]:
        self.stop.set()
        self.thread.join(2)
        self.points.append((round(time.monotonic() - self.t0, 3), self.read()))
        return self.points


def throttled_rate(points: list[tuple[float, int]], burst: int, n: int) -> dict:
    """Messages per second after the burst: from the first reading at or past `burst` to the
    reading where the count last changed. The bucket starts full, so the first `burst`
    messages may leave at once; what follows is the rate. Both ends are arrivals, so mail
    that arrives in clumps (a batch a second) is not miscounted by up to a clump."""
    start = next(((t, c) for t, c in points if c >= burst), None)
    final = points[-1][1]
    end = next((t, c) for t, c in points if c == final)
    watched = points[-1][0]
    if start is None or end[0] <= start[0] or end[1] <= start[1]:
        return {"per_s": None, "from": start, "to": end, "delivered": final,
                "watched_s": watched, "all_arrived": final >= n}
    per_s = (end[1] - start[1]) / (end[0] - start[0])
    return {"per_s": round(per_s, 2), "from": start, "to": end, "delivered": final,
            "watched_s": watched, "all_arrived": final >= n}


def delivery_pid(relay: Relay) -> int:
    """The relay's delivery process (it names itself relay-delivery after the fork)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [p["pid"] for p in relay.procs() if p["comm"] == "relay-delivery"]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise BenchError(f"no relay-delivery process\n{relay.describe()}")


def queue_all(tools: Tools, relay: Relay, counts: dict[str, int], plan: Plan) -> float:
    """smtp-source per domain, all at once (so that the queue interleaves the domains); the
    seconds until every message had its 250."""
    t0 = time.monotonic()
    sources = [start_source(tools, relay.port, n, plan.sessions, plan.size, f"to@{dom}")
               for dom, n in counts.items() if n]
    for src in sources:
        finish_source(src, timeout=max(300.0, plan.messages / 20))
    return time.monotonic() - t0


def wait_sinks(targets: dict[str, tuple[Sink, int]], relay: Relay, timeout: float) -> dict:
    """Monotonic time at which each sink reached its target; fails naming the short ones."""
    deadline = time.monotonic() + timeout
    reached: dict[str, float] = {}
    while len(reached) < len(targets):
        for dom, (sink, target) in targets.items():
            if dom not in reached:
                when = sink.wait(target, min(deadline, time.monotonic() + 0.2))
                if when is not None:
                    reached[dom] = when
        if time.monotonic() > deadline or not relay.alive():
            short = {d: f"{s.current()}/{t}" for d, (s, t) in targets.items() if d not in reached}
            why = "timeout" if relay.alive() else f"the relay died\n{relay.describe()}"
            raise BenchError(f"{why} after {timeout:.0f}s; sinks short of their count "
                             f"(have/expected, cumulative): {short}")
    return reached


def settle_all(sinks: list[Sink], quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until no sink's counter has moved for `quiet` seconds."""
    end = time.monotonic() + limit
    last, since = [s.current() for s in sinks], time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = [s.current() for s in sinks]
        if now != last:
            last, since = now, time.monotonic()


def wait_idle(pid: int, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until a process has used no CPU for `quiet` seconds (the delivery process done
    with the previous phase's bookkeeping), so that it does not count in the next phase."""
    end = time.monotonic() + limit
    last, since = _ticks(pid), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = _ticks(pid)
        if now != last:
            last, since = now, time.monotonic()


def _ticks(pid: int) -> int:
    st = read_stat(pid)
    return cpu_ticks(st, with_children=False) if st else 0


def shaping_pair(tools: Tools, workdir: Path, sinks: dict[str, Sink], plan: Plan, pair: int,
                 control: bool) -> dict:
    """One relay process: a warm-up phase, then the phase without the throttled domain's mail,
    then the one with it (`control`: without again). Both phases of a ratio run in the same
    process: one Python process can run 10 % cheaper or dearer than the next for its whole
    life (bench/scale), more than the 5 % this measures. `with` comes last: its throttled
    backlog stays queued until the relay stops."""
    slow = domain_names()[0]
    # The throttle is configured in every phase alike; only the mail differs.
    relay = Relay(workdir, f"shape-{pair + 1}", tools.relay_cmd,
                  {d: s.port for d, s in sinks.items()}, autogroup_nice=tools.autogroup_nice,
                  limits={slow: f'rate = "{RATE}"\nburst = {plan.burst}\n'})
    delivery: int | None = None
    try:
        relay.start()
        delivery = delivery_pid(relay)
        # not counted: the first deliveries of a process pay for lazy imports, first
        # connections, cold caches
        phase(relay, delivery, tools, sinks, replace(plan, messages=WARM_UP_MESSAGES),
              "warm-up", pair)
        runs = [phase(relay, delivery, tools, sinks, plan, kind, pair)
                for kind in ("without", "control" if control else "with")]
        stop_s = relay.stop()
    finally:
        if delivery is not None:
            with contextlib.suppress(OSError):
                os.kill(delivery, signal.SIGCONT)  # never leave it stopped: it would not die
        relay.stop()
    without, with_ = runs
    return {"pair": pair, "runs": runs, "stop_s": stop_s,
            "ratio": round(with_["fast_e2e_per_s"] / without["fast_e2e_per_s"], 3),
            # the same from the delivery process's CPU alone (delivery is CPU-bound here):
            # blind to neighbours taking the CPU, which move the end-to-end ratio
            "cpu_ratio": round(without["window"]["relay_cpu_s"]["delivery"]
                               / max(0.001, with_["window"]["relay_cpu_s"]["delivery"]), 3),
            "relay_warnings": [line for line in relay.notable if "config_warning" in line],
            "relay_notable": list(relay.notable)[-10:]}


def phase(relay: Relay, delivery: int, tools: Tools, sinks: dict[str, Sink], plan: Plan,
          kind: str, pair: int) -> dict:
    """Queue the phase's backlog while the delivery process is stopped, resume it, and time
    the 19 unthrottled domains until the last of their mail is at its sink."""
    slow = domain_names()[0]
    counts = split(plan)
    if kind != "with":
        counts[slow] = 0
    fast_sinks = [s for d, s in sinks.items() if d != slow]
    settle_all(fast_sinks)  # the previous phase's last deliveries are in
    wait_idle(delivery)
    bases = {d: s.current() for d, s in sinks.items()}
    watch: ThrottledWatch | None = None
    stopped = True
    os.kill(delivery, signal.SIGSTOP)
    try:
        log(f"pair {pair + 1}, {kind}: queuing {sum(counts.values()):,} x {plan.size} B over "
            f"{sum(1 for n in counts.values() if n)} domains (delivery stopped)")
        queue_s = queue_all(tools, relay, counts, plan)
        early = sum(s.current() - bases[d] for d, s in sinks.items() if d != slow)
        if early:
            raise BenchError(f"{early} messages reached the sinks while delivery was stopped")
        fast = {d: (sinks[d], bases[d] + n) for d, n in counts.items() if d != slow}
        for sink, target in fast.values():
            sink.arm(target)
        window = Window(relay, list(sinks.values()))
        t0 = time.monotonic()
        if counts[slow]:
            watch = ThrottledWatch(sinks[slow], bases[slow], t0)
        os.kill(delivery, signal.SIGCONT)
        stopped = False
        reached = wait_sinks(fast, relay, timeout=max(120.0, plan.messages / 100))
        cpu = window.close()
        delivered = sum(s.current() - bases[d] for d, s in sinks.items())
        points: list[tuple[float, int]] = []
        if watch is not None:
            watch_throttled(watch, counts[slow], plan, relay)
            points = watch.close()
    finally:
        if watch is not None:
            watch.stop.set()
        if stopped:
            with contextlib.suppress(OSError):
                os.kill(delivery, signal.SIGCONT)
    settle_all(fast_sinks)
    return summarize_run(kind, pair, counts, bases, sinks, slow, plan, queue_s=queue_s, t0=t0,
                         reached=reached, cpu=cpu, delivered=delivered, points=points)


def watch_throttled(watch: ThrottledWatch, n: int, plan: Plan, relay: Relay) -> None:
    """Go on watching the throttled sink until it has all its mail, or for plan.watch_s past
    its burst (its rate is what is measured, not how long its backlog takes)."""
    while relay.alive():
        if watch.latest() >= n:
            return
        # seconds since the resume at which the count passed the burst (the thread's reading)
        burst_at = next((t for t, c in list(watch.points) if c >= min(plan.burst, n)), None)
        since_resume = time.monotonic() - watch.t0
        if burst_at is not None and since_resume - burst_at >= plan.watch_s:
            return
        if burst_at is None and since_resume > plan.watch_s + 60:
            return  # nothing beyond the burst arrives: the rate says so (None)
        time.sleep(SAMPLE_S)


def summarize_run(kind: str, pair: int, counts: dict[str, int], bases: dict[str, int],
                  sinks: dict[str, Sink], slow: str, plan: Plan, *, queue_s: float, t0: float,
                  reached: dict[str, float], cpu: dict, delivered: int,
                  points: list[tuple[float, int]]) -> dict:
    fast_n = sum(n for d, n in counts.items() if d != slow)
    finish = sorted(reached[d] - t0 for d in reached)
    got = {d: s.current() - bases[d] for d, s in sinks.items()}
    # every unthrottled message exactly once; the throttled domain at most its count
    mismatched = {d: f"{got[d]}/{n}" for d, n in counts.items()
                  if (got[d] != n if d != slow else got[d] > n)}
    r = {"kind": kind, "pair": pair, "counts": counts, "queued": sum(counts.values()),
         "queue_s": round(queue_s, 2), "queued_per_s": round(sum(counts.values()) / queue_s, 1),
         "fast_messages": fast_n, "fast_e2e_s": round(finish[-1], 3),
         "fast_e2e_per_s": round(fast_n / finish[-1], 1),
         "domain_finish_s": {d: round(reached[d] - t0, 3) for d in reached},
         "first_domain_done_s": round(finish[0], 3),
         "delivered_in_window": delivered, "window": cpu,
         "delivery_us_per_msg": round(cpu["relay_cpu_s"]["delivery"] * 1e6 / max(1, delivered),
                                      1),
         "sink_counts": got, "sink_mismatch": mismatched}
    if counts[slow]:
        r["throttled"] = throttled_rate(points, min(plan.burst, counts[slow]), counts[slow])
        r["throttled"]["n"] = counts[slow]
        r["throttled"]["points"] = points
    rate = r.get("throttled", {}).get("per_s")
    log(f"pair {pair + 1}, {kind}: queued in {queue_s:.1f}s; the 19 delivered at "
        f"{r['fast_e2e_per_s']:,.0f} msg/s end to end ({r['fast_e2e_s']:.1f}s)"
        + (f"; throttled domain {rate if rate is not None else '-'}/s" if counts[slow] else "")
        + (f"; SINK MISMATCH {mismatched}" if mismatched else ""))
    return r


def measure_shaping(plan: Plan, tools: Tools, workdir: Path, control: bool = False) -> dict:
    """`plan.pairs` relay processes, each a (without, with) pair of phases; the verdict is the
    median of the pairs' ratios."""
    sinks = {d: Sink(workdir, tools.smtp_sink, name=f"sink-{d.split('.')[0]}")
             for d in domain_names()}
    try:
        pairs = [shaping_pair(tools, workdir, sinks, plan, pair, control)
                 for pair in range(plan.pairs)]
    finally:
        for sink in sinks.values():
            sink.stop()
    runs = [r for p in pairs for r in p["runs"]]
    rates = [r["throttled"]["per_s"] for r in runs if r.get("throttled")]
    measured = [x for x in rates if x is not None]
    return {"control": control, "pairs": pairs, "runs": runs,
            "ratios": [p["ratio"] for p in pairs],
            "cpu_ratios": [p["cpu_ratio"] for p in pairs],
            "cpu_ratio_median": round(statistics.median(p["cpu_ratio"] for p in pairs), 3),
            "ratio_median": round(statistics.median(p["ratio"] for p in pairs), 3),
            "stop_s_median": statistics.median(p["stop_s"] for p in pairs),
            "throttled_per_s": rates,
            "throttled_per_s_median": round(statistics.median(measured), 2) if measured else None,
            # main before issue 9's shaping parses `rate` and says so at start
            "rate_not_enforced_warning": any(".rate: not enforced" in line for p in pairs
                                             for line in p["relay_warnings"])}


# --------------------------------------------------------------------------------------
# The report

def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def rate_ok(per_s: float | None) -> bool:
    return per_s is not None and abs(per_s / RATE_PER_S - 1) <= TARGET_RATE_TOLERANCE


def shaping_rows(s: dict, plan: Plan) -> list[tuple[str, str, str, str]]:
    wo = [r for r in s["runs"] if r["kind"] == "without"]
    w = [r for r in s["runs"] if r["kind"] != "without"]  # with (or control)
    second = "control" if s["control"] else "with"
    names = domain_names()
    counts = split(plan)
    each = counts[names[1]]

    def both(key: str, fmt: str) -> str:
        a = statistics.median(r[key] for r in wo)
        b = statistics.median(r[key] for r in w)
        return f"{fmt.format(a)} / {fmt.format(b)}"

    def done(runs: list[dict]) -> str:
        return (f"{statistics.median(r['first_domain_done_s'] for r in runs):.1f} / "
                f"{statistics.median(r['fast_e2e_s'] for r in runs):.1f}")

    title = (f"1 CONTROL (A/A): the 19 (19 x {each:,}) end to end, again / first" if s["control"]
             else f"1 the other 19 (19 x {each:,}) end to end, with / without the throttled "
                  f"domain's {counts[names[0]]:,}")
    rows = [(title, f"{s['ratio_median']:.3f}x", f">= {TARGET_RATIO:.2f}x",
             verdict(s["ratio_median"] >= TARGET_RATIO)),
            (f"  end to end msg/s of the 19, without / {second} (median of {len(w)} pair(s))",
             both("fast_e2e_per_s", "{:,.0f}"), "", ""),
            *([("  (a drain of a few seconds: the ratio is noise-prone; see the full run)",
                "", "", "")] if max(r["fast_e2e_s"] for r in w) < 10 else []),
            ("  ratio per pair (each pair one relay process)",
             ", ".join(f"{x:.3f}" for x in s["ratios"]), "", ""),
            ("  the same from delivery CPU for the 19's mail (blind to neighbours)",
             f"{s['cpu_ratio_median']:.3f}x", "", ""),
            ("  s until the first / last of the 19 was done, without", done(wo), "", ""),
            (f"  s until the first / last of the 19 was done, {second}", done(w), "", ""),
            (f"  queuing msg/s (delivery stopped), without / {second}",
             both("queued_per_s", "{:,.0f}"), "", ""),
            (f"  delivery CPU us/msg, without / {second}",
             both("delivery_us_per_msg", "{:,.0f}"), "", ""),
            ("  relay stop after the last phase (its throttled backlog queued), s",
             f"{s['stop_s_median']:.1f}", "", "")]
    if s["control"]:
        return rows
    per_s = s["throttled_per_s_median"]
    t = w[-1]["throttled"]
    rows.append((f'2 throttled domain (rate = "{RATE}", burst = {plan.burst}) after its burst',
                 "-" if per_s is None else f"{per_s:,.2f} msg/s",
                 f"{RATE_PER_S:.0f}/s +-{100 * TARGET_RATE_TOLERANCE:.0f}%",
                 verdict(rate_ok(per_s))))
    rows.append(("  delivered of its backlog by the end of the watch",
                 f"{t['delivered']:,} of {t['n']:,} in {t['watched_s']:.1f}s", "", ""))
    if s["rate_not_enforced_warning"]:
        rows.append(("  the relay said at start: rate not enforced yet", "yes", "", ""))
    return rows


def scheduler_rows(sched: dict) -> list[tuple[str, str, str, str]]:
    ks = sched["ks"]
    rounds = len(ks["0"]["delivery_us_per_msg"])
    rows = [(f"3 delivery CPU per msg, empty queue (bench/scale; {rounds} round(s))",
             f"{ks['0']['median_us']:,.0f} us", "", "")]
    for key, e in ks.items():
        if key != "0":
            rows.append((f"  K={int(key):,} deferred (drift-corrected "
                         f"{e['drift_corrected_median']:.2f}x)",
                         f"{e['median_us']:,.0f} us ({e['ratio_to_k0']:.2f}x)",
                         f"<= {TARGET_CPU_RATIO:.2f}x",
                         verdict(e["ratio_to_k0"] <= TARGET_CPU_RATIO)))
    rows.append(("  K=0 rounds spread (noise)", f"{sched['k0_spread_pct']:.1f}%", "", ""))
    return rows


def render(results: dict, plan: Plan) -> str:
    rows: list[tuple[str, str, str, str]] = []
    if "shaping" in results:
        rows += shaping_rows(results["shaping"], plan)
    if "scheduler" in results:
        rows += scheduler_rows(results["scheduler"])
    w = max((len(r[0]) for r in rows), default=40)
    lines = [f"{'measure':<{w}}  {'figure':>24}  {'target':>10}  result", "-" * (w + 47)]
    lines += [f"{a:<{w}}  {b:>24}  {c:>10}  {d}".rstrip() for a, b, c, d in rows]
    lines += ["", *context_lines(results)]
    return "\n".join(lines) + "\n"


def context_lines(results: dict) -> list[str]:
    busy = results["host_busy_pct_before"]
    out = [f"host CPU busy before the run: {busy:.0f}% of {results['cpus']} CPUs"
           + (" (neighbours: expect noise)" if busy > 10 else "")]
    for r in results.get("shaping", {}).get("runs", []):
        c = r["window"]
        relay = sum(c["relay_cpu_s"].values())
        out.append(f"  pair {r['pair'] + 1}, {r['kind']:<7}: host "
                   f"{c['host_busy_pct']:3.0f}%; relay {relay / c['seconds']:.2f} cores "
                   f"(delivery {c['relay_cpu_s']['delivery'] / c['seconds']:.2f}), sinks and "
                   f"load gen {c['loadgen_cores']:.2f}, else {c['other_cores']:.2f}"
                   + (" (BUSY NEIGHBOURS: distrust this pair's end-to-end ratio)"
                      if c["other_cores"] > NEIGHBOURS_BUSY else "")
                   + (f"; SINK MISMATCH {r['sink_mismatch']}" if r["sink_mismatch"] else ""))
    return out


# --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/shaping", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="about a minute: 5,000 messages, one scheduler round per K")
    ap.add_argument("--only", choices=["shaping", "scheduler"], action="append",
                    help="run only this measurement (repeatable)")
    ap.add_argument("--messages", type=int, help="messages per run with the throttled domain")
    ap.add_argument("--pairs", type=int, help="(without, with) pairs of runs")
    ap.add_argument("--throttled-share", type=float, metavar="F",
                    help="share of the messages to the throttled domain (default 1/20: even)")
    ap.add_argument("--burst", type=int, help="the throttled domain's burst (default 10)")
    ap.add_argument("--watch", type=float, metavar="S",
                    help="seconds the throttled domain is watched past its burst")
    ap.add_argument("--control", action="store_true",
                    help="A/A: the second phase of each pair without the throttled domain's "
                         "mail too; the ratio shows the harness's own noise and order effect")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, queues)")
    ap.add_argument("--out", default=str(BENCH_DIR / "out"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise BenchError("must run as root (smtp-sink -u postfix needs it)")
    plan = QUICK if args.quick else FULL
    overrides = {"messages": args.messages, "pairs": args.pairs, "burst": args.burst,
                 "throttled_share": args.throttled_share, "watch_s": args.watch}
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if plan.messages < 2 * DOMAINS or not 0 < plan.throttled_share < 1 or plan.burst < 1:
        raise BenchError("--messages at least 40, --throttled-share between 0 and 1, "
                         "--burst at least 1")
    tools = find_tools()
    wanted = args.only or ["shaping", "scheduler"]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="invoice-relay-shaping-"))
    workdir.chmod(0o755)
    results: dict = {"started": stamp, "quick": args.quick, "plan": asdict(plan),
                     "cpus": os.cpu_count(), "git": git_state(), "relay_cmd": tools.relay_cmd,
                     "rate": RATE, "targets": {"ratio": TARGET_RATIO, "rate_per_s": RATE_PER_S,
                                               "rate_tolerance": TARGET_RATE_TOLERANCE,
                                               "cpu_ratio": TARGET_CPU_RATIO}}
    t0 = time.monotonic()
    status = 0
    try:
        log(f"work dir {workdir}")
        results["host_busy_pct_before"] = host_busy()
        if "shaping" in wanted:
            results["shaping"] = measure_shaping(plan, tools, workdir, args.control)
        if "scheduler" in wanted:
            log("scheduler: bench/scale's measurement, K = 0 and 100,000")
            results["scheduler"] = scale.measure_scheduler(plan.sched, tools, workdir)
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
    header = (f"invoice-relay shaping benchmark{' (--quick)' if args.quick else ''}; checkout "
              f"{g['commit'][:10] or '?'}{' (dirty)' if g['dirty_files'] else ''}; "
              f"{results['cpus']} CPUs; wall time {results['wall_seconds']:.0f}s"
              + ("  [INCOMPLETE]" if status else ""))
    if "host_busy_pct_before" in results:
        results["table"] = header + "\n" + render(results, plan)
        print("\n" + results["table"], end="")
    path = write_results(Path(args.out), f"shaping-{stamp}.json", results)
    log(f"results written to {path}")
    return status


if __name__ == "__main__":
    run_cli(main, "shaping")
