"""TLS for outbound delivery: the SSL contexts of one config, and the static requirement of a
`[[destination]] tls` key (MTA-STS requirements come from an StsSource, tlspolicy.py).

The contexts are built once per config, here only (a reload builds a new TlsContexts from the
new config); no message ever reads a CA file.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import Config, DestinationPolicy
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsMode, TlsRequirement

REQUIRED = TlsRequirement(TlsMode.REQUIRED)
VERIFY = TlsRequirement(TlsMode.VERIFY)
_STATIC = {"opportunistic": OPPORTUNISTIC, "required": REQUIRED, "verify": VERIFY}


def static_requirement(policy: DestinationPolicy | None) -> TlsRequirement | None:
    """The requirement a destination's `tls` key fixes; None for `mta-sts` (ask the
    StsSource per attempt). No policy: opportunistic, today's behaviour."""
    if policy is None:
        return OPPORTUNISTIC
    return _STATIC.get(policy.tls)


class CaFileError(ValueError):
    """`[delivery] tls_ca_file` cannot be used: unreadable, or no PEM certificate in it."""


def _no_verify_context() -> ssl.SSLContext:
    """Opportunistic and `required`: encrypt, but accept any certificate (RFC 7435)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def verifying_context(ca_file: Path | None, *, with_system_cas: bool = False
                      ) -> ssl.SSLContext:
    """Chain and host name checked against `ca_file`, else the system CAs (loading those takes
    about 20 ms: done once per config). `verify` and MTA-STS delivery trust only the bundle
    when one is set (the contract: empty = the system CAs); the MTA-STS policy fetch trusts
    both (`with_system_cas`, RFC 8461 section 3.3 with the operator's additions)."""
    # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname are its defaults.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None or with_system_cas:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise CaFileError(f"file not found: {ca_file}") from None
        except ssl.SSLError as exc:  # before OSError, its base class
            raise CaFileError(f"{ca_file}: not a PEM certificate bundle ({exc.reason or exc})"
                              ) from None
        except OSError as exc:
            raise CaFileError(f"{ca_file}: cannot read: {exc.strerror or exc}") from None
    return ctx


@dataclass
class TlsContexts:
    """The client contexts of one config: `plain` (no verification) and `verifying`."""

    ca_file: Path | None = None
    plain: ssl.SSLContext = field(default_factory=_no_verify_context)
    _verifying: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, config: Config) -> TlsContexts:
        """Build the contexts; the verifying one now when a destination may need it (so a
        bad tls_ca_file fails here, at start or reload, not at a delivery). CaFileError."""
        contexts = cls(config.delivery.tls_ca_file)
        if any(d.tls in ("verify", "mta-sts") for d in config.destinations):
            contexts._verifying = verifying_context(contexts.ca_file)
        return contexts

    @property
    def verifying(self) -> ssl.SSLContext:
        if self._verifying is None:  # no destination asked for it at load: once, then kept
            self._verifying = verifying_context(self.ca_file)
        return self._verifying
