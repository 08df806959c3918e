"""Disk space: the intake's free-space floor and the delivery's emergency reserve.

Intake stops taking mail (452 4.3.1) while free space on the queue's filesystem is below
`[queue] min_free_space`, so that delivery can always record outcomes and free spool files.
If the disk fills anyway (another program, a floor of "0"), delivery frees a reserve file it
keeps in the queue folder, so that its index writes can still succeed and the queue drains
instead of deadlocking.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

RESERVE_NAME = "reserve"
RESERVE_MAX = 8 << 20
RESERVE_MIN = 512 << 10  # enough for the index's write-ahead log to cycle twice


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def total_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


class FreeSpaceGuard:
    """Is there room for new mail? A statvfs and a stat, at most once per CACHE_SECONDS when
    there is plenty of room.

    Below the floor, or while delivery has had to spend its reserve (the reserve file it
    created at startup is gone), new mail waits: otherwise intake would take the freed room
    and delivery could again not record anything."""

    # A burst of messages pays one check: two system calls per message were ~6 us of the
    # intake's CPU. Only a comfortable answer is reused: with HEADROOM free above the floor,
    # the disk cannot fill (and delivery cannot spend its reserve) within CACHE_SECONDS
    # unless something writes 300 MB/s. Near the floor or the reserve, every message checks.
    CACHE_SECONDS = 0.2
    HEADROOM = 64 << 20

    def __init__(self, path: Path, floor: int, reserve: Path | None = None) -> None:
        self.path = path
        self.floor = floor
        self.reserve = reserve
        self._until = 0.0  # monotonic time until which "ok" needs no new check

    def ok(self) -> bool:
        now = time.monotonic()
        if now < self._until:
            return True
        if self.reserve is not None and not self.reserve.exists():
            return False
        try:
            free = free_bytes(self.path)
        except OSError:
            return True  # cannot tell: let the write itself fail with 451
        if free >= max(self.floor, 0) + self.HEADROOM:
            self._until = now + self.CACHE_SECONDS
        return self.floor <= 0 or free >= self.floor


def floor_bytes(path: Path, min_free_space: object) -> int:
    """`min_free_space` as bytes: an int, or a Percent of the filesystem's size."""
    value = getattr(min_free_space, "value", None)
    if value is not None:
        return int(total_bytes(path) * float(value) / 100)
    return int(min_free_space)  # type: ignore[call-overload]


class Reserve:
    """A file of zeros kept in the queue folder, deleted when the disk is full."""

    def __init__(self, root: Path) -> None:
        self.path = root / RESERVE_NAME
        total = total_bytes(root)
        self.size = min(RESERVE_MAX, max(total // 20, min(RESERVE_MIN, total // 4)))
        self.released = False

    def ensure(self, margin: float = 1.5) -> bool:
        """Create the reserve if it is missing and there is clearly room for it: `margin`
        times its size free (a reserve taken back too soon is spent again at once)."""
        if self.path.exists() and self.path.stat().st_size >= self.size:
            self.released = False
            return True
        if free_bytes(self.path.parent) < self.size * margin:
            return False
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"\0" * self.size)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self.released = False
        return True

    def release(self) -> bool:
        """Free the reserve; True if there was one to free."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self.released = True
        return True


def is_disk_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return getattr(exc, "errno", None) == 28 or "disk is full" in text or "no space" in text
