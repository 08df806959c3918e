"""The envelope of a queued message and the per-recipient states it moves through."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, fields
from enum import StrEnum


class State(StrEnum):
    """Where a recipient is (Postfix's queue states, per recipient). Pending ones are picked up
    by delivery; final ones never change again."""

    QUEUED = "queued"        # accepted, never tried
    ACTIVE = "active"        # claimed by the delivery process right now
    DEFERRED = "deferred"    # a temporary failure; retried at next_attempt
    UNKNOWN = "unknown"      # the connection dropped after the final dot: maybe delivered
    HOLD = "hold"            # an operator stopped delivery attempts (`queue hold`)
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    DELETED = "deleted"      # removed by an operator (`queue delete`): no DSN, the record stays


# Short names for the members, as the rest of the code spells them.
QUEUED, ACTIVE, DEFERRED, UNKNOWN = State.QUEUED, State.ACTIVE, State.DEFERRED, State.UNKNOWN
HOLD, DELIVERED, BOUNCED, EXPIRED = State.HOLD, State.DELIVERED, State.BOUNCED, State.EXPIRED
DELETED = State.DELETED

# Delivery priorities, most urgent first (`[[sender]] priority`, the priority headers).
HIGH, NORMAL, BULK = "high", "normal", "bulk"
PRIORITIES = (HIGH, NORMAL, BULK)

PENDING_STATES = (QUEUED, DEFERRED, UNKNOWN)
FINAL_STATES = (DELIVERED, BOUNCED, EXPIRED, DELETED)


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    client: str = ""
    helo: str = ""
    auth: str | None = None
    body: str | None = None       # "8BITMIME" when the client said BODY=8BITMIME
    smtputf8: bool = False
    message_id: str | None = None
    # high | normal | bulk (relay.smtp.priority). Written only when not normal: most records
    # stay as they were, and a record without it (older spools) reads as normal.
    priority: str = NORMAL

    def to_json(self) -> bytes:
        """The envelope as UTF-8 JSON; UnicodeEncodeError for text that is not valid Unicode
        (intake refuses such addresses and names before a message gets here)."""
        data = {name: getattr(self, name) for name in _FIELDS}
        data["recipients"] = list(self.recipients)
        if self.priority == NORMAL:
            del data["priority"]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        data["recipients"] = tuple(data["recipients"])
        return cls(**data)


_FIELDS = tuple(f.name for f in fields(Envelope))
_counter = itertools.count(random.SystemRandom().getrandbits(20))


def new_queue_id() -> str:
    """Sortable by time (microseconds); unique across our processes (pid) and within one
    (a counter that starts at a random point, so a restart in the same microsecond differs)."""
    micros = time.time_ns() // 1000
    tail = (os.getpid() & 0xFFF) << 20 | (next(_counter) & 0xFFFFF)
    return f"{micros:014X}{tail:08X}"
