"""DKIM test keys and their DNS TXT records (RSA: SubjectPublicKeyInfo; Ed25519: the raw
32-byte key, RFC 8463), plus a dkimpy `dnsfunc` that asks a real DNS server on loopback."""

from __future__ import annotations

import base64
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL


def write_rsa(path: Path, bits: int = 2048, fmt: serialization.PrivateFormat = PKCS8,
              ) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                       serialization.NoEncryption()))
    return key


def write_ed25519(path: Path) -> ed25519.Ed25519PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, PKCS8,
                                       serialization.NoEncryption()))
    return key


def txt_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def txt_zone(selector: str, domain: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
             ) -> str:
    """The zone line, the value split into strings of at most 255 characters."""
    value = txt_value(key)
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. 60 IN TXT {strings}\n"


def dnsfunc_for(host: str, port: int):  # type: ignore[no-untyped-def]
    """A dkimpy `dnsfunc(name, timeout)` that asks the DNS server at host:port over UDP."""
    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(dns.message.make_query(qname, dns.rdatatype.TXT), host,
                              timeout=timeout, port=port)
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None
    return get_txt
