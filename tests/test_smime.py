"""S/MIME per recipient: certificates judged at load and per recipient, the encrypted copy that
OpenSSL decrypts back to the original MIME entity, each recipient's own copy end to end through
the real relay (DKIM-signed and verified with stock dkimpy), 550 at RCPT and 4.7.5 at delivery
when `required` has no usable certificate, and the expiry warnings of check-config."""

from __future__ import annotations

import datetime
import smtplib
import subprocess
import threading
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from dkimkeys import txt_zone, write_rsa
from dnsserver import DnsServer
from relayproc import RelayProcess
from sink import Sink
from smimecerts import write_smime
from test_config_status import run_relay, write_config
from test_dkim_delivery import verify_all

from relay.config import ConfigError, load_config
from relay.policy.prepare import prepare
from relay.policy.smime import Smime, encrypt

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def openssl_decrypt(data: bytes, cert: Path, key: Path) -> bytes:
    done = subprocess.run(["openssl", "smime", "-decrypt", "-recip", str(cert), "-inkey",
                           str(key), "-binary"], input=data, capture_output=True, check=False,
                          timeout=20)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def invoice(to: str, subject: str = "Invoice 2026-0042") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Billing <ar@invoices.test>"
    msg["To"] = to
    msg["Cc"] = "clerk@customer.test"
    msg["Subject"] = subject
    msg["Date"] = "Sun, 29 Nov 2026 20:00:00 +0000"
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@invoices.test>"
    msg["X-Invoice-Id"] = "2026-0042"
    msg.set_content("Amount due: EUR 12,800.00\nIBAN: DE02 1203 0000 0000 2020 51\n")
    msg.add_attachment(b"%PDF-1.7\n" + bytes(range(256)) * 20, maintype="application",
                       subtype="pdf", filename="invoice.pdf")
    return msg.as_bytes()


def entity(data: bytes) -> bytes:
    """The MIME entity of a message: its Content-* fields and the body, as bytes."""
    head, _, body = data.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    keep = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                fields[-1] += b"\r\n" + line
            continue
        keep = line.lower().startswith(b"content-")
        if keep:
            fields.append(line)
    return b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


# ------------------------------------------------------------------ the encryption itself


def test_encrypted_copy_decrypts_to_the_original_entity_with_openssl(tmp_path: Path) -> None:
    cert, key = write_smime(tmp_path / "ap", emails=["ap@customer.test"])
    original = invoice("ap@customer.test").replace(
        b"Subject: Invoice 2026-0042", b"Subject: Invoice 2026-0042\r\n\tfolded on")
    config = _config(tmp_path, f'[[recipient]]\nmatch = "ap@customer.test"\n'
                               f'smime_certificate = "{cert}"\nencryption = "required"\n')
    smime = Smime.from_config(config)
    assert smime is not None
    decision = smime.decide("AP@customer.test")
    assert decision is not None and decision.certificate is not None
    ready = prepare(original, sender="ar@invoices.test", signer=None,
                    encrypt_to=decision.certificate)
    sent = ready.data
    assert ready.encrypted
    assert b"\n" not in sent.replace(b"\r\n", b"")  # CRLF line ends only, on the wire
    assert b"12,800" not in sent and b"IBAN" not in sent and b"%PDF" not in sent
    outer = message_from_bytes(sent, policy=policy.default)
    # Routing and trace fields stay outside, in clear text, once each.
    assert outer["From"] == "Billing <ar@invoices.test>" and outer["To"] == "ap@customer.test"
    assert outer["Cc"] == "clerk@customer.test" and outer["X-Invoice-Id"] == "2026-0042"
    assert b"Subject: Invoice 2026-0042\r\n\tfolded on\r\n" in sent  # byte for byte
    assert outer["Message-ID"] == "<Invoice-2026-0042@invoices.test>"
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == "enveloped-data"
    assert sent.lower().count(b"\r\nmime-version:") == 1
    assert openssl_decrypt(sent, cert, key) == entity(original)
    # AES-256-CBC content encryption (RFC 8551's MUST); openssl names what it finds.
    info = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "SMIME"],
                          input=sent, capture_output=True, check=True).stdout
    assert b"aes-256-cbc" in info


