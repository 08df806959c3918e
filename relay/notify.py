"""systemd's notify protocol (sd_notify(3)) and the watchdog that speaks for every process.

The unit is `Type=notify` with `NotifyAccess=main`: only the main process talks to systemd.
systemd keeps one watchdog per unit, so the main process sends WATCHDOG=1 only while each
child (delivery, the second intake process) has written a fresh heartbeat into a shared page
from its own event loop: a hung delivery loop stops the pings, and systemd restarts the relay.
Without $NOTIFY_SOCKET (not run by systemd) every call here does nothing.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable

_SLOT = struct.Struct("d")  # one CLOCK_MONOTONIC reading per child (system-wide clock)


def notify(*states: str) -> bool:
    """Send `READY=1`, `WATCHDOG=1`, ... to $NOTIFY_SOCKET; False when there is none or the
    datagram could not be sent (never blocks: systemd not listening must not stall the loop)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # the abstract namespace: a leading NUL byte on the wire
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(states).encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds (sd_watchdog_enabled), or None when the watchdog is
    off or meant for another process ($WATCHDOG_PID)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Heartbeats:
    """One timestamp slot per child in a page shared across fork(): children beat, the main
    process checks. Made before the fork; the page is anonymous, so nothing touches the disk."""

    def __init__(self, children: int, interval: float) -> None:
        self.interval = interval          # between two WATCHDOG=1
        self.period = interval / 4        # between two beats: a missed beat or three is fine
        self._page = mmap.mmap(-1, max(1, children) * _SLOT.size)
        self.children = children
        now = time.monotonic()
        for slot in range(children):      # fresh until the child's loop has had time to beat
            _SLOT.pack_into(self._page, slot * _SLOT.size, now)

    def beat(self, slot: int) -> None:
        _SLOT.pack_into(self._page, slot * _SLOT.size, time.monotonic())

    async def beat_forever(self, slot: int) -> None:
        """In a child, on its event loop: a loop that stops turning stops beating."""
        while True:
            self.beat(slot)
            await asyncio.sleep(self.period)

    def stale(self) -> list[int]:
        """The children whose last beat is older than one watchdog interval."""
        now = time.monotonic()
        return [slot for slot in range(self.children)
                if now - _SLOT.unpack_from(self._page, slot * _SLOT.size)[0] > self.interval]

    async def watchdog(self, on_stale: Callable[[list[int]], None] | None = None) -> None:
        """In the main process: WATCHDOG=1 every interval while every child is alive; when
        one is not, no ping (systemd kills and restarts the unit after WatchdogSec)."""
        was_stale: list[int] = []
        while True:
            stale = self.stale()
            if not stale:
                notify("WATCHDOG=1")
            elif stale != was_stale and on_stale is not None:
                on_stale(stale)
            was_stale = stale
            await asyncio.sleep(self.interval)
