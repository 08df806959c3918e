"""Spool segments: batches appended with one sync, read back by location, scanned after a
crash up to the first record that was never acknowledged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.queue.segments import (
    HEADER,
    SegmentReader,
    SegmentWriter,
    SingleWriter,
    scan,
    segment_files,
)


def records(n: int, size: int = 100, tag: str = "m") -> list[tuple[bytes, list[bytes]]]:
    out = []
    for i in range(n):
        body = f"{tag}{i}:".encode() + b"x" * size + b"\r\n"
        out.append((b'{"id":"%s%d"}' % (tag.encode(), i), [body[:10], body[10:]]))
    return out


def test_batch_is_one_sync_and_reads_back(tmp_path: Path) -> None:
    syncs: list[int] = []
    writer = SegmentWriter(tmp_path, 0, size=1 << 20, sync=syncs.append)
    batch = records(20)
    locations = writer.append(batch)
    assert len(syncs) == 1
    reader = SegmentReader(tmp_path)
    for (_, parts), location in zip(batch, locations, strict=True):
        assert reader.read(location) == b"".join(parts)
    [name] = segment_files(tmp_path)
    found = list(scan(tmp_path / name))
    assert [r.envelope for r in found] == [env for env, _ in batch]
    assert [r.location for r in found] == locations
    writer.close()


def test_rolls_into_a_new_segment_and_seals_the_old(tmp_path: Path) -> None:
    sealed: list[str] = []
    writer = SegmentWriter(tmp_path, 1, size=4096, on_sealed=sealed.append)
    writer.prepare_spare()
    locations = [loc for _ in range(10) for loc in writer.append(records(5, 300))]
    names = segment_files(tmp_path)
    assert len(names) > 2 and sealed == sorted(sealed)
    assert {loc.segment for loc in locations} <= set(names)
    total = sum(len(list(scan(tmp_path / n))) for n in names)
    assert total == 50
    writer.close()
    assert len(sealed) == len({loc.segment for loc in locations})


def test_a_record_larger_than_a_segment_gets_its_own_file(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, 0, size=4096)
    [big] = writer.append(records(1, 20_000))
    assert os.path.getsize(tmp_path / big.segment) >= 20_000
    assert SegmentReader(tmp_path).read(big).startswith(b"m0:xxx")


@pytest.mark.parametrize("damage", ["torn_tail", "zeros", "flipped_byte"])
def test_scan_stops_at_the_first_damaged_record(tmp_path: Path, damage: str) -> None:
    writer = SegmentWriter(tmp_path, 0, size=1 << 20)
    first = writer.append(records(3, tag="a"))
    second = writer.append(records(3, tag="b"))
    writer.close()
    path = tmp_path / first[0].segment
    data = bytearray(path.read_bytes())
    victim = second[1].offset - 20   # inside the second record of the second batch
    if damage == "torn_tail":
        data[victim:] = b"\0" * (len(data) - victim)
    elif damage == "zeros":
        start = second[1].offset - HEADER.size - 11   # the record header and its envelope
        data[start:second[1].offset] = b"\0" * (HEADER.size + 11)
    else:
        data[second[1].offset + 5] ^= 0x40
    path.write_bytes(bytes(data))
    found = [r.envelope for r in scan(path)]
    assert found == [b'{"id":"a0"}', b'{"id":"a1"}', b'{"id":"a2"}', b'{"id":"b0"}']


def test_single_writer_streams_then_completes(tmp_path: Path) -> None:
    single = SingleWriter(tmp_path, 0, b'{"id":"big"}')
    assert list(scan(tmp_path / single.name)) == []   # nothing readable before the header
    for i in range(5):
        single.append([b"chunk%d " % i, b"y" * 1000])
    location = single.finish()
    [record] = list(scan(tmp_path / single.name))
    assert record.envelope == b'{"id":"big"}' and record.location == location
    assert SegmentReader(tmp_path).read(location).startswith(b"chunk0 yyy")


def test_failed_sync_seals_the_segment(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    writer = SegmentWriter(tmp_path, 0, size=1 << 20, sync=failing)
    with pytest.raises(OSError):
        writer.append(records(2))
    writer._sync = os.fdatasync  # the disk is back: the next batch goes to a fresh segment
    [location] = writer.append(records(1, tag="c"))
    assert len(segment_files(tmp_path)) == 2 and location.offset == HEADER.size + 11


def test_a_message_in_more_pieces_than_one_system_call_takes(tmp_path: Path) -> None:
    """A large message read in small chunks arrives in more than IOV_MAX (1024) pieces."""
    writer = SegmentWriter(tmp_path, 0, size=8 << 20)
    parts = [b"%05d" % j + bytes([65 + j % 26]) * 95 for j in range(2500)]
    [location] = writer.append([(b'{"id":"many"}', parts)])
    assert SegmentReader(tmp_path).read(location) == b"".join(parts)
    assert len(list(scan(tmp_path / location.segment))) == 1


def test_a_batch_that_fills_a_segment_syncs_it_before_moving_on(tmp_path: Path) -> None:
    synced: list[int] = []
    closed: list[int] = []
    writer = SegmentWriter(tmp_path, 0, size=4096, sync=synced.append,
                           on_sealed=lambda name: closed.append(len(synced)))
    locations = writer.append(records(12, 500))   # about 7 KB: crosses into a second segment
    assert len({loc.segment for loc in locations}) >= 2
    assert closed and closed[0] == 1  # the first segment was synced before it was closed
    assert len(synced) == len({loc.segment for loc in locations})
