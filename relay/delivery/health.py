"""Path health for shaped delivery: what a remote reply says about the path, each path's
cool-down and `on_reply` suspension, and each destination's circuit breaker.

Pure state machines: no sockets, no asyncio, no clock of their own. Every method takes `now`
(seconds, e.g. `time.monotonic()`), so the engine and the tests drive time.

A *path* is one (source address, destination) pair; a *destination* is a recipient domain.

API, as the engine uses it:

- `classify(reply, rules) -> ReplyClass`, for a reply that is not 2xx (never on success: the
  hot path does not pay for it). `reply` is the remote reply text, codes included (multi-line
  replies as `Reply.text` gives them). In this order:
  1. the destination's `on_reply` rules: the first whose `match` is found -> SUSPEND for its
     `duration` (`ReplyClass.duration`);
  2. failures about the MESSAGE, where another source will not help -> MESSAGE: RFC 7372
     DKIM/SPF-record/DMARC codes (X.7.20-22, X.7.24, X.7.26), Outlook's 5.7.512/515, media and
     size codes (X.6.*, X.3.4), DKIM/DMARC named in the text, content or virus rejections,
     greylisting;
  3. the enhanced codes about the SOURCE -> BLOCK: X.7.23 (SPF), X.7.25 (reverse DNS), Gmail's
     X.7.28 rate limit, Outlook's 5.7.511 and 5.7.606-649 (banned sending IP), 4.7.650,
     4.7.500; then the default block patterns (`BLOCK_PATTERNS`: DNSBLs, "blocked",
     "rate limited", "try again later" (in a 421 or a 5xx only), Yahoo TS/TSS codes,
     QQ/NetEase frequency and IP codes ...) -> BLOCK;
  4. any other `421` reply -> TRANSIENT;
  5. everything else -> NONE (the recipient's own business: retry or bounce as usual).
  Connection-level events have no reply: when an attempt over a path got no SMTP answer from
  any next hop (connect refused or timed out, connection lost before the final dot, a `421`
  greeting that `classify` calls TRANSIENT), the engine records `TRANSIENT` itself
  (`path.record(now, TRANSIENT, why)`). A source address that cannot be bound is a BLOCK of
  its path (`path.record(now, BLOCK, why)`).
  What it means for the recipient: after SUSPEND or BLOCK it is retried (through another
  source when one is available, else deferred with `all_blocked`'s reason), never bounced,
  even for a 5xx; after MESSAGE, NONE or TRANSIENT the reply decides as it always has
  (4xx defers, 5xx bounces).

- `PathHealth`, one per path: `available(now)`, `until(now)`, `rate_factor(now)`,
  `connection_cap(now, max_connections, rated)`, `success(now)`, `failure(now, kind,
  reason)`, `suspend(now, duration, reason)`, and `record(now, reply_class, reason)` which
  does what a `classify` result asks. A BLOCK or TRANSIENT failure takes the path out of
  rotation for `cooldown`, doubling with each failure in a row up to `cooldown_max`
  (`[delivery] path_cooldown`, `path_cooldown_max`); failures reported while it is already
  out (attempts that were in flight) do not double it again. After a cool-down the path
  carries one connection (a probe) until a success resets it. A suspension takes it out for
  `duration`; then, for one more `duration`, it runs at half the destination's rate
  (`rate_factor` 0.5), or on one connection when the destination has no rate; then at full
  speed.

- `Breaker`, one per destination: `allow(now)`, `until(now)`, `success(now)`, `failure(now)`.
  Opens after `BREAKER_THRESHOLD` connection-level failures in a row (each an attempt where
  every next hop failed, over any of the destination's paths); while open, `allow` is False
  and the engine hands the destination's work back due at `until(now)`, holding no slots.
  After the cool-down (the path cool-down settings, doubling while probes fail) it is
  half-open: `allow` lets ONE probe through; the probe's success closes it, its failure
  opens it again. A probe whose outcome never comes is replaced after another cool-down.
  Report `success` when an attempt got any SMTP reply after the greeting (the destination is
  up, even if it refused the message); report only TRANSIENT outcomes as `failure`.

- `all_blocked(destination, paths, now) -> Deferral | None`: None while some path is
  available, else when to come back and the reason to defer with
  ("all sources of D are blocked: <reason>").

- `HealthBook`: the engine's store of both, keyed by destination and source, created on first
  use; `prune(now)`, called now and then, forgets the healthy ones.
  `HealthBook.from_config(config)` at start; `apply(config)` at SIGHUP (from
  `DeliveryEngine.apply`) keeps the state, which is what the remotes said, and changes the
  timings. It is not a `Runtime` field for that reason: a reload must not forget a block.

Per message the engine pays a dict lookup and `available`/`connection_cap` (well under a
microsecond); `classify` (about 15 us, regular expressions) runs only on non-2xx replies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from relay.config import Config
from relay.config.policies import OnReply

BREAKER_THRESHOLD = 3  # whole-destination connection failures in a row before it opens
DEFAULT_COOLDOWN = 60.0
DEFAULT_COOLDOWN_MAX = 3600.0
RAMP_FACTOR = 0.5
REASON_MAX = 300  # characters of a reply kept for the deferral text


class ReplyKind(StrEnum):
    SUSPEND = "suspend"      # an on_reply rule matched: no connection for `duration`
    MESSAGE = "message"      # about this message: another source will not help; no path action
    BLOCK = "block"          # this source is blocked at this destination: out of rotation
    TRANSIENT = "transient"  # connection-level failure of the path
    NONE = "none"            # about the recipient, or nothing known: no path action


@dataclass(frozen=True, slots=True)
class ReplyClass:
    kind: ReplyKind
    duration: float = 0.0  # SUSPEND only: seconds, from the rule

    @property
    def path_action(self) -> bool:
        """True when the reply changes the path's health (suspend, block, transient)."""
        return self.kind in _PATH_KINDS


