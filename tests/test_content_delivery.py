"""Content repair end to end: the real relay process delivers Chinese invoices to a sink that
does not announce 8BITMIME and to one that does; what arrives decodes to what was sent."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from relayproc import RelayProcess
from sink import Received, Sink
from test_content import (
    INVOICE_TEXT,
    INVOICE_TEXT_TRAD,
    PDF,
    crlf,
    einvoice_xml,
    invoice_with_pdf,
    plain,
)


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    with Sink(eight_bit_mime=False) as seven, Sink() as eight:
        yield seven, eight


@pytest.fixture
def relay(relay_factory: type, sinks: tuple[Sink, Sink]) -> RelayProcess:
    seven, eight = sinks
    return relay_factory(routes={"seven.test": [seven.address],  # type: ignore[no-any-return]
                                 "eight.test": [eight.address]}).start()


def send(relay: RelayProcess, data: bytes, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo("app.sender.test")
        options = [] if data.isascii() else ["BODY=8BITMIME"]
        client.sendmail("billing@sender.test", [rcpt], data, mail_options=options)


def after_received(got: Received) -> bytes:
    assert got.data.startswith(b"Received: ")
    end = got.data.index(b"\r\n", got.data.index(b";"))  # the relay's one Received field
    while got.data[end + 2:end + 3] in (b" ", b"\t"):
        end = got.data.index(b"\r\n", end + 2)
    return got.data[end + 2:]


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def fits(data: bytes) -> bool:
    return max(len(line) for line in data.split(b"\r\n")) <= 998


def messages() -> dict[str, bytes]:
    xml = einvoice_xml()
    return {
        "utf8-pdf": invoice_with_pdf(),
        "gbk": plain("发票通知".encode("gbk"), INVOICE_TEXT.encode("gbk")),
        "big5-short": plain("發票".encode("big5"), INVOICE_TEXT_TRAD.encode("big5")),
        "xml": plain(b"UBL", xml, b"MIME-Version: 1.0\r\nContent-Type: application/xml\r\n"),
    }


def check_decodes(name: str, data: bytes) -> None:
    msg = parse(data)
    if name == "utf8-pdf":
        text, pdf = msg.iter_parts()
        assert crlf(text.get_content()) == crlf(INVOICE_TEXT)
        assert pdf.get_content() == PDF
    elif name == "gbk":
        assert msg["Subject"] == "发票通知"
        assert crlf(msg.get_content()) == crlf(INVOICE_TEXT)
    elif name == "big5-short":
        assert msg["Subject"] == "發票"
        assert crlf(msg.get_content()) == crlf(INVOICE_TEXT_TRAD)
    else:
        assert msg.get_content() == einvoice_xml()


def deliver_all(relay: RelayProcess, sink: Sink, domain: str) -> dict[str, Received]:
    sent = messages()
    for name, data in sent.items():
        send(relay, data.replace(b"Subject: ", f"X-Case: {name}\r\nSubject: ".encode(), 1),
             f"ap@{domain}")
    got = sink.wait_for(len(sent))
    return {parse(m.data)["X-Case"]: m for m in got}


def test_seven_bit_hop_gets_seven_bit_that_decodes_to_the_original(
        relay: RelayProcess, sinks: tuple[Sink, Sink]) -> None:
    seven, _ = sinks
    arrived = deliver_all(relay, seven, "seven.test")
    assert set(arrived) == set(messages())
    for name, got in arrived.items():
        assert got.data.isascii(), name
        assert fits(got.data), name
        assert not any(o.startswith("BODY=") for o in got.mail_options), name
        check_decodes(name, got.data)
    assert "Traceback" not in relay.log


def test_eight_bit_hop_gets_declared_8bit_as_is_and_the_rest_repaired(
        relay: RelayProcess, sinks: tuple[Sink, Sink]) -> None:
    _, eight = sinks
    arrived = deliver_all(relay, eight, "eight.test")
    sent = messages()
    for name, got in arrived.items():
        assert fits(got.data), name
        check_decodes(name, got.data)
        eight_bit = not got.data.isascii()
        assert ("BODY=8BITMIME" in got.mail_options) == eight_bit, name
    # a declared UTF-8 invoice is not touched; undeclared GBK keeps its bytes and gets a label
    utf8 = sent["utf8-pdf"].replace(b"Subject: ", b"X-Case: utf8-pdf\r\nSubject: ", 1)
    assert after_received(arrived["utf8-pdf"]) == utf8
    assert INVOICE_TEXT.encode("gbk") in arrived["gbk"].data
    assert parse(arrived["gbk"].data).get_content_charset() == "gb18030"


def test_seven_bit_message_arrives_byte_identical(relay: RelayProcess,
                                                  sinks: tuple[Sink, Sink]) -> None:
    seven, _ = sinks
    data = invoice_with_pdf().replace(INVOICE_TEXT.encode(), b"Dear customer,\r\nsee the PDF.")
    assert data.isascii()
    send(relay, data, "ap@seven.test")
    [got] = seven.wait_for(1)
    assert after_received(got) == data
