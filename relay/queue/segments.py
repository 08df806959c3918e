"""Spool segments: accepted messages appended in batches to preallocated files, one sync a batch.

A segment is a file in `queue.path/spool/`, created at its full size (fallocate), then synced
with its folder entry before the first message goes in, so that appending a batch needs one
fdatasync and no folder sync. Each message is one record:

    header  "IRM1" crc32 envelope_len message_len   (4 + 4 + 4 + 8 bytes, little-endian)
    envelope JSON, then the message bytes exactly as accepted

`crc32` covers the envelope, the message and then the two lengths (in that order, so that a
streamed message can be checksummed as it arrives). Records are written in order and
a batch is acknowledged only after its sync, so after a crash or a power cut every
acknowledged record is intact and the first record that is not (zeros, a torn header, a bad
checksum) marks the end of what was ever acknowledged in that segment.

A large message (streamed while it arrives) gets a segment of its own, named with a
".one" suffix, written as it arrives and completed by writing its header last.

Segments are the truth: the index is rebuilt from them. A segment is removed once it is sealed
(no writer appends to it any more) and every message in it is final.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"IRM1"
HEADER = struct.Struct("<4sIIQ")
SEGMENT_SIZE = 32 << 20
SUFFIX = ".seg"
SINGLE_SUFFIX = ".one"
_LENGTHS = struct.Struct("<IQ")
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_counter = itertools.count()


class SegmentCorrupt(Exception):
    """A record that cannot be read back (damaged after it was acknowledged)."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a message's bytes are: segment file name, offset and length of the message."""

    segment: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Record:
    """One message as found by a scan of a segment."""

    envelope: bytes
    location: Location
    end: int  # offset just past this record: where the next one starts


def record_header(envelope: bytes, parts: Sequence[bytes], length: int) -> bytes:
    crc = zlib.crc32(envelope)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return _header(crc, len(envelope), length)


def _header(crc: int, env_len: int, msg_len: int) -> bytes:
    crc = zlib.crc32(_LENGTHS.pack(env_len, msg_len), crc)
    return HEADER.pack(MAGIC, crc, env_len, msg_len)


def segment_name(writer: int) -> str:
    """Names sort by creation time; the writer number and a counter keep them unique."""
    return f"{time.time_ns():016x}-{writer:02d}-{next(_counter) % 10000:04d}"


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: write a temporary file, fsync, rename over, fsync the
    folder. A crash leaves the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def make_spool_dir(spool_dir: Path) -> None:
    """Create the spool folder if needed, and make it and the queue folder findable after a
    power cut. A new folder's name is on disk only once the folder holding it is synced: `serve`
    creates a missing queue folder, and the segments' own folder syncs cover only the spool.
    Called once at startup, before any mail is taken."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    sync_dir(spool_dir.parent)
    for folder in spool_dir.parent.resolve().parents:
        with contextlib.suppress(OSError):  # above the queue folder: best effort (permissions)
            sync_dir(folder)


def write_all(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:
    """pwritev everything at `offset` (short writes continue where they stopped; at most
    IOV_MAX buffers go into one call, as the kernel refuses more with EINVAL)."""
    pending = [memoryview(p) for p in parts if len(p)]
    while pending:
        written = os.pwritev(fd, pending[:IOV_MAX], offset)
        offset += written
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]


class _Open:
    """A segment being appended to."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.offset = 0

    def room(self) -> int:
        return self.size - self.offset


class SegmentWriter:
    """Appends batches of messages for one intake process. Blocking: use it from one thread.

    After every batch the touched segments are fdatasynced (a segment is filled before the
    next one is used, so that is one sync per batch, two when a batch crosses into a new
    segment). A spare segment is prepared ahead, so that rolling over costs no file creation
    on the acknowledgement path."""

    def __init__(self, spool_dir: Path, writer: int, *, size: int = SEGMENT_SIZE,
                 sync: Callable[[int], None] = os.fdatasync,
                 on_sealed: Callable[[str], None] | None = None) -> None:
        self.dir = spool_dir
        self.writer = writer
        self.size = size
        self._sync = sync
        self._on_sealed = on_sealed
        self._current: _Open | None = None
        self._spare: _Open | None = None

    def append(self, batch: Sequence[tuple[bytes, Sequence[bytes]]]) -> list[Location]:
        """Write (envelope JSON, message parts) records and sync them.

        Returns where each message is. Raises OSError when the write or the sync failed: then
        nothing of the batch may be acknowledged, and the segment is sealed where it was,
        because after a failed sync the kernel may have dropped pages it said it would write."""
        touched: list[_Open] = []
        locations: list[Location] = []
        try:
            for envelope, parts in batch:
                length = sum(map(len, parts))
                need = HEADER.size + len(envelope) + length
                segment = self._current
                if segment is None or segment.room() < need:
                    if segment in touched:  # full: its records are synced before it is closed
                        self._sync(segment.fd)
                        touched.remove(segment)
                    segment = self._roll(need)
                if segment not in touched:
                    touched.append(segment)
                header = record_header(envelope, parts, length)
                write_all(segment.fd, [header, envelope, *parts], segment.offset)
                start = segment.offset + HEADER.size + len(envelope)
                locations.append(Location(segment.name, start, length))
                segment.offset += need
            for segment in touched:
                self._sync(segment.fd)
        except BaseException:
            self._abandon_current()
            raise
        return locations

    @property
    def needs_spare(self) -> bool:
        return self._spare is None

    def prepare_spare(self) -> None:
        """Create the next segment now (it is on the acknowledgement path otherwise)."""
        if self._spare is None:
            self._spare = self._create()

    def close(self) -> None:
        for segment in (self._current, self._spare):
            if segment is not None:
                os.close(segment.fd)
        if self._current is not None and self._on_sealed is not None:
            self._on_sealed(self._current.name)
        self._current = self._spare = None

    def _roll(self, need: int) -> _Open:
        """Seal the current segment; the next one, with room for `need` bytes."""
        if self._current is not None:
            self._seal(self._current)
        segment = self._spare if self._spare is not None else self._create()
        self._spare = None
        if segment.size < need:  # a record bigger than a segment: a file just for it
            os.close(segment.fd)
            os.unlink(self.dir / segment.name)
            segment = self._create(size=need)
        self._current = segment
        return segment

    def _create(self, size: int | None = None) -> _Open:
        size = size or self.size
        name = segment_name(self.writer) + SUFFIX
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
            sync_dir(self.dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.dir / name)
            raise
        return _Open(name, fd, size)

    def _seal(self, segment: _Open) -> None:
        os.close(segment.fd)
        self._current = None
        if self._on_sealed is not None:
            self._on_sealed(segment.name)

    def _abandon_current(self) -> None:
        if self._current is not None:
            self._seal(self._current)


