"""`invoice-relay dkim keygen`: the key on disk, its mode, and a TXT record that verifies."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relay import config as config_module
from relay.config import load_config
from relay.ops import dkimcmd

MESSAGE = (b"From: Billing <billing@invoices.example.com>\r\n"
           b"To: ap@customer.example\r\n"
           b"Subject: Invoice 2026-0042\r\n"
           b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <inv-2026-0042@invoices.example.com>\r\n"
           b"\r\n"
           b"Amount due: 1,250.00 EUR\r\n")


def run_relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != config_module.ENV_CONFIG}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def parse_record(stdout: str) -> tuple[str, list[str]]:
    """(owner name, character-strings) of the one zone-file line keygen prints."""
    (line,) = stdout.splitlines()
    owner, rest = line.split(" IN TXT ", 1)
    strings = re.findall(r'"([^"]*)"', rest)
    assert rest == " ".join(f'"{s}"' for s in strings)  # nothing but quoted strings
    return owner, strings


def sign(pem: bytes, algorithm: str, selector: str, domain: str) -> bytes:
    if algorithm == "ed25519":
        # dkimpy wants the base64 of the raw 32-byte seed, not PEM.
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        secret = base64.b64encode(seed)
    else:
        secret = pem
    header = dkim.sign(MESSAGE, selector.encode(), domain.encode(), secret,
                       signature_algorithm=f"{algorithm}-sha256".encode(),
                       canonicalize=(b"relaxed", b"relaxed"))
    return header + MESSAGE


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_key_whose_record_verifies(tmp_path: Path, algorithm: str) -> None:
    config = tmp_path / "etc" / "relay.toml"
    config.parent.mkdir()
    config.write_text("")
    result = run_relay("--config", str(config), "dkim", "keygen", "--domain",
                       "Invoices.Example.COM", "--selector", "s2026", "--algorithm", algorithm,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # keys/ beside the config, DOMAIN.SELECTOR.pem, 0600, PKCS#8.
    path = tmp_path / "etc" / "keys" / "invoices.example.com.s2026.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    owner, strings = parse_record(result.stdout)
    assert owner == "s2026._domainkey.invoices.example.com."
    assert all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    if algorithm == "ed25519":  # RFC 8463: the raw key, not a SubjectPublicKeyInfo
        assert len(base64.b64decode(record.split("p=")[1])) == 32
    else:
        assert len(strings) == 2  # an RSA-2048 record does not fit one string

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name == b"s2026._domainkey.invoices.example.com." else None

    signed = sign(pem, algorithm, "s2026", "invoices.example.com")
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"1,250.00", b"9,250.00"), dnsfunc=dnsfunc)
    # The config accepts the key and reads its algorithm from the file.
    (config.parent / "policies").mkdir()
    (config.parent / "policies" / "s.toml").write_text(
        '[[sender]]\ndomain = "invoices.example.com"\n'
        'dkim = [{ selector = "s2026", key = "keys/invoices.example.com.s2026.pem" }]\n')
    (sender,) = load_config(config).senders
    assert sender.dkim[0].algorithm == algorithm


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    args = ("dkim", "keygen", "--domain", "a.example", "--selector", "s1", "--out", "k",
            "--algorithm", "ed25519")
    assert run_relay(*args, cwd=tmp_path).returncode == 0
    path = tmp_path / "k" / "a.example.s1.pem"
    before = path.read_bytes()
    result = run_relay(*args, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("k/a.example.s1.pem: already exists; not overwritten")
    assert path.read_bytes() == before


def test_keygen_without_config_uses_keys_in_the_working_directory(tmp_path: Path) -> None:
    result = run_relay("dkim", "keygen", "--domain", "a.example", "--selector", "s1",
                       "--algorithm", "ed25519", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "keys" / "a.example.s1.pem").is_file()


def test_keygen_usage_errors(tmp_path: Path) -> None:
    result = run_relay("dkim", "keygen", "--domain", "bad domain", "--selector", "s1",
                       cwd=tmp_path)
    assert result.returncode == 2 and "is not a valid domain name" in result.stderr
    result = run_relay("dkim", "keygen", "--domain", "a.example", "--selector", "s1",
                       "--algorithm", "dsa", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'dsa'" in result.stderr
    assert not (tmp_path / "keys").exists()


def test_key_file_is_created_with_mode_0600(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The mode must be given to open(2) itself: a chmod afterwards leaves a window in which
    # the key is readable by others (umask 022 gives 0644 until then).
    calls: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, *args: object, **kw: object) -> int:
        calls.append((flags, mode))
        return real_open(path, flags, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dkimcmd.os, "open", spy)
    old_umask = os.umask(0)  # nothing masks a wrong mode here
    try:
        dkimcmd.write_new_file(tmp_path / "k.pem", b"secret")
    finally:
        os.umask(old_umask)
    ((flags, mode),) = calls
    assert flags & os.O_EXCL and flags & os.O_CREAT and mode == 0o600
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
