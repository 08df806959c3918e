"""What watching the relay costs (issue 12, "Bounds"): end-to-end throughput with `/metrics`
scraped every second and a delivery webhook receiver attached, against the same relay setup
without either, as medians of alternating rounds.

Two relay instances run side by side, each delivering to its own smtp-sink on 127.0.0.1:

- `plain`: the bench relay as bench/run starts it;
- `observed`: the same, plus a `[[sender]]` policy for bench.test with a `webhook` pointing at
  bench/webhook_sink.py (a process of its own that answers 204 and counts the events), and a
  scraper
  that GETs `/metrics` once a second for the whole run.

Rounds alternate plain, observed, plain, ... (smtp-source, one message per connection, 4 KiB,
16 sessions by default), so that drift of the machine hits both alike. The verdict compares
the medians: within the plain rounds' own spread (max-min over median) counts as "within
noise".

    bench/observe                 # 5 rounds each, 2,000 messages a round (about 2 minutes)
    bench/observe --rounds 3 --n 1000

Writes bench/out/observe-<timestamp>.json. Needs root and Postfix's smtp-source/smtp-sink.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import (
    BenchError,
    Relay,
    Sink,
    free_port,
    git_state,
    log,
    run_cli,
    run_round,
    write_results,
)

SCRAPE_INTERVAL = 1.0


class Receiver:
    """bench/webhook_sink.py in a process of its own: 204 to every POST, counting them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "webhook_sink.py"),
             str(self.port)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise BenchError("bench/webhook_sink.py did not start")

    @property
    def events(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=5) as answer:
            return int(answer.read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


class Scraper:
    """GET /metrics once a second; counts answers and failures."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.ok = self.failed = 0
        self.bytes = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    self.bytes = len(answer.read())
                    self.ok += 1
            except OSError:
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()


def webhook_policy(workdir: Path, port: int) -> str:
    secret = workdir / "webhook.key"
    secret.write_text("bench-secret\n")
    return (f'[[sender]]\ndomain = "bench.test"\n'
            f'webhook = {{ url = "http://127.0.0.1:{port}/events", '
            f'secret_file = "{secret}" }}\n')


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/observe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per setup")
    ap.add_argument("--n", type=int, default=2000, help="messages per round")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument("--sessions", type=int, default=16, help="smtp-source sessions")
    ap.add_argument("--relay-cmd", default=os.environ.get("RELAY_CMD") or str(
        Path(sys.executable).parent / "invoice-relay"),
        help="the relay command (default: RELAY_CMD, else invoice-relay beside this Python)")
    args = ap.parse_args()
    smtp_source, smtp_sink = shutil.which("smtp-source"), shutil.which("smtp-sink")
    if not smtp_source or not smtp_sink:
        raise BenchError("smtp-source and smtp-sink (Debian's postfix package) are needed")
    workdir = Path(tempfile.mkdtemp(prefix="observe-"))
    receiver = Receiver()
    systems, sinks, scraper = [], [], None
    try:
        sink_plain, sink_observed = Sink(workdir, smtp_sink, "sink-plain"), \
            Sink(workdir, smtp_sink, "sink-observed")
        sinks += [sink_plain, sink_observed]
        plain = Relay(workdir, {"example.net": sink_plain.port}, args.relay_cmd.split(), "plain")
        observed = Relay(workdir, {"example.net": sink_observed.port}, args.relay_cmd.split(),
                         "observed", extra_policy=webhook_policy(workdir, receiver.port))
        systems += [plain, observed]
        scraper = Scraper(observed.http_port)
        timeout = max(120.0, args.n / 20)
        rounds: dict[str, list[dict]] = {"plain": [], "observed": []}
        order = [(plain, sink_plain), (observed, sink_observed)]
        for kind, (relay, sink) in (("warmup-" + r.name, (r, s)) for r, s in order):
            run_round(kind, relay, sink, smtp_source, min(500, args.n), args.size,
                      args.sessions, timeout, systems, rcpt="to@example.net")
        for number in range(args.rounds):
            for relay, sink in order if number % 2 == 0 else order[::-1]:
                r = run_round(relay.name, relay, sink, smtp_source, args.n, args.size,
                              args.sessions, timeout, systems, rcpt="to@example.net")
                rounds[relay.name].append(r)
                log(f"{relay.name:9} round {number + 1}: e2e {r['e2e_per_s']:7.0f}/s  CPU us/msg "
                    f"{r['cpu_us_per_msg']}")
        return report(args, rounds, receiver, scraper)
    finally:
        if scraper:
            scraper.stop()
        for system in systems:
            system.stop()
        for sink in sinks:
            sink.stop()
        receiver.close()
        shutil.rmtree(workdir, ignore_errors=True)


def report(args: argparse.Namespace, rounds: dict[str, list[dict]], receiver: Receiver,
           scraper: Scraper) -> int:
    e2e = {k: [r["e2e_per_s"] for r in v] for k, v in rounds.items()}
    cpu = {k: [r["cpu_us_per_msg"]["total"] for r in v] for k, v in rounds.items()}
    median = {k: statistics.median(v) for k, v in e2e.items()}
    ratio = median["observed"] / median["plain"]
    noise = spread(e2e["plain"])
    within = abs(1 - ratio) <= max(noise, 0.05)
    lines = [
        f"observe: {args.rounds} alternating rounds each, n={args.n}, {args.size} B, "
        f"{args.sessions} sessions",
        f"  plain     e2e median {median['plain']:7.0f}/s  (min-max {min(e2e['plain']):.0f}-"
        f"{max(e2e['plain']):.0f})  CPU us/msg median {statistics.median(cpu['plain']):.0f}",
        f"  observed  e2e median {median['observed']:7.0f}/s  (min-max "
        f"{min(e2e['observed']):.0f}-{max(e2e['observed']):.0f})  CPU us/msg median "
        f"{statistics.median(cpu['observed']):.0f}",
        f"  ratio observed/plain {ratio:.3f}; plain rounds' spread {noise:.1%}: "
        f"{'within noise' if within else 'OUTSIDE noise'}",
        f"  webhook events received {receiver.events}; /metrics scrapes {scraper.ok} ok, "
        f"{scraper.failed} failed, last {scraper.bytes} bytes",
    ]
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_results(Path(__file__).resolve().parent / "out", f"observe-{stamp}.json", {
        "git": git_state(), "args": vars(args), "rounds": rounds, "ratio": ratio,
        "plain_spread": noise, "within_noise": within, "webhook_events": receiver.events,
        "scrapes_ok": scraper.ok, "scrapes_failed": scraper.failed})
    print(f"  results: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main, "bench/observe")