class SingleWriter:
    """A large message streamed into a segment of its own while it arrives.

    The header goes in last: until then the file reads as empty (zeros) and recovery removes
    it. Blocking: call from a worker thread."""

    def __init__(self, spool_dir: Path, writer: int, envelope: bytes) -> None:
        self.dir = spool_dir
        self.name = segment_name(writer) + SINGLE_SUFFIX
        self.envelope = envelope
        self.fd = os.open(spool_dir / self.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.offset = HEADER.size + len(envelope)
        self.length = 0
        self._crc = zlib.crc32(envelope)
        try:
            write_all(self.fd, [b"\0" * HEADER.size, envelope], 0)
        except BaseException:
            self.discard()
            raise

    def append(self, parts: Sequence[bytes]) -> None:
        write_all(self.fd, parts, self.offset + self.length)
        for part in parts:
            self._crc = zlib.crc32(part, self._crc)
            self.length += len(part)

    def finish(self, sync: Callable[[int], None] = os.fdatasync) -> Location:
        """Write the header and sync the file and its folder entry; the message's location."""
        write_all(self.fd, [_header(self._crc, len(self.envelope), self.length)], 0)
        sync(self.fd)
        os.close(self.fd)
        self.fd = -1
        sync_dir(self.dir)
        return Location(self.name, HEADER.size + len(self.envelope), self.length)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / self.name)


# --- reading ---------------------------------------------------------------------------------

def scan(path: Path, start: int = 0) -> Iterator[Record]:
    """Every intact record of a segment from offset `start`, in order, up to the first one
    that is not (the end of what was acknowledged)."""
    name = path.name
    with open(path, "rb") as f:
        offset = start
        while True:
            f.seek(offset)
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                return
            magic, crc, env_len, msg_len = HEADER.unpack(head)
            if magic != MAGIC:
                return
            envelope = f.read(env_len)
            check = zlib.crc32(envelope)
            remaining = msg_len
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                check = zlib.crc32(chunk, check)
                remaining -= len(chunk)
            check = zlib.crc32(_LENGTHS.pack(env_len, msg_len), check)
            if check != crc or len(envelope) != env_len:
                return
            body = offset + HEADER.size + env_len
            yield Record(envelope, Location(name, body, msg_len), body + msg_len)
            offset = body + msg_len


class SegmentReader:
    """Reads message bytes by location, keeping the segments it reads open."""

    def __init__(self, spool_dir: Path, max_open: int = 64) -> None:
        self.dir = spool_dir
        self.max_open = max_open
        self._fds: dict[str, int] = {}

    def read(self, location: Location) -> bytes:
        fd = self._fd(location.segment)
        data = os.pread(fd, location.length, location.offset)
        if len(data) != location.length:
            raise SegmentCorrupt(f"{location.segment}: short read at {location.offset}")
        return data

    def forget(self, segment: str) -> None:
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, segment: str) -> int:
        fd = self._fds.get(segment)
        if fd is None:
            if len(self._fds) >= self.max_open:
                self.forget(next(iter(self._fds)))
            fd = self._fds[segment] = os.open(self.dir / segment, os.O_RDONLY)
        return fd


def read_at(spool_dir: Path, location: Location) -> bytes:
    """One read without keeping the segment open (for a thread or a command)."""
    with open(spool_dir / location.segment, "rb") as f:
        data = os.pread(f.fileno(), location.length, location.offset)
    if len(data) != location.length:
        raise SegmentCorrupt(f"{location.segment}: short read at {location.offset}")
    return data


def segment_files(spool_dir: Path) -> list[str]:
    """Segment names in creation order."""
    return sorted(entry.name for entry in os.scandir(spool_dir)
                  if entry.name.endswith((SUFFIX, SINGLE_SUFFIX)) and entry.is_file())
