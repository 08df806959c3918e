"""Notices from intake to the delivery process, one line each over a pipe per intake process.

    M <segment> <offset> <length> <record end> <envelope JSON>\\n   a message was acknowledged
    S <segment>\\n                                                  no more messages go there

The delivery process owns the queue index (one writer for the whole relay): it indexes and
schedules each message from its notice. A notice is sent only after the 250, so a lost notice
(the delivery process died) loses nothing: startup recovery finds the message in its segment.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay import log
from relay.queue.envelope import Envelope
from relay.queue.segments import Location


@dataclass(frozen=True, slots=True)
class Committed:
    """A message made durable: its envelope and where its bytes are (its record ends there
    too: the message is the last part of a record)."""

    envelope: Envelope
    location: Location

    @property
    def priority(self) -> str:
        """high | normal | bulk, as intake decided it (kept in the envelope)."""
        return self.envelope.priority


def encode(committed: Iterable[tuple[bytes, Location]]) -> bytes:
    """Notice lines for (envelope JSON, location) of acknowledged messages."""
    return b"".join(b"M %s %d %d %s\n" % (loc.segment.encode(), loc.offset, loc.length, env)
                    for env, loc in committed)


def encode_sealed(segment: str) -> bytes:
    return b"S %s\n" % segment.encode()


class NoticeReader:
    """Splits what arrives on a pipe into notices; a partial line waits for the rest."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> tuple[list[Committed], list[str]]:
        """(messages, sealed segments) from the complete lines received so far."""
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        messages: list[Committed] = []
        sealed: list[str] = []
        for line in lines:
            try:
                if line.startswith(b"M "):
                    _, segment, offset, length, env = line.split(b" ", 4)
                    messages.append(Committed(Envelope.from_json(env), Location(
                        segment.decode(), int(offset), int(length))))
                elif line.startswith(b"S "):
                    sealed.append(line[2:].decode())
            except (ValueError, TypeError, KeyError) as exc:
                # Never expected; that message is indexed from its segment at the next start.
                log.event("notice_unreadable", level=40, error=f"{type(exc).__name__}: {exc}")
        return messages, sealed


class NoticeWriter:
    """Intake's end of its notice pipe: never blocks (asyncio buffers what the pipe cannot
    take); once the delivery process is gone, notices are dropped (the relay is stopping,
    and startup recovery indexes those messages from their segments)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._transport: asyncio.WriteTransport | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_write_pipe(
            _Quiet, os.fdopen(self.fd, "wb", buffering=0))

    def committed(self, items: Iterable[tuple[bytes, Location]]) -> None:
        self._write(encode(items))

    def sealed(self, names: Iterable[str]) -> None:
        self._write(b"".join(encode_sealed(n) for n in names))

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing() and data:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _Quiet(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        pass


def read_pipes(fds: Iterable[int], on_notices: Callable[[list[Committed], list[str]], None],
               on_all_closed: Callable[[], None]) -> None:
    """The delivery process's end: feed every notice that arrives on `fds` to `on_notices`."""
    loop = asyncio.get_running_loop()
    open_fds = set(fds)
    readers = {fd: NoticeReader() for fd in open_fds}

    def readable(fd: int) -> None:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not data:  # that intake process is gone
            loop.remove_reader(fd)
            open_fds.discard(fd)
            if not open_fds:
                on_all_closed()
            return
        on_notices(*readers[fd].feed(data))

    for fd in open_fds:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable, fd)
