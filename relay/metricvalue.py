"""A prometheus-client value class whose updates stay in memory, written out twice a second.

prometheus-client's multiprocess value (MmapedValue) does per update: a lock, an `os.getpid()`
system call (to notice a fork), and a `struct.pack_into` into its mapped file; ten Python calls
and a syscall, about 40 times per message across intake and delivery. Here `inc`/`set` change
a float under a lock and put the value on a pending list; `flush()` writes the pending values
into this process's file (same file names, keys and layout as prometheus-client's, so its
MultiProcessCollector reads them unchanged). A daemon thread per process flushes every
FLUSH_INTERVAL seconds; `serve` flushes before each process exits, and `atexit` does for a
process that ends normally.

So a scrape may lag an update by up to FLUSH_INTERVAL, and a process killed with SIGKILL (or
one that dies without reaching its exit path) loses up to FLUSH_INTERVAL of its counts.

A fork is noticed once, in the child (`os.register_at_fork`), not per update: the child's
values start at zero and go to a file named with its own pid, as with MmapedValue.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

from prometheus_client.mmap_dict import MmapedDict, mmap_key

FLUSH_INTERVAL = 0.5

_lock = threading.Lock()
_files: dict[str, MmapedDict] = {}      # file prefix -> this process's file
_values: list[BufferedValue] = []       # every value made in this process
_pending: list[BufferedValue] = []      # changed since the last flush
_flusher: dict[str, Any] = {"pid": 0}   # pid of the process whose flusher thread runs


def _file(prefix: str) -> MmapedDict:
    """This process's file for `prefix` (call with _lock held)."""
    found = _files.get(prefix)
    if found is None:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        found = _files[prefix] = MmapedDict(os.path.join(directory, f"{prefix}_{os.getpid()}.db"))
    return found


class BufferedValue:
    """Same constructor as prometheus-client's MmapedValue (set as `values.ValueClass`)."""

    _multiprocess = True

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any,
                 labelvalues: Any, help_text: str, multiprocess_mode: str = "",
                 **kwargs: Any) -> None:
        self._prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._dirty = False
        with _lock:
            # As MmapedValue: the series is in the file at once (at zero for a new one), and a
            # metric made again in this process goes on from what the file holds.
            self._value, self._timestamp = _file(self._prefix).read_value(self._key)
            _values.append(self)

    def inc(self, amount: float) -> None:
        with _lock:
            self._value += amount
            if not self._dirty:
                self._mark()

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            self._value = value
            self._timestamp = timestamp or 0.0
            if not self._dirty:
                self._mark()

    def _mark(self) -> None:
        self._dirty = True
        _pending.append(self)
        if _flusher["pid"] != os.getpid():  # once per change after a flush, not per update
            _start_flusher()

    def set_exemplar(self, exemplar: Any) -> None:
        return  # not in multiprocess mode (as MmapedValue)

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


def flush() -> None:
    """Write every value changed since the last flush into this process's files."""
    with _lock:
        _write(_pending)


def _write(values: list[BufferedValue]) -> None:
    """(with _lock held)"""
    for value in values:
        value._dirty = False
        _file(value._prefix).write_value(value._key, value._value, value._timestamp)
    values.clear()


def _start_flusher() -> None:
    """At a process's first update (with _lock held): write every series now, as MmapedValue
    does at a forked child's first update. The files' pages get their blocks while there is
    room: a first write into a sparse mapped page on a full disk is a SIGBUS."""
    _flusher["pid"] = os.getpid()
    _write(list(_values))
    _pending.clear()
    threading.Thread(target=_flush_forever, name="metrics-flush", daemon=True).start()


def _flush_forever() -> None:
    pid = os.getpid()
    while _flusher["pid"] == pid:
        time.sleep(FLUSH_INTERVAL)
        flush()


def _after_fork_in_child() -> None:
    """A new process: its values start at zero, in files of its own, with no thread yet."""
    global _lock
    _lock = threading.Lock()  # the parent's may have been held by a thread that is not here
    for f in _files.values():
        f.close()  # our copy of the parent's mapping; the parent's file stays as it is
    _files.clear()
    for value in _values:
        value._value, value._timestamp, value._dirty = 0.0, 0.0, False
    _pending.clear()
    _flusher["pid"] = 0


def close() -> None:
    """Flush and forget every file (a new metrics folder, or tests)."""
    flush()
    with _lock:
        for f in _files.values():
            f.close()
        _files.clear()
        _values.clear()


os.register_at_fork(before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(),
                    after_in_child=_after_fork_in_child)
atexit.register(flush)
