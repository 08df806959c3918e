"""Unit tests of the chunked DATA reader, fed at every chunk size from one byte up.

The reader sees the raw bytes a client sends after `354`: the message with dot-stuffing,
then the final `CRLF . CRLF`, then possibly pipelined commands. Whatever the chunking, it must
find the same end, produce the same un-stuffed bytes, the same leftover and the same error.
"""

from __future__ import annotations

import time

import pytest

from relay.smtp.data import DataError, DataReader

MAX_LINE = 998  # octets, without CRLF (RFC 5322 2.1.1)

BIG = 1 << 30


def chunkings(data: bytes, max_size: int | None = None) -> list[list[bytes]]:
    """`data` cut into chunks of every size from 1 to len(data) (or max_size), plus odd cuts."""
    top = len(data) if max_size is None else min(len(data), max_size)
    out = [[data[i:i + n] for i in range(0, len(data), n)] for n in range(1, top + 1)]
    out.append([data])
    # uneven cuts: 1, 2, 3, ... byte chunks, so that boundaries fall everywhere
    uneven, pos, n = [], 0, 1
    while pos < len(data):
        uneven.append(data[pos:pos + n])
        pos, n = pos + n, n % 7 + 1
    out.append(uneven)
    return out


def run(chunks: list[bytes], limit: int = BIG) -> DataReader:
    reader = DataReader(limit)
    for i, chunk in enumerate(chunks):
        done = reader.feed(chunk)
        assert done == reader.done
        if done:
            # whatever came after the final dot in this chunk is leftover; later chunks are
            # never fed (the server hands them to the command reader)
            rest = b"".join(chunks[i + 1:])
            reader.leftover += rest
            break
    return reader


def message(reader: DataReader) -> bytes:
    return b"".join(reader.parts)


def check_all(wire: bytes, *, expect: bytes | None = None, leftover: bytes = b"",
              error: DataError | None = None, limit: int = BIG,
              max_size: int | None = None) -> None:
    for chunks in chunkings(wire, max_size):
        reader = run(chunks, limit)
        sizes = sorted({len(c) for c in chunks})[:3]
        assert reader.done, f"final dot not found (chunk sizes {sizes})"
        assert reader.error == error, f"chunk sizes {sizes}"
        assert reader.leftover == leftover, f"chunk sizes {sizes}"
        if error is None:
            assert message(reader) == expect, f"chunk sizes {sizes}"
            assert reader.size == len(expect)  # type: ignore[arg-type]
        else:
            assert reader.parts == [], "a refused message keeps no bytes"


# --- final dot and un-stuffing ---------------------------------------------------------------

def test_simple_message_every_chunk_size() -> None:
    body = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
    check_all(body + b".\r\n", expect=body)


def test_empty_message() -> None:
    check_all(b".\r\n", expect=b"")


def test_empty_message_with_pipelined_command() -> None:
    check_all(b".\r\nQUIT\r\n", expect=b"", leftover=b"QUIT\r\n")


def test_only_a_blank_line() -> None:
    check_all(b"\r\n.\r\n", expect=b"\r\n")


def test_leftover_after_final_dot() -> None:
    body = b"a\r\nb\r\n"
    rest = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    check_all(body + b".\r\n" + rest, expect=body, leftover=rest)


def test_leftover_that_looks_like_another_final_dot() -> None:
    body = b"x\r\n"
    rest = b".\r\n.\r\n"
    check_all(body + b".\r\n" + rest, expect=body, leftover=rest)


def test_first_line_starting_with_dot_is_unstuffed() -> None:
    # the sender stuffed ".hidden" as "..hidden"
    check_all(b"..hidden\r\nnext\r\n.\r\n", expect=b".hidden\r\nnext\r\n")


def test_first_line_single_dot_word() -> None:
    # ".x" on the wire (a non-conforming client that did not stuff) loses its dot, as RFC 5321
    # 4.5.2 says a receiver must do
    check_all(b".x\r\n.\r\n", expect=b"x\r\n")


def test_double_dot_lines_are_unstuffed() -> None:
    wire = b"a\r\n..\r\nb\r\n...\r\n..x\r\n.\r\n"
    check_all(wire, expect=b"a\r\n.\r\nb\r\n..\r\n.x\r\n")


def test_stuffed_dot_line_does_not_end_data() -> None:
    # "..\r\n" is a stuffed "." line: it must not be mistaken for the end, at any boundary
    wire = b"before\r\n..\r\nafter\r\n.\r\n"
    check_all(wire, expect=b"before\r\n.\r\nafter\r\n")


def test_first_line_stuffed_single_dot() -> None:
    check_all(b"..\r\nend\r\n.\r\n", expect=b".\r\nend\r\n")


def test_dot_only_in_middle_of_line_untouched() -> None:
    check_all(b"a.b\r\n x.\r\n.\r\n", expect=b"a.b\r\n x.\r\n")


