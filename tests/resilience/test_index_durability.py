"""Index.make_durable() under a power cut: what the relay relies on before it removes a segment.

With another connection reading the index (an operator's `invoice-relay queue list`, a
monitoring or backup job holding a snapshot), a checkpoint can neither copy nor sync anything;
make_durable() once relied on one, returned as if the commits were on disk, and a power cut
then took back final states whose segment was already removed. It now syncs the write-ahead
log itself.
"""

from __future__ import annotations

import sqlite3

from mount import CrashMount

from relay.queue.index import Index
from relay.queue.segments import sync_dir


def rows_after_cut(mount: CrashMount, with_reader: bool) -> int:
    db = mount.path / "index.sqlite"
    index = Index(db)
    index.conn.execute("CREATE TABLE t (x)")
    index.make_durable()
    sync_dir(mount.path)  # the index's own files are findable after the cut
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    if with_reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # holds a snapshot
    index.conn.execute("INSERT INTO t VALUES (1)")  # e.g. "every message in it is final"
    index.make_durable()  # returned normally: the relay would remove the segment now
    reader.close()  # a reader syncs nothing; the index stays open (a last close checkpoints)
    mount.cut()
    mount.mount()
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        conn.close()


def test_make_durable_commits_survive_a_power_cut(crash_mount: CrashMount) -> None:
    assert rows_after_cut(crash_mount, with_reader=False) == 1


def test_make_durable_with_a_reader_present(crash_mount: CrashMount) -> None:
    assert rows_after_cut(crash_mount, with_reader=True) == 1
