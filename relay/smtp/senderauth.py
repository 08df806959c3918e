"""Sender authorisation (`[[sender]] clients`): who may use a domain in MAIL FROM and From:.

Postfix's smtpd_sender_login_maps checks the envelope only; a forged invoice with a new bank
account needs only a forged From header, so the header is checked too. Intake builds this
once per config, and only when some `[[sender]]` has `clients`: otherwise it holds None and
pays nothing per message. After DATA only the header block is read, never the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.header import decode_header, make_header

from relay.addresses import domain_of
from relay.config import Config, SenderPolicy

# Every From (or obsolete `From :`) field of the header block, with its folded lines.
_FROM_FIELD = re.compile(rb"(?im)^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
# What follows an `@` up to the next delimiter: a domain as a mail client would read it.
_AT_DOMAIN = re.compile(r"@([^\s<>()\[\],;:\"@\\]+)")


class SenderAuth:
    """Answers "may this client use this sender domain?" for intake."""

    def __init__(self, policy_for: Callable[[str], SenderPolicy | None]) -> None:
        self._policy_for = policy_for

    @classmethod
    def from_config(cls, config: Config) -> SenderAuth | None:
        """The checker, or None when no `[[sender]]` has `clients` (nothing to check)."""
        return cls(config.sender_for) if config.sender_clients_in_force else None

    def allowed(self, domain: str, user: str | None, client: str) -> bool:
        """True unless the policy of `domain` lists clients and this one is not among them."""
        policy = self._policy_for(lookup_form(domain))
        return policy is None or policy.clients is None or policy.clients.allows(user, client)

    def refused_envelope(self, sender: str, user: str | None, client: str) -> str | None:
        """The envelope sender's domain when this client may not use it; None when it may.
        The null sender has no domain and is never refused here."""
        domain = domain_of(sender) if sender not in ("", "<>") else ""
        if domain and not self.allowed(domain, user, client):
            return domain
        return None

    def refused_from(self, header_block: bytes, user: str | None, client: str) -> str | None:
        """The first From-header domain this client may not use; None when it may use all."""
        for domain in from_domains(header_block):
            if not self.allowed(domain, user, client):
                return domain
        return None


def from_domains(header_block: bytes) -> list[str]:
    """Every domain written after an `@` in the From fields, display names and comments
    included, raw and after decoding RFC 2047 encoded-words.

    Deliberately wider than an RFC 5322 parse: a mail client may read a malformed field
    differently from our parser, and `"billing@invoices.example.com" <x@elsewhere>` is a
    classic spoof. A field with no `@` at all names no domain, so no policy applies to it."""
    found: dict[str, None] = {}
    for match in _FROM_FIELD.finditer(header_block):
        raw = match.group(1).replace(b"\r\n", b"").decode("utf-8", "replace")
        for text in (raw, _decoded(raw)):
            for domain in _AT_DOMAIN.findall(text):
                found.setdefault(domain.lower().rstrip("."), None)
    return [domain for domain in found if domain]


def _decoded(value: str) -> str:
    """The field with encoded-words decoded (`=?utf-8?q?billing=40invoices...?=`)."""
    if "=?" not in value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):  # unknown charset, bad encoding
        return ""


def lookup_form(domain: str) -> str:
    """Policies hold A-labels (xn--): a U-label domain (SMTPUTF8) must match them too."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not a valid domain: only a `*` policy can match it


def header_block(head: bytes, *, whole: bool) -> bytes | None:
    """The header block of a message's first bytes (with the CRLF of its last line): b""
    when the message starts with the empty line, all of `head` when it is the `whole`
    message and has no body, None when the block goes on past `head` (it cannot be checked)."""
    if head.startswith(b"\r\n"):
        return b""
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        return head[:end + 2]
    return head if whole else None
