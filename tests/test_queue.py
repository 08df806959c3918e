"""The durable queue: group commit and its fsync accounting, streamed messages, the index and
its segment bookkeeping, the queue commands."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from queuefiles import plant, stored_ids

from relay.queue import segments
from relay.queue.committer import Committer, QueueWriteError
from relay.queue.envelope import ACTIVE, DELIVERED, Envelope, new_queue_id
from relay.queue.index import Index, Outcome
from relay.queue.notices import Committed
from relay.queue.segments import Location, read_at


def _envelope(*rcpts: str) -> Envelope:
    return Envelope(id=new_queue_id(), sender="ap@invoices.test",
                    recipients=rcpts or ("x@example.net",), received=time.time())


class SlowCountingSync:
    """Real fdatasync, slowed down so that a batch forms behind it; counts every call."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        os.fdatasync(fd)
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)


async def _commit_many(committer: Committer, count: int) -> list[BaseException | None]:
    async def one() -> BaseException | None:
        try:
            await committer.commit(_envelope(), [b"Subject: t\r\n\r\nbody\r\n"], 23)
        except QueueWriteError as exc:
            return exc
        return None
    return await asyncio.gather(*(one() for _ in range(count)))


async def test_group_commit_batches_messages_that_arrive_during_a_sync(tmp_path: Path) -> None:
    sync = SlowCountingSync(delay=0.05)
    announced: list[tuple[bytes, Location]] = []
    committer = Committer(tmp_path / "spool", 0, segment_size=1 << 20, sync=sync,
                          on_committed=announced.extend)
    committer.start()
    try:
        # An idle relay commits a lone message at once: no timer waits for company.
        started = time.monotonic()
        assert await _commit_many(committer, 1) == [None]
        assert time.monotonic() - started < 0.5
        assert sync.calls == 1  # its segment's data; the segment's name was synced at creation

        # Ten messages finishing DATA while another one syncs are committed together.
        sync.entered.clear()
        first = asyncio.ensure_future(_commit_many(committer, 1))
        await asyncio.to_thread(sync.entered.wait, 5)
        results = await _commit_many(committer, 10)
        assert await first == [None]
        assert results == [None] * 10
    finally:
        committer.stop()
    stats = committer.stats
    assert stats.batch_sizes[0] == 1
    assert sum(stats.batch_sizes) == 12
    assert max(stats.batch_sizes) >= 5, stats.batch_sizes  # they shared a batch
    # One sync per batch, never one per message, and no folder sync at all.
    assert stats.syncs == sync.calls == len(stats.batch_sizes) <= 4
    # Every message is announced to delivery once, with where its bytes are.
    assert len(announced) == 12 and len(set(stored_ids(tmp_path))) == 12
    for _, location in announced:
        assert read_at(tmp_path / "spool", location) == b"Subject: t\r\n\r\nbody\r\n"


async def test_failed_fsync_refuses_the_whole_batch_and_is_not_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def failing_sync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    announced: list[tuple[bytes, Location]] = []
    committer = Committer(tmp_path / "spool", 0, segment_size=1 << 20, sync=failing_sync,
                          on_committed=announced.extend)
    committer.start()
    try:
        results = await _commit_many(committer, 5)
    finally:
        committer.stop()
    assert all(isinstance(r, QueueWriteError) for r in results)
    assert len(calls) == len(set(calls)) <= 5  # a segment whose sync failed is never synced again
    assert announced == []  # nothing half-acknowledged is announced


async def test_streamed_message_gets_its_own_synced_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    announced: list[tuple[bytes, Location]] = []
    sealed: list[str] = []
    synced: list[str] = []      # files fdatasynced, by name
    dirs_synced: list[Path] = []

    def sync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        os.fdatasync(fd)

    real_sync_dir = segments.sync_dir
    monkeypatch.setattr(segments, "sync_dir",
                        lambda path: (dirs_synced.append(path), real_sync_dir(path)))
    committer = Committer(tmp_path / "spool", 1, segment_size=1 << 20, sync=sync,
                          on_committed=announced.extend, on_sealed=sealed.extend)
    committer.start()
    try:
        env = _envelope()
        single = await asyncio.to_thread(committer.open_stream, env, [b"Subject: big\r\n\r\n"])
        await asyncio.to_thread(single.append, [b"x" * 100_000])
        assert stored_ids(tmp_path) == []  # not readable before it is complete
        location = await committer.finish_stream(single, [b"\r\nend\r\n"])
    finally:
        committer.stop()
    assert stored_ids(tmp_path) == [env.id]
    assert read_at(tmp_path / "spool", location).endswith(b"x\r\nend\r\n")
    assert announced == [(env.to_json(), location)] and location.segment in sealed
    # Acknowledged only after its own file and its folder entry are on disk.
    assert location.segment in synced and tmp_path / "spool" in dirs_synced