def test_message_with_many_lines_and_dots() -> None:
    lines = [b"." * (i % 4) + b"line %d" % i for i in range(60)]
    wire = b"".join(b"." + ln + b"\r\n" if ln.startswith(b".") else ln + b"\r\n" for ln in lines)
    expect = b"".join(ln + b"\r\n" for ln in lines)
    check_all(wire + b".\r\n", expect=expect, max_size=200)


def test_final_dot_straddles_every_boundary() -> None:
    body = b"x" * 50 + b"\r\n"
    wire = body + b".\r\nNOOP\r\n"
    for cut in range(1, len(wire)):
        reader = run([wire[:cut], wire[cut:]])
        assert reader.done and reader.error is None
        assert message(reader) == body
        assert reader.leftover == b"NOOP\r\n"


def test_not_done_before_final_dot() -> None:
    wire = b"a\r\n.\r"
    for chunks in chunkings(wire):
        reader = run(chunks)
        assert not reader.done


def test_large_message_in_realistic_chunks() -> None:
    line = b"0123456789" * 7 + b"\r\n"
    body = line * 30000 + b"..dot\r\n" + line
    wire = body + b".\r\n"
    expect = line * 30000 + b".dot\r\n" + line
    for size in (1, 4096, 65536, 1 << 18, 1000, 1001, 1002, 4093):
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        reader = run(chunks)
        assert reader.done and reader.error is None
        assert message(reader) == expect
        assert reader.size == len(expect)


def test_take_parts_streams_the_same_bytes() -> None:
    line = b"y" * 100 + b"\r\n"
    wire = line * 200 + b".\r\n"
    for size in (1, 7, 103, 5000):
        reader = DataReader(BIG)
        taken = []
        for i in range(0, len(wire), size):
            if reader.feed(wire[i:i + size]):
                break
            taken.extend(reader.take_parts())
        taken.extend(reader.take_parts())
        assert b"".join(taken) == line * 200


# --- errors ------------------------------------------------------------------------------------

BAD = DataError.BAD_ENDINGS


@pytest.mark.parametrize("wire", [
    b"a\rb",                 # bare CR inside a line
    b"a\x00b",               # NUL
    b"\rfirst",              # bare CR as the very first byte
    b"\x00",                 # NUL alone
    b"end\r",                # CR CR LF
    b"end\r\n\r",            # a line that is a bare CR
    b"x\r\n\x00\r\ny",        # NUL line between good lines
    b"lf\nthen\rcr",         # a bare LF is fine, the bare CR after it is not
], ids=["cr", "nul", "cr-first", "nul-alone", "cr-cr-lf", "cr-line", "nul-line", "lf-cr"])
def test_bad_endings(wire: bytes) -> None:
    check_all(wire + b"\r\n.\r\n", error=BAD)


@pytest.mark.parametrize(("wire", "expect"), [
    (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),                   # bare LF inside
    (b"\nfirst\r\n.\r\n", b"\r\nfirst\r\n"),               # bare LF as the very first byte
    (b"end\n\r\n.\r\n", b"end\r\n\r\n"),                 # LF, then an empty CRLF line
    (b"x\n..y\n.\n\r\n.\r\n", b"x\r\n.y\r\n\r\n\r\n"),     # dot-stuffing after bare LFs
    (b"unix\nlines\n" * 300 + b"\r\n.\r\n", b"unix\r\nlines\r\n" * 300 + b"\r\n"),
])
def test_bare_lf_line_ends_become_crlf(wire: bytes, expect: bytes) -> None:
    """As Postfix 3.9's smtpd_forbid_bare_newline = normalize."""
    check_all(wire, expect=expect, max_size=60)


def test_smuggling_lf_dot_crlf_does_not_end_data() -> None:
    # "\n.\r\n" is the classic SMTP smuggling end marker: it must not end the message; what
    # follows is message data, not a second transaction
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n"
    wire = b"Subject: a\r\n\r\nbody\n.\r\n" + smuggled + b".\r\nQUIT\r\n"
    check_all(wire, expect=b"Subject: a\r\n\r\nbody\r\n\r\n" + smuggled,
              leftover=b"QUIT\r\n", max_size=40)


@pytest.mark.parametrize("marker", [b"\n.\r\n", b"\r\n.\n", b"\n.\n"])
def test_lf_dot_markers_are_data_not_the_end(marker: bytes) -> None:
    wire = b"body" + marker + b"MAIL FROM:<e@x>\r\n.\r\nQUIT\r\n"
    for chunks in chunkings(wire, 30):
        reader = run(chunks)
        assert reader.done and reader.error is None and reader.leftover == b"QUIT\r\n"
        assert b"MAIL FROM:<e@x>\r\n" in message(reader)


@pytest.mark.parametrize("marker", [b"\r.\r\n", b"\r\n.\r"])
def test_bare_cr_markers_are_refused_not_ended(marker: bytes) -> None:
    wire = b"body" + marker + b"MAIL FROM:<e@x>\r\n.\r\n"
    check_all(wire, error=BAD, max_size=30)