_PATH_KINDS = frozenset((ReplyKind.SUSPEND, ReplyKind.BLOCK, ReplyKind.TRANSIENT))
MESSAGE = ReplyClass(ReplyKind.MESSAGE)
BLOCK = ReplyClass(ReplyKind.BLOCK)
TRANSIENT = ReplyClass(ReplyKind.TRANSIENT)
NONE = ReplyClass(ReplyKind.NONE)

# An RFC 3463 code not inside an IP address or a version ("4.16.55.1" is not one).
_ENHANCED_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")

# Enhanced codes (subject.detail) about the message: another source address will not help.
_MESSAGE_CODES = frozenset({
    (7, 20), (7, 21), (7, 22),  # RFC 7372: no (valid, author-aligned) DKIM signature
    (7, 24),                    # RFC 7372: the sender domain's SPF record is broken
    (7, 26),                    # RFC 7372: several checks failed (DMARC)
    (7, 512),                   # Outlook: the message's From is not RFC 5322 compliant
    (7, 515),                   # Outlook: sending domain below the required authentication
    (3, 4),                     # message too big for the system
})
_MESSAGE_SUBJECTS = frozenset({6})  # X.6.*: media / content conversion problems
# Enhanced codes about the source address: another source may well be accepted.
_SOURCE_CODES = frozenset({
    (7, 23),   # RFC 7372: SPF validation failed for this source
    (7, 25),   # RFC 7372: reverse DNS validation failed for this source
    (7, 28),   # Gmail: unusual rate of unsolicited mail from this IP, rate limited
    (7, 511),  # Outlook: banned sending IP
    (7, 650),  # Outlook: rate limited due to IP reputation
    (7, 500),  # Outlook: server busy, rate limited
    *((7, n) for n in range(606, 650)),  # Outlook: banned sending IP (block list)
})

# Text about the message (content, authentication of the message, greylisting).
_MESSAGE_TEXT_RE = re.compile("|".join((
    r"\bdkim\b", r"\bdmarc\b",
    r"\bcontent\s+(?:rejected|refused|not\s+accepted)",
    r"\b(?:spam|virus|malware|phishing)\s+(?:content|detected|found)",
    r"\bmessage\s+(?:\w+\s+){0,2}(?:rejected|refused)\s+(?:as|because\s+of|due\s+to)\s+spam",
    r"\blikely\s+(?:spam|unsolicited)",  # Gmail: this message is likely unsolicited
    r"\bDT:SPM\b", r"\bDT:SUM\b",  # NetEase: spam content; envelope/header sender mismatch
    r"\bgr[ae]ylist",  # per (source, sender, recipient): another source starts over
)), re.IGNORECASE)

