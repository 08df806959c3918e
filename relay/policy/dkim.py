"""DKIM signing (RFC 6376; Ed25519-SHA256 per RFC 8463) with keys loaded once per config load.

Which `[[sender]]` policy signs: the one matching the From header's domain (the domain DMARC
aligns on); only when none matches it (or only the catch-all `*`, which cannot hold keys),
the envelope sender's. Its `d=` is the policy's domain without a leading `*.`. One signature
per `dkim` entry, RSA ones first (top of the message), relaxed/relaxed.

Cost: OpenSSL signs (`cryptography`), and bodies are canonicalised with whole-body bytes
operations (no Python loop per line), so a signature costs well under a millisecond.
Private keys live only in the key objects here, never in the config or in a log line.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relay.config import Config, DkimKey, DomainIndex, normalize_domain

# Signed when present, in this order. From and Reply-To are oversigned (listed once more than
# they occur), so a From or a Reply-To added after signing breaks the signature: a forged
# Reply-To is how payment-diversion fraud redirects a customer's answer.
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"reply-to")
OVERSIGNED = frozenset({b"from", b"reply-to"})
MIN_RSA_BITS = 1024  # RFC 8301: verifiers refuse smaller keys
LINE = 76            # fold the DKIM-Signature header near this column

_HEADER_WSP = re.compile(rb"[ \t]+")
_SPACE_RUN = re.compile(rb"  +")
_CRLF_RUN = re.compile(rb"(?:\r\n)*\Z")
_ADDR_DOMAIN = re.compile(r"@([^\s@<>\"()\[\],;:]+)")


class DkimKeyError(Exception):
    """Keys that could not be loaded: one `FILE: KEY: problem` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class SigningKey:
    selector: str
    algorithm: str   # "rsa" | "ed25519"
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    @property
    def a_tag(self) -> str:
        return f"{self.algorithm}-sha256"

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463: PureEdDSA over the SHA-256 hash of the data, not over the data.
        return self.private.sign(hashlib.sha256(data).digest())


@dataclass(frozen=True, slots=True)
class SigningDomain:
    """One `[[sender]]` policy as the signer sees it (keys empty: the policy does not sign)."""

    pattern: str
    d: str
    keys: tuple[SigningKey, ...]