def test_only_bare_lf_lines_keep_memory_bounded() -> None:
    reader = DataReader(BIG)
    for _ in range(1000):
        reader.feed(b"no crlf in this line\n" * 50)
    assert reader.error is None and not reader.done
    assert len(reader._buf) < 2000


def test_error_still_finds_final_dot_and_leftover() -> None:
    wire = b"x\ry\r\n" + b"z" * 3000 + b"\r\n.\r\nRSET\r\n"
    check_all(wire, error=BAD, leftover=b"RSET\r\n", max_size=64)


def test_line_of_998_octets_is_accepted() -> None:
    line = b"a" * MAX_LINE + b"\r\n"
    wire = line + line + b".\r\n"
    for size in [*range(1, 12), 997, 998, 999, 1000, 1001, 1002, 1003, 2000, len(wire)]:
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        reader = run(chunks)
        assert reader.error is None, f"chunk size {size}"
        assert message(reader) == line + line


def test_line_of_998_octets_stuffed_is_accepted() -> None:
    line = b"." + b"b" * (MAX_LINE - 1) + b"\r\n"
    check_all(b"." + line + b".\r\n", expect=line, max_size=40)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_lines_over_998_octets_are_accepted_as_they_are(where: str) -> None:
    """interface.md: accepted up to max_message_size; delivery re-encodes the part."""
    long_line = b"c" * (MAX_LINE + 1) + b"\r\n"
    xml = b"<Invoice>" + b"<Line>42</Line>" * 400 + b"</Invoice>\r\n"  # 6,019 octets
    short = b"short\r\n"
    body = {"first": long_line + xml + short, "middle": short + long_line + short,
            "last": short + xml + long_line}[where]
    for size in [1, 2, 3, 5, 64, 997, 998, 999, 1000, 1001, 1002, 1003, 4096, 70000]:
        wire = body + b".\r\nNOOP\r\n"
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        reader = run(chunks)
        assert reader.done and reader.error is None, f"chunk size {size}"
        assert reader.leftover == b"NOOP\r\n"
        assert message(reader) == body


def test_long_line_with_bare_lf_is_normalised() -> None:
    wire = b"x" * 3000 + b"\n" + b"y" * 1500 + b"\r\n.\r\n"
    check_all(wire, expect=b"x" * 3000 + b"\r\n" + b"y" * 1500 + b"\r\n", max_size=9)


def test_very_long_line_over_the_limit_keeps_memory_bounded() -> None:
    reader = DataReader(100_000)
    for _ in range(100):
        reader.feed(b"d" * 10000)
    assert reader.error is DataError.TOO_BIG
    assert len(reader._buf) < 20000
    assert reader.feed(b"\r\n.\r\n")
    assert reader.error is DataError.TOO_BIG and reader.parts == []


def test_one_line_of_many_mib_is_read_in_linear_time() -> None:
    reader = DataReader(BIG)
    chunk = b"e" * 65536
    started = time.perf_counter()
    for _ in range(400):  # 25 MiB, one line
        reader.feed(chunk)
    assert reader.feed(b"\r\n.\r\n") and reader.error is None
    assert time.perf_counter() - started < 2  # quadratic rescans took minutes
    assert reader.size == 400 * 65536 + 2


def test_long_line_and_a_fault_is_refused() -> None:
    wire = b"e" * 2000 + b"\r\na\rb\r\n.\r\nQUIT\r\n"
    for size in (1, 3, 100, 999, 1000, 1001, 5000):
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        reader = run(chunks)
        assert reader.error is BAD
        assert reader.parts == [] and reader.leftover == b"QUIT\r\n"


# --- size limit --------------------------------------------------------------------------------

def test_size_limit_exact_fits() -> None:
    body = b"12345678\r\n" * 10  # 100 octets
    check_all(body + b".\r\n", expect=body, limit=100, max_size=30)


def test_size_limit_one_over_is_refused() -> None:
    body = b"12345678\r\n" * 10 + b"x\r\n"
    check_all(body + b".\r\nQUIT\r\n", error=DataError.TOO_BIG, leftover=b"QUIT\r\n",
              limit=100, max_size=30)


def test_size_counts_unstuffed_bytes() -> None:
    body = b"..\r\n" * 25  # 100 octets on the wire, 75 after un-stuffing
    check_all(body + b".\r\n", expect=b".\r\n" * 25, limit=75, max_size=20)


def test_too_big_message_does_not_accumulate() -> None:
    reader = DataReader(1000)
    line = b"z" * 98 + b"\r\n"
    for _ in range(10000):
        reader.feed(line)
    assert reader.error is DataError.TOO_BIG
    assert reader.parts == []
    assert len(reader._buf) < 1000
    assert reader.feed(b".\r\n")


def test_error_replies_match_contract() -> None:
    assert DataError.BAD_ENDINGS.value == "554 5.6.0 Message contains bare CR or NUL"
    assert DataError.TOO_BIG.value == "552 5.3.4 Message size exceeds fixed limit"
