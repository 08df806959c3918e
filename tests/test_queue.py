"""The durable queue: spool file format, group commit and its fsync accounting, the index."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.queue.committer import Committer, QueueWriteError
from relay.queue.envelope import ACTIVE, DELIVERED, Envelope, new_queue_id
from relay.queue.index import Index, Outcome
from relay.queue.spool import Spool, SpoolCorrupt


def _envelope(*rcpts: str) -> Envelope:
    return Envelope(id=new_queue_id(), sender="ap@invoices.test",
                    recipients=rcpts or ("x@example.net",), received=time.time())


def test_spool_roundtrip_keeps_bytes_and_final_states(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = _envelope("a@example.net", "b@example.net")
    message = b"Subject: \xe5\x8f\x91\xe7\xa5\xa8\r\n\r\n" + os.urandom(5000)
    os.close(spool.create(env, [message[:10], message[10:]], complete=True))
    assert spool.read_message(env.id) == message
    spool.mark_final(env.id, [(1, DELIVERED)], sync=True)
    entry = spool.read(env.id)
    assert entry.envelope == env
    assert entry.finals == {1: DELIVERED}
    with open(spool.path(env.id), "ab") as f:
        f.write(b"F 0 deliv")  # a record torn by a power cut is ignored
    assert spool.read(env.id).finals == {1: DELIVERED}


def test_incomplete_spool_file_is_never_readable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    env = _envelope()
    fd = spool.create(env, [b"Subject: x\r\n\r\nstreaming"], complete=False)
    os.close(fd)
    with pytest.raises(SpoolCorrupt, match="incomplete"):
        spool.read(env.id)


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
    committer = Committer(Spool(tmp_path), tmp_path / "index.sqlite", max_lifetime=3600,
                          sync=sync)
    committer.start()
    try:
        # An idle relay commits a lone message at once: no timer waits for company.
        started = time.monotonic()
        assert await _commit_many(committer, 1) == [None]
        assert time.monotonic() - started < 0.5
        assert sync.calls == 2  # its file and the folder

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
    # Per batch: one sync per new file plus ONE folder sync, never one per message.
    assert stats.file_syncs == 12
    assert stats.dir_syncs == len(stats.batch_sizes) <= 4
    assert sync.calls == stats.file_syncs + stats.dir_syncs
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 12


async def test_failed_fsync_refuses_the_whole_batch_and_is_not_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def failing_sync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    spool = Spool(tmp_path)
    committer = Committer(spool, tmp_path / "index.sqlite", max_lifetime=3600, sync=failing_sync)
    committer.start()
    try:
        results = await _commit_many(committer, 5)
    finally:
        committer.stop()
    assert all(isinstance(r, QueueWriteError) for r in results)
    assert len(calls) <= 5  # at most one attempt per file: a failed fsync is never retried
    assert list(spool.ids()) == []  # nothing half-acknowledged stays behind
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_claim_moves_due_recipients_to_active_exactly_once(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    env = _envelope("a@example.net", "b@example.org")
    index.insert([(env, 100)], max_lifetime=3600)
    first = index.claim_due(time.time(), 100)
    assert {d.rcpt for d in first} == {"a@example.net", "b@example.org"}
    assert index.claim_due(time.time(), 100) == []  # active: nobody else gets them
    state = index.conn.execute("SELECT DISTINCT state FROM recipients").fetchall()
    assert state == [(ACTIVE,)]
    # A restart releases what the dead process held.
    assert index.release_active(time.time()) == 2
    assert len(index.claim_due(time.time(), 100)) == 2


def test_record_reports_messages_that_became_final(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    env = _envelope("a@example.net", "b@example.net")
    index.insert([(env, 100)], max_lifetime=3600)
    index.claim_due(time.time(), 10)
    now = time.time()
    done = index.record([Outcome(env.id, 0, DELIVERED, now, now, "250 2.0.0 ok", host="mx")])
    assert done == []
    done = index.record([Outcome(env.id, 1, "deferred", now, now + 60, "451 4.3.0 later")])
    assert done == []
    done = index.record([Outcome(env.id, 1, DELIVERED, now, now, "250 ok")])
    assert done == [env.id]
    attempts = index.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
    assert attempts == 3


def test_due_query_uses_the_partial_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    plan = index.conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM recipients WHERE state IN"
        " ('queued', 'deferred', 'unknown') AND next_attempt <= ? ORDER BY next_attempt LIMIT 5",
        (time.time(),)).fetchall()
    assert any("recipients_due" in str(row) for row in plan), plan


def test_queue_commands(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text('[queue]\npath = "var"\n')
    spool = Spool(tmp_path / "var")
    index = Index(tmp_path / "var" / "index.sqlite")
    env = _envelope("a@example.net")
    os.close(spool.create(env, [b"Subject: hello\r\n\r\nbody\r\n"], complete=True))
    index.insert([(env, 25)], max_lifetime=3600)
    index.close()

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
    rebuilt = run("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert env.id in run("list", "--json").stdout