def test_claim_moves_due_recipients_to_active_exactly_once(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    env = _envelope("a@example.net", "b@example.org")
    index.add([Committed(env, Location("seg", 0, 100))], max_lifetime=3600)
    first = index.claim_due(time.time(), 100)
    assert first[0].location == Location("seg", 0, 100)
    assert {d.rcpt for d in first} == {"a@example.net", "b@example.org"}
    assert index.claim_due(time.time(), 100) == []  # active: nobody else gets them
    state = index.conn.execute("SELECT DISTINCT state FROM recipients").fetchall()
    assert state == [(ACTIVE,)]
    # A restart releases what the dead process held.
    assert index.release_active(time.time()) == 2
    assert len(index.claim_due(time.time(), 100)) == 2


def test_record_reports_finished_messages_and_removable_segments(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    env = _envelope("a@example.net", "b@example.net")
    other = _envelope("c@example.net")
    index.add([Committed(env, Location("seg1", 0, 100)),
               Committed(other, Location("seg1", 200, 100))], max_lifetime=3600)
    index.claim_due(time.time(), 10)
    now = time.time()
    assert index.record([Outcome(env.id, 0, DELIVERED, now, now, "250 ok", host="mx")]) == ([], [])
    assert index.record([Outcome(env.id, 1, "deferred", now, now + 60, "451 later")]) == ([], [])
    assert index.record([Outcome(env.id, 1, DELIVERED, now, now, "250 ok")]) == ([env.id], [])
    assert index.seal(["seg1"]) == []  # sealed, but `other` is still pending
    assert index.record([Outcome(other.id, 0, DELIVERED, now, now, "250 ok")]) == (
        [other.id], ["seg1"])
    assert index.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 4
    index.forget_segments(["seg1"])
    assert index.segments() == {}


def test_segment_rows_remember_how_far_they_are_indexed(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    a, b = _envelope(), _envelope()
    index.add([Committed(a, Location("seg", 30, 100)), Committed(b, Location("seg", 160, 50))],
              max_lifetime=3600)
    index.add([Committed(a, Location("seg", 30, 100))], max_lifetime=3600)  # twice: no double
    [row] = index.segments().values()
    assert (row.messages, row.finished, row.sealed, row.indexed_upto) == (2, 0, False, 210)


def test_due_query_uses_the_partial_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    plan = index.conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM recipients WHERE state IN"
        " ('queued', 'deferred', 'unknown') AND next_attempt <= ? ORDER BY next_attempt LIMIT 5",
        (time.time(),)).fetchall()
    assert any("recipients_due" in str(row) for row in plan), plan


def test_releasing_claimed_recipients_uses_the_partial_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    plan = index.conn.execute(
        "EXPLAIN QUERY PLAN UPDATE recipients SET state = 'queued' WHERE state = 'active'"
    ).fetchall()
    assert any("recipients_active" in str(row) for row in plan), plan


def test_queue_commands(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text('[queue]\npath = "var"\n')
    env = _envelope("a@example.net")
    plant(tmp_path / "var", env, b"Subject: hello\r\n\r\nbody\r\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "--config",
                               str(tmp_path / "relay.toml"), "queue", *args],
                              capture_output=True, text=True, timeout=30)

    listed = run("list")
    assert listed.returncode == 0 and env.id in listed.stdout and "queued" in listed.stdout
    shown = run("show", env.id)
    assert "Subject: hello" in shown.stdout and "<a@example.net> queued" in shown.stdout
    assert run("show", "NOSUCHID").returncode == 1
    (tmp_path / "var" / "index.sqlite").unlink()
    for extra in ("-wal", "-shm"):
        (tmp_path / "var" / f"index.sqlite{extra}").unlink(missing_ok=True)
    lost = run("list")  # a spool without its index: the command says what to do
    assert lost.returncode == 1 and "invoice-relay queue rebuild" in lost.stderr
    (tmp_path / "var" / "index.sqlite").write_bytes(b"garbage" * 1000)
    damaged = run("list")
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    assert "invoice-relay queue rebuild" in damaged.stderr
    (tmp_path / "var" / "index.sqlite").unlink()
    rebuilt = run("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert env.id in run("list", "--json").stdout