# Default block patterns: the remote names a block, a DNSBL listing or a rate limit of this
# source. Checked after the on_reply rules and the message exclusions.
BLOCK_PATTERNS: tuple[str, ...] = (
    r"\bblocked\b", r"\bblack\s*list(?:ed)?\b", r"\bblock\s*list(?:ed)?\b", r"\blisted\s+at\b",
    r"\bspamhaus\b", r"\b(?:dns)?rbl\b", r"\bdnsbl\b", r"\bbanned\s+sending\s+ip\b",
    r"\btoo\s+many\s+(?:concurrent\s+)?connections\b", r"\brate[\s-]+limit(?:ed|ing)?\b",
    # About the source address itself: its SPF authorisation, its reverse DNS
    r"\bspf\b", r"\breverse\s+(?:dns|hostname|lookup)\b", r"\bPTR\s+record",
    r"\bcannot\s+find\s+your\s+(?:reverse\s+)?hostname\b",
    # Gmail: 421-4.7.28 / 550-5.7.1 "unusual rate of unsolicited mail originating from your IP"
    r"\bunusual\s+rate\s+of\b", r"\bunsolicited\s+mail\s+originating\s+from\s+your\s+ip",
    # Outlook/Hotmail: "part of their network is on our block list (S3150)"
    r"\bS31[45]0\b",
    # Yahoo: "421 4.7.0 [TSS04] Messages from ... temporarily deferred due to unexpected
    # volume or user complaints"; [TS01]-[TS03]; [IPTS04]
    r"\[(?:TSS|IPTS|TS)\d\d\]", r"\btemporarily\s+deferred\s+due\s+to\b",
    # QQ: "550 Mail content denied" (bulk content reported as spam by many users),
    # "550 Connection frequency limited", "550 Ip frequency limited"
    r"\bmail\s+content\s+denied\b", r"\bfrequency\s+limited\b",
    # NetEase (163/126): HL:IPB/IHU/IFC/ICC/REP/MEP/IFQ/ITC (IP suspended, not listed,
    # frequency or concurrency over the limit), MI:SPB, RP:CEL, DT:RBL, WM:BLI, DY:*
    r"\bHL:[A-Z]{3}\b", r"\bMI:SPB\b", r"\bRP:CEL\b", r"\bDT:RBL\b", r"\bWM:BLI\b",
    r"\bDY:[A-Z]*",
)
_BLOCK_TEXT_RE = re.compile("|".join(BLOCK_PATTERNS), re.IGNORECASE)
# Generic texts that name a block only in a 421 (closing) or a 5xx: in a 450/451/452 they are
# what any server says for a passing condition of its own ("451 4.3.0 try again later"), and
# taking the path out for that would delay every other message on it.
LATER_PATTERNS: tuple[str, ...] = (r"\btry\s+again\s+later\b", r"\bserver\s+busy\b")
_LATER_TEXT_RE = re.compile("|".join(LATER_PATTERNS), re.IGNORECASE)


def _enhanced(reply: str) -> tuple[int, int] | None:
    """(subject, detail) of the first RFC 3463 code in the reply, e.g. (7, 26)."""
    match = _ENHANCED_RE.search(reply)
    return (int(match[2]), int(match[3])) if match else None


def classify(reply: str, rules: Sequence[OnReply] = ()) -> ReplyClass:
    """What a non-2xx reply says about its path (order in the module docstring)."""
    for rule in rules:
        if rule.match.search(reply):
            return ReplyClass(ReplyKind.SUSPEND, rule.duration)
    code = _enhanced(reply)
    if code is not None and (code in _MESSAGE_CODES or code[0] in _MESSAGE_SUBJECTS):
        return MESSAGE
    if _MESSAGE_TEXT_RE.search(reply):
        return MESSAGE
    if code in _SOURCE_CODES or _BLOCK_TEXT_RE.search(reply):
        return BLOCK
    closing = reply.lstrip().startswith(("421", "5"))
    if closing and _LATER_TEXT_RE.search(reply):
        return BLOCK
    if reply.lstrip().startswith("421"):
        return TRANSIENT
    return NONE


def _short(reason: str) -> str:
    """One line, at most REASON_MAX characters: the reply as a deferral reason."""
    line = " ".join(reason.split())
    return line if len(line) <= REASON_MAX else line[: REASON_MAX - 3] + "..."


