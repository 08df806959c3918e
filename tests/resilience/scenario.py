"""Kill or power-cut the real relay again and again under load, then account for every message.

One `Scenario.run()` starts the relay and reconnecting SMTP clients (tests/test_crash.Load), then
`plan.cuts` times waits for a seeded random moment and SIGKILLs the relay's process group (with
a crashfs mount, crashfs too: a power cut) and starts it again. `drain()` stops the clients,
lets the queue empty and returns a `Report` on every message that got a 250.

Deliveries are filed by relay run (the time between two starts): the sink settles after each
kill before the next run begins. A message delivered twice by one run is a bug (one worker per
recipient); one delivered again in a later run is a duplicate, charged to the kill that ended
the run of its previous delivery. Each duplicate must be explained by the README's window:

- the kill window: at the kill the sink had the message but the index had not recorded its
  outcome (the relay's live index is copied right after the SIGKILL). At most 32 unrecorded
  outcomes plus the transactions in flight; the crash tests allow 64.
- the log window (power cuts only): the outcome was recorded, but in index commits the cut took
  back (not in the durable index, copied after the remount). Nothing becomes durable between
  the relay's SIGKILL and crashfs's: only an fsync does, and nobody is left to call one.
"""

from __future__ import annotations

import itertools
import random
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mount import CrashMount
from queuefiles import pending_ids
from relayproc import RelayProcess
from sink import Received, Sink
from test_crash import (
    MARKER,
    MAX_DUPLICATES,
    Load,
    assert_group_dead,
    index_states,
    message_body,
    quiet_sink,
    wait_until,
)

from relay.queue.envelope import FINAL_STATES
from relay.queue.segments import segment_files

DRAIN_TIMEOUT = 90.0
SETTLE_QUIET = 3.0  # no delivery for this long: a broken relay has given up on what it lost
KILL_WINDOW = MAX_DUPLICATES
# Once every message is final: each intake process's current segment and its spare, no more
# (at most 2 intake processes; DSN segments only come with bounces, and there are none here).
SEGMENTS_IN_USE = 4
# Events that must never appear when nothing is broken.
PROBLEMS = ("spool_missing", "spool_corrupt", "index_unusable", "notice_unreadable",
            "delivery_error", "record_failed", "segment_remove_failed", "spool_sync_failed")


@dataclass(frozen=True)
class Plan:
    """What one run does; every random choice comes from `seed`."""

    seed: int
    cuts: int
    acks_between: tuple[int, int] = (15, 60)  # new 250s before a cut, uniform in this range
    during_restart: float = 0.0   # chance that the next cut hits the restart, not the load
    big_every: int = 7            # every Nth message of a client is 1.6 MiB (streamed)
    clients: int = 6
    deferred_every: int = 0       # about 1 in N messages gets 451 at its first attempt


def marker_in(data: bytes) -> str | None:
    start = data.find(MARKER)
    if start < 0:
        return None
    start += len(MARKER)
    return data[start:data.index(b"\r\n", start)].decode(errors="replace")


class FirstTryRefusal:
    """A sink's data_reply: 451 to about 1 in `every` messages at their first attempt (chosen
    by marker, so the same ones each time), as real destinations do; 0 refuses nothing."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.refused: set[str] = set()

    def __call__(self, content: bytes) -> str | None:
        marker = marker_in(content)
        if marker is None or not self.every or sum(marker.encode()) % self.every:
            return None
        if marker in self.refused:
            return None
        self.refused.add(marker)
        return "451 4.3.0 try again later"


# --- what the sink got ---------------------------------------------------------------------------

@dataclass
class Deliveries:
    """What the sink received, split into relay runs."""

    sink: Sink
    starts: list[int] = field(default_factory=lambda: [0])  # first message index of each run

    def end_run(self) -> set[str]:
        """After a kill: once the sink has taken the last bytes in flight, a new run begins.
        Returns the markers the run that ended delivered."""
        quiet_sink(self.sink, quiet=0.3)
        self.starts.append(len(self.sink.messages))
        ended = list(self.sink.messages)[self.starts[-2]:self.starts[-1]]
        return {m for msg in ended if (m := marker_in(msg.data)) is not None}

    def runs(self) -> dict[str | None, list[int]]:
        """Marker -> the run of each delivery (None: messages without a marker)."""
        found: dict[str | None, list[int]] = {}
        run = 0
        for n, msg in enumerate(list(self.sink.messages)):
            while run + 1 < len(self.starts) and n >= self.starts[run + 1]:
                run += 1
            found.setdefault(marker_in(msg.data), []).append(run)
        return found

    def markers(self) -> set[str]:
        return {m for m in self.runs() if m is not None}


# --- what the index knew --------------------------------------------------------------------------

def final_markers(queue_dir: Path) -> set[str]:
    """Markers of the messages whose every recipient is final in the index as it is on disk
    now (read from a copy, so that opening it changes nothing in the queue)."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "index.sqlite"
        for suffix in ("", "-wal"):  # the -shm is rebuilt from the log
            source = queue_dir / f"index.sqlite{suffix}"
            if source.exists():
                shutil.copyfile(source, f"{copy}{suffix}")
        if not copy.exists():
            return set()
        conn = sqlite3.connect(copy)
        try:
            finals = ",".join(f"'{s}'" for s in FINAL_STATES)
            rows = conn.execute(
                "SELECT message_id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
                f" WHERE r.msg = m.id AND r.state NOT IN ({finals}))").fetchall()
        finally:
            conn.close()
    return {mid.strip("<>").split("@")[0] for (mid,) in rows if mid}


