"""Unit tests of content repair (relay/policy/content.py): what a mail client decodes from the
repaired bytes is what the sender wrote, every line fits, and untouched parts stay byte for byte."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import time
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.policy.charsets import detect
from relay.policy.content import encoded_words, has_long_line, repair

INVOICE_TEXT = ("尊敬的客户：\r\n\r\n附件是贵公司2024年3月的增值税电子普通发票，发票号码 04400231，"
                "金额人民币12,345.00元。\r\n请查收，如有疑问请联系财务部。\r\n谢谢！\r\n")
INVOICE_TEXT_TRAD = ("親愛的客戶：\r\n\r\n附件是貴公司2024年3月的統一發票，發票號碼 AB-12345678，"
                     "金額新台幣12,345元。\r\n請查收，如有疑問請聯絡財務部。\r\n")
SHORT_GBK = ["发票", "发票通知", "电子发票", "增值税专用发票", "付款通知", "对账单", "请查收发票",
             "发票号码12345678", "2024年3月账单", "电子发票（普通发票）", "发票：INV-2024-001"]
SHORT_BIG5 = ["發票", "電子發票", "統一發票通知", "付款通知", "對帳單", "請查收發票", "合約"]
PDF = b"%PDF-1.4\n" + os.urandom(30 * 1024) + b"\n%%EOF\n"


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def lines_fit(data: bytes) -> bool:
    return max(len(line) for line in data.split(b"\r\n")) <= 998


def crlf(text: str) -> str:
    return text.replace("\r\n", "\n")


def fixed(data: bytes, *, eight_bit_ok: bool = False, smtputf8: bool = False,
          fallback: str | None = None) -> bytes:
    out = repair(data, eight_bit_ok=eight_bit_ok, smtputf8=smtputf8, fallback_charset=fallback)
    assert lines_fit(out)
    if not eight_bit_ok:
        assert out.isascii()
    return out


def invoice_with_pdf(text: str = INVOICE_TEXT, charset: str = "utf-8") -> bytes:
    return (b"From: Billing <billing@sender.test>\r\nTo: ap@example.net\r\n"
            b"Subject: =?utf-8?b?5Y+R56Wo?=\r\nMessage-ID: <inv-1@sender.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"==b1==\"\r\n\r\n"
            b"--==b1==\r\nContent-Type: text/plain; charset=\"" + charset.encode() + b"\"\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.encode(charset) +
            b"\r\n--==b1==\r\nContent-Type: application/pdf\r\n"
            b"Content-Disposition: attachment; filename=\"INV-1.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" +
            base64.encodebytes(PDF).replace(b"\n", b"\r\n") + b"\r\n--==b1==--\r\n")


def plain(subject: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"From: billing@sender.test\r\nTo: ap@example.net\r\nSubject: " + subject +
            b"\r\n" + extra + b"\r\n" + body)


# --- the fast path --------------------------------------------------------------------------------

@pytest.mark.parametrize("eight_bit_ok", [True, False])
def test_seven_bit_message_comes_back_as_the_same_object(eight_bit_ok: bool) -> None:
    data = invoice_with_pdf().replace(INVOICE_TEXT.encode(), b"Dear customer, see the PDF.")
    assert data.isascii()
    assert repair(data, eight_bit_ok=eight_bit_ok, smtputf8=False, fallback_charset="gbk") \
        is data


def test_fast_path_costs_microseconds() -> None:
    data = invoice_with_pdf().replace(INVOICE_TEXT.encode(), b"see PDF") * 6  # ~250 KiB 7-bit
    started = time.perf_counter()
    for _ in range(100):
        repair(data, eight_bit_ok=False, smtputf8=False, fallback_charset=None)
    per_call = (time.perf_counter() - started) / 100
    assert per_call < 0.002, f"{per_call * 1e6:.0f} us"  # measured ~40 us; generous for CI


def naive_long(data: bytes) -> bool:
    return any(len(line.removesuffix(b"\r")) > 998 for line in data.split(b"\n"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 500, 996, 997, 998, 999, 1000, 1001, 2500]),
                          st.sampled_from([b"\r\n", b"\n", b"\r", b""])), max_size=6))
def test_long_line_scan_agrees_with_splitting(shape: list[tuple[int, bytes]]) -> None:
    data = b"".join(b"x" * n + end for n, end in shape)
    assert has_long_line(data) == naive_long(data)


def test_long_line_scan_within_a_span() -> None:
    data = b"a" * 2000 + b"\r\nshort\r\n" + b"b" * 999 + b"\r\n"
    assert not has_long_line(data, 2002, 2009)
    assert has_long_line(data, 2009)
    assert has_long_line(data, 0, 2000)


# --- 8-bit to a hop without 8BITMIME --------------------------------------------------------------

def test_utf8_invoice_with_pdf_for_a_seven_bit_hop() -> None:
    data = invoice_with_pdf()
    out = fixed(data)
    text_part, pdf_part = parse(out).iter_parts()
    assert crlf(text_part.get_content()) == crlf(INVOICE_TEXT)
    assert text_part["Content-Transfer-Encoding"] == "base64"  # mostly Chinese: base64
    assert pdf_part.get_content() == PDF
    # only the text part changed: the PDF part and every header field are the same bytes
    pdf_start = data.index(b"--==b1==\r\nContent-Type: application/pdf")
    assert out.endswith(data[pdf_start:])
    assert out.startswith(data[:data.index(b"\r\n\r\n") + 4])


def test_eight_bit_hop_gets_a_declared_utf8_invoice_byte_for_byte() -> None:
    data = invoice_with_pdf()
    assert repair(data, eight_bit_ok=True, smtputf8=False, fallback_charset=None) == data


def test_mostly_ascii_text_becomes_quoted_printable() -> None:
    body = ("Invoice 2024-0042, total EUR 1,234.00. Grüße aus München.\r\n" * 5).encode()
    data = plain(b"x", body, b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n")
    out = fixed(data)
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"Invoice 2024-0042, total EUR 1,234.00. Gr=C3=BC=C3=9Fe" in out
    assert crlf(msg.get_content()) == crlf(body.decode())


def test_multipart_that_said_8bit_says_7bit_once_its_parts_are_encoded() -> None:
    data = invoice_with_pdf().replace(b"Content-Type: multipart/mixed; boundary=\"==b1==\"\r\n",
                                      b"Content-Type: multipart/mixed; boundary=\"==b1==\"\r\n"
                                      b"Content-Transfer-Encoding: 8bit\r\n")
    out = fixed(data)
    assert parse(out)["Content-Transfer-Encoding"] == "7bit"


def test_raw_binary_pdf_becomes_base64() -> None:
    data = plain(b"pdf", b"", b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=q\r\n")
    data += (b"--q\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--q\r\n"
             b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: binary\r\n\r\n"
             + PDF.replace(b"\r", b"").replace(b"\n", b"\r\n") + b"\r\n--q--\r\n")
    out = fixed(data)
    _, pdf = parse(out).iter_parts()
    assert pdf["Content-Transfer-Encoding"] == "base64"
    assert pdf.get_content() == PDF.replace(b"\r", b"").replace(b"\n", b"\r\n")


# --- lines over 998 octets ------------------------------------------------------------------------

def einvoice_xml(line_octets: int = 5000, lines: int = 3) -> bytes:
    item = b"<cac:InvoiceLine><cbc:ID>1</cbc:ID><cbc:LineExtensionAmount currencyID=\"EUR\">" \
           b"100.00</cbc:LineExtensionAmount></cac:InvoiceLine>"
    line = (item * (line_octets // len(item) + 1))[:line_octets]
    return b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n" + b"\r\n".join([line] * lines) \
        + b"\r\n"


@pytest.mark.parametrize("eight_bit_ok", [True, False])
def test_einvoice_xml_with_5000_octet_lines_is_quoted_printable(eight_bit_ok: bool) -> None:
    xml = einvoice_xml()
    data = plain(b"UBL invoice", b"", b"MIME-Version: 1.0\r\n"
                 b"Content-Type: multipart/mixed; boundary=x\r\n")
    data += (b"--x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee XML\r\n--x\r\n"
             b"Content-Type: application/xml\r\nContent-Disposition: attachment;"
             b" filename=invoice.xml\r\n\r\n" + xml + b"\r\n--x--\r\n")
    out = fixed(data, eight_bit_ok=eight_bit_ok)
    text, attachment = parse(out).iter_parts()
    assert attachment["Content-Transfer-Encoding"] == "quoted-printable"
    assert attachment.get_content() == xml  # never cut
    assert text.get_content() == "see XML"  # the CRLF before a delimiter belongs to it
    assert b"--x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee XML\r\n--x\r\n" in out


def test_long_lines_of_chinese_xml_become_base64() -> None:
    xml = ("<发票>" + "<货物>办公用品</货物>" * 400 + "</发票>\r\n").encode()
    data = plain(b"xml", xml, b"MIME-Version: 1.0\r\nContent-Type: text/xml; charset=utf-8\r\n")
    out = fixed(data, eight_bit_ok=True)
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_content() == xml.decode()


def test_long_header_is_folded_at_whitespace() -> None:
    refs = " ".join(f"<ref-{i:04d}@sender.test>" for i in range(150)).encode()
    data = plain(b"x", b"body\r\n", b"References: " + refs + b"\r\n")
    out = fixed(data, eight_bit_ok=True)
    assert parse(out)["References"] == refs.decode()
    assert out.replace(b"\r\n ", b" ") == data


def test_long_header_without_whitespace_is_encoded() -> None:
    blob = "Z" * 3000
    out = fixed(plain(b"x", b"body\r\n", b"X-Invoice-Blob: " + blob.encode() + b"\r\n"))
    assert parse(out)["X-Invoice-Blob"] == blob


# --- charsets -------------------------------------------------------------------------------------

def test_undeclared_gbk_body_and_subject() -> None:
    data = plain("发票通知".encode("gbk"), INVOICE_TEXT.encode("gbk"))
    out = fixed(data)
    msg = parse(out)
    assert msg["Subject"] == "发票通知"
    assert msg.get_content_charset() == "gb18030"
    assert crlf(msg.get_content()) == crlf(INVOICE_TEXT)
    assert msg["MIME-Version"] == "1.0"


def test_undeclared_gbk_for_an_eight_bit_hop_keeps_its_bytes_and_gets_a_charset() -> None:
    body = INVOICE_TEXT.encode("gbk")
    out = fixed(plain(b"invoice", body), eight_bit_ok=True)
    assert out.endswith(b"\r\n\r\n" + body)
    msg = parse(out)
    assert msg.get_content_charset() == "gb18030"
    assert crlf(msg.get_content()) == crlf(INVOICE_TEXT)


def test_undeclared_big5_body() -> None:
    out = fixed(plain("發票".encode("big5"), INVOICE_TEXT_TRAD.encode("big5")))
    msg = parse(out)
    assert msg["Subject"] == "發票"
    assert msg.get_content_charset() == "big5"
    assert crlf(msg.get_content()) == crlf(INVOICE_TEXT_TRAD)


def test_undeclared_utf8_is_utf8() -> None:
    out = fixed(plain("电子发票".encode(), INVOICE_TEXT.encode()), fallback="gb18030")
    msg = parse(out)
    assert msg["Subject"] == "电子发票"
    assert msg.get_content_charset() == "utf-8"


@pytest.mark.parametrize("subject", SHORT_GBK)
def test_short_gbk_subject_shows_correctly(subject: str) -> None:
    out = fixed(plain(subject.encode("gbk"), b"see attachment\r\n"), eight_bit_ok=True)
    assert parse(out)["Subject"] == subject
    assert b"see attachment" in out and out.isascii()


@pytest.mark.parametrize("subject", SHORT_BIG5)
def test_short_big5_subject_shows_correctly(subject: str) -> None:
    out = fixed(plain(subject.encode("big5"), b"see attachment\r\n"), eight_bit_ok=True)
    assert parse(out)["Subject"] == subject


def test_detection_beats_a_general_detector_on_short_subjects() -> None:
    right = sum(detect([s.encode("gbk")]).charset == "gb18030" for s in SHORT_GBK) + \
        sum(detect([s.encode("big5")]).charset == "big5" for s in SHORT_BIG5)
    assert right == len(SHORT_GBK) + len(SHORT_BIG5)


def test_charset_declared_by_another_part_wins_over_detection() -> None:
    # GBK "您好" also reads as two real characters in Big5: detection is unsure about it
    hello = "您好".encode("gbk")
    assert not detect([hello]).sure
    data = plain(b"x", b"", b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative;"
                 b" boundary=a\r\n")
    data += (b"--a\r\nContent-Type: text/plain\r\n\r\n" + hello + b"\r\n--a\r\n"
             b"Content-Type: text/html; charset=gbk\r\n\r\n<p>" + hello + b"</p>\r\n--a--\r\n")
    text, html = parse(fixed(data, fallback="big5")).iter_parts()
    assert text.get_content_charset() == "gbk"
    assert text.get_content() == "您好"
    assert "您好" in html.get_content()


def test_sender_charset_decides_when_detection_is_unsure() -> None:
    hello = "您好".encode("gbk")
    msg = parse(fixed(plain(hello, hello + b"\r\n"), fallback="gbk"))
    assert msg.get_content_charset() == "gbk"
    assert msg["Subject"] == "您好"
    assert parse(fixed(plain(hello, hello), fallback=None)).get_content_charset() == "gb18030"


def test_latin1_without_any_charset_is_not_taken_for_chinese() -> None:
    text = "Rechnung Nr. 42: Grüße aus München, zahlbar binnen 14 Tagen.\r\n"
    msg = parse(fixed(plain("Grüße".encode("latin-1"), text.encode("latin-1"))))
    assert msg.get_content_charset() == "windows-1252"
    assert msg["Subject"] == "Grüße"
    assert crlf(msg.get_content()) == crlf(text)


def test_display_names_are_encoded_addresses_never() -> None:
    data = (b"From: " + "财务部".encode("gbk") + b" <billing@sender.test>\r\n"
            b"To: \"" + "应付账款".encode("gbk") + b"\" <ap@example.net>, plain@example.net\r\n"
            b"Subject: " + "发票".encode("gbk") + b"\r\n\r\nbody\r\n")
    out = fixed(data, eight_bit_ok=True)
    msg = parse(out)
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("财务部", "billing@sender.test")
    first, second = msg["To"].addresses
    assert (first.display_name, first.addr_spec) == ("应付账款", "ap@example.net")
    assert second.addr_spec == "plain@example.net"
    assert b"<billing@sender.test>" in out and b"<ap@example.net>" in out


def test_smtputf8_message_keeps_utf8_headers_and_body_raw() -> None:
    data = plain("发票 INV-1".encode(), INVOICE_TEXT.encode())
    assert repair(data, eight_bit_ok=True, smtputf8=True, fallback_charset=None) == data


def test_smtputf8_message_to_a_seven_bit_hop_gets_a_charset_with_its_encoding() -> None:
    msg = parse(fixed(plain(b"x", INVOICE_TEXT.encode()), smtputf8=True))
    assert msg.get_content_charset() == "utf-8"
    assert crlf(msg.get_content()) == crlf(INVOICE_TEXT)


def test_smtputf8_message_still_gets_non_utf8_headers_encoded() -> None:
    out = fixed(plain("发票".encode("gbk"), b"body\r\n"), eight_bit_ok=True, smtputf8=True)
    assert parse(out)["Subject"] == "发票"


def test_encoded_words_stay_short_and_round_trip() -> None:
    text = "增值税电子普通发票" * 20 + " INV-2024"
    words = encoded_words(text)
    assert all(len(line.strip()) <= 75 for line in words.split(b"\r\n"))
    assert str(parse(b"Subject: " + words + b"\r\n\r\n")["Subject"]) == text


@pytest.mark.parametrize("charset", ["utf-8", "gbk"])
def test_raw_8bit_file_name_becomes_rfc2231(charset: str) -> None:
    name = "发票-2024年3月.pdf"
    data = plain(b"x", b"", b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=q\r\n")
    data += (b"--q\r\nContent-Type: application/pdf; name=\"" + name.encode(charset) + b"\"\r\n"
             b"Content-Disposition: attachment; filename=\"" + name.encode(charset) + b"\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(PDF) + b"--q--\r\n")
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    [pdf] = parse(fixed(data)).iter_parts()
    assert pdf.get_filename() == name
    assert pdf.get_content() == PDF


def test_forwarded_message_inside_gets_repaired_too() -> None:
    inner = plain("发票".encode("gbk"), INVOICE_TEXT.encode("gbk"))
    data = plain(b"Fwd: invoice", b"", b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
                 b" boundary=f\r\n")
    data += (b"--f\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n--f\r\n"
             b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--f--\r\n")
    _, forwarded = parse(fixed(data)).iter_parts()
    message = forwarded.get_content()
    assert message["Subject"] == "发票"
    assert crlf(message.get_content()) == crlf(INVOICE_TEXT)


TEXTS = [INVOICE_TEXT, INVOICE_TEXT_TRAD, "Rechnung 2024-0042, Grüße\r\n", "plain ascii\r\n",
         "x" * 1500 + "\r\n", "发" * 700 + "\r\n", ".leading dot\r\n", "", "a\r\n\r\n--\r\n"]
CHARSETS = ["utf-8", "gbk", "big5", "gb18030"]


@st.composite
def leaf_parts(draw: st.DrawFn) -> tuple[bytes, str, str]:
    text = "".join(draw(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=4)))
    charset = draw(st.sampled_from(CHARSETS))
    try:
        raw = text.encode(charset)
    except UnicodeEncodeError:
        charset, raw = "utf-8", text.encode()
    declared = draw(st.booleans())
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/xml"]))
    header = b"Content-Type: " + ctype.encode()
    header += (b"; charset=" + charset.encode()) if declared else b""
    cte = draw(st.sampled_from([b"", b"Content-Transfer-Encoding: 8bit\r\n",
                                b"Content-Transfer-Encoding: 7bit\r\n"]))
    part = header + b"\r\n" + cte + b"\r\n" + raw
    # what a reader must get back: the text, when its charset was declared or is findable
    return part, text, charset if declared or charset == "utf-8" else ""


@settings(max_examples=150, deadline=None)
@given(st.lists(leaf_parts(), min_size=1, max_size=4), st.booleans(),
       st.sampled_from(["发票通知", "發票", "Invoice", "Rechnung Grüße"]),
       st.sampled_from(CHARSETS))
def test_any_mix_of_parts_arrives_readable(parts: list[tuple[bytes, str, str]], eight_bit_ok: bool,
                                           subject: str, subject_charset: str) -> None:
    try:
        raw_subject = subject.encode(subject_charset)
    except UnicodeEncodeError:
        raw_subject = subject.encode()
    body = b"".join(b"--=_b\r\n" + part + b"\r\n" for part, _, _ in parts) + b"--=_b--\r\n"
    data = plain(raw_subject, body, b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
                 b" boundary=\"=_b\"\r\n")
    out = fixed(data, eight_bit_ok=eight_bit_ok, fallback=subject_charset)
    msg = parse(out)
    if subject_charset == "utf-8" or raw_subject.isascii():
        assert msg["Subject"] == subject
    for got, (_, text, charset) in zip(msg.iter_parts(), parts, strict=True):
        if charset or text.isascii():
            content = got.get_content()
            content = content.decode(charset or "ascii") if isinstance(content, bytes) \
                else content
            assert crlf(content) == crlf(text).removesuffix("\n") or \
                crlf(content) == crlf(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.booleans(), st.booleans())
def test_repair_never_raises(data: bytes, eight_bit_ok: bool, smtputf8: bool) -> None:
    data = data.replace(b"\r", b"").replace(b"\n", b"\r\n")  # as the spool keeps it
    for message in (data, b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" + data):
        repair(message, eight_bit_ok=eight_bit_ok, smtputf8=smtputf8, fallback_charset="gbk")