@dataclass(slots=True)
class PathHealth:
    """Health of one (source address, destination) path. See the module docstring."""

    cooldown: float = DEFAULT_COOLDOWN
    cooldown_max: float = DEFAULT_COOLDOWN_MAX
    failures: int = 0            # BLOCK/TRANSIENT failures in a row (each one doubles)
    reason: str = ""             # why it is (or last was) out of rotation
    kind: ReplyKind = ReplyKind.NONE       # what took it out last
    _out_until: float = 0.0      # no connection before this
    _ramp_until: float = 0.0     # after a suspension: half speed until this

    def available(self, now: float) -> bool:
        """True when the path may carry mail now."""
        return now >= self._out_until

    def until(self, now: float) -> float:
        """When the path is usable again (`now` when it is)."""
        return max(now, self._out_until)

    def ramping(self, now: float) -> bool:
        """True in the half-speed period after an `on_reply` suspension."""
        return self._out_until <= now < self._ramp_until

    def probing(self, now: float) -> bool:
        """True after a cool-down until the next success: one connection at a time."""
        return self.failures > 0 and self.available(now)

    def rate_factor(self, now: float) -> float:
        """Share of the destination's rate this path may use: 0 while out of rotation, 0.5
        while ramping up after a suspension, else 1."""
        if not self.available(now):
            return 0.0
        return RAMP_FACTOR if now < self._ramp_until else 1.0

    def connection_cap(self, now: float, max_connections: int, rated: bool) -> int:
        """How many connections this path may hold now, out of `max_connections`: none while
        out of rotation; one while probing, or while ramping for a destination without a
        rate (`rated` False; with a rate, `rate_factor` does the slowing)."""
        if not self.available(now):
            return 0
        if self.failures > 0 or (not rated and now < self._ramp_until):
            return min(1, max_connections)
        return max_connections

    def success(self, now: float) -> None:
        """A delivery went through (or the remote answered normally): the path is healthy.
        A suspension's ramp is time-bound and continues."""
        self.failures = 0

    def failure(self, now: float, kind: ReplyKind, reason: str) -> None:
        """A BLOCK or TRANSIENT outcome: out of rotation for the cool-down, which doubles
        with each failure in a row (up to `cooldown_max`). Other kinds change nothing."""
        if kind not in (ReplyKind.BLOCK, ReplyKind.TRANSIENT):
            return
        self.reason, self.kind = _short(reason), kind
        if not self.available(now):
            return  # an attempt that was in flight when the path went out: no extra doubling
        self.failures += 1
        delay = min(self.cooldown * 2 ** min(self.failures - 1, 32), self.cooldown_max)
        self._out_until = now + delay

    def suspend(self, now: float, duration: float, reason: str) -> None:
        """An `on_reply` rule matched: no connection for `duration`, then half speed for one
        more `duration`, then full speed. A later match extends, never shortens."""
        self.reason, self.kind = _short(reason), ReplyKind.SUSPEND
        self._out_until = max(self._out_until, now + duration)
        self._ramp_until = max(self._ramp_until, now + 2 * duration)

    def record(self, now: float, reply_class: ReplyClass, reason: str) -> None:
        """Apply what `classify` found: suspend, fail, or (MESSAGE, NONE) nothing."""
        if reply_class.kind is ReplyKind.SUSPEND:
            self.suspend(now, reply_class.duration, reason)
        else:
            self.failure(now, reply_class.kind, reason)


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(slots=True)
class Breaker:
    """Circuit breaker of one destination. See the module docstring."""

    cooldown: float = DEFAULT_COOLDOWN
    cooldown_max: float = DEFAULT_COOLDOWN_MAX
    threshold: int = BREAKER_THRESHOLD
    failures: int = 0        # connection-level failures in a row
    opened: int = 0          # times opened in a row (each doubles the cool-down)
    _open_until: float = 0.0
    _open: bool = False
    _probe_at: float | None = None  # when the half-open probe was let through

    def state(self, now: float) -> str:
        if not self._open:
            return CLOSED
        return OPEN if now < self._open_until else HALF_OPEN

    def until(self, now: float) -> float:
        """When work may be tried again: `now` when closed, else the next probe's time."""
        if not self._open:
            return now
        if self._probe_at is not None:  # a probe is out: wait for it, or replace it later
            return max(now, self._probe_at + self._delay())
        return max(now, self._open_until)

    def allow(self, now: float) -> bool:
        """May one attempt start now? When half-open, True once: that attempt is the probe."""
        if not self._open:
            return True
        if now < self.until(now):
            return False
        self._probe_at = now
        return True

    def success(self, now: float) -> None:
        """The destination answered: close."""
        self._open, self._probe_at = False, None
        self.failures = self.opened = 0

    def failure(self, now: float) -> None:
        """An attempt where every next hop failed at connection level."""
        self.failures += 1
        if self._open:
            if self._probe_at is not None:  # the probe failed (or a late one): open again
                self._reopen(now)
            return
        if self.failures >= self.threshold:
            self._open = True
            self._reopen(now)

    def _delay(self) -> float:
        return min(self.cooldown * 2 ** min(max(self.opened - 1, 0), 32), self.cooldown_max)

    def _reopen(self, now: float) -> None:
        self.opened += 1
        self._probe_at = None
        self._open_until = now + self._delay()