def test_a_message_without_content_fields_still_round_trips(tmp_path: Path) -> None:
    cert, key = write_smime(tmp_path / "ap", emails=["ap@customer.test"])
    from cryptography import x509
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    plain = b"From: a@invoices.test\r\nTo: ap@customer.test\r\nSubject: s\r\n\r\nline 1\r\n"
    sent = encrypt(plain, certificate)
    assert openssl_decrypt(sent, cert, key) == b"\r\nline 1\r\n"


# ------------------------------------------------------------ which certificate is usable


def _config(tmp_path: Path, policies: str, main: str = "") -> object:
    path, _ = write_config(tmp_path, main, policies)
    return load_config(path)


def test_usable_means_within_the_validity_period(tmp_path: Path) -> None:
    cert, _ = write_smime(tmp_path / "ap", emails=["ap@customer.test"],
                          not_before=NOW - DAY, not_after=NOW + 2 * DAY)
    smime = Smime.from_config(_config(tmp_path, f'[[recipient]]\nmatch = "ap@customer.test"\n'
                                                f'smime_certificate = "{cert}"\n'
                                                'encryption = "required"\n'))
    assert smime is not None
    now = NOW.timestamp()
    assert smime.refusal("ap@customer.test", now) is None
    assert "expired on" in (smime.refusal("ap@customer.test", now + 3 * 86400) or "")
    assert "not valid before" in (smime.refusal("ap@customer.test", now - 2 * 86400) or "")
    assert smime.target("clerk@customer.test") is None  # no policy: shares transactions


def test_domain_policies_need_a_gateway_certificate(tmp_path: Path) -> None:
    gateway, _ = write_smime(tmp_path / "gw", emails=["@customer.test"])
    subdomains, _ = write_smime(tmp_path / "sub", dns_names=["*.branch.test"])
    config = _config(tmp_path, f'[[recipient]]\nmatch = "customer.test"\n'
                               f'smime_certificate = "{gateway}"\nencryption = "required"\n'
                               f'[[recipient]]\nmatch = "*.branch.test"\n'
                               f'smime_certificate = "{subdomains}"\n')
    smime = Smime.from_config(config)
    assert smime is not None
    for rcpt in ("ap@customer.test", "anyone@customer.test", "x@north.branch.test"):
        decision = smime.decide(rcpt)
        assert decision is not None and decision.certificate is not None, rcpt
    assert smime.decide("x@branch.test") is None


def test_no_recipient_policy_costs_nothing(tmp_path: Path) -> None:
    assert Smime.from_config(_config(tmp_path, "")) is None
    # preferred without a certificate asks for nothing: plain, no own transaction, no log
    assert Smime.from_config(_config(tmp_path, '[[recipient]]\nmatch = "x.test"\n')) is None


