"""Failed-AUTH limits per client address, shared by every intake process.

A token bucket per client (IPv4 address, or IPv6 /64: one host owns a whole /64), `depth`
tokens deep, refilled at `[server] auth_failure_limit`. An AUTH attempt takes a token before the
password is hashed and gives it back when the login succeeds, so a client with an empty bucket
is turned away without any hashing, and concurrent guesses cannot overtake the limit.

The buckets live in anonymous shared memory created before the intake processes fork, guarded
by one process-shared lock: a guessing flood never touches the queue index, and each check is
a few microseconds on the event loop. The table has a fixed size; when it is full the bucket
nearest to full is reused, which forgets the least (a full bucket is the same as no bucket).
"""

from __future__ import annotations

import ipaddress
import mmap
import multiprocessing
import struct
import time
import zlib
from collections.abc import Callable

DEPTH = 5
SLOTS = 4096
PROBE = 8
_SLOT = struct.Struct("=16sdd")  # client key, tokens, time of the last update


def client_key(address: str) -> bytes:
    """16 bytes naming the client: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address.encode()[:16].ljust(16, b"\0")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return ip.packed[:8] + b"\0" * 7 + b"\x06"
    return ip.packed + b"\0" * 12


class AuthFailureLimiter:
    """Token buckets of failed AUTH attempts, in memory shared across fork()."""

    def __init__(self, count: int, period: float, *, depth: int = DEPTH, slots: int = SLOTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = count / period
        self.depth = float(depth)
        self.slots = slots
        self._clock = clock
        self._mem = mmap.mmap(-1, slots * _SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS
        self._lock = multiprocessing.Lock()

    def try_take(self, address: str) -> bool:
        """Take a token for one AUTH attempt; False when the client has none left."""
        key = client_key(address)
        with self._lock:
            slot, tokens = self._find(key)
            if tokens < 1.0:
                return False
            self._store(slot, key, tokens - 1.0)
            return True

    def give_back(self, address: str) -> None:
        """The attempt succeeded: it was not a failure."""
        key = client_key(address)
        with self._lock:
            slot, tokens = self._find(key)
            self._store(slot, key, min(self.depth, tokens + 1.0))

    def _find(self, key: bytes) -> tuple[int, float]:
        """The slot for `key` and its tokens now (refilled), claiming a slot if needed."""
        now = self._clock()
        start = zlib.crc32(key) % self.slots
        victim, victim_tokens = start, -1.0
        for step in range(PROBE):
            slot = (start + step) % self.slots
            stored, tokens, stamp = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
            refilled = min(self.depth, tokens + (now - stamp) * self.rate)
            if stored == key:
                return slot, refilled
            if stored == b"\0" * 16:
                refilled = self.depth + 1.0  # an empty slot is the best victim
            if refilled > victim_tokens:
                victim, victim_tokens = slot, refilled
        return victim, self.depth

    def _store(self, slot: int, key: bytes, tokens: float) -> None:
        _SLOT.pack_into(self._mem, slot * _SLOT.size, key, tokens, self._clock())
