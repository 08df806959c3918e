"""Spool files: one file per message, holding its envelope, its bytes and recipients' final states.

Layout: a fixed 34-byte header line `IRSPOOL1 <envelope length> <message length>\\n`, the envelope
as JSON and a newline, the message bytes, then appended state records `F <index> <state>\\n`
written as recipients reach a final state. A file whose header still carries the sentinel length,
or which is shorter than its header says, was never acknowledged and is removed at startup.
The spool is the source of truth: the SQLite index can be rebuilt from it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.queue.envelope import FINAL_STATES, Envelope

MAGIC = b"IRSPOOL1"
HEADER_LEN = len(MAGIC) + 1 + 10 + 1 + 12 + 1
INCOMPLETE = 999_999_999_999  # message length sentinel while a large message is still streaming


def _header(envelope_len: int, message_len: int) -> bytes:
    return b"%s %010d %012d\n" % (MAGIC, envelope_len, message_len)


class SpoolCorrupt(Exception):
    """A spool file that cannot be read back: `unfinished` (cut short, header never completed:
    it was never acknowledged unless the index knows it) or damaged."""

    def __init__(self, message: str, *, unfinished: bool = True) -> None:
        super().__init__(message)
        self.unfinished = unfinished


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    envelope: Envelope
    message_offset: int
    message_length: int
    finals: dict[int, str]   # recipient index -> final state, from the appended records


class Spool:
    """The folder of spool files. Methods do blocking I/O: call them from worker threads."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "spool"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, queue_id: str) -> Path:
        return self.dir / queue_id

    # --- writing -------------------------------------------------------------------------

    def create(self, envelope: Envelope, parts: Sequence[bytes], *, complete: bool,
               env: bytes | None = None) -> int:
        """Create the file with the envelope and the first message parts; return its fd.

        `env` is `envelope.to_json()` when the caller made it already. With complete=False the
        header carries the sentinel length until `finish` is called (used when a large message
        is streamed in several writes)."""
        env = (envelope.to_json() if env is None else env) + b"\n"
        length = sum(map(len, parts)) if complete else INCOMPLETE
        fd = os.open(self.path(envelope.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, [_header(len(env), length), env, *parts])
        except BaseException:
            os.close(fd)
            self.remove(envelope.id)
            raise
        return fd

    @staticmethod
    def append(fd: int, parts: Sequence[bytes]) -> None:
        _write_all(fd, parts)

    @staticmethod
    def finish(fd: int, envelope_len: int, message_len: int) -> None:
        """Replace the sentinel length once every part of a streamed message is written."""
        os.pwrite(fd, _header(envelope_len, message_len), 0)

    def sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark_final(self, queue_id: str, states: Iterable[tuple[int, str]], *, sync: bool) -> None:
        """Append final recipient states so that the index can be rebuilt without re-sending."""
        records = b"".join(b"F %d %s\n" % (idx, state.encode()) for idx, state in states)
        fd = os.open(self.path(queue_id), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, records)
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def remove(self, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(queue_id))

    # --- reading -------------------------------------------------------------------------

    def read(self, queue_id: str) -> SpoolEntry:
        """Envelope and final states, without reading the message bytes."""
        with open(self.path(queue_id), "rb") as f:
            env_len, msg_len = _parse_header(f.read(HEADER_LEN), queue_id)
            env_raw = f.read(env_len)
            if os.fstat(f.fileno()).st_size < HEADER_LEN + env_len + msg_len:
                raise SpoolCorrupt(f"{queue_id}: truncated")
            f.seek(HEADER_LEN + env_len + msg_len)
            tail = f.read()
        fake = _header(env_len, 0) + env_raw
        entry = _parse(fake + tail, queue_id, include_message=False)[0]
        return SpoolEntry(entry.envelope, HEADER_LEN + env_len, msg_len, entry.finals)

    def read_message(self, queue_id: str) -> bytes:
        """The message bytes exactly as accepted (with our Received header)."""
        with open(self.path(queue_id), "rb") as f:
            head = f.read(HEADER_LEN)
            env_len, msg_len = _parse_header(head, queue_id)
            f.seek(HEADER_LEN + env_len)
            data = f.read(msg_len)
        if len(data) != msg_len:
            raise SpoolCorrupt(f"{queue_id}: truncated message")
        return data

    def read_all(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        with open(self.path(queue_id), "rb") as f:
            return _parse(f.read(), queue_id, include_message=True)

    def ids(self) -> Iterator[str]:
        for entry in os.scandir(self.dir):
            if entry.is_file() and not entry.name.startswith("."):
                yield entry.name


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    pending = [memoryview(p) for p in parts if p]
    while pending:
        written = os.writev(fd, pending)
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]


def _parse_header(head: bytes, queue_id: str) -> tuple[int, int]:
    fields = head.split()
    if len(head) != HEADER_LEN or len(fields) != 3 or fields[0] != MAGIC:
        raise SpoolCorrupt(f"{queue_id}: bad header")
    env_len, msg_len = int(fields[1]), int(fields[2])
    if msg_len == INCOMPLETE:
        raise SpoolCorrupt(f"{queue_id}: incomplete (never acknowledged)")
    return env_len, msg_len


def _parse(raw: bytes, queue_id: str, *, include_message: bool) -> tuple[SpoolEntry, bytes]:
    env_len, msg_len = _parse_header(raw[:HEADER_LEN], queue_id)
    msg_start = HEADER_LEN + env_len
    msg_end = msg_start + msg_len
    if len(raw) < msg_end:
        raise SpoolCorrupt(f"{queue_id}: truncated")
    try:
        envelope = Envelope.from_json(raw[HEADER_LEN:msg_start])
    except (ValueError, TypeError, KeyError) as exc:
        raise SpoolCorrupt(f"{queue_id}: bad envelope ({exc})", unfinished=False) from None
    finals: dict[int, str] = {}
    for line in raw[msg_end:].split(b"\n"):
        parts = line.split()
        # A torn last record (power cut mid-append) is ignored: that recipient is retried.
        if len(parts) == 3 and parts[0] == b"F" and parts[1].isdigit():
            state = parts[2].decode()
            if state in FINAL_STATES:
                finals[int(parts[1])] = state
    message = raw[msg_start:msg_end] if include_message else b""
    return SpoolEntry(envelope, msg_start, msg_len, finals), message
