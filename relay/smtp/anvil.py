"""Connection and message-rate limits across every intake process (Postfix's anvil), and the
queue depth that delivery reports to intake.

- `[server] max_connections`: all clients together; clients outside `trusted_networks` may
  take only nine tenths of the slots, so the apps always get in.
- `[server] max_connections_per_client`: per client address (IPv6: per /64), except clients in
  `trusted_networks`: the apps' own connection pools (often more than 50 connections from one
  host) must never be refused, as Postfix exempts `mynetworks` from its anvil limits. They
  still count in `max_connections`.
- `[server] max_messages_per_client` ("N/period"): MAIL commands per client address, a
  token bucket N deep refilled at N per period (kept as its "theoretical arrival time",
  GCRA, so one float per client is the whole state).
- the number of messages in the queue, which the delivery process writes about once a
  second from the index and intake raises by one per message it commits (`[queue]
  max_queued`).

The counters live in anonymous shared memory created before the processes fork, guarded by
one process-shared lock: a connection costs a few microseconds, and a flood of connections
never touches the queue. Per-client slots live in a fixed open-addressing table; a slot is
reused only when its client has no connection and a full bucket (it then remembers nothing).
A client that finds no slot (the table's probe window full of connected clients) is counted
in the total only.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
import time

from relay.smtp.authlimit import client_key

SLOTS = 8192
PROBE = 16
_HEAD = struct.Struct("=qq")          # connections (all processes), messages queued
_SLOT = struct.Struct("=16sqd")       # client key, its connections, its bucket's arrival time
_NO_KEY = b"\0" * 16


class Anvil:
    """Shared counters; create before fork()."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, _HEAD.size + slots * _SLOT.size)  # MAP_SHARED|MAP_ANONYMOUS
        self._lock = multiprocessing.Lock()

    # --- connections -------------------------------------------------------------------------

    def connect(self, address: str, *, trusted: bool, max_total: int,
                max_per_client: int) -> str | None:
        """Count a new connection; None when admitted, else what is over its limit (the
        connection was not counted)."""
        # The apps (trusted) are counted in the total only: no per-client key to work out.
        key = None if trusted else client_key(address)
        with self._lock:
            total, queued = _HEAD.unpack_from(self._mem, 0)
            limit = max_total if trusted else max_total - max_total // 10
            if total >= limit:
                return "max_connections"
            slot = None if key is None else self._find(key, claim=True, now=time.monotonic())
            if slot is not None:
                _, conns, tat = self._read(slot)
                if conns >= max_per_client:
                    return "max_connections_per_client"
                self._write(slot, key, conns + 1, tat)
            _HEAD.pack_into(self._mem, 0, total + 1, queued)
            return None

    def disconnect(self, address: str, *, trusted: bool = False) -> None:
        """An admitted connection ended."""
        key = None if trusted else client_key(address)
        with self._lock:
            total, queued = _HEAD.unpack_from(self._mem, 0)
            _HEAD.pack_into(self._mem, 0, max(0, total - 1), queued)
            slot = None if key is None else self._find(key, claim=False, now=0.0)
            if slot is not None:
                _, conns, tat = self._read(slot)
                self._write(slot, key, max(0, conns - 1), tat)

    @property
    def connections(self) -> int:
        return int(_HEAD.unpack_from(self._mem, 0)[0])

    # --- message rate ------------------------------------------------------------------------

    def take_message(self, address: str, count: int, period: float, now: float) -> bool:
        """One MAIL from `address` under `count` per `period`; False when over it."""
        interval = period / count
        key = client_key(address)
        with self._lock:
            slot = self._find(key, claim=True, now=now)
            if slot is None:
                return True  # cannot be tracked: never refuse for our table's sake
            _, conns, tat = self._read(slot)
            tat = max(tat, now)
            if tat + interval - now > period + 1e-9:
                return False
            self._write(slot, key, conns, tat + interval)
            return True

    # --- queue depth -------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return int(_HEAD.unpack_from(self._mem, 0)[1])

    def set_queued(self, count: int) -> None:
        """The delivery process's count from the index."""
        with self._lock:
            total, _ = _HEAD.unpack_from(self._mem, 0)
            _HEAD.pack_into(self._mem, 0, total, count)

    def add_queued(self, count: int) -> None:
        """Intake committed `count` messages (until delivery's next count includes them)."""
        with self._lock:
            total, queued = _HEAD.unpack_from(self._mem, 0)
            _HEAD.pack_into(self._mem, 0, total, queued + count)

    # --- the table ---------------------------------------------------------------------------

    def _read(self, slot: int) -> tuple[bytes, int, float]:
        key, conns, tat = _SLOT.unpack_from(self._mem, _HEAD.size + slot * _SLOT.size)
        return key, conns, tat

    def _write(self, slot: int, key: bytes, conns: int, tat: float) -> None:
        _SLOT.pack_into(self._mem, _HEAD.size + slot * _SLOT.size, key, conns, tat)

    def _find(self, key: bytes, *, claim: bool, now: float) -> int | None:
        """The slot of `key`; with `claim`, a free one for it (None: none free)."""
        start = int.from_bytes(key, "little") % self.slots
        free = None
        for step in range(PROBE):
            slot = (start + step) % self.slots
            stored, conns, tat = self._read(slot)
            if stored == key:
                return slot
            if free is None and (stored == _NO_KEY or (conns == 0 and tat <= now)):
                free = slot
        if claim and free is not None:
            self._write(free, key, 0, 0.0)
        return free if claim else None
