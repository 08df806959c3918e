"""SIGKILL of the relay's whole process group at seeded random moments under sustained load.

Several clients send small and 1.6 MiB (streamed) messages without pause and reconnect while
the relay restarts; some kills land during a restart. Every message that got a 250 must arrive,
byte for byte; each duplicate must be one whose outcome the killed relay had not recorded, at
most 64 per kill (README: 32 unrecorded outcomes plus the transactions in flight).
"""

from __future__ import annotations

from pathlib import Path

from relayproc import RelayProcess
from scenario import KILL_WINDOW, FirstTryRefusal, Plan, Scenario, assert_nothing_lost, show
from sink import Sink

PLAN = Plan(seed=20261129, cuts=5, acks_between=(40, 250), during_restart=0.2, big_every=6,
            deferred_every=8)


def test_sigkill_five_times_under_load(tmp_path: Path) -> None:
    with Sink(data_reply=FirstTryRefusal(PLAN.deferred_every)) as sink:
        relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]},
                             queue={"segment_size": "256KiB"})
        scenario = Scenario(relay, sink, PLAN)
        try:
            scenario.run()
            report = scenario.drain()
        finally:
            scenario.close()
    show("sigkill", report)
    assert_nothing_lost(report)
    assert all(len(cut.duplicates) <= KILL_WINDOW for cut in report.cuts)
    assert not any(cut.rolled_back for cut in report.cuts)  # a kill keeps the page cache
