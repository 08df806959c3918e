"""A message's delivery priority, decided at intake: high, normal or bulk.

From the message's own header when a trusted or authenticated client wrote it (`X-Priority:
1|2` or `Priority: urgent` is high, `X-Priority: 4|5` or `Priority: non-urgent` is bulk), else
from the envelope sender's `[[sender]] priority`, else normal. Only the header block is read.
A header that says normal (`X-Priority: 3`, which some mail libraries add to every message)
does not override the sender's policy: only a header asking for high or bulk does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from relay.addresses import domain_of
from relay.config import Config, SenderPolicy
from relay.queue.envelope import BULK, HIGH, NORMAL
from relay.smtp.senderauth import lookup_form

# `X-Priority:` or `Priority:` at the start of a header line, and its value on that line.
_FIELD = re.compile(rb"(?im)^(x-)?priority[ \t]*:[ \t]*([^\r\n]*)")
# The same names without IGNORECASE and after a line end: a leading literal lets the regex
# engine skip from line end to line end, about 4x faster than _FIELD on a header block with
# no such field (most messages). _NAME_FIRST covers the block's first line.
_NAME = rb"(?:[Xx]-)?[Pp][Rr][Ii][Oo][Rr][Ii][Tt][Yy][ \t]*:"
_NAME_AFTER_LINE_END = re.compile(rb"\n" + _NAME)
_NAME_FIRST = re.compile(_NAME)
_X_PRIORITY = {b"1": HIGH, b"2": HIGH, b"4": BULK, b"5": BULK}   # RFC-less, as mail clients
_PRIORITY = {b"urgent": HIGH, b"non-urgent": BULK}                # RFC 2156


def header_priority(header_block: bytes) -> str | None:
    """high or bulk when a priority field of the header block asks for it (the first such
    field wins), else None. `X-Priority: 1 (Highest)` reads as 1."""
    if not (_NAME_AFTER_LINE_END.search(header_block) or _NAME_FIRST.match(header_block)):
        return None
    for match in _FIELD.finditer(header_block):
        value = match.group(2).strip().lower()
        if match.group(1):  # X-Priority: the first character is the level
            found = _X_PRIORITY.get(value[:1]) if value[1:2] in (b"", b" ", b"(") else None
        else:
            found = _PRIORITY.get(value.split(b";")[0].split(b"(")[0].strip())
        if found is not None:
            return found
    return None


class SenderPriority:
    """`[[sender]] priority` of envelope-sender domains; built only when some sender sets
    one other than normal (otherwise intake holds None and looks nothing up)."""

    def __init__(self, policy_for: Callable[[str], SenderPolicy | None]) -> None:
        self._policy_for = policy_for

    @classmethod
    def from_config(cls, config: Config) -> SenderPriority | None:
        if all(s.priority == NORMAL for s in config.senders):
            return None
        return cls(config.sender_for)

    def of(self, sender: str) -> str:
        """The priority of mail from envelope sender `sender` ("" for the null sender)."""
        if not sender:
            return NORMAL
        policy = self._policy_for(lookup_form(domain_of(sender)))
        return policy.priority if policy is not None else NORMAL


def message_priority(sender_priority: str, header_block: bytes, *, header_counts: bool) -> str:
    """The header's priority when it counts (a trusted or authenticated client) and asks for
    high or bulk; otherwise the sender's."""
    if header_counts:
        return header_priority(header_block) or sender_priority
    return sender_priority
