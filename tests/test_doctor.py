"""`invoice-relay doctor`: SPF, DKIM, DMARC and PTR/FCrDNS checked against a real DNS server
on loopback, with records that pass and records that fail, and the fix printed for each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dkimkeys import txt_zone, write_ed25519, write_rsa
from dnsserver import DnsServer

from relay.cli import main

GOOD_ZONE = """
good.test.                  60 IN TXT "v=spf1 ip4:127.0.0.2 -all"
good.test.                  60 IN MX  10 mx1.good.test.
_dmarc.good.test.           60 IN TXT "v=DMARC1; p=reject; rua=mailto:d@good.test"
_mta-sts.good.test.         60 IN TXT "v=STSv1; id=20260101"
2.0.0.127.in-addr.arpa.     60 IN PTR mta1.good.test.
mta1.good.test.             60 IN A   127.0.0.2
"""

BAD_ZONE = """
bad.test.                   60 IN TXT "v=spf1 ip4:127.0.0.2 ~all"
hard.test.                  60 IN TXT "v=spf1 ip4:127.0.0.2 -all"
_dmarc.hard.test.           60 IN TXT "v=DMARC1; p=none"
none.test.                  60 IN A   127.0.0.9
3.0.0.127.in-addr.arpa.     60 IN PTR elsewhere.test.
5.0.0.127.in-addr.arpa.     60 IN PTR mta5.bad.test.
mta5.bad.test.              60 IN A   127.0.0.55
"""


def write_config(tmp_path: Path, dns: DnsServer, sources: list[tuple[str, str]],
                 senders: str) -> Path:
    lines = ", ".join(f'{{ address = "{a}", hostname = "{h}" }}' for a, h in sources)
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "senders.toml").write_text(senders)
    path = tmp_path / "relay.toml"
    path.write_text(f'[dns]\nnameservers = ["{dns.address}"]\n'
                    f"[delivery]\nsource_addresses = [{lines}]\n"
                    '[policies]\npath = "policies"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def row(out: str, status: str, subject: str, name: str) -> str:
    """The table line of one check (asserting there is exactly one), and its fix line."""
    pattern = rf"^{status}\s+{re.escape(subject)}\s+{re.escape(name)}\s+.*(?:\n\s+fix:.*)?"
    found = re.findall(pattern, out, re.MULTILINE)
    assert len(found) == 1, f"no single {status} {subject} {name} in:\n{out}"
    return found[0]


def test_a_domain_set_up_right_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    (tmp_path / "keys").mkdir()
    rsa_key = write_rsa(tmp_path / "keys" / "r.pem")
    ed_key = write_ed25519(tmp_path / "keys" / "e.pem")
    zone = GOOD_ZONE + txt_zone("r1", "good.test", rsa_key) + txt_zone("e1", "good.test", ed_key)
    with DnsServer(zone) as dns:
        config = write_config(tmp_path, dns, [("127.0.0.2", "mta1.good.test")],
                              '[[sender]]\ndomain = "good.test"\n'
                              'dkim = [ { selector = "r1", key = "keys/r.pem" },'
                              ' { selector = "e1", key = "keys/e.pem" } ]\n')
        code, out, _ = run(capsys, "--config", str(config), "doctor")
    assert code == 0, out
    row(out, "PASS", "good.test", "spf 127.0.0.2")
    assert "(rsa)" in row(out, "PASS", "good.test", "dkim r1")
    assert "(ed25519)" in row(out, "PASS", "good.test", "dkim e1")
    assert "p=reject" in row(out, "PASS", "good.test", "dmarc")
    assert "mx1.good.test" in row(out, "INFO", "good.test", "mx")
    assert "id=20260101" in row(out, "INFO", "good.test", "mta-sts")
    assert "mta1.good.test" in row(out, "PASS", "127.0.0.2", "ptr/fcrdns")
    assert "FAIL" not in out and "fix:" not in out
    assert out.rstrip().endswith("0 failed")


def test_every_failure_is_shown_with_its_fix(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").mkdir()
    published = write_rsa(tmp_path / "keys" / "published.pem")
    write_rsa(tmp_path / "keys" / "other.pem")  # on disk, but DNS holds `published`
    write_ed25519(tmp_path / "keys" / "ed.pem")  # DNS holds an RSA record for its selector
    zone = (BAD_ZONE + txt_zone("other", "bad.test", published)
            + txt_zone("ed", "bad.test", published))
    senders = ('[[sender]]\ndomain = "bad.test"\n'
               'dkim = [ { selector = "other", key = "keys/other.pem" },'
               ' { selector = "ed", key = "keys/ed.pem" },'
               ' { selector = "gone", key = "keys/published.pem" } ]\n'
               '[[sender]]\ndomain = "hard.test"\n[[sender]]\ndomain = "none.test"\n')
    sources = [("127.0.0.2", "mta1.bad.test"), ("127.0.0.3", "mta3.bad.test"),
               ("127.0.0.4", "mta4.bad.test"), ("127.0.0.5", "mta5.bad.test")]
    with DnsServer(zone) as dns:
        config = write_config(tmp_path, dns, sources, senders)
        code, out, _ = run(capsys, "--config", str(config), "doctor")
    assert code == 1
    # SPF: softfail, fail, none (and pass for the authorised address)
    row(out, "PASS", "bad.test", "spf 127.0.0.2")
    assert "add ip4:127.0.0.3 to the SPF record of bad.test" in row(
        out, "FAIL", "bad.test", "spf 127.0.0.3")
    assert "fail:" in row(out, "FAIL", "hard.test", "spf 127.0.0.4")
    none = row(out, "FAIL", "none.test", "spf 127.0.0.5")
    assert "no SPF record at none.test" in none
    assert 'publish none.test. IN TXT "v=spf1 ip4:127.0.0.5 -all"' in none
    # DKIM: another key, another algorithm, no record; each fix is the record to publish
    other = row(out, "FAIL", "bad.test", "dkim other")
    assert "another public key" in other and "other._domainkey.bad.test. IN TXT" in other
    assert "k=rsa, the key on disk is ed25519" in row(out, "FAIL", "bad.test", "dkim ed")
    gone = row(out, "FAIL", "bad.test", "dkim gone")
    assert "no DKIM key record at gone._domainkey.bad.test" in gone
    assert "publish gone._domainkey.bad.test. IN TXT" in gone
    # DMARC: absent, and present with p=none
    assert "publish _dmarc.bad.test. IN TXT" in row(out, "FAIL", "bad.test", "dmarc")
    assert "p=none" in row(out, "PASS", "hard.test", "dmarc")
    # PTR: mismatching, absent, forward lookup not back to the address
    mismatch = row(out, "FAIL", "127.0.0.3", "ptr/fcrdns")
    assert "PTR is elsewhere.test, EHLO name is mta3.bad.test" in mismatch
    assert "or make elsewhere.test the source's `hostname`" in mismatch
    assert "set its PTR to mta4.bad.test" in row(out, "FAIL", "127.0.0.4", "ptr/fcrdns")
    assert "publish mta5.bad.test. IN A 127.0.0.5" in row(
        out, "FAIL", "127.0.0.5", "ptr/fcrdns")
    assert "none (bounces" in row(out, "INFO", "bad.test", "mx")


def test_domain_option_limits_and_unknown_domain_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with DnsServer(GOOD_ZONE + BAD_ZONE) as dns:
        config = write_config(tmp_path, dns, [("127.0.0.2", "mta1.good.test")],
                              '[[sender]]\ndomain = "good.test"\n'
                              '[[sender]]\ndomain = "bad.test"\n')
        code, out, _ = run(capsys, "--config", str(config), "doctor", "--domain", "Good.Test.")
        assert code == 0, out
        assert "bad.test" not in out
        code, out, err = run(capsys, "--config", str(config), "doctor", "--domain", "x.test")
    assert code == 2 and out == ""
    assert "--domain x.test: no [[sender]] policy" in err and "good.test, bad.test" in err


def test_kernel_chosen_source_cannot_be_checked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with DnsServer(GOOD_ZONE) as dns:
        config = write_config(tmp_path, dns, [], '[[sender]]\ndomain = "good.test"\n')
        code, out, _ = run(capsys, "--config", str(config), "doctor")
    assert code == 0, out
    assert "cannot check SPF or PTR" in out
    assert "spf 127" not in out


def test_dns_failure_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with DnsServer(GOOD_ZONE) as dns:
        dns.servfail("_dmarc.good.test")
        config = write_config(tmp_path, dns, [("127.0.0.2", "mta1.good.test")],
                              '[[sender]]\ndomain = "good.test"\n')
        code, out, _ = run(capsys, "--config", str(config), "doctor")
    assert code == 1
    assert "DNS error" in row(out, "FAIL", "good.test", "dmarc")
