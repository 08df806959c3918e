"""The prepare step: the bytes one copy of a message is sent as, made when its next hop is known.

Pure (bytes in, bytes out, plus the SHA-256 of what goes out for the proof of delivery). The
spool keeps the message as accepted; delivery calls this per copy and caches the result per
job and variant, so a second hop or a retry within one attempt does not sign again. Order:
content repair first (it may rewrite parts), then S/MIME (a recipient's own copy is encrypted
to its certificate), DKIM last (it signs the bytes that leave, the encrypted copy included).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509

from relay.policy import smime
from relay.policy.content import repair
from relay.policy.dkim import Signer


@dataclass(frozen=True, slots=True)
class Prepared:
    data: bytes
    sha256: str                   # hex digest of `data`, recorded with each attempt
    signed_by: tuple[str, ...] = ()  # "d/selector" per DKIM-Signature added
    encrypted: bool = False           # S/MIME enveloped to the recipient's certificate


def prepare(data: bytes, *, sender: str, signer: Signer | None, eight_bit_ok: bool = True,
            smtputf8: bool = False, fallback_charset: str | None = None,
            now: float | None = None, encrypt_to: x509.Certificate | None = None) -> Prepared:
    """`data` as it should go to a hop (`eight_bit_ok`: it announced 8BITMIME).

    `fallback_charset` is the envelope sender's `[[sender]] charset`; `encrypt_to` the one
    recipient's usable S/MIME certificate (relay/policy/smime.py), None for a plain copy."""
    # The same object back unless something needed repair (one scan for a 7-bit message)
    data = repair(data, eight_bit_ok=eight_bit_ok, smtputf8=smtputf8,
                  fallback_charset=fallback_charset)
    if encrypt_to is not None:
        data = smime.encrypt(data, encrypt_to)
    signed_by: tuple[str, ...] = ()
    if signer is not None:  # None: no [[sender]] has dkim, no per-message work at all
        data, signed_by = signer.sign(data, sender, now)
    return Prepared(data, hashlib.sha256(data).hexdigest(), signed_by, encrypt_to is not None)
