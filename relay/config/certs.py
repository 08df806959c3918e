"""Certificates named by the config (`[server] tls_cert`, `[[recipient]] smime_certificate`):
reading one PEM certificate with a clear error, whom an S/MIME certificate is issued for, and
the expiry warnings check-config prints and serve logs.

Certificates are public: reading one here leaks nothing. What is kept in `Config` is still only
the path; the S/MIME encryptor (relay/policy/smime.py) loads its certificates itself, once per
config load.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from relay.config.report import read_bytes

EXPIRY_WARNING_DAYS = 30
MIN_RSA_BITS = 2048  # RFC 8551 section 4.1: receiving agents SHOULD support up to 4096


def read_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file; ValueError saying what is wrong (never a trace)."""
    data = read_bytes(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = " (a private key? give the certificate)" if b"PRIVATE KEY-----" in data else ""
        raise ValueError(f"{path}: not a PEM certificate{hint}")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{path}: not a valid PEM certificate") from None


def expiry_warning(path: Path, cert: x509.Certificate, now: float,
                   days: int = EXPIRY_WARNING_DAYS) -> str | None:
    """`PATH expired on DATE` / `PATH expires on DATE (in N days)`, or None when it is further
    away than `days`."""
    not_after = cert.not_valid_after_utc
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    left = not_after.timestamp() - now
    if left <= 0:
        return f"{path} expired on {when}"
    if left < days * 86400:
        return f"{path} expires on {when} (in {int(left // 86400)} days)"
    return None


def not_yet_valid_warning(path: Path, cert: x509.Certificate, now: float) -> str | None:
    start = cert.not_valid_before_utc
    if start.timestamp() > now:
        return f"{path} is not valid before {start.strftime('%Y-%m-%d %H:%M UTC')}"
    return None


def smime_problem(cert: x509.Certificate, match: str) -> str | None:
    """Why `cert` cannot encrypt mail for a `[[recipient]] match`; None when it can.

    Time is not judged here (see relay/policy/smime.py): an expired certificate is a warning
    at load, and a reason to refuse or defer at RCPT and delivery."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        kind = "an EC" if isinstance(key, ec.EllipticCurvePublicKey) else "a non-RSA"
        return (f"{kind} certificate; S/MIME encryption here supports RSA recipient "
                "certificates only")
    if key.key_size < MIN_RSA_BITS:
        return f"an RSA key of {key.key_size} bits; use at least {MIN_RSA_BITS}"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_encipherment:
        return "its KeyUsage does not allow keyEncipherment (a signing-only certificate?)"
    if not issued_for(cert, match):
        names = ", ".join(sorted(certificate_names(cert))) or "no address or domain"
        what = "address" if "@" in match else "domain (a gateway certificate)"
        return f"not issued for the {what} {match} (it names: {names})"
    return None


def certificate_names(cert: x509.Certificate) -> set[str]:
    """Lower-cased rfc822Name and dNSName SANs and subject emailAddress values."""
    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names.update(n.lower() for n in san.get_values_for_type(x509.RFC822Name))
        names.update(n.lower() for n in san.get_values_for_type(x509.DNSName))
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if isinstance(attribute.value, str):
            names.add(attribute.value.lower())
    return names


def issued_for(cert: x509.Certificate, match: str) -> bool:
    """True when the certificate names the policy's `match`.

    - an address: that address as an rfc822Name SAN or a subject emailAddress;
    - a domain `d` (a gateway certificate): rfc822Name `@d` or `d`, or dNSName `d`;
    - `*.d`: dNSName `*.d`, or rfc822Name `.d` (RFC 5280's spelling of "any subdomain")."""
    return bool(_accepted_names(match) & certificate_names(cert))


def _accepted_names(match: str) -> set[str]:
    if "@" in match:
        return {match}
    if match.startswith("*."):
        return {match, match[1:]}
    return {match, f"@{match}"}


def utc_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
