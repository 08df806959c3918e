"""DKIM end to end: the real relay process signs what it delivers to an aiosmtpd sink, and stock
dkimpy verifies what the sink received against TXT records served by a real DNS server on
loopback. Also: what is not signed arrives byte for byte, every attempt records the SHA-256 of
the bytes the sink got, and a key that cannot be loaded stops the relay from starting."""

from __future__ import annotations

import hashlib
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from dkimkeys import dnsfunc_for, txt_zone, write_ed25519, write_rsa
from dnsserver import DnsServer
from relayproc import RelayProcess
from sink import Received, Sink

RelayFactory = Callable[..., RelayProcess]

POLICIES = """
[[sender]]
domain = "*.example.com"
dkim = [ { selector = "ed", key = "keys/ed.pem" }, { selector = "rsa", key = "keys/rsa.pem" } ]

[[sender]]
domain = "invoices.test"
dkim = [ { selector = "inv", key = "keys/inv.pem" } ]
"""


@pytest.fixture
def dns_with_keys(tmp_path: Path) -> Iterator[DnsServer]:
    """Keys under tmp_path/keys (the config's folder) and their TXT records in a DNS server."""
    (tmp_path / "keys").mkdir()
    zone = txt_zone("ed", "example.com", write_ed25519(tmp_path / "keys" / "ed.pem"))
    zone += txt_zone("rsa", "example.com", write_rsa(tmp_path / "keys" / "rsa.pem"))
    zone += txt_zone("inv", "invoices.test", write_rsa(tmp_path / "keys" / "inv.pem"))
    with DnsServer(zone) as server:
        yield server


def send(relay: RelayProcess, data: bytes, sender: str) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        code, reply = smtp.mail(sender, ["BODY=8BITMIME"] if any(b > 127 for b in data) else [])
        assert code == 250, reply
        assert smtp.rcpt("ap@customer.test")[0] == 250
        code, reply = smtp.data(data)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def invoice(sender: str, subject: str, extra: str = "") -> bytes:
    return (f"From: \"Billing\" <{sender}>\r\nTo: <ap@customer.test>\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 20:00:00 +0000\r\nMessage-ID: <{subject}@relay.test>\r\n"
            f"{extra}\r\nPlease find invoice {subject} attached.\r\n").encode()


