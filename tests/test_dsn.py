"""RFC 3464 DSNs: parsed back with the stdlib bytes parser, checked byte by byte for CRLF."""

from __future__ import annotations

import re
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import default

import pytest

from relay.delivery.dsn import FailedRecipient, build_dsn, original_headers

ORIGINAL = (
    b"Received: from app.example.test by relay.example.test\r\n"
    b"\tfor <buyer@shop.test>; Mon, 24 Nov 2025 16:00:00 +0000\r\n"
    b"From: Billing <billing@seller.test>\r\n"
    b"To: buyer@shop.test\r\n"
    b"Subject: Invoice 2025-0042\r\n"
    b"Message-ID: <inv-42@seller.test>\r\n"
    b"\r\n"
    b"--=_relay_ looks like a boundary but is body text\r\n"
    b"<Invoice>...</Invoice>\r\n"
)
MULTILINE = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces. https://support.example/mail/?p=NoSuchUser x1si"
)
FAILURES = [
    FailedRecipient("buyer@shop.test", "5.1.1", MULTILINE, "mx1.shop.test", 1_764_000_100),
    FailedRecipient("jörg@shop.test", "4.4.7", None, None, None),
    FailedRecipient("ap@other.test", "5.7.1", "554 5.7.1 rejected", "mx.other.test", 1_764_000_150),
]


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "relay.example.test",
        "queue_id": "4F2A9C01",
        "original_sender": "billing@seller.test",
        "arrival": 1_764_000_000,
        "original_headers": original_headers(ORIGINAL),
        "failures": FAILURES,
        "now": 1_764_000_200,
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def test_every_line_ends_with_crlf() -> None:
    data = build()
    assert data.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n", data) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", data) is None, "bare CR"
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_top_level_headers() -> None:
    data = build()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    msg = parse(data)
    assert (
        b"\r\nFrom: MAILER-DAEMON@relay.example.test (Mail Delivery System)\r\n" in b"\r\n" + head
    )
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.test"
    assert msg["To"].addresses[0].addr_spec == "billing@seller.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime.timestamp() == 1_764_000_200
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.test>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects


def test_three_parts_in_rfc3464_order() -> None:
    msg = parse(build())
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_boundary_never_occurs_in_content() -> None:
    data = build()
    boundary = parse(data).get_boundary()
    assert boundary is not None
    delimiter = b"--" + boundary.encode()
    # preamble-free positions: exactly 3 part delimiters and 1 close delimiter
    assert data.count(delimiter) == 4
    assert data.count(delimiter + b"--") == 1


def test_human_part_quotes_each_reply_verbatim() -> None:
    text = parse(build()).get_payload()[0]
    assert text.get_content_charset() == "utf-8"
    body = text.get_content()
    assert "<buyer@shop.test>: host mx1.shop.test said:" in body
    for line in MULTILINE.split("\r\n"):
        assert "    " + line in body
    assert "<jörg@shop.test>" in body
    assert "554 5.7.1 rejected" in body


def test_delivery_status_fields() -> None:
    status = parse(build()).get_payload()[1]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 4
    per_message, first, second, third = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["X-Queue-ID"] == "4F2A9C01"
    assert per_message["Arrival-Date"] == "Mon, 24 Nov 2025 16:00:00 +0000"

    assert first["Final-Recipient"] == "rfc822; buyer@shop.test"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx1.shop.test"
    assert first["Last-Attempt-Date"] == "Mon, 24 Nov 2025 16:01:40 +0000"

    # unknown fields are absent, not empty
    assert second["Status"] == "4.4.7"
    for field in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert second[field] is None

    assert third["Final-Recipient"] == "rfc822; ap@other.test"
    assert third["Diagnostic-Code"] == "smtp; 554 5.7.1 rejected"


def test_multiline_diagnostic_is_folded_verbatim() -> None:
    data = build()
    expected = b"Diagnostic-Code: smtp; " + MULTILINE.replace("\r\n", "\r\n ").encode() + b"\r\n"
    assert expected in data
    block = parse(data).get_payload()[1].get_payload()[1]
    # unfolding gives back the reply lines joined by a space
    assert re.sub(r"\r?\n ", " ", str(block["Diagnostic-Code"])) == "smtp; " + " ".join(
        MULTILINE.split("\r\n")
    )


def test_non_ascii_recipient_uses_rfc6533_utf8_type() -> None:
    data = build()
    assert b"Final-Recipient: utf-8; j\\x{F6}rg@shop.test\r\n" in data
    # the report itself stays 7-bit; only the human part carries 8-bit UTF-8
    status_part = data.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert status_part.isascii()


def test_rfc6533_escapes_plus_equals_and_backslash() -> None:
    failure = FailedRecipient("ü+tag=x@shop.test", "5.1.1", None, None, None)
    data = build(failures=[failure])
    assert b"Final-Recipient: utf-8; \\x{FC}\\x{2B}tag\\x{3D}x@shop.test\r\n" in data


def test_non_ascii_sender_header_is_rfc2047() -> None:
    data = build(original_sender="jörg@seller.test")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    to = parse(data)["To"]
    assert "jörg@seller.test" in str(to)
    # an IDN domain with an ASCII local part becomes a plain A-label address
    data = build(original_sender="billing@bücher.test")
    assert b"To: <billing@xn--bcher-kva.test>\r\n" in data


def test_original_headers_part_is_verbatim() -> None:
    part = parse(build()).get_payload()[2]
    payload = part.get_payload(decode=True)
    assert payload == ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"Invoice>" not in build()  # no body content leaks into the DSN


def test_lf_only_original_headers_become_crlf() -> None:
    data = build(original_headers=b"From: a@b.test\nSubject: x\n\nbody\n")
    assert b"\r\n\r\nFrom: a@b.test\r\nSubject: x\r\n\r\n--" in data
    assert re.search(rb"(?<!\r)\n", data) is None


def test_all_ascii_dsn_is_7bit() -> None:
    data = build(failures=[FAILURES[0]])
    assert data.isascii()
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"
    assert b"Content-Transfer-Encoding: 8bit" not in data


def test_delay_warning_subject() -> None:
    failure = FailedRecipient("b@y.test", "4.4.1", None, None, None, action="delayed")
    msg = parse(build(failures=[failure]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "delayed"


def test_null_sender_never_gets_a_dsn() -> None:
    with pytest.raises(ValueError):
        build(original_sender="")


def test_original_headers_of_stored_message() -> None:
    assert original_headers(ORIGINAL) == ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    assert original_headers(b"\r\nbody only") == b""


def test_original_headers_capped_at_64k_on_a_line_boundary() -> None:
    line = b"X-Long: " + b"a" * 990 + b"\r\n"
    message = line * 200 + b"\r\nbody"
    block = original_headers(message)
    assert len(block) <= 64 * 1024
    assert block.endswith(b"\r\n\r\n")
    assert block[:-2].endswith(line)
    assert block.count(b"\r\n") == block.count(b"X-Long") + 1


def _walk_types(message: Message) -> list[str]:
    return [part.get_content_type() for part in message.walk()]


def test_parses_cleanly_without_defects() -> None:
    msg = parse(build())
    assert _walk_types(msg)[0] == "multipart/report"
    assert all(not part.defects for part in msg.walk())
