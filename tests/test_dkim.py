"""DKIM signing (relay.policy.dkim, relay.policy.prepare) without a relay process: keys,
canonicalisation against dkimpy's reference code, policy choice, and signatures that stock
dkimpy verifies against TXT records served by a real DNS server on loopback."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dkim.canonicalization import Relaxed
from dkimkeys import TRADITIONAL, dnsfunc_for, txt_zone, write_ed25519, write_rsa
from dnsserver import DnsServer

from relay.config import Config, DkimKey, SenderPolicy
from relay.policy.dkim import (
    DkimKeyError,
    Signer,
    body_hash,
    load_key,
    relaxed_body,
    relaxed_header,
)
from relay.policy.prepare import prepare

INVOICE = (b"Received: from app.test by relay.test\r\n"
           b"From: \"Billing\" <billing@inv.example.com>\r\n"
           b"To: ap@customer.test,\r\n  cfo@customer.test\r\n"
           b"Subject:  Invoice   2026-001 \r\n"
           b"Date: Sun, 29 Nov 2026 20:00:00 +0000\r\n"
           b"Message-ID: <inv-1@inv.example.com>\r\n"
           b"\r\n"
           b"Amount due:\t 1,200.00  EUR  \r\n\r\nPay to the usual account.\r\n\r\n\r\n")


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[tuple[Config, DnsServer]]:
    """A config with an RSA and an Ed25519 key for `*.example.com` (listed Ed25519 first),
    one RSA key for `invoices.test`, and `nodkim.test` without keys; DNS serves the TXTs."""
    zone = ""
    ed = write_ed25519(tmp_path / "ed.pem")
    zone += txt_zone("ed", "example.com", ed)
    rsa_key = write_rsa(tmp_path / "rsa.pem")
    zone += txt_zone("rsa", "example.com", rsa_key)
    inv = write_rsa(tmp_path / "inv.pem", fmt=TRADITIONAL)  # "BEGIN RSA PRIVATE KEY" works too
    zone += txt_zone("inv", "invoices.test", inv)
    config = Config(senders=(
        SenderPolicy("*.example.com", dkim=(DkimKey("ed", tmp_path / "ed.pem"),
                                            DkimKey("rsa", tmp_path / "rsa.pem"))),
        SenderPolicy("invoices.test", dkim=(DkimKey("inv", tmp_path / "inv.pem"),)),
        SenderPolicy("nodkim.test"),
        SenderPolicy("*", priority="bulk"),
    ))
    with DnsServer(zone) as server:
        yield config, server


def signatures(data: bytes) -> list[dict[str, str]]:
    head = data[:data.index(b"\r\n\r\n")].decode()
    found = re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head,
                       re.MULTILINE | re.I)
    return [dict(tag.strip().split("=", 1) for tag in "".join(s.split()).split(";") if tag)
            for s in found]


def verifies(data: bytes, server: DnsServer) -> list[bool]:
    """Each DKIM-Signature, top down, verified by stock dkimpy."""
    dnsfunc = dnsfunc_for(server.host, server.port)
    checker = dkim.DKIM(data)
    return [checker.verify(idx=i, dnsfunc=dnsfunc) for i in range(len(signatures(data)))]


# ---------------------------------------------------------------------------- canonicalisation


BODIES = [b"", b"\r\n", b"\r\n\r\n", b"a\r\n", b"a", b"a  \r\n", b" \t \r\n", b"a\t\tb \r\n\r\n",
          b"x \r\n \r\n\t\r\n", b"line  with   runs\r\nand\ttabs\t\r\n\r\nend", b"  lead\r\n",
          "8-bit 发票 金额  \r\n".encode()]


def _same_as_dkimpy(body: bytes) -> None:
    reference = Relaxed.canonicalize_body(body)
    assert relaxed_body(body) == reference, body
    # body_hash takes a fast path (no copy) when nothing needs changing: same digest.
    head = b"Subject: x\r\n\r\n"
    assert body_hash(head + body, len(head)) == hashlib.sha256(reference).digest()


@pytest.mark.parametrize("body", [*BODIES, b"plain\r\nbase64+/=\r\n", b"no line end",
                                  b"ab\r\n\r\n", b"a\r\n\r\n\r\n", b"\r", b"ab \r\n"])
def test_relaxed_body_is_dkimpys(body: bytes) -> None:
    _same_as_dkimpy(body)


def test_relaxed_body_matches_dkimpy_on_random_bodies() -> None:
    rng = random.Random(7)
    alphabet = [b" ", b"\t", b"\r\n", b"a", b"b", b"  ", b"\xe5"]
    for _ in range(2000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        _same_as_dkimpy(body)


def test_relaxed_header_is_dkimpys() -> None:
    raw = b"Subject \t:  Invoice \t 2026\r\n\t  continued  "
    name, value = raw.split(b":", 1)
    [(ref_name, ref_value)] = Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_header(raw) == ref_name + b":" + ref_value


# ---------------------------------------------------------------------------- keys


def test_keys_load_in_every_supported_form(tmp_path: Path) -> None:
    write_rsa(tmp_path / "a.pem")
    write_rsa(tmp_path / "b.pem", fmt=TRADITIONAL)
    write_ed25519(tmp_path / "c.pem")
    algorithms = [load_key(DkimKey(s, tmp_path / f"{s}.pem")).algorithm for s in "abc"]
    assert algorithms == ["rsa", "rsa", "ed25519"]


def _problem(tmp_path: Path, content: bytes | None) -> str:
    path = tmp_path / "k.pem"
    if content is not None:
        path.write_bytes(content)
    entry = DkimKey("s1", path, where="policies/p.toml: sender[0].dkim[0].key")
    with pytest.raises(DkimKeyError) as caught:
        load_key(entry)
    [line] = caught.value.problems
    assert line.startswith("policies/p.toml: sender[0].dkim[0].key: ")
    return line


def test_bad_keys_are_named_problems_without_key_material(tmp_path: Path) -> None:
    assert "cannot read" in _problem(tmp_path, None)
    assert "not a PEM private key" in _problem(tmp_path, b"hello\n")
    cert_like = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    assert "not a PEM private key" in _problem(tmp_path, cert_like)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    assert "RSA or Ed25519" in _problem(tmp_path, ec_pem)
    encrypted = write_rsa(tmp_path / "x.pem").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    assert "encrypted" in _problem(tmp_path, encrypted)
    # cryptography refuses to make a key this small; openssl still does.
    small = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                            "rsa_keygen_bits:512"], capture_output=True, check=True).stdout
    line = _problem(tmp_path, small)
    assert "512 bits" in line
    assert small.decode().splitlines()[1] not in line


def test_signer_lists_every_key_that_fails(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("nope")
    config = Config(senders=(
        SenderPolicy("a.test", dkim=(DkimKey("s", tmp_path / "missing.pem", where="f: a"),)),
        SenderPolicy("b.test", dkim=(DkimKey("s", tmp_path / "bad.pem", where="f: b"),)),
    ))
    with pytest.raises(DkimKeyError) as caught:
        Signer.from_config(config)
    assert [p.split(":")[1].strip() for p in caught.value.problems] == ["a", "b"]


def test_no_dkim_anywhere_means_no_signer() -> None:
    assert Signer.from_config(Config(senders=(SenderPolicy("a.test"),))) is None


# ---------------------------------------------------------------------------- signing


def test_rsa_and_ed25519_side_by_side_both_verify(keys: tuple[Config, DnsServer]) -> None:
    config, server = keys
    signer = Signer.from_config(config)
    signed, used = signer.sign(INVOICE, "bounces@other.test")
    assert signed.endswith(INVOICE)
    assert used == ("example.com/rsa", "example.com/ed")
    sigs = signatures(signed)
    assert [s["a"] for s in sigs] == ["rsa-sha256", "ed25519-sha256"]  # RSA first
    assert all(s["d"] == "example.com" and s["c"] == "relaxed/relaxed" for s in sigs)
    assert all("l" not in s and "t" in s for s in sigs)
    assert verifies(signed, server) == [True, True]
    assert all(len(line) <= 78 for line in signed.split(b"\r\n")[:20])


def test_h_covers_the_invoice_headers_and_oversigns_from_and_reply_to(
        keys: tuple[Config, DnsServer]) -> None:
    config, _ = keys
    signed, _ = Signer.from_config(config).sign(INVOICE, "")
    assert signatures(signed)[0]["h"].split(":") == [
        "from", "from", "to", "subject", "date", "message-id", "reply-to"]


@pytest.mark.parametrize("added", [b"Reply-To: <pay@attacker.test>", b"From: <ceo@inv.example.com>",
                                   b"Subject: changed bank account"])
def test_a_header_added_after_signing_breaks_both_signatures(
        keys: tuple[Config, DnsServer], added: bytes) -> None:
    config, server = keys
    signed, _ = Signer.from_config(config).sign(INVOICE, "")
    assert verifies(signed, server) == [True, True]
    at = signed.index(b"\r\n\r\n") + 2
    forged = signed[:at] + added + b"\r\n" + signed[at:]
    assert verifies(forged, server) == [False, False]


def test_the_from_domain_chooses_the_policy_before_the_envelope(
        keys: tuple[Config, DnsServer]) -> None:
    config, server = keys
    signer = Signer.from_config(config)
    from_invoices = INVOICE.replace(b"billing@inv.example.com", b"ar@invoices.test")
    signed, used = signer.sign(from_invoices, "bounces@inv.example.com")
    assert used == ("invoices.test/inv",)
    assert verifies(signed, server) == [True]
    # No policy for the From domain (the catch-all `*` does not count): the envelope's.
    from_elsewhere = INVOICE.replace(b"billing@inv.example.com", b"x@unlisted.test")
    signed, used = signer.sign(from_elsewhere, "app@invoices.test")
    assert used == ("invoices.test/inv",)
    assert verifies(signed, server) == [True]
    # The From domain's policy applies even without keys: not signed as another domain.
    from_nodkim = INVOICE.replace(b"billing@inv.example.com", b"x@nodkim.test")
    assert signer.sign(from_nodkim, "app@invoices.test") == (from_nodkim, ())
    # Neither matches: unchanged, the same object.
    assert signer.sign(from_elsewhere, "app@unlisted.test")[0] is from_elsewhere


def test_from_header_forms(keys: tuple[Config, DnsServer]) -> None:
    config, _ = keys
    signer = Signer.from_config(config)
    for header in (b"From: billing@INV.Example.COM",
                   b"From: =?utf-8?b?5Y+R56Wo?= <a@x.example.com>",
                   b"From:\r\n  \"Last, First\" (billing)\r\n  <a@x.example.com>"):
        data = header + b"\r\nSubject: s\r\n\r\nbody\r\n"
        assert signer.sign(data, "")[1][0] == "example.com/rsa", header


def test_prepare_signs_and_hashes_what_goes_out(keys: tuple[Config, DnsServer]) -> None:
    config, server = keys
    signer = Signer.from_config(config)
    ready = prepare(INVOICE, sender="", signer=signer)
    assert ready.sha256 == hashlib.sha256(ready.data).hexdigest()
    assert verifies(ready.data, server) == [True, True]
    plain = prepare(INVOICE, sender="", signer=None)
    assert plain.data is INVOICE and plain.signed_by == ()
    assert plain.sha256 == hashlib.sha256(INVOICE).hexdigest()


def test_an_internationalised_from_domain_finds_its_policy(tmp_path: Path) -> None:
    write_ed25519(tmp_path / "k.pem")
    a_label = "发票.test".encode("idna").decode()
    signer = Signer.from_config(Config(senders=(
        SenderPolicy(a_label, dkim=(DkimKey("s", tmp_path / "k.pem"),)),)))
    data = "From: 开票 <开票@发票.test>\r\nSubject: s\r\n\r\nbody\r\n".encode()
    assert signer.sign(data, "")[1] == (f"{a_label}/s",)
    assert signer.sign(b"Subject: s\r\n\r\nbody\r\n", "ar@发票.test")[1] == (f"{a_label}/s",)
