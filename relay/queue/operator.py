"""An operator's actions on queued recipients (`queue retry|hold|release|delete|bounce`).

They run where the index's one writer is: on the delivery process's index thread while the
relay runs (the command reaches it over `queue.path/control.sock`), or in the command itself,
holding the queue lock, while it is stopped. `delete` and `bounce` only pick the recipients
here (claiming them, so nothing else does); the caller records them as outcomes through the
delivery store, which writes the `bounced` DSN exactly as for a remote refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from relay.queue.envelope import ACTIVE, DEFERRED, HOLD, NORMAL, QUEUED
from relay.queue.index import FINAL_SQL, PENDING_SQL, DueRecipient, Index
from relay.queue.segments import Location

VERBS = ("retry", "hold", "release", "delete", "bounce")
CHUNK = 500  # ids per `IN (...)`: well under SQLite's variable limit
# The replies recorded for an operator's decision (a local decision, never a remote's words).
DELETE_REPLY = "deleted by the relay's operator (queue delete)"
BOUNCE_REPLY = "550 5.0.0 returned to the sender by the relay's operator (queue bounce)"
BOUNCE_STATUS = "5.0.0"


@dataclass(frozen=True, slots=True)
class Request:
    verb: str
    ids: tuple[str, ...] = ()
    all: bool = False          # retry only: every pending recipient
    domain: str | None = None  # retry only: every pending recipient at this domain

    def to_json(self) -> bytes:
        return json.dumps({"verb": self.verb, "ids": list(self.ids), "all": self.all,
                           "domain": self.domain}).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Request:
        data = json.loads(raw)
        verb = data.get("verb")
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r}")
        ids = tuple(str(i) for i in data.get("ids") or ())
        domain = data.get("domain")
        return cls(verb, ids, bool(data.get("all")), str(domain).lower() if domain else None)


@dataclass
class Change:
    messages: int = 0          # messages touched
    changed: int = 0           # recipients whose state or due time changed
    busy: int = 0              # in an attempt right now: left to finish (delete, bounce)
    picked: list[DueRecipient] = field(default_factory=list)  # delete/bounce: to record

    def to_dict(self) -> dict[str, int]:
        return {"messages": self.messages, "changed": self.changed, "busy": self.busy}


class UnknownIds(Exception):
    def __init__(self, ids: list[str]) -> None:
        super().__init__(", ".join(ids))
        self.ids = ids


def apply(index: Index, req: Request, now: float,
          busy: frozenset[tuple[str, int]] = frozenset()) -> Change:
    """Carry out `req` in one transaction; UnknownIds (nothing changed) for ids not queued
    here. `busy`: recipients in an attempt right now, which delete and bounce leave alone."""
    with index._transaction():
        missing = _unknown(index, req.ids)
        if missing:
            raise UnknownIds(missing)
        if req.verb in ("delete", "bounce"):
            return _pick(index, req, now, busy)
        return _update(index, req, now)


def _unknown(index: Index, ids: tuple[str, ...]) -> list[str]:
    known: set[str] = set()
    for chunk in _chunks(list(dict.fromkeys(ids))):
        marks = ",".join("?" * len(chunk))
        known.update(row[0] for row in index.conn.execute(
            f"SELECT id FROM messages WHERE id IN ({marks})", chunk))
    return [i for i in dict.fromkeys(ids) if i not in known]


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)] or [[]]


def _scopes(req: Request) -> list[tuple[str, list[object]]]:
    """WHERE fragments (with their parameters) that select the request's recipients."""
    if req.all:
        return [("1", [])]
    if req.domain:
        return [("domain = ?", [req.domain])]
    return [(f"msg IN ({','.join('?' * len(c))})", list(c)) for c in _chunks(list(req.ids))
            if c]


def _update(index: Index, req: Request, now: float) -> Change:
    if req.verb == "retry":  # due now; a held recipient stays held (as Postfix's postqueue -f)
        sql = (f"UPDATE recipients SET next_attempt = ?, updated = ? WHERE {{}}"
               f" AND state IN {PENDING_SQL} RETURNING msg")
        params: list[object] = [now, now]
    elif req.verb == "hold":  # claimed ones too: their queued jobs are dropped by the engine
        sql = (f"UPDATE recipients SET state = '{HOLD}', updated = ? WHERE {{}}"
               f" AND state IN ('{QUEUED}', '{DEFERRED}', 'unknown', '{ACTIVE}') RETURNING msg")
        params = [now]
    else:  # release: due now, as it was before the hold
        sql = (f"UPDATE recipients SET state = CASE WHEN attempts = 0 THEN '{QUEUED}'"
               f" ELSE '{DEFERRED}' END, next_attempt = ?, updated = ? WHERE {{}}"
               f" AND state = '{HOLD}' RETURNING msg")
        params = [now, now]
    change = Change()
    touched: set[str] = set()
    for where, args in _scopes(req):
        rows = index.conn.execute(sql.format(where), [*params, *args]).fetchall()
        change.changed += len(rows)
        touched.update(r[0] for r in rows)
    change.messages = len(touched)
    return change


def _pick(index: Index, req: Request, now: float, busy: frozenset[tuple[str, int]]) -> Change:
    """Claim every recipient of the messages that is not final (and not in an attempt now)."""
    change = Change()
    for where, args in _scopes(req):
        rows = index.conn.execute(
            "SELECT r.msg, r.idx, r.rcpt, r.domain, r.attempts, m.sender, m.received,"
            " m.expires, m.body, m.smtputf8, m.segment, m.offset, m.size, r.priority"
            " FROM recipients r JOIN messages m ON m.id = r.msg"
            f" WHERE {where} AND r.state NOT IN {FINAL_SQL}", args).fetchall()
        for (msg, idx, rcpt, domain, attempts, sender, received, expires, body, utf8, segment,
             offset, size, priority) in rows:
            if (msg, idx) in busy:
                change.busy += 1
                continue
            location = Location(segment, offset, size) if segment is not None else None
            change.picked.append(DueRecipient(msg, idx, rcpt, domain, attempts, sender,
                                              received, expires, body, bool(utf8), location,
                                              priority or NORMAL))
    index.conn.executemany(
        f"UPDATE recipients SET state = '{ACTIVE}', updated = ? WHERE msg = ? AND idx = ?",
        [(now, d.msg, d.idx) for d in change.picked])
    change.changed = len(change.picked)
    change.messages = len({d.msg for d in change.picked})
    return change


__all__ = ["BOUNCE_REPLY", "DELETE_REPLY", "VERBS", "Change", "Request", "UnknownIds", "apply"]
