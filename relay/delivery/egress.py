"""Which source addresses may carry a job: IP warm-up caps and SPF-aware egress (issue 10).

`decide` is pure: given a destination's source addresses, the job's recipient count, the time,
the SPF results already fetched for the envelope sender and the warm-up counts, it returns the
sources allowed now or a deferral. `WarmupCounters` keeps the counts per (source, destination
domain, UTC day), in memory with a JSON file under the queue folder written off the event loop
at most once a second (a crash loses at most the last second of counts: the address may then
carry that many recipients more than its cap that day). Counts are reserved when a job is
queued on a source (so a burst dispatched at once cannot overshoot the cap) and settled when
its outcome is known: the recipients the server accepted stay counted, as providers count
them; the others are given back.

Without a source pool (the kernel's choice) none of this runs, and with no warm-up source and
`spf = "off"` the engine need not call it (`Egress.needed`).

Wiring (relay/delivery/engine.py, when a job is queued on a path): `pool_for` gives the
destination's pool; under `spf = "enforce"` `await fetch_spf(checker, pool, job.first.sender)`
(in a task: `_enqueue` is synchronous); `Egress.eligible(pool, domain, len(job.recipients),
time.time(), spf_or_None, job.first.sender)`; an `Allowed` picks among its sources (splitting
the job at `limit`) and reserves; a `Deferral` with `until` is postponed without an attempt
(as `_hand_back` does), one without is a temporary verdict with its reply; the reservation is
settled with the job's delivered count when the job ends, whichever way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay import log
from relay.config import IPAddress, SourceAddress
from relay.queue.segments import write_atomically

DAY = 86400.0
FLUSH_INTERVAL = 1.0          # seconds between writes of the counts file while counts change
PERMERROR_LOG_INTERVAL = 3600.0  # a permerror for one (source, sender domain) is logged this often
COUNTS_FILE = "warmup-counts.json"

# SPF results (RFC 7208 section 2.6) as pyspf spells them.
SPF_OK = frozenset({"pass", "none", "neutral"})
SPF_EXCLUDED = frozenset({"fail", "softfail"})
TEMPERROR = "temperror"
PERMERROR = "permerror"


class SpfResultLike(Protocol):
    @property
    def result(self) -> str: ...

    @property
    def explanation(self) -> str: ...


class SpfCheckerLike(Protocol):
    """relay/delivery/spf.py's `SpfChecker` (cached per record TTL; never raises)."""

    async def check(self, ip: str, sender: str, helo: str) -> SpfResultLike: ...


@dataclass(frozen=True, slots=True)
class Allowed:
    """The job may leave through any of `sources` (in the pool's order); with `limit`, only
    that many of its recipients may (the rest go through `decide` again, as a job of their own):
    no source had room for all of them today."""

    sources: tuple[SourceAddress, ...]
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Deferral:
    """No source may carry the job now.

    `until` set: a warm-up deferral, due at that time (the next UTC midnight), no attempt
    counted. `until` None: an SPF deferral on the retry schedule, an attempt counted (so a
    sender whose SPF never authorises the pool expires with a DSN naming the result)."""

    reply: str     # "451 4.7.x ..." for the log, the queue and a DSN
    status: str    # enhanced status, e.g. "4.7.23"
    until: float | None = None


Decision = Allowed | Deferral


_EPOCH = datetime.date(1970, 1, 1)
_last_day: tuple[int, datetime.date] = (0, _EPOCH)


