"""What TLS one delivery attempt to a destination requires: the seam between where a
requirement comes from (a `[[destination]] tls` key, or an MTA-STS policy fetched for the
domain) and the attempt that enforces it (relay/delivery/attempt.py).

- opportunistic: encrypt when offered, without verifying; a failed handshake is retried in
  plain text (and the host remembered as broken for a while).
- required: never plain text; the certificate is not checked.
- verify: never plain text; the chain and the host name are checked against the system CAs or
  `[delivery] tls_ca_file`.
An MTA-STS policy in `enforce` mode is `verify` plus `mx_patterns` (only matching MX hosts may
be used); in `testing` mode it is opportunistic delivery with `report_only` set, so the attempt
logs what would have failed under enforce.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class TlsMode(StrEnum):
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    VERIFY = "verify"


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    mode: TlsMode
    # MTA-STS (RFC 8461 section 4.1): the policy's `mx` patterns ("mx.example.net" or
    # "*.example.net", lower case); only hosts matching one may be used. None: any host.
    mx_patterns: tuple[str, ...] | None = None
    # MTA-STS `testing`: deliver as `mode` says, but log what `verify` + `mx_patterns` would
    # have refused.
    report_only: bool = False
    origin: str = "policy"  # "policy" (a [[destination]] key) or "mta-sts", for logs

    @property
    def plain_text_allowed(self) -> bool:
        return self.mode == TlsMode.OPPORTUNISTIC

    def allows_host(self, name: str) -> bool:
        """True when `name` (an MX or route host name) matches the MX patterns, if any.

        `*.example.net` matches exactly one more label (RFC 8461 section 4.1)."""
        if self.mx_patterns is None:
            return True
        host = name.lower().rstrip(".")
        for pattern in self.mx_patterns:
            if pattern.startswith("*."):
                head, _, rest = host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


OPPORTUNISTIC = TlsRequirement(TlsMode.OPPORTUNISTIC)


class StsSource(Protocol):
    """Where `tls = "mta-sts"` destinations get their requirement (relay/delivery/mtasts.py).

    Never raises: no policy, or a fetch that failed with nothing cached, gives OPPORTUNISTIC
    (RFC 8461 section 5: a policy once seen keeps applying from the cache until it expires)."""

    async def requirement(self, domain: str) -> TlsRequirement: ...