def test_a_certificate_replaced_after_the_check_is_judged_when_rebuilt(tmp_path: Path) -> None:
    """Reload rebuilds the object from the config; a file that went bad meanwhile refuses."""
    cert, _ = write_smime(tmp_path / "ap", emails=["ap@customer.test"])
    config = _config(tmp_path, f'[[recipient]]\nmatch = "ap@customer.test"\n'
                               f'smime_certificate = "{cert}"\nencryption = "required"\n')
    write_smime(tmp_path / "ap", emails=["ap@customer.test"], ec_key=True)
    smime = Smime.from_config(config)  # type: ignore[arg-type]
    assert smime is not None
    assert "RSA" in (smime.refusal("ap@customer.test") or "")


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: write_smime(d / "c", emails=["ap@customer.test"], ec_key=True)[0],
     "an EC certificate; S/MIME encryption here supports RSA recipient certificates only"),
    (lambda d: write_smime(d / "c", emails=["other@customer.test"])[0],
     "not issued for the address ap@customer.test (it names: other@customer.test)"),
    (lambda d: write_smime(d / "c", emails=["ap@customer.test"], key_encipherment=False)[0],
     "its KeyUsage does not allow keyEncipherment"),
    (lambda d: write_smime(d / "c", emails=["ap@customer.test"])[1],
     "not a PEM certificate (a private key? give the certificate)"),
    (lambda d: (d / "c.pem").write_text("hello") and d / "c.pem", "not a PEM certificate"),
], ids=["ec", "wrong-address", "signing-only", "private-key", "not-pem"])
def test_check_config_names_file_and_key_of_a_bad_certificate(tmp_path: Path, make: object,
                                                              expected: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    config, policy_file = write_config(
        tmp_path, "", f'[[recipient]]\nmatch = "ap@customer.test"\nsmime_certificate = "{path}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)  # every load, serve included: encryption is real
    (line,) = caught.value.problems
    assert line.startswith(f"{policy_file}: recipient[0].smime_certificate: {path}")
    assert expected in line


def test_check_config_policy_errors(tmp_path: Path) -> None:
    cert, _ = write_smime(tmp_path / "c", emails=["ap@customer.test"])
    config, policy_file = write_config(
        tmp_path, "", '[[recipient]]\nmatch = "ap@customer.test"\nencryption = "required"\n'
                      f'[[recipient]]\nmatch = "*"\nsmime_certificate = "{cert}"\n'
                      '[[recipient]]\nmatch = "b@customer.test"\nsmime_certificate = "no.pem"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == [
        f'{policy_file}: recipient[0].encryption: "required" needs smime_certificate: every '
        "message to ap@customer.test would be refused",
        f'{policy_file}: recipient[1].smime_certificate: not allowed under match = "*": one '
        "certificate cannot be every recipient's",
        f"{policy_file}: recipient[2].smime_certificate: file not found: {tmp_path}/no.pem",
    ]


def test_expiry_warnings_for_tls_and_smime_certificates(tmp_path: Path) -> None:
    soon, _ = write_smime(tmp_path / "soon", emails=["ap@customer.test"],
                          not_after=NOW + 10 * DAY + datetime.timedelta(hours=1))
    gone, _ = write_smime(tmp_path / "gone", emails=["old@customer.test"], not_after=NOW - DAY)
    fine, _ = write_smime(tmp_path / "fine", emails=["ok@customer.test"])
    tls_cert, tls_key = write_smime(tmp_path / "tls", dns_names=["relay.test"],
                                    not_after=NOW + 5 * DAY + datetime.timedelta(hours=1))
    config, policy_file = write_config(
        tmp_path, f'[server]\ntls_cert = "{tls_cert}"\ntls_key = "{tls_key}"\n',
        f'[[recipient]]\nmatch = "ap@customer.test"\nsmime_certificate = "{soon}"\n'
        f'encryption = "required"\n'
        f'[[recipient]]\nmatch = "old@customer.test"\nsmime_certificate = "{gone}"\n'
        f'encryption = "required"\n'
        f'[[recipient]]\nmatch = "ok@customer.test"\nsmime_certificate = "{fine}"\n')
    result = run_relay("check-config", "--config", str(config), cwd=tmp_path)
    # A warning, never a refusal: one customer's expired certificate must not stop the relay.
    assert result.returncode == 0, result.stdout + result.stderr

    def day(offset: datetime.timedelta) -> str:
        return (NOW + offset).strftime("%Y-%m-%d")

    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{config}: server.tls_cert: {tls_cert} expires on "
                               f"{day(5 * DAY + datetime.timedelta(hours=1))} ")
    assert lines[0].endswith("(in 5 days)")
    assert lines[1].startswith(f"{policy_file}: recipient[0].smime_certificate: {soon} "
                               f"expires on {day(10 * DAY + datetime.timedelta(hours=1))} ")
    assert lines[2].startswith(f"{policy_file}: recipient[1].smime_certificate: {gone} "
                               f"expired on {day(-DAY)} ")


# ----------------------------------------------------------------------- end to end


@pytest.fixture
def relay_setup(tmp_path: Path, relay_factory: type) -> object:
    """A relay that DKIM-signs for invoices.test, with S/MIME policies for customer.test and
    the gateway domain gw.test, both routed to one sink (which defers `late@` while told)."""
    certs = tmp_path / "certs"
    ap = write_smime(certs / "ap", emails=["ap@customer.test"])
    gw = write_smime(certs / "gw", emails=["@gw.test"], fresh_key=True)
    expired = write_smime(certs / "expired", emails=["expired@customer.test"],
                          not_after=NOW - DAY)
    stale = write_smime(certs / "stale", emails=["pref@customer.test"], not_after=NOW - DAY)
    # Valid at intake, expired while the message waits in the queue.
    late = write_smime(certs / "late", emails=["late@customer.test"],
                       not_after=datetime.datetime.now(datetime.UTC)
                       + datetime.timedelta(seconds=6))
    (tmp_path / "keys").mkdir()
    zone = txt_zone("inv", "invoices.test", write_rsa(tmp_path / "keys" / "inv.pem"))
    policies = (
        '[[sender]]\ndomain = "invoices.test"\n'
        'dkim = [{ selector = "inv", key = "keys/inv.pem" }]\n'
        f'[[recipient]]\nmatch = "ap@customer.test"\nsmime_certificate = "{ap[0]}"\n'
        'encryption = "required"\n'
        f'[[recipient]]\nmatch = "gw.test"\nsmime_certificate = "{gw[0]}"\n'
        'encryption = "required"\n'
        f'[[recipient]]\nmatch = "expired@customer.test"\nsmime_certificate = "{expired[0]}"\n'
        'encryption = "required"\n'
        f'[[recipient]]\nmatch = "pref@customer.test"\nsmime_certificate = "{stale[0]}"\n'
        f'[[recipient]]\nmatch = "late@customer.test"\nsmime_certificate = "{late[0]}"\n'
        'encryption = "required"\n')
    defer_late = threading.Event()
    defer_late.set()
    with DnsServer(zone) as dns, Sink(rcpt_reply=lambda a: "451 4.3.0 not now" if (
            a == "late@customer.test" and defer_late.is_set()) else None) as sink:
        relay = relay_factory(routes={"customer.test": [sink.address], "gw.test": [sink.address]},
                              policies=policies).start()
        yield relay, sink, dns, {"ap": ap, "gw": gw}, defer_late


def test_end_to_end(relay_setup: object) -> None:
    relay, sink, dns, certs, defer_late = relay_setup  # type: ignore[misc]
    assert isinstance(relay, RelayProcess) and isinstance(sink, Sink)
    assert isinstance(dns, DnsServer) and isinstance(defer_late, threading.Event)
    original = invoice("ap@customer.test")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo("erp.invoices.test")
        # Queued while its certificate is valid; it expires before the sink takes the message.
        client.sendmail("ar@invoices.test", ["late@customer.test"], original)
        client.mail("ar@invoices.test")
        assert client.rcpt("expired@customer.test") == (
            550, b"5.7.1 <expired@customer.test>: no usable S/MIME certificate")
        for rcpt in ("ap@customer.test", "clerk@customer.test", "pref@customer.test",
                     "x@gw.test"):
            assert client.rcpt(rcpt)[0] == 250, rcpt
        assert client.data(original)[0] == 250
    got = {tuple(m.rcpt_tos): m for m in sink.wait_for(4, timeout=20)}
    # A recipient with an encrypting policy gets a copy (a transaction) of its own.
    assert set(got) == {("ap@customer.test",), ("x@gw.test",), ("pref@customer.test",),
                        ("clerk@customer.test",)}
    # The encrypted recipient's copy: OpenSSL gives back the original entity; DKIM verifies.
    for rcpt, name in (("ap@customer.test", "ap"), ("x@gw.test", "gw")):
        copy = got[(rcpt,)].data
        assert b"IBAN" not in copy and b"application/pkcs7-mime" in copy
        assert openssl_decrypt(copy, *certs[name]) == entity(original)
        assert verify_all(copy, dns) == [True]
    # preferred without a usable certificate, and no policy at all: plain, signed too.
    for rcpt in ("pref@customer.test", "clerk@customer.test"):
        plain = got[(rcpt,)].data
        assert b"IBAN: DE02" in plain and verify_all(plain, dns) == [True]
    (skipped,) = relay.events("smime_skipped", at_least=1)
    assert skipped["rcpt"] == "pref@customer.test" and "expired on" in skipped["reason"]
    (refused,) = relay.events("rejected", at_least=1)
    assert refused["rcpt"] == "expired@customer.test"
    # late@: deferred by the sink until its certificate expired, then 4.7.5 without a
    # connection; once the sink would take it, still nothing arrives in clear text.
    relay.wait_for_log(r"event=deferred .*rcpt=late@customer.test .*status=4\.7\.5", timeout=20)
    defer_late.clear()
    relay.wait_for_log(r"event=deferred .*rcpt=late@customer.test .*status=4\.7\.5",
                       count=2, timeout=10)
    assert all("late@customer.test" not in m.rcpt_tos for m in sink.wait_for(3))
    last = [e for e in relay.events("deferred") if e["rcpt"] == "late@customer.test"][-1]
    assert last["reply"].startswith("451 4.7.5 <late@customer.test>: no usable S/MIME "
                                    "certificate: the certificate expired on ")
    assert "host" not in last  # decided before any connection
