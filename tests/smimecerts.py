"""Throw-away S/MIME recipient certificates for the tests: RSA-2048 keys, self-signed, with email
(rfc822Name) or DNS SANs, valid for as long as a test asks.

    cert, key = write_smime(tmp_path / "ap", emails=["ap@customer.test"])

One RSA-2048 key is generated per process and reused (generation costs ~50-100 ms); a test that
needs its own key passes `fresh_key=True`.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


@functools.cache
def _shared_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_smime(stem: Path, *, emails: Sequence[str] = (), dns_names: Sequence[str] = (),
                subject_email: str | None = None, not_before: datetime.datetime | None = None,
                not_after: datetime.datetime | None = None, ec_key: bool = False,
                fresh_key: bool = False, key_encipherment: bool | None = True
                ) -> tuple[Path, Path]:
    """Write `stem.pem` (the certificate) and `stem.key` (its key); return both paths.

    Default validity: from a day before now (or before `not_after`) to a year from now.
    `key_encipherment=None` leaves the KeyUsage extension out altogether."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if ec_key:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(65537, 2048) if fresh_key else _shared_key()
    now = datetime.datetime.now(datetime.UTC)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, "S/MIME test recipient")]
    if subject_email is not None:
        attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    name = x509.Name(attributes)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or min(now, not_after or now) - DAY)
               .not_valid_after(not_after or now + 365 * DAY))
    sans: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails]
    sans += [x509.DNSName(d) for d in dns_names]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if key_encipherment is not None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
            key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
    cert = builder.sign(key, hashes.SHA256())
    stem.parent.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
