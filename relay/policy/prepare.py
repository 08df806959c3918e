"""The prepare step: the bytes one copy of a message is sent as, made when its next hop is known.

Pure (bytes in, bytes out, plus the SHA-256 of what goes out for the proof of delivery). The
spool keeps the message as accepted; delivery calls this per copy and caches the result per
job and variant, so a second hop or a retry within one attempt does not sign again. Order:
content repair first (it may rewrite parts), DKIM last (it signs the bytes that leave).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from relay.policy.dkim import Signer


@dataclass(frozen=True, slots=True)
class Prepared:
    data: bytes
    sha256: str                   # hex digest of `data`, recorded with each attempt
    signed_by: tuple[str, ...] = ()  # "d/selector" per DKIM-Signature added


def prepare(data: bytes, *, sender: str, signer: Signer | None, eight_bit_ok: bool = True,
            now: float | None = None) -> Prepared:
    """`data` as it should go to a hop (`eight_bit_ok`: it announced 8BITMIME)."""
    # Content repair (relay.policy.content.repair: 8-bit downgrade for a hop without
    # 8BITMIME, re-encoding of long lines) goes here, before signing.
    signed_by: tuple[str, ...] = ()
    if signer is not None:  # None: no [[sender]] has dkim, no per-message work at all
        data, signed_by = signer.sign(data, sender, now)
    return Prepared(data, hashlib.sha256(data).hexdigest(), signed_by)
