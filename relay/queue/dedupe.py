"""Duplicate suppression: which (Message-ID, sender, recipient, body) was accepted lately.

An app that times out after the final dot and sends the invoice again must not send it twice.
Each recipient of a message with a Message-ID is one entry, keyed by a hash of the Message-ID,
the sender, the recipient and the SHA-256 of the message data, holding the queue id of the
message that first carried it and when it was accepted.

Why a file-backed shared table: both intake processes accept from the same sockets, so a
resubmission may reach the other process; and a delivered message's spool segment is removed
long before its window ends, so the spool cannot rebuild this memory. The table is a fixed-size
open-addressing hash table in a file under the queue folder, mapped MAP_SHARED into every
intake process (the mapping is made before the fork): a check is a few microseconds under one
process-shared lock, and nothing is written or synced per message. A restart, or a killed
relay, keeps it (the page cache survives a killed process); a power cut may lose the entries
of the last seconds the kernel had not written back, which can then be sent twice.

Atomic with the commit: an entry is first *claimed* (pending, owned by the new queue id) and
made final only once its message is durable; a commit that fails releases it. An identical
message that finds a pending entry waits for the owner's outcome: two identical messages in
one batch give one queued message and one 250 naming it, never two copies and never a 250
for a message that was not queued. Pending entries left by a killed relay are cleared at start.

The table remembers the most recent SLOTS recipient-messages within the window: when a probe
window is full, the oldest entry is reused.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

FILE_NAME = "dedupe.table"
SLOTS = 1 << 18            # 262,144 recipient-messages, 14 MiB of file (sparse until used)
PROBE = 16
PENDING_LIMIT = 600.0      # seconds; a commit (even a 25 MiB stream) is far shorter
_MAGIC = b"IRDEDUP1"
_HEADER = struct.Struct("=8sQ")      # magic, slot count
_SLOT = struct.Struct("=16s24sdB7x")  # key, first queue id, accepted (wall clock), state
EMPTY, PENDING, FINAL = 0, 1, 2
# A slot that held a key once and was given up (a failed commit, a dead relay's claim). Unlike
# EMPTY it does not end a probe: keys stored further along stay findable, so a probe can stop
# at the first EMPTY slot (a new key, the common case, then costs one or two reads, not PROBE).
FREED = 3
_NO_KEY = b"\0" * 16
_STATE = 48                # offset of a slot's state byte


class Busy(Exception):
    """An identical message is being committed right now: ask again shortly."""


def dedupe_key(message_id: str, sender: str, recipient: str, body_digest: bytes) -> bytes:
    """16 bytes naming one recipient of one message (never all zeros in practice)."""
    # One encode of "id\0sender\0rcpt\0": the same bytes as encoding each part and adding
    # b"\0" (the table persists across restarts, so the keys must not change).
    text = f"{message_id}\0{sender}\0{recipient.lower()}\0"
    h = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16)
    h.update(body_digest)
    return h.digest()


class Claim(NamedTuple):
    """`claim`'s answer: per key None (this message may queue it) or the queue id that
    already did; and the (slot, key) pairs this message holds pending, for `settle`."""

    firsts: list[str | None]
    held: list[tuple[int, bytes]]


def _map_file(path: Path, size: int, slots: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fresh = os.fstat(fd).st_size != size or os.pread(fd, _HEADER.size, 0) != \
            _HEADER.pack(_MAGIC, slots)
        if fresh:  # new, or another layout: start empty (forgets, never misleads)
            os.ftruncate(fd, 0)
        # Real blocks for every page: a write through the mapping must never meet ENOSPC.
        os.posix_fallocate(fd, 0, size)
        if fresh:
            os.pwrite(fd, _HEADER.pack(_MAGIC, slots), 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED)
    except OSError:
        os.ftruncate(fd, 0)
        raise
    finally:
        os.close(fd)


class DedupeTable:
    """The shared table. Open it before forking the intake processes."""

    def __init__(self, path: Path, slots: int = SLOTS) -> None:
        self.path = path
        size = _HEADER.size + slots * _SLOT.size
        self.persistent = True
        try:
            self._mem = _map_file(path, size, slots)
        except OSError:
            # No room for the file (a nearly full disk): remember in memory only until the
            # next start, rather than risk SIGBUS writing into an unallocated page.
            self.persistent = False
            self._mem = mmap.mmap(-1, size)
        self.slots = slots
        self._lock = multiprocessing.Lock()
        self._clear_pending()

    def close(self) -> None:
        self._mem.close()

    def _clear_pending(self) -> None:
        """Claims of a relay that died before their commit's outcome: never queued."""
        # Every slot's state byte in one slice, searched in C: a start pays a millisecond,
        # not a Python loop over every slot.
        first = _HEADER.size + _STATE
        states = self._mem[first:first + self.slots * _SLOT.size:_SLOT.size]
        slot = states.find(PENDING)
        while slot >= 0:
            _SLOT.pack_into(self._mem, _HEADER.size + slot * _SLOT.size, _NO_KEY, b"", 0.0, FREED)
            slot = states.find(PENDING, slot + 1)

    # --- on the event loop, microseconds each ------------------------------------------------

    def claim(self, keys: Sequence[bytes], queue_id: str, now: float,
              window: float) -> Claim:
        """For each key: None when this message may queue it (claimed, pending, for
        `queue_id`), or the queue id of the message that already did. Busy when another
        message holds a pending claim on one of them (this call then claims nothing new
        beyond what it already holds)."""
        owner = queue_id.encode()
        with self._lock:
            found = [self._find(key, now, window) for key in keys]
            if any(state == PENDING and first != owner for _, state, first in found):
                raise Busy
            firsts: list[str | None] = []
            held: list[tuple[int, bytes]] = []
            for key, (slot, state, first) in zip(keys, found, strict=True):
                if state == FINAL:
                    firsts.append(first.decode())
                    continue
                if state == EMPTY:
                    self._store(slot, key, owner, now, PENDING)
                firsts.append(None)
                held.append((slot, key))
            return Claim(firsts, held)

    def settle(self, held: Sequence[tuple[int, bytes]], queue_id: str, *,
               committed: bool) -> None:
        """The commit's outcome for `claim(...).held`: our pending claims become final, or
        are forgotten. A slot no longer holding our claim (taken over after PENDING_LIMIT)
        is left alone."""
        owner = queue_id.encode()
        with self._lock:
            for slot, key in held:
                stored, first, stamp, state = self._read(slot)
                if stored != key or first != owner or state != PENDING:
                    continue
                if committed:
                    self._store(slot, key, owner, stamp, FINAL)
                else:
                    self._store(slot, _NO_KEY, b"", 0.0, FREED)

    # --- the table ---------------------------------------------------------------------------

    def _read(self, slot: int) -> tuple[bytes, bytes, float, int]:
        key, first, stamp, state = _SLOT.unpack_from(self._mem, _HEADER.size + slot * _SLOT.size)
        return key, first.rstrip(b"\0"), stamp, state

    def _store(self, slot: int, key: bytes, first: bytes, stamp: float, state: int) -> None:
        _SLOT.pack_into(self._mem, _HEADER.size + slot * _SLOT.size, key, first, stamp, state)

    def _find(self, key: bytes, now: float, window: float) -> tuple[int, int, bytes]:
        """(slot, state, first id) of `key`; for a key not known within the window, the slot
        to claim (EMPTY): a free or expired one, else the oldest final entry."""
        start = int.from_bytes(key[:8], "little") % self.slots
        victim, victim_age = start, -1.0
        mem, slots = self._mem, self.slots
        for step in range(PROBE):
            slot = (start + step) % slots
            if mem[_HEADER.size + slot * _SLOT.size + _STATE] == EMPTY:
                # Never used: the key is not further along. Take this slot, unless an earlier
                # one is as free (dead or freed).
                return (victim if victim_age == float("inf") else slot), EMPTY, b""
            stored, first, stamp, state = self._read(slot)
            age = now - stamp
            # A claim older than PENDING_LIMIT lost its session somehow: it no longer blocks.
            live = (state == PENDING and age < PENDING_LIMIT) or \
                (state == FINAL and age < window)
            if stored == key and live:
                return slot, state, first
            age = float("inf") if not live else age if state == FINAL else -1.0
            if age > victim_age:
                victim, victim_age = slot, age
        return victim, EMPTY, b""
