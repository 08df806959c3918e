"""Content repair end to end: the real relay process delivers Chinese invoices to a sink that
does not announce 8BITMIME and to one that does; what arrives decodes to what was sent."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from dkimkeys import txt_zone, write_rsa
from dnsserver import DnsServer
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
from test_dkim_delivery import POLICIES, chinese_invoice_with_pdf, verify_all
from test_dkim_delivery import send as send_signed


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


@pytest.fixture
def signing_dns(tmp_path: Path) -> Iterator[DnsServer]:
    """The key of test_dkim_delivery's `invoices.test` policy, served by a DNS server."""
    (tmp_path / "keys").mkdir()
    for name in ("ed", "rsa"):  # the policies name them; only invoices.test signs here
        write_rsa(tmp_path / "keys" / f"{name}.pem")
    with DnsServer(txt_zone("inv", "invoices.test", write_rsa(tmp_path / "keys" / "inv.pem"))
                   ) as server:
        yield server


def test_signed_chinese_invoice_through_a_seven_bit_hop_verifies(
        relay_factory: type, signing_dns: DnsServer) -> None:
    """Issue 7 item 2: repair runs before signing, so the signature covers the 7-bit copy."""
    with Sink(eight_bit_mime=False) as seven:
        relay = relay_factory(routes={"customer.test": [seven.address]},  # type: ignore[operator]
                              policies=POLICIES).start()
        original = chinese_invoice_with_pdf()
        send_signed(relay, original, "ar@invoices.test")
        [got] = seven.wait_for(1)
    assert got.data.isascii() and fits(got.data)
    assert verify_all(got.data, signing_dns) == [True]
    text, pdf = parse(got.data).iter_parts()
    assert text.get_content() == parse(original).get_body().get_content()  # type: ignore[union-attr]
    assert pdf.get_content() == next(parse(original).iter_attachments()).get_content()


def test_sender_charset_decides_what_detection_cannot(relay_factory: type) -> None:
    # "報價單" (quotation) in Big5 also reads as three common simplified characters in GBK
    subject = "報價單".encode("big5")
    policies = '[[sender]]\ndomain = "sender.test"\ncharset = "big5"\n'
    with Sink(eight_bit_mime=False) as seven:
        relay = relay_factory(routes={"seven.test": [seven.address]},  # type: ignore[operator]
                              policies=policies).start()
        send(relay, plain(subject, subject + b"\r\n"), "ap@seven.test")
        [got] = seven.wait_for(1)
    msg = parse(got.data)
    assert msg["Subject"] == "報價單"
    assert msg.get_content_charset() == "big5"
    assert crlf(msg.get_content()) == "報價單\n"