def utc_day(now: float) -> datetime.date:
    global _last_day
    number = int(now // DAY)  # POSIX time has no leap seconds: days are 86400 s exactly
    if number != _last_day[0]:
        _last_day = (number, _EPOCH + datetime.timedelta(days=number))
    return _last_day[1]


def next_utc_midnight(now: float) -> float:
    return (int(now // DAY) + 1) * DAY


def cap_on(source: SourceAddress, day: datetime.date) -> int | None:
    """Recipients per destination domain `source` may carry on `day`: 0 before its warm-up
    starts, per_day[N] on day N, None (no cap) without warm-up or after the list ends."""
    warmup = source.warmup
    if warmup is None:
        return None
    n = (day - warmup.start).days
    if n < 0:
        return 0
    return warmup.per_day[n] if n < len(warmup.per_day) else None


def decide(sources: Sequence[SourceAddress], recipients: int, now: float,
           spf: Mapping[IPAddress, str] | None,
           used: Callable[[SourceAddress, datetime.date], int]) -> Decision:
    """The sources that may carry a job of `recipients` recipients to one destination now.

    `sources` is the destination's pool (its `source_addresses` or the whole pool; empty: the
    kernel's choice, always allowed). `spf` maps each source's address to its SPF result for
    the envelope sender (None: `spf = "off"`); a source without a result counts as temperror,
    so nothing leaves unchecked. `used(source, day)` is what it already carries to this
    destination that day."""
    if not sources:
        return Allowed(())
    candidates = list(sources) if spf is None else [s for s in sources if _spf_ok(spf, s)]
    if not candidates:
        return _spf_deferral(sources, spf or {})
    day = utc_day(now)
    full: list[SourceAddress] = []
    best: tuple[int, SourceAddress] | None = None
    for source in candidates:
        cap = cap_on(source, day)
        room = None if cap is None else cap - used(source, day)
        if room is None or room >= recipients:
            full.append(source)
        elif room > 0 and (best is None or room > best[0]):
            best = (room, source)
    if full:
        return Allowed(tuple(full))
    if best is not None:
        return Allowed((best[1],), limit=best[0])
    names = ", ".join(str(s.address) for s in candidates)
    return Deferral(f"451 4.7.0 Every source address is at its warm-up cap for today"
                    f" (warm-up caps: {names}); deferred to the next UTC day", "4.7.0",
                    until=next_utc_midnight(now))


def _spf_ok(spf: Mapping[IPAddress, str], source: SourceAddress) -> bool:
    result = spf.get(source.address, TEMPERROR)
    return result in SPF_OK or result == PERMERROR


def _spf_deferral(sources: Sequence[SourceAddress], spf: Mapping[IPAddress, str]) -> Deferral:
    results = ", ".join(f"{s.address}={spf.get(s.address, TEMPERROR)}" for s in sources)
    if any(spf.get(s.address, TEMPERROR) == TEMPERROR for s in sources):
        # RFC 7372: X.7.24 is "SPF validation error" (a DNS problem, worth retrying).
        return Deferral(f"451 4.7.24 SPF temperror for the envelope sender, no source address"
                        f" authorised ({results})", "4.7.24")
    return Deferral(f"451 4.7.23 The envelope sender's SPF does not authorise any source"
                    f" address (SPF {results})", "4.7.23")


async def fetch_spf(checker: SpfCheckerLike, sources: Iterable[SourceAddress],
                    sender: str) -> dict[IPAddress, str]:
    """Each source's SPF result for `sender`, checked concurrently (the checker caches them,
    so a known sender costs no DNS round trip). The null sender is checked against the
    source's HELO name, which the checker does when `sender` is empty."""
    sources = list(sources)
    results = await asyncio.gather(*(checker.check(str(s.address), sender, s.hostname)
                                      for s in sources))
    return {s.address: r.result for s, r in zip(sources, results, strict=True)}


# --- counters ----------------------------------------------------------------------------------

_Key = tuple[str, str]  # (source address, destination domain), for the current UTC day


@dataclass(frozen=True, slots=True)
class _Snapshot:
    generation: int
    day: datetime.date
    done: dict[_Key, int]


@dataclass(frozen=True, slots=True)
class Reservation:
    """Recipients counted against `source` at `domain` on `day` until settled."""

    source: str
    domain: str
    day: datetime.date
    count: int


class WarmupCounters:
    """Recipients carried per (source, destination domain) today, surviving a restart.

    Only counts of the current UTC day are kept: the first use on a new day drops the old
    ones (the file follows at the next write). `pending` counts are reserved by queued jobs
    and are not written: after a crash those jobs are claimed and reserved again."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.day = utc_day(clock())
        self._done: dict[_Key, int] = {}
        self._pending: dict[_Key, int] = {}
        self._dirty = False
        self._generation = 0   # of the last snapshot taken
        self._written = 0      # of the last snapshot written
        self._write_lock = threading.Lock()
        if path is not None:
            self._load(path)

    # -- counting (O(1) dict work on the event loop) --

    def used_at(self, domain: str) -> Callable[[SourceAddress, datetime.date], int]:
        """The `used` function `decide` wants, for one destination domain."""
        def used(source: SourceAddress, day: datetime.date) -> int:
            self._roll(day)
            key = (str(source.address), domain)
            return self._done.get(key, 0) + self._pending.get(key, 0)
        return used

    def reserve(self, source: SourceAddress, domain: str, count: int,
                now: float) -> Reservation | None:
        """Count `count` recipients of a job queued on `source` (None for a source that needs
        no counting: no warm-up, or its list has ended)."""
        day = utc_day(now)
        if cap_on(source, day) is None:
            return None
        self._roll(day)
        key = (str(source.address), domain)
        self._pending[key] = self._pending.get(key, 0) + count
        return Reservation(key[0], domain, day, count)

    def settle(self, reservation: Reservation | None, accepted: int) -> None:
        """The job's outcome is known: `accepted` recipients stay counted, the rest are
        given back (a job moved to another source settles with 0)."""
        if reservation is None:
            return
        key = (reservation.source, reservation.domain)
        if reservation.day == self.day:
            left = self._pending.get(key, 0) - reservation.count
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
        self._add(reservation.day, key, min(accepted, reservation.count))

    def record(self, source: SourceAddress, domain: str, count: int, now: float) -> None:
        """Count `count` accepted recipients outright (no reservation before)."""
        day = utc_day(now)
        if cap_on(source, day) is not None:
            self._add(day, (str(source.address), domain), count)

    def _add(self, day: datetime.date, key: _Key, count: int) -> None:
        self._roll(day)
        if day != self.day or count <= 0:
            return  # a day that has ended: its cap no longer matters
        self._done[key] = self._done.get(key, 0) + count
        self._dirty = True

    def _roll(self, day: datetime.date) -> None:
        if day > self.day:
            self.day = day
            self._done.clear()
            self._pending.clear()
            self._dirty = True

    # -- persistence --

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("day") != self.day.isoformat():
                return  # an older day's counts: pruned
            for source, domains in data["counts"].items():
                for domain, count in domains.items():
                    self._done[(source, domain)] = int(count)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Losing a day's counts lets a warm-up address send more once: worth a warning,
            # not a refusal to start.
            log.event("warmup_counts_unreadable", level=logging.WARNING, file=str(path),
                      error=str(exc))

    def snapshot(self) -> _Snapshot:
        """A copy to serialise in another thread (the loop goes on changing the original)."""
        self._generation += 1
        return _Snapshot(self._generation, self.day, dict(self._done))

    def write(self) -> None:
        """Write the counts now (blocking: from a thread, or at shutdown)."""
        if self.path is None:
            return
        snapshot = self.snapshot()
        self._dirty = False
        self._write_snapshot(snapshot)

    async def run(self) -> None:
        """Write the counts off the event loop, at most once per FLUSH_INTERVAL, while they
        change; the last write happens when cancelled."""
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                await self.flush()
        finally:
            if self._dirty:
                with contextlib.suppress(OSError):
                    self.write()

    def _write_snapshot(self, snapshot: _Snapshot) -> None:
        """(In a thread.) A write cancelled at shutdown goes on in its thread while the last
        one starts: one at a time, and an older snapshot never replaces a newer one."""
        assert self.path is not None
        counts: dict[str, dict[str, int]] = {}
        for (source, domain), count in snapshot.done.items():
            counts.setdefault(source, {})[domain] = count
        data = json.dumps({"day": snapshot.day.isoformat(), "counts": counts}).encode()
        with self._write_lock:
            if snapshot.generation > self._written:
                write_atomically(self.path, data)
                self._written = snapshot.generation

    async def flush(self) -> None:
        if not self._dirty or self.path is None:
            return
        data = self.snapshot()
        self._dirty = False
        try:
            await asyncio.to_thread(self._write_snapshot, data)
        except OSError as exc:
            self._dirty = True
            log.event("warmup_counts_write_failed", level=logging.WARNING, file=str(self.path),
                      error=str(exc))


# --- what the engine holds ----------------------------------------------------------------------

class Egress:
    """The engine's one object for this: counters plus the permerror log. Not derived from
    the config (its counts must outlive a SIGHUP), so it is not in relay/runtime.py: the
    config's `source_addresses` and `spf` are read per call."""

    def __init__(self, counters: WarmupCounters, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self.clock = clock
        self._permerror_logged: dict[tuple[IPAddress, str], float] = {}

    @classmethod
    def under(cls, queue_path: Path, clock: Callable[[], float] = time.time) -> Egress:
        """Counters kept in `queue_path`/warmup-counts.json (reads it: call before the loop)."""
        return cls(WarmupCounters(queue_path / COUNTS_FILE, clock), clock)

    @staticmethod
    def needed(sources: Sequence[SourceAddress], spf_mode: str) -> bool:
        """Whether dispatch must call `eligible` at all (False keeps the hot path as it is)."""
        return bool(sources) and (spf_mode == "enforce"
                                  or any(s.warmup is not None for s in sources))

    def eligible(self, sources: Sequence[SourceAddress], destination_domain: str,
                 recipients_count: int, now: float,
                 spf_results: Mapping[IPAddress, str] | None, sender: str = "") -> Decision:
        """`decide` with this process's counts; logs each permerror it lets through (once an
        hour per source and sender domain)."""
        if spf_results is not None:
            self._log_permerrors(sources, spf_results, sender, now)
        return decide(sources, recipients_count, now, spf_results,
                      self.counters.used_at(destination_domain))

    def _log_permerrors(self, sources: Sequence[SourceAddress],
                        spf: Mapping[IPAddress, str], sender: str, now: float) -> None:
        domain = sender.rpartition("@")[2].lower()
        for s in sources:
            if spf.get(s.address) != PERMERROR:
                continue
            key = (s.address, domain)
            if self._permerror_logged.get(key, -PERMERROR_LOG_INTERVAL) \
                    > now - PERMERROR_LOG_INTERVAL:
                continue
            self._permerror_logged[key] = now
            log.event("spf_permerror", level=logging.WARNING, source=str(s.address),
                      sender_domain=domain or None, hostname=s.hostname,
                      note="the sender's SPF record is broken; sending anyway")


def pool_for(sources: Sequence[SourceAddress], allowed: Sequence[IPAddress]
             ) -> tuple[SourceAddress, ...]:
    """A destination's pool: its `source_addresses` among `[delivery] source_addresses`
    (in the pool's order), or the whole pool when it names none."""
    if not allowed:
        return tuple(sources)
    wanted = set(allowed)
    return tuple(s for s in sources if s.address in wanted)