def chinese_invoice_with_pdf() -> bytes:
    """A UTF-8 invoice in Chinese, sent as 8-bit, with a PDF attachment."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "开票 <ar@invoices.test>"
    msg["To"] = "ap@customer.test"
    msg["Subject"] = "发票 2026-00042"
    msg["Message-ID"] = "<cn-42@invoices.test>"
    msg.set_content("尊敬的客户：\n\n附件是2026年11月的增值税电子普通发票，金额：￥12,800.00。\n"
                    "请于30日内付款。  谢谢！\n", charset="utf-8", cte="8bit")
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="fapiao.pdf")
    return msg.as_bytes()


def verify_all(data: bytes, server: DnsServer) -> list[bool]:
    dnsfunc = dnsfunc_for(server.host, server.port)
    checker = dkim.DKIM(data)
    count = data[:data.index(b"\r\n\r\n")].lower().count(b"\r\ndkim-signature:") + \
        data.lower().startswith(b"dkim-signature:")
    return [checker.verify(idx=i, dnsfunc=dnsfunc) for i in range(count)]


def tag(data: bytes, index: int, name: str) -> str:
    sig = dkim.DKIM(data)
    sigs = [v for k, v in sig.headers if k.lower() == b"dkim-signature"]
    tags = dkim.util.parse_tag_value(b"".join(sigs[index].split()))
    return tags[name.encode()].decode()


def by_subject(messages: list[Received], subject: str) -> bytes:
    [found] = [m.data for m in messages
               if str(message_from_bytes(m.data, policy=policy.default)["Subject"]) == subject]
    return found


def attempt_hashes(relay: RelayProcess, queue_id: str) -> list[str | None]:
    with sqlite3.connect(relay.queue_dir / "index.sqlite") as conn:
        return [row[0] for row in conn.execute(
            "SELECT sha256 FROM attempts WHERE msg = ? ORDER BY time", (queue_id,))]


@pytest.fixture
def signing_relay(relay_factory: RelayFactory, sink: Sink,
                  dns_with_keys: DnsServer) -> RelayProcess:
    return relay_factory(routes={"customer.test": [sink.address]}, policies=POLICIES).start()


def test_signed_copies_verify_and_choose_their_policy(signing_relay: RelayProcess, sink: Sink,
                                                      dns_with_keys: DnsServer) -> None:
    relay, server = signing_relay, dns_with_keys
    # The From domain decides (DMARC alignment); d= drops the pattern's "*.".
    send(relay, invoice("billing@eu.inv.example.com", "by-from"), "bounces@invoices.test")
    # No policy for the From domain: the envelope sender's signs.
    send(relay, invoice("billing@unlisted.test", "by-envelope"), "app@invoices.test")
    received = sink.wait_for(2)
    by_from = by_subject(received, "by-from")
    assert verify_all(by_from, server) == [True, True]
    assert [tag(by_from, i, "a") for i in (0, 1)] == ["rsa-sha256", "ed25519-sha256"]
    assert [tag(by_from, i, "d") for i in (0, 1)] == ["example.com", "example.com"]
    assert [tag(by_from, i, "s") for i in (0, 1)] == ["rsa", "ed"]
    by_envelope = by_subject(received, "by-envelope")
    assert verify_all(by_envelope, server) == [True]
    assert (tag(by_envelope, 0, "d"), tag(by_envelope, 0, "s")) == ("invoices.test", "inv")


def test_a_reply_to_added_after_signing_fails_verification(
        signing_relay: RelayProcess, sink: Sink, dns_with_keys: DnsServer) -> None:
    send(signing_relay, invoice("billing@inv.example.com", "forged",
                                "Reply-To: <billing@inv.example.com>\r\n"), "app@other.test")
    [got] = sink.wait_for(1)
    assert verify_all(got.data, dns_with_keys) == [True, True]
    assert tag(got.data, 0, "h").split(":").count("reply-to") == 2  # oversigned
    at = got.data.index(b"\r\n\r\n") + 2
    forged = got.data[:at] + b"Reply-To: <payments@attacker.test>\r\n" + got.data[at:]
    assert verify_all(forged, dns_with_keys) == [False, False]


def test_chinese_invoice_with_pdf_verifies_through_an_8bitmime_hop(
        signing_relay: RelayProcess, sink: Sink, dns_with_keys: DnsServer) -> None:
    original = chinese_invoice_with_pdf()
    assert any(b > 127 for b in original)
    send(signing_relay, original, "ar@invoices.test")
    [got] = sink.wait_for(1)
    assert "BODY=8BITMIME" in got.mail_options
    assert verify_all(got.data, dns_with_keys) == [True]
    parsed = message_from_bytes(got.data, policy=policy.default)
    text, pdf = (part for part in parsed.iter_parts())
    assert "增值税电子普通发票" in text.get_content()
    assert pdf.get_content().startswith(b"%PDF-1.7")


def test_attempts_record_the_sha256_of_what_the_sink_got(
        signing_relay: RelayProcess, sink: Sink) -> None:
    signed_id = send(signing_relay, invoice("billing@inv.example.com", "proof"), "a@b.test")
    plain_id = send(signing_relay, invoice("billing@unlisted.test", "plain"), "a@unlisted.test")
    received = sink.wait_for(2)
    signing_relay.wait_for_log("event=delivered", count=2)
    for queue_id, subject in ((signed_id, "proof"), (plain_id, "plain")):
        expected = hashlib.sha256(by_subject(received, subject)).hexdigest()
        assert attempt_hashes(signing_relay, queue_id) == [expected]
    shown = subprocess.run([sys.executable, "-m", "relay", "--config", str(signing_relay.config),
                            "queue", "show", signed_id], capture_output=True, text=True,
                           cwd=signing_relay.dir)
    assert shown.returncode == 0, shown.stderr
    assert f"sha256={attempt_hashes(signing_relay, signed_id)[0]}" in shown.stdout


def test_without_a_signing_policy_the_message_arrives_byte_for_byte(
        relay_factory: RelayFactory, sink: Sink) -> None:
    relay = relay_factory(routes={"customer.test": [sink.address]},
                          policies='[[sender]]\ndomain = "nodkim.test"\n').start()
    original = chinese_invoice_with_pdf()
    send(relay, original, "ar@nodkim.test")
    [got] = sink.wait_for(1)
    # Only the relay's own Received header is added on top.
    assert got.data.endswith(original)
    added = got.data[:-len(original)]
    assert added.startswith(b"Received: ") and added.count(b"\r\n") == added.count(b"\r\n ") + \
        added.count(b"\r\n\t") + 1


def test_a_key_that_cannot_be_loaded_stops_the_start(tmp_path: Path,
                                                     relay_factory: RelayFactory) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                               "-----END PRIVATE KEY-----\n")
    relay = relay_factory(policies='[[sender]]\ndomain = "invoices.test"\n'
                                   'dkim = [ { selector = "s1", key = "keys/bad.pem" } ]\n')
    relay.start(wait=False)
    assert relay.proc is not None
    assert relay.proc.wait(15) == 78
    assert "sender[0].dkim[0].key" in relay.log
    assert "bad.pem" in relay.log and "AAAA" not in relay.log


def test_an_index_from_before_the_sha256_column_is_migrated(tmp_path: Path) -> None:
    from relay.queue.index import Index, Outcome

    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as old:
        old.execute("CREATE TABLE attempts (msg TEXT NOT NULL, idx INTEGER NOT NULL, time REAL"
                    " NOT NULL, outcome TEXT NOT NULL, host TEXT, address TEXT, reply TEXT,"
                    " tls TEXT)")
        old.execute("INSERT INTO attempts VALUES ('OLD', 0, 1.0, 'delivered', 'h', 'a', 'r',"
                    " NULL)")
    index = Index(db)
    try:
        index.record([Outcome("NEW", 0, "delivered", 2.0, 2.0, "250 ok", sha256="ab" * 32)])
        rows = index.conn.execute("SELECT msg, sha256 FROM attempts ORDER BY time").fetchall()
    finally:
        index.close()
    assert rows == [("OLD", None), ("NEW", "ab" * 32)]