@dataclass
class Cut:
    """What one kill or power cut cost."""

    unrecorded: set[str]    # sent by this run, outcome not in the live index: the kill window
    rolled_back: set[str]   # final in the live index, not in the durable one: the log window
    duplicates: set[str] = field(default_factory=set)

    def unexplained(self) -> set[str]:
        return self.duplicates - self.unrecorded - self.rolled_back


# --- the scenario ---------------------------------------------------------------------------------

@dataclass
class Report:
    acked: int
    delivered: int
    lost: list[str]
    cuts: list[Cut]
    twice_in_one_run: list[str]
    damaged: list[str]          # delivered with other bytes than were sent
    unmarked: int               # deliveries without a marker (garbage read from the spool)
    states: Counter[str]
    recovered: list[dict[str, str]]
    log_problems: list[str]
    segments_seen: int = 0      # distinct spool segments listed at the cuts
    segments_removed: int = 0   # of which gone by a later cut (removed while the cuts went on)
    segments_left: list[str] = field(default_factory=list)  # once the queue is empty

    @property
    def duplicates(self) -> int:
        return sum(len(c.duplicates) for c in self.cuts)

    def summary(self) -> str:
        return (f"acked={self.acked} delivered={self.delivered} lost={len(self.lost)}"
                f" duplicates={self.duplicates} damaged={len(self.damaged)}"
                f" unmarked={self.unmarked} states={dict(self.states)}"
                f" segments seen at the cuts={self.segments_seen}"
                f" (removed before the last cut: {self.segments_removed},"
                f" left at the end: {len(self.segments_left)})")


