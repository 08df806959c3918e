"""IP warm-up caps and SPF-aware egress (relay/delivery/egress.py), with a fake clock."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config import SourceAddress, Warmup
from relay.delivery.egress import (
    COUNTS_FILE,
    Allowed,
    Deferral,
    Egress,
    WarmupCounters,
    decide,
    fetch_spf,
    pool_for,
)

START = datetime.date(2026, 12, 1)
DAY = 86400.0


def at(day: int, hour: float = 10.0) -> float:
    """Epoch seconds of `hour` UTC on day `day` after START."""
    midnight = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp()
    return midnight + day * DAY + hour * 3600


def src(address: str, per_day: tuple[int, ...] | None = None, start: datetime.date = START
        ) -> SourceAddress:
    warmup = Warmup(start, per_day) if per_day is not None else None
    return SourceAddress(ipaddress.ip_address(address), f"mta-{address}.example.com",
                         warmup=warmup)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def egress(tmp_path: Path, clock: Clock) -> Egress:
    return Egress.under(tmp_path, clock)


def send(e: Egress, source: SourceAddress, domain: str, n: int, now: float) -> None:
    """A job of `n` recipients queued on `source` and all accepted."""
    e.counters.settle(e.counters.reserve(source, domain, n, now), n)


def addresses(decision: Allowed | Deferral) -> list[str]:
    assert isinstance(decision, Allowed), decision
    return [str(s.address) for s in decision.sources]


# --- warm-up ------------------------------------------------------------------------------

def test_cap_per_day_follows_the_list_then_ends(tmp_path: Path) -> None:
    new = src("192.0.2.20", (2, 3))
    clock = Clock(at(0))
    e = egress(tmp_path, clock)
    for day, cap in ((0, 2), (1, 3), (2, None), (30, None)):
        clock.now = at(day)
        carried = 0
        while carried < 10:
            decision = e.eligible([new], "example.net", 1, clock.now, None)
            if isinstance(decision, Deferral):
                break
            send(e, new, "example.net", 1, clock.now)
            carried += 1
        assert carried == (cap if cap is not None else 10), f"day {day}"


def test_before_start_the_address_is_not_used(tmp_path: Path) -> None:
    new, old = src("192.0.2.20", (100,)), src("192.0.2.10")
    e = egress(tmp_path, Clock(at(-1)))
    assert addresses(e.eligible([new, old], "example.net", 1, at(-1, 23.9), None)) \
        == ["192.0.2.10"]
    deferred = e.eligible([new], "example.net", 1, at(-1, 23.9), None)
    assert isinstance(deferred, Deferral) and deferred.until == at(0, 0)
    assert addresses(e.eligible([new], "example.net", 1, at(0, 0), None)) == ["192.0.2.20"]


def test_caps_are_per_destination_domain(tmp_path: Path) -> None:
    new = src("192.0.2.20", (1,))
    e = egress(tmp_path, Clock(at(0)))
    send(e, new, "example.net", 1, at(0))
    assert isinstance(e.eligible([new], "example.net", 1, at(0), None), Deferral)
    assert addresses(e.eligible([new], "example.org", 1, at(0), None)) == ["192.0.2.20"]


def test_over_its_cap_the_job_goes_through_the_other_addresses_at_once(tmp_path: Path) -> None:
    new, a, b = src("192.0.2.20", (2,)), src("192.0.2.10"), src("192.0.2.11")
    e = egress(tmp_path, Clock(at(0)))
    assert addresses(e.eligible([new, a, b], "example.net", 2, at(0), None)) \
        == ["192.0.2.20", "192.0.2.10", "192.0.2.11"]
    send(e, new, "example.net", 2, at(0))
    decision = e.eligible([new, a, b], "example.net", 1, at(0), None)
    assert addresses(decision) == ["192.0.2.10", "192.0.2.11"]  # no deferral: no waiting


def test_all_capped_defers_to_the_next_utc_day_naming_the_caps(tmp_path: Path) -> None:
    a, b = src("192.0.2.20", (1, 5)), src("192.0.2.21", (1, 5))
    e = egress(tmp_path, Clock(at(0)))
    send(e, a, "example.net", 1, at(0))
    send(e, b, "example.net", 1, at(0))
    decision = e.eligible([a, b], "example.net", 1, at(0, 23.5), None)
    assert isinstance(decision, Deferral)
    assert decision.until == at(1, 0)  # a warm-up deferral: due then, no attempt counted
    assert decision.reply.startswith("451 4.7.0") and "warm-up cap" in decision.reply
    assert "192.0.2.20" in decision.reply and "192.0.2.21" in decision.reply
    assert addresses(e.eligible([a, b], "example.net", 1, at(1, 0), None)) \
        == ["192.0.2.20", "192.0.2.21"]


def test_queued_jobs_count_until_settled_and_refused_recipients_are_given_back(
        tmp_path: Path) -> None:
    new = src("192.0.2.20", (3,))
    e = egress(tmp_path, Clock(at(0)))
    first = e.counters.reserve(new, "example.net", 2, at(0))
    # A burst dispatched at once cannot overshoot the cap: the queued job counts already.
    partial = e.eligible([new], "example.net", 2, at(0), None)
    assert partial == Allowed((new,), limit=1)
    e.counters.settle(first, 1)  # one recipient accepted, one refused or deferred
    assert addresses(e.eligible([new], "example.net", 2, at(0), None)) == ["192.0.2.20"]


def test_counts_survive_a_restart_and_are_pruned_the_next_day(tmp_path: Path) -> None:
    new = src("192.0.2.20", (2, 2))
    clock = Clock(at(0))
    e = egress(tmp_path, clock)
    send(e, new, "example.net", 2, at(0))
    e.counters.record(new, "example.org", 1, at(0))
    asyncio.run(e.counters.flush())

    again = egress(tmp_path, clock)  # a new process
    assert isinstance(again.eligible([new], "example.net", 1, at(0), None), Deferral)
    assert addresses(again.eligible([new], "example.org", 1, at(0), None)) == ["192.0.2.20"]
    assert again.eligible([new], "example.org", 2, at(0), None) == Allowed((new,), limit=1)

    clock.now = at(1)
    next_day = egress(tmp_path, clock)  # yesterday's file: nothing carried today
    assert addresses(next_day.eligible([new], "example.net", 2, at(1), None)) == ["192.0.2.20"]
    # A rolled day rewrites the file without yesterday's counts.
    again.eligible([new], "example.net", 1, at(1), None)
    asyncio.run(again.counters.flush())
    data = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert data == {"day": "2026-12-02", "counts": {}}


def test_the_writer_task_writes_within_a_second_and_at_cancel(tmp_path: Path) -> None:
    new = src("192.0.2.20", (5,))
    counters = WarmupCounters(tmp_path / COUNTS_FILE, Clock(at(0)))

    async def main() -> None:
        task = asyncio.create_task(counters.run())
        counters.record(new, "example.net", 3, at(0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    data = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert data["counts"] == {"192.0.2.20": {"example.net": 3}}


def test_an_unreadable_counts_file_is_a_warning_not_a_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / COUNTS_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        e = egress(tmp_path, Clock(at(0)))
    assert "warmup_counts_unreadable" in caplog.text
    assert addresses(e.eligible([src("192.0.2.20", (1,))], "example.net", 1, at(0), None)) \
        == ["192.0.2.20"]


def test_without_a_pool_or_a_policy_nothing_is_needed() -> None:
    assert not Egress.needed((), "enforce")
    assert not Egress.needed((src("192.0.2.10"),), "off")
    assert Egress.needed((src("192.0.2.10"),), "enforce")
    assert Egress.needed((src("192.0.2.10", (5,)),), "off")
    assert decide((), 1, at(0), {}, lambda s, d: 0) == Allowed(())


# --- SPF ------------------------------------------------------------------------------------

POOL = [src("192.0.2.10"), src("192.0.2.11"), src("192.0.2.12"), src("192.0.2.13")]


def spf(*results: str) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    return {s.address: r for s, r in zip(POOL, results, strict=False)}


def test_spf_fail_and_softfail_are_never_used_none_and_neutral_are() -> None:
    decision = decide(POOL, 1, at(0), spf("fail", "softfail", "none", "neutral"),
                      lambda s, d: 0)
    assert addresses(decision) == ["192.0.2.12", "192.0.2.13"]
    assert addresses(decide(POOL[:2], 1, at(0), spf("pass", "fail"), lambda s, d: 0)) \
        == ["192.0.2.10"]


def test_spf_permerror_is_allowed_and_logged_once(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    e = egress(tmp_path, Clock(at(0)))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            decision = e.eligible(POOL[:2], "example.net", 1, at(0),
                                  spf("permerror", "fail"), sender="ap@invoices.example.com")
            assert addresses(decision) == ["192.0.2.10"]
    lines = [r.getMessage() for r in caplog.records if "spf_permerror" in r.getMessage()]
    assert len(lines) == 1
    assert "192.0.2.10" in lines[0] and "invoices.example.com" in lines[0]


def test_spf_temperror_defers_on_the_retry_schedule_naming_it() -> None:
    decision = decide(POOL[:2], 1, at(0), spf("temperror", "fail"), lambda s, d: 0)
    assert isinstance(decision, Deferral) and decision.until is None
    assert decision.status == "4.7.24" and "temperror" in decision.reply
    # Another address that passes carries the message at once.
    assert addresses(decide(POOL[:2], 1, at(0), spf("temperror", "pass"), lambda s, d: 0)) \
        == ["192.0.2.11"]
    # A source nobody checked is not sent from.
    assert isinstance(decide(POOL[:1], 1, at(0), {}, lambda s, d: 0), Deferral)


def test_no_address_passing_spf_defers_naming_the_result() -> None:
    decision = decide(POOL[:2], 1, at(0), spf("fail", "softfail"), lambda s, d: 0)
    assert isinstance(decision, Deferral) and decision.until is None
    assert decision.reply.startswith("451 4.7.23") and decision.status == "4.7.23"
    assert "192.0.2.10=fail" in decision.reply and "192.0.2.11=softfail" in decision.reply


def test_spf_off_skips_the_check() -> None:
    assert addresses(decide(POOL[:2], 1, at(0), None, lambda s, d: 0)) \
        == ["192.0.2.10", "192.0.2.11"]


def test_spf_and_warmup_together_spf_first(tmp_path: Path) -> None:
    new, old = src("192.0.2.20", (1,)), src("192.0.2.10")
    e = egress(tmp_path, Clock(at(0)))
    send(e, new, "example.net", 1, at(0))
    results = {new.address: "pass", old.address: "fail"}
    decision = e.eligible([new, old], "example.net", 1, at(0), results)
    # The only address SPF allows is capped: a warm-up deferral, not an SPF one.
    assert isinstance(decision, Deferral) and decision.until == at(1, 0)


@dataclass(frozen=True)
class FakeResult:
    result: str
    explanation: str = ""


class FakeChecker:
    def __init__(self, results: dict[str, str]) -> None:
        self.results = results
        self.calls: list[tuple[str, str, str]] = []

    async def check(self, ip: str, sender: str, helo: str) -> FakeResult:
        self.calls.append((ip, sender, helo))
        return FakeResult(self.results[ip])


def test_fetch_spf_asks_for_each_source_with_its_helo_name() -> None:
    checker = FakeChecker({"192.0.2.10": "pass", "192.0.2.11": "softfail"})
    results = asyncio.run(fetch_spf(checker, POOL[:2], ""))
    assert results == spf("pass", "softfail")
    assert checker.calls == [("192.0.2.10", "", "mta-192.0.2.10.example.com"),
                             ("192.0.2.11", "", "mta-192.0.2.11.example.com")]


def test_a_late_older_write_never_replaces_a_newer_one(tmp_path: Path) -> None:
    new = src("192.0.2.20", (5,))
    counters = WarmupCounters(tmp_path / COUNTS_FILE, Clock(at(0)))
    counters.record(new, "example.net", 1, at(0))
    older = counters.snapshot()  # as taken by a flush whose thread is slow
    counters.record(new, "example.net", 1, at(0))
    counters.write()             # the final write at shutdown
    counters._write_snapshot(older)
    data = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert data["counts"] == {"192.0.2.20": {"example.net": 2}}


def test_pool_for_a_destination_keeps_the_pools_order() -> None:
    assert pool_for(POOL, ()) == tuple(POOL)
    assert pool_for(POOL, (POOL[2].address, POOL[0].address)) == (POOL[0], POOL[2])
