"""Power cuts: the relay's queue folder (spool and index) on crashfs, which forgets everything
that was not synced when it is killed (tests/resilience/crashfs.py).

Twenty cuts at seeded random moments under load, some during a restart, with small segments so
that they roll over, are sealed and are removed all along. Each cut: SIGKILL the relay's process
group, SIGKILL crashfs, lazy unmount, remount on the same backing folder, start the relay again.
Then nothing that got a 250 may be lost, and every duplicate must be in the README's window.

The `teeth` tests run the same scenario against a relay launched with one sync disabled at
runtime (no knob in the relay) and pass only if acknowledged mail IS lost: the harness catches
such a bug.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mount import CrashMount
from relayproc import RelayProcess
from scenario import FirstTryRefusal, Plan, Report, Scenario, assert_nothing_lost, show
from sink import Sink

PLAN = Plan(seed=1, cuts=20, acks_between=(10, 80), during_restart=0.2, big_every=7,
            deferred_every=8)
TEETH_PLAN = Plan(seed=1, cuts=4, acks_between=(10, 80), big_every=7, deferred_every=8)
RELAY = ["-m", "relay"]

# The committer's fdatasync does nothing: batches and streamed messages reach the disk only if
# the kernel happens to write them back.
SKIP_FILE_SYNC = """
import sys
import relay.queue.committer as committer
real_init = committer.Committer.__init__
def init(self, *args, **kwargs):
    kwargs["sync"] = lambda fd: None
    real_init(self, *args, **kwargs)
committer.Committer.__init__ = init
from relay.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A new segment's name is never synced into the spool folder (segments.sync_dir skips it);
# recovery and delivery import their own sync_dir first and keep it.
SKIP_DIR_SYNC = """
import sys
import relay.delivery.store, relay.queue.recovery
import relay.queue.segments as segments
real_sync_dir = segments.sync_dir
def sync_dir(path):
    if path.name != "spool":
        real_sync_dir(path)
segments.sync_dir = sync_dir
from relay.cli import main
sys.exit(main(sys.argv[1:]))
"""


def power_cuts(tmp_path: Path, mount: CrashMount, plan: Plan, launcher: list[str],
               expect_loss: bool = False) -> Report:
    queue = mount.path / "queue"
    with Sink(data_reply=FirstTryRefusal(plan.deferred_every)) as sink:
        relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]},
                             queue={"path": str(queue), "segment_size": "64KiB"},
                             launcher=launcher)
        scenario = Scenario(relay, sink, plan, mount=mount, queue_dir=queue)
        try:
            scenario.run()
            return scenario.drain(expect_loss=expect_loss)
        finally:
            scenario.close()


def test_power_cuts_lose_nothing(tmp_path: Path, crash_mount: CrashMount) -> None:
    report = power_cuts(tmp_path, crash_mount, PLAN, RELAY)
    show("power cuts", report)
    assert_nothing_lost(report)
    assert report.segments_removed > 0, "no segment was removed while the cuts went on"


@pytest.mark.teeth
def test_teeth_without_file_sync_mail_is_lost(tmp_path: Path, crash_mount: CrashMount) -> None:
    report = power_cuts(tmp_path, crash_mount, TEETH_PLAN, ["-c", SKIP_FILE_SYNC],
                        expect_loss=True)
    show("teeth: no file sync", report)
    assert report.lost, "records never synced survived every cut: the harness has no teeth"


@pytest.mark.teeth
def test_teeth_without_folder_sync_mail_is_lost(tmp_path: Path,
                                                crash_mount: CrashMount) -> None:
    report = power_cuts(tmp_path, crash_mount, TEETH_PLAN, ["-c", SKIP_DIR_SYNC],
                        expect_loss=True)
    show("teeth: no folder sync", report)
    assert report.lost, "segments never named durably survived every cut: no teeth"
    assert any(" event=spool_missing " in line for line in report.log_problems)