class Scenario:
    """The relay, its load, its sink and (for power cuts) the mount under its queue."""

    def __init__(self, relay: RelayProcess, sink: Sink, plan: Plan,
                 mount: CrashMount | None = None, queue_dir: Path | None = None) -> None:
        self.relay = relay
        self.sink = sink
        self.plan = plan
        self.mount = mount
        self.queue_dir = queue_dir or relay.queue_dir
        self.rng = random.Random(plan.seed)
        self.load = Load(relay.port, big_every=plan.big_every, clients=plan.clients,
                         reconnect=True)
        self.deliveries = Deliveries(sink)
        self.cuts: list[Cut] = []
        self.spool: list[set[str]] = []  # segment files at each cut
        self.recovered: list[dict[str, str]] = []
        self.log_problems: list[str] = []

    def run(self) -> None:
        """`plan.cuts` kills; the relay is running (and listening) when this returns."""
        self._restart(wait=True)
        self.load.start()
        left = self.plan.cuts
        while left:
            self._await_moment()
            self._cut()
            left -= 1
            # Some cuts hit the next start instead: in recovery, or before intake listens.
            while left and self.rng.random() < self.plan.during_restart:
                self._restart(wait=False)
                time.sleep(self.rng.uniform(0.1, 0.8))  # imports take ~0.3 s, then recovery
                self._cut()
                left -= 1
            self._restart(wait=True)

    def close(self) -> None:
        """Always, even after a failure: no client thread and no relay process outlives it."""
        self.load.stop.set()
        self.relay.__exit__()

    def _await_moment(self) -> None:
        target = self.load.count() + self.rng.randint(*self.plan.acks_between)
        wait_until(lambda: self.load.count() >= target, 60, f"{target} acknowledged messages")
        time.sleep(self.rng.uniform(0.0, 0.05))  # not always right after a 250

    def _cut(self) -> None:
        """SIGKILL the relay's group; with a mount, the power goes too (crashfs dies)."""
        pgid = self.relay.proc.pid  # type: ignore[union-attr]
        self.relay.kill()
        assert_group_dead(pgid)
        delivered = self.deliveries.end_run()
        self.spool.append(self._segments())
        live = final_markers(self.queue_dir)
        durable = self._power_cut() if self.mount is not None else live
        self.cuts.append(Cut(unrecorded=delivered - live, rolled_back=live - durable))

    def _power_cut(self) -> set[str]:
        """crashfs dies and comes back (the reboot); what the index kept on disk."""
        assert self.mount is not None
        self.mount.cut()
        self.mount.mount()
        return final_markers(self.queue_dir)

    def _segments(self) -> set[str]:
        spool = self.queue_dir / "spool"
        return set(segment_files(spool)) if spool.is_dir() else set()

    def _restart(self, wait: bool) -> None:
        proc = self.relay.proc
        assert proc is None or proc.poll() is not None, "the previous relay still runs"
        self._collect_log()
        self.relay.start(wait=wait)

    def _collect_log(self) -> None:
        """What the last run logged about its recovery, and any sign of damage."""
        if self.relay.proc is None:
            return  # not started yet
        text = self.relay.new_log()
        self.recovered += self.relay.events("recovered")
        self.log_problems += [line for line in text.splitlines()
                              if any(f" event={p} " in line + " " for p in PROBLEMS)]

    # --- the end -------------------------------------------------------------------------------

    def drain(self, expect_loss: bool = False) -> Report:
        """Stop the clients, let the relay deliver what it has, and account for everything.

        Waits until every acknowledged message arrived and the queue is empty, or (a relay
        that lost mail, or `expect_loss`) until deliveries stop; the report says the rest."""
        self.load.join()
        acked = set(self.load.acked)
        if expect_loss or not _wait(lambda: acked <= self.deliveries.markers()
                                    and not pending_ids(self.queue_dir), DRAIN_TIMEOUT):
            self._settle()
        # The last removals follow the last commits: only the writers' open segments stay.
        _wait(lambda: len(self._segments()) <= SEGMENTS_IN_USE, 10)
        time.sleep(0.3)  # nothing more may arrive
        self._collect_log()
        return self._report(acked)

    def _settle(self) -> None:
        last, since = -1, time.monotonic()
        deadline = since + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            count = len(self.sink.messages)
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since > SETTLE_QUIET:
                return
            time.sleep(0.1)

    def _report(self, acked: set[str]) -> Report:
        runs = self.deliveries.runs()
        self._charge_duplicates(runs)
        return Report(
            acked=len(acked),
            delivered=sum(len(r) for r in runs.values()),
            lost=sorted(acked - set(runs)),
            cuts=self.cuts,
            twice_in_one_run=sorted(m for m, r in runs.items()
                                    if m is not None and len(set(r)) < len(r)),
            damaged=self._damaged(),
            unmarked=len(runs.get(None, [])),
            states=index_states(self.queue_dir),
            recovered=self.recovered,
            log_problems=self.log_problems,
            segments_seen=len(set().union(*self.spool)),
            segments_removed=len(set().union(*self.spool[:-1]) - self.spool[-1])
            if self.spool else 0,
            segments_left=sorted(self._segments()),
        )

    def _charge_duplicates(self, runs: dict[str | None, list[int]]) -> None:
        for marker, seen in runs.items():
            for before, after in itertools.pairwise(seen):
                if marker is not None and after > before:
                    self.cuts[before].duplicates.add(marker)

    def _damaged(self) -> list[str]:
        big = set(self.load.big)
        return sorted({m for msg in list(self.sink.messages)
                       if (m := marker_in(msg.data)) is not None
                       and not intact(msg, message_body(m, m in big))})


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def intact(msg: Received, body: bytes) -> bool:
    """The relay adds its Received header on top and must change nothing else."""
    return msg.data.endswith(body) and msg.data[:-len(body)].startswith(b"Received: ")


# --- checks and output -----------------------------------------------------------------------

def show(name: str, report: Report) -> None:
    """Printed by every run (pytest -s, or the captured output of a failure)."""
    print(f"[{name}] {report.summary()}")
    for n, cut in enumerate(report.cuts):
        extra = (f" rolled back={len(cut.rolled_back)}" if cut.rolled_back else "")
        print(f"[{name}]   cut {n + 1}: duplicates={len(cut.duplicates)}"
              f" unrecorded at the kill={len(cut.unrecorded)}{extra}"
              + (f" UNEXPLAINED={sorted(cut.unexplained())}" if cut.unexplained() else ""))
    for n, rec in enumerate(report.recovered):
        print(f"[{name}]   start {n + 1}: " + " ".join(
            f"{k}={v}" for k, v in rec.items() if k not in ("time", "event")))
    for line in report.log_problems[:20]:
        print(f"[{name}]   log: {line}")


def assert_nothing_lost(report: Report) -> None:
    """What a relay that keeps its promise shows after any number of kills or power cuts."""
    assert not report.lost, f"{len(report.lost)} acknowledged messages lost: {report.lost[:10]}"
    assert not report.damaged, f"delivered with other bytes: {report.damaged[:10]}"
    assert not report.unmarked, f"{report.unmarked} deliveries of unknown messages"
    assert not report.twice_in_one_run, f"sent twice by one run: {report.twice_in_one_run[:10]}"
    for n, cut in enumerate(report.cuts):
        assert not cut.unexplained(), f"cut {n + 1}: duplicates outside the window"
        assert len(cut.unrecorded) <= KILL_WINDOW, f"cut {n + 1}: {len(cut.unrecorded)} unrecorded"
    assert not report.log_problems, report.log_problems[:5]
    assert len(report.segments_left) <= SEGMENTS_IN_USE, report.segments_left
    states = report.states
    assert states["active"] == 0, states
    assert states["queued"] + states["deferred"] + states["unknown"] == 0, states
