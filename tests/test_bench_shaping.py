"""bench/shaping: the figures its verdicts rest on.

The benchmark itself runs for minutes against real sinks (bench/README.md); these tests check
the parts that decide PASS/FAIL without running it: the throttled domain's rate from its sink's
readings, the split of the mail over the 20 domains, and that the relay config it writes is one
the relay takes, with the throttle on the right domain.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import load_config

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import shaping  # noqa: E402  (bench/shaping.py, not a package; it imports bench and scale)


def clumps(burst: int, per_clump: int, seconds: int, *, lag: float = 0.3) -> list[tuple]:
    """Sink readings of a domain whose mail arrives in one clump a second after its burst."""
    points = [(0.0, 0), (lag, burst)]
    for s in range(1, seconds + 1):
        points.append((lag + s, burst + s * per_clump))
    return points


def test_rate_after_the_burst_is_the_clumps_per_second() -> None:
    points = clumps(burst=10, per_clump=10, seconds=6)
    points.append((9.5, 70))  # end of the watch, nothing new since the last clump
    rate = shaping.throttled_rate(points, burst=10, n=250)
    assert rate["per_s"] == pytest.approx(10.0)
    assert shaping.rate_ok(rate["per_s"])
    assert rate["delivered"] == 70 and not rate["all_arrived"]


def test_an_unthrottled_domain_fails_the_rate_check() -> None:
    # all 250 within a second, as on a relay that parses `rate` and ignores it
    points = [(0.0, 0), (0.2, 40), (0.5, 160), (0.9, 250), (3.0, 250)]
    rate = shaping.throttled_rate(points, burst=10, n=250)
    assert rate["per_s"] > 100 and rate["all_arrived"]
    assert not shaping.rate_ok(rate["per_s"])
    # 12/s is 20 % over: outside the tolerance
    assert not shaping.rate_ok(shaping.throttled_rate(clumps(10, 12, 6), 10, 250)["per_s"])


def test_nothing_after_the_burst_has_no_rate() -> None:
    rate = shaping.throttled_rate([(0.0, 0), (0.3, 10), (30.0, 10)], burst=10, n=250)
    assert rate["per_s"] is None and not shaping.rate_ok(rate["per_s"])


def test_mail_is_split_over_twenty_domains() -> None:
    even = shaping.split(shaping.FULL)
    assert len(even) == 20 and set(even.values()) == {2500}
    assert next(iter(even)) == shaping.domain_names()[0] == "throttled.shaping.test"
    heavy = shaping.split(replace(shaping.FULL, throttled_share=0.3))
    assert heavy["throttled.shaping.test"] == 15_000
    assert sum(heavy.values()) <= 50_000 and len(set(heavy.values())) == 2


def test_the_relay_config_throttles_only_that_domain(tmp_path: Path) -> None:
    names = shaping.domain_names()
    relay = shaping.Relay(tmp_path, "shape", ["invoice-relay"], {d: 10000 + i for i, d in
                                                                   enumerate(names)},
                          limits={names[0]: f'rate = "{shaping.RATE}"\nburst = 10\n'})
    config = load_config(relay.dir / "relay.toml")
    slow = config.destination_for(names[0])
    assert slow is not None and slow.rate is not None
    assert slow.rate.per_second == pytest.approx(shaping.RATE_PER_S) and slow.burst == 10
    other = config.destination_for(names[5])
    assert other is not None and other.rate is None
    assert [str(r) for r in other.routes] == ["127.0.0.1:10005"]
