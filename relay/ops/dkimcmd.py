"""`invoice-relay dkim keygen`: a new DKIM private key on disk and the TXT record to publish.

The key file is created with mode 0600 in the same system call that creates it (never
readable by others, not even for a moment) and never overwritten. Keys are PKCS#8 PEM;
the `[[sender]] dkim` entry names the file, and the algorithm is read from it.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import ConfigError, find_config_file, normalize_domain
from relay.exitcodes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
TXT_STRING_MAX = 255  # one character-string of a TXT record (RFC 1035 3.3)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def generate(algorithm: str) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt_value(key: PrivateKey) -> str:
    """`v=DKIM1; k=...; p=...`: RSA publishes its SubjectPublicKeyInfo (RFC 6376), Ed25519
    the raw 32-byte public key (RFC 8463), not an SPKI."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


def txt_strings(value: str) -> list[str]:
    """The value cut into character-strings of at most 255 characters each."""
    return [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]


def zone_line(selector: str, domain: str, value: str) -> str:
    """The record as a zone-file line; the value holds no `"` or `\\` (base64 and `v=...;`)."""
    strings = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def default_key_folder(cli_config: str | None) -> Path:
    """`keys/` beside the main config (the folder `[[sender]] dkim` paths are relative to);
    with no config file, in the working directory."""
    path = find_config_file(cli_config)
    base = path.resolve().parent if path is not None else Path.cwd()
    return base / "keys"


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; FileExistsError if it exists.

    O_EXCL refuses an existing file (and a symlink planted in its place); the mode is given
    to open(2), so the file is never readable by others, whatever happens next."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a umask can only remove bits, but say it plainly
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def keygen_command(cli_config: str | None, domain: str, selector: str, algorithm: str,
                   out: str | None) -> int:
    try:
        domain = normalize_domain(domain)
        selector = normalize_domain(selector)  # one or more DNS labels, like a domain
    except ValueError as exc:
        print(f"invoice-relay dkim keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        folder = Path(out).expanduser() if out else default_key_folder(cli_config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_PROBLEM
    path = folder / f"{domain}.{selector}.pem"
    key = generate(algorithm)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_new_file(path, private_pem(key))
    except FileExistsError:
        print(f"{path}: already exists; not overwritten (pick another selector, or move the "
              "old key away once its DNS record is retired)", file=sys.stderr)
        return EXIT_PROBLEM
    except OSError as exc:
        print(f"{path}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"wrote {path} ({algorithm}, mode 0600); publish this TXT record:", file=sys.stderr)
    print(zone_line(selector, domain, txt_value(key)))
    return EXIT_OK