@dataclass(frozen=True, slots=True)
class Deferral:
    """Every source of a destination is out of rotation: defer until `until`, with `reason`."""

    until: float
    reason: str


def all_blocked(destination: str, paths: Iterable[PathHealth], now: float) -> Deferral | None:
    """None while some path is available (or there are none); else when the first path comes
    back and the reason to defer with, from that path."""
    first: PathHealth | None = None
    for path in paths:
        if path.available(now):
            return None
        if first is None or path.until(now) < first.until(now):
            first = path
    if first is None:
        return None
    return Deferral(first.until(now),
                    f"all sources of {destination} are blocked: {first.reason or first.kind}")


@dataclass
class HealthBook:
    """Path health and breakers of every destination seen, created on first use. Kept across
    a SIGHUP (the state is what the remotes said, not config); `configure` changes timings."""

    cooldown: float = DEFAULT_COOLDOWN
    cooldown_max: float = DEFAULT_COOLDOWN_MAX
    _paths: dict[tuple[str, str], PathHealth] = field(default_factory=dict)
    _breakers: dict[str, Breaker] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> HealthBook:
        return cls(config.delivery.path_cooldown, config.delivery.path_cooldown_max)

    def apply(self, config: Config) -> None:
        """A reloaded config: new timings, same state."""
        self.configure(config.delivery.path_cooldown, config.delivery.path_cooldown_max)

    def path(self, destination: str, source: str) -> PathHealth:
        """The health of the path from `source` ("" for the kernel's choice) to `destination`."""
        key = (destination, source)
        found = self._paths.get(key)
        if found is None:
            found = self._paths[key] = PathHealth(self.cooldown, self.cooldown_max)
        return found

    def breaker(self, destination: str) -> Breaker:
        found = self._breakers.get(destination)
        if found is None:
            found = self._breakers[destination] = Breaker(self.cooldown, self.cooldown_max)
        return found

    def deferral(self, destination: str, sources: Iterable[str], now: float) -> Deferral | None:
        """`all_blocked` over the paths from `sources` to `destination`."""
        return all_blocked(destination, (self.path(destination, s) for s in sources), now)

    def prune(self, now: float) -> int:
        """Forget paths and breakers with nothing to remember (healthy, not ramping), so that
        a relay sending to many domains keeps only the troubled ones. Returns how many."""
        healthy = [k for k, p in self._paths.items()
                   if p.failures == 0 and now >= p._out_until and now >= p._ramp_until]
        for key in healthy:
            del self._paths[key]
        closed = [d for d, b in self._breakers.items() if b.failures == 0 and not b._open]
        for destination in closed:
            del self._breakers[destination]
        return len(healthy) + len(closed)

    def forgive(self, destination: str | None, now: float) -> int:
        """`queue retry`: the operator asks for an attempt now, so cool-downs and open breakers
        of `destination` (None: every destination) are forgotten, as Postfix's flush forgets
        a dead destination. An `on_reply` suspension stays: the remote asked for that time.
        Returns how many paths and breakers were reset."""
        reset = 0
        for (dest, _), path in self._paths.items():
            if destination not in (None, dest) or path.kind is ReplyKind.SUSPEND:
                continue
            if path.failures or not path.available(now):
                path.failures, path._out_until = 0, 0.0
                reset += 1
        for dest in [d for d in self._breakers if destination in (None, d)]:
            del self._breakers[dest]
            reset += 1
        return reset

    def destinations(self) -> set[str]:
        """Destinations with any state kept (the engine watches only these closely)."""
        return {d for d, _ in self._paths} | set(self._breakers)

    def configure(self, cooldown: float, cooldown_max: float) -> None:
        """New timings (at reload): they apply from each path's next failure on."""
        self.cooldown, self.cooldown_max = cooldown, cooldown_max
        for item in (*self._paths.values(), *self._breakers.values()):
            item.cooldown, item.cooldown_max = cooldown, cooldown_max