def load_key(entry: DkimKey) -> SigningKey:
    """Read one private key (PEM, PKCS#8 or traditional; RSA or Ed25519).

    Raises DkimKeyError with one `FILE: KEY: problem` line; the text never holds key bytes."""
    where = entry.where or f"{entry.key}: dkim selector {entry.selector!r}"
    try:
        pem = Path(entry.key).read_bytes()
    except OSError as exc:
        raise DkimKeyError([f"{where}: cannot read {entry.key}: {exc.strerror}"]) from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise DkimKeyError([f"{where}: {entry.key} is encrypted; DKIM keys must be stored"
                            " without a passphrase (mode 0600)"]) from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimKeyError([f"{where}: {entry.key} is not a PEM private key"]) from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError([f"{where}: RSA key of {private.key_size} bits; DKIM needs at"
                                f" least {MIN_RSA_BITS} (2048 recommended)"])
        return SigningKey(entry.selector, "rsa", private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return SigningKey(entry.selector, "ed25519", private)
    raise DkimKeyError([f"{where}: {entry.key} holds a {type(private).__name__.lstrip('_')};"
                        " DKIM signs with RSA or Ed25519 keys only"])


class Signer:
    """Signs messages for the `[[sender]]` policies of one config (re)load."""

    def __init__(self, domains: Sequence[SigningDomain]) -> None:
        self._index = DomainIndex((sd.pattern, sd) for sd in domains)

    @classmethod
    def from_config(cls, config: Config) -> Signer | None:
        """Load every key now; None when no policy has `dkim` (nothing to do per message).

        Raises DkimKeyError listing every key that failed: never sign nothing silently."""
        if not any(s.dkim for s in config.senders):
            return None
        problems: list[str] = []
        domains = []
        for policy in config.senders:
            keys = []
            for entry in policy.dkim:
                try:
                    keys.append(load_key(entry))
                except DkimKeyError as exc:
                    problems.extend(exc.problems)
            keys.sort(key=lambda k: k.algorithm != "rsa")  # RSA first, stable otherwise
            d = policy.domain[2:] if policy.domain.startswith("*.") else policy.domain
            domains.append(SigningDomain(policy.domain, d, tuple(keys)))
        if problems:
            raise DkimKeyError(problems)
        return cls(domains)

    def domain_for(self, from_domain: str | None, envelope_sender: str) -> SigningDomain | None:
        """The policy that signs: the From domain's, else the envelope sender's."""
        found = self._index.lookup(_a_label(from_domain)) if from_domain else None
        if found is None or found.pattern == "*":
            _, at, domain = envelope_sender.rpartition("@")
            found = self._index.lookup(_a_label(domain)) if at and domain else None
        return found if found is not None and found.keys else None

    def sign(self, data: bytes, envelope_sender: str, now: float | None = None
             ) -> tuple[bytes, tuple[str, ...]]:
        """(the message with its DKIM-Signature headers on top, `d/selector` of each one);
        the message unchanged and () when no policy signs it."""
        head_end = _head_end(data)
        fields = parse_header(data[:head_end])
        domain = self.domain_for(from_domain(fields), envelope_sender)
        if domain is None:
            return data, ()
        bh = base64.b64encode(body_hash(data, head_end)).decode()
        h_names, signed = _signed_headers(fields)
        stamp = int(time.time() if now is None else now)
        headers = [_signature(key, domain.d, stamp, h_names, bh, signed) for key in domain.keys]
        return b"".join(headers) + data, tuple(f"{domain.d}/{k.selector}" for k in domain.keys)


def _a_label(domain: str) -> str:
    """The domain as policies spell it (xn-- form); as it is when it is no valid name."""
    if domain.isascii():
        return domain
    try:
        return normalize_domain(domain)
    except ValueError:
        return domain


# ---------------------------------------------------------------------------- the message


def _head_end(data: bytes) -> int:
    """Offset of the body: after the empty line that ends the header (len(data) if none)."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def parse_header(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, the whole field without its final CRLF) per header field, in order."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[0] in b" \t" and fields:  # a continuation line of the field before
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon > 0:
            fields.append((line[:colon].rstrip(b" \t").lower(), line))
    return fields


def from_domain(fields: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the (first) From header's address, lower case; None if there is none."""
    for name, raw in fields:
        if name == b"from":
            value = raw[raw.index(b":") + 1:].decode("utf-8", "replace").replace("\r\n", "")
            for _, address in getaddresses([value]):
                if "@" in address:
                    return address.rpartition("@")[2].strip().lower().rstrip(".") or None
            found = _ADDR_DOMAIN.findall(value)  # what getaddresses could not parse
            return found[-1].lower().rstrip(".") if found else None
    return None


def relaxed_header(raw: bytes) -> bytes:
    """RFC 6376 3.4.2: name lower-cased, value unfolded, WSP runs one SP, trimmed; + CRLF."""
    colon = raw.index(b":")
    value = _HEADER_WSP.sub(b" ", raw[colon + 1:].replace(b"\r\n", b"")).strip()
    return raw[:colon].rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 over the whole body at once: WSP runs -> one SP, no WSP before a line
    end, no empty lines at the end, CRLF at the end of a non-empty body.

    Whole-body bytes operations only (C speed, no Python loop per line): tabs become spaces,
    one regex collapses runs of spaces, then a space before a line end goes."""
    data = body.replace(b"\t", b" ") if b"\t" in body else body
    if b"  " in data:
        data = _SPACE_RUN.sub(b" ", data)
    if b" \r\n" in data:  # after the collapse, at most one space before a line end
        data = data.replace(b" \r\n", b"\r\n")
    stripped = data.rstrip(b"\r\n")
    # Only whole CRLFs are empty lines (a bare CR or LF, which intake never stores, stays).
    empty_lines = _CRLF_RUN.search(data[len(stripped):])
    assert empty_lines is not None  # the pattern matches at the end of any string
    data = data[:len(data) - len(empty_lines.group())]
    return data + b"\r\n" if data else b""


def body_hash(data: bytes, start: int = 0) -> bytes:
    """SHA-256 of the relaxed body that begins at `start` in `data`.

    A body without a tab, a double space or a space before a line end (base64 and
    quoted-printable parts, most generated text) is hashed in place, without a copy."""
    # One memchr for a space first: base64 has none, and the two-byte searches are slower.
    spaces = data.find(b" ", start) >= 0
    if (data.find(b"\t", start) >= 0 or data.endswith(b"\r\n\r\n") or len(data) - start < 4
            or (spaces and (data.find(b"  ", start) >= 0 or data.find(b" \r\n", start) >= 0))):
        return hashlib.sha256(relaxed_body(data[start:])).digest()
    end = len(data) - 2 if data.endswith(b"\r\n") else len(data)
    digest = hashlib.sha256(memoryview(data)[start:end])
    if end > start:
        digest.update(b"\r\n")
    return digest.digest()


def _signed_headers(fields: Sequence[tuple[bytes, bytes]]) -> tuple[list[bytes], bytes]:
    """(the h= names, the canonical header fields they cover, in h= order).

    Several instances of a name are taken from the bottom up (RFC 6376 5.4.2); an
    oversigned name's extra entry covers "no further instance"."""
    by_name: dict[bytes, list[bytes]] = {}
    for name, raw in fields:
        if name in SIGNED_HEADERS:
            by_name.setdefault(name, []).append(raw)
    names: list[bytes] = []
    canonical: list[bytes] = []
    for name in SIGNED_HEADERS:
        present = by_name.get(name, [])
        names.extend([name] * (len(present) + (name in OVERSIGNED)))
        canonical.extend(relaxed_header(raw) for raw in reversed(present))
    return names, b"".join(canonical)


def _signature(key: SigningKey, d: str, stamp: int, h_names: list[bytes], bh: str,
               signed: bytes) -> bytes:
    """One DKIM-Signature header field (folded, with CRLF) for the canonical `signed`."""
    tags: list[tuple[str, bool]] = [
        (f"v=1; a={key.a_tag}; c=relaxed/relaxed; d={d};", True),
        (f"s={key.selector};", True), (f"t={stamp};", True)]
    h = [n.decode() + ":" for n in h_names]
    h[-1] = h[-1][:-1] + ";"
    tags += [("h=" + h[0], True), *((piece, False) for piece in h[1:]), (f"bh={bh};", True)]
    unsigned = _fold([*tags, ("b=", True)])
    to_sign = signed + relaxed_header(unsigned.encode())[:-2]
    b = base64.b64encode(key.sign(to_sign)).decode()
    chunks = [b[i:i + 64] for i in range(0, len(b), 64)]
    chunks[0] = "b=" + chunks[0]
    return (_fold([*tags, *((c, i == 0) for i, c in enumerate(chunks))]) + "\r\n").encode()


def _fold(pieces: Sequence[tuple[str, bool]]) -> str:
    """`DKIM-Signature:` and the pieces, a space before those marked so, folded (CRLF TAB)
    where a line would pass LINE: between tags, between h= names, inside b=; all places
    where the grammar allows folding white space and relaxed canonicalisation ignores it."""
    out = ["DKIM-Signature:"]
    column = len(out[0])
    for text, spaced in pieces:
        gap = 1 if spaced else 0
        if column + gap + len(text) > LINE:
            out.append("\r\n\t")
            column = 8
        elif spaced:
            out.append(" ")
            column += 1
        out.append(text)
        column += len(text)
    return "".join(out)
