"""One delivery attempt of one job: try the next hops in order until one gives an answer.

A connect failure, a 4xx/5xx greeting, a 4xx to EHLO or MAIL, a TLS failure or a drop before
the final dot moves on to the next address; RCPT and DATA replies decide per recipient.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from relay import log
from relay.config import Config, SourceAddress
from relay.delivery.client import (
    Abandoned,
    BindFailed,
    ConnectionLost,
    LocalAddressError,
    Reply,
    ReplyError,
    SmtpClient,
    SmtpClientError,
    Timeouts,
    TlsFailed,
    Transaction,
)
from relay.delivery.nexthop import NextHop
from relay.delivery.tls import VERIFY, TlsContexts
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsMode, TlsRequirement
from relay.policy import charsets
from relay.policy.content import needs_repair
from relay.policy.dkim import Signer
from relay.policy.prepare import Prepared, prepare
from relay.policy.smime import NO_CERTIFICATE, Decision, Smime
from relay.queue.index import DueRecipient

if TYPE_CHECKING:
    from relay.delivery.egress import Reservation
    from relay.delivery.paths import Path

TLS_BROKEN_MEMORY = 3600.0  # after a failed handshake, talk plain text to that host for an hour
_UNKNOWN_LOST = "connection lost after the final dot: outcome unknown"
_UNKNOWN_STOPPING = "relay stopped before the reply to the final dot: outcome unknown"
REPAIR_INLINE_MAX = 256 * 1024  # larger messages are repaired in a thread, off the event loop


@dataclass(slots=True)
class Job:
    """Recipients of one message that share a destination: one SMTP transaction."""

    msg: str
    recipients: list[DueRecipient]
    # The connection its transaction runs on, while it runs: a graceful stop asks it whether
    # the final dot is out (SmtpClient.abandon).
    client: SmtpClient | None = None
    invoice_id: str | None = None  # its X-Invoice-Id, once its bytes were read (records)
    # The path (source address, destination) it was dispatched to; None: the kernel's
    # choice of source and the attempter's own TLS memory (tests that run no engine).
    path: Path | None = None
    # Source addresses that could not be bound for it (it moved on to another source).
    unbindable: tuple[object, ...] = ()
    # Set by the attempt, for path health: some hop replied after its greeting (the
    # destination is up); or every hop tried failed at connection level (no session).
    answered: bool = False
    unreachable: bool = False
    # Warm-up recipients counted against its source until its outcome is known (egress.py).
    reservation: Reservation | None = None

    @property
    def first(self) -> DueRecipient:
        return self.recipients[0]

    @property
    def priority(self) -> str:
        """high | normal | bulk: the message's (every recipient of a job shares it)."""
        return self.recipients[0].priority


class Kind(StrEnum):
    """What one attempt did for one recipient (the engine turns it into a `State`)."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"    # retried (deferred), or expired when its lifetime is over
    PERMANENT = "permanent"    # bounced, with a DSN
    UNKNOWN = "unknown"        # the final dot went out and no reply came back: maybe delivered
    RELEASED = "released"      # a graceful stop gave it up before its final dot: not an attempt


@dataclass(slots=True)
class Verdict:
    """What happened to one recipient in this attempt."""

    due: DueRecipient
    kind: Kind
    reply: str
    status: str               # enhanced status code
    hop: NextHop | None = None
    tls: str | None = None     # TLS version, None for plain text
    sha256: str | None = None  # of the bytes sent, when the data went out
    tls_cipher: str | None = None
    tls_verified: bool = False  # chain and host name checked (tls = "verify", MTA-STS)
    source: str | None = None   # our address:port (delivery records)
    signed_by: tuple[str, ...] = ()  # DKIM "d/selector" of the bytes sent (delivery records)
    # True when `reply` is the remote server's reply; False when it is the relay's own text (a
    # connect error, a timeout, a TLS policy, DNS): logs and DSNs never say the host "said" it.
    remote: bool = False


@dataclass(slots=True)
class Connection:
    client: SmtpClient
    hop: NextHop
    sent: int = 0
    # The TLS requirement it was opened under: a job under another one opens its own.
    requirement: TlsRequirement = OPPORTUNISTIC
    verified: bool = False
    # MTA-STS testing: what verify + mx patterns would have refused on this connection.
    report: str | None = None


class SourceUnusable(Exception):
    """The job's source address cannot be bound: the engine moves it to another source."""

    def __init__(self, source: SourceAddress, why: str) -> None:
        super().__init__(why)
        self.source = source


class TlsRefused(Exception):
    """A hop cannot meet the TLS requirement (its connection is closed): skip it."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status  # 4.7.4: no STARTTLS; 4.7.5: handshake or verification failed
        self.reply = f"451 {status} {text}"


def _status_of(reply: Reply, default: str) -> str:
    return reply.enhanced or default


@dataclass
class Attempter:
    config: Config
    own_listeners: set[tuple[str, int]]
    # The SSL contexts of this config (None: built from `config` here).
    tls: TlsContexts | None = None
    # Broken-STARTTLS memory of jobs without a path (the engine's paths keep their own).
    tls_broken: dict[str, float] = field(default_factory=dict)
    # Keys of this config load; None when no [[sender]] signs (then nothing is parsed).
    signer: Signer | None = None
    # Certificates of this config load; None when no [[recipient]] asks for encryption.
    smime: Smime | None = None
    # Set by a graceful stop: no new hop is tried, and a transaction cut off before its final
    # dot is released (given back unattempted) rather than counted as a failed attempt.
    draining: bool = False

    def __post_init__(self) -> None:
        if self.tls is None:
            self.tls = TlsContexts.from_config(self.config)

    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.config.delivery.connect_timeout)

    def is_own_listener(self, hop: NextHop) -> bool:
        if (hop.address, hop.port) in self.own_listeners:
            return True
        wildcard = {p for a, p in self.own_listeners if a in ("0.0.0.0", "::")}
        return hop.port in wildcard and ipaddress.ip_address(hop.address).is_loopback

    async def _open(self, hop: NextHop, source: SourceAddress | None) -> SmtpClient:
        helo = source.hostname if source else self.config.server.hostname
        address = str(source.address) if source else None
        return await SmtpClient.connect(hop.address, hop.port, helo_name=helo,
                                        source_address=address, timeouts=self.timeouts())

    async def connect(self, hop: NextHop, requirement: TlsRequirement = OPPORTUNISTIC,
                      path: Path | None = None) -> Connection:
        """A connection to `hop` from `path`'s source address that meets `requirement`;
        TlsRefused when it cannot."""
        source = path.source if path is not None else None
        broken = path.tls_broken if path is not None else self.tls_broken
        if not requirement.plain_text_allowed:
            return await self._connect_enforced(hop, requirement, source)
        if requirement.report_only:
            return await self._connect_reporting(hop, requirement, source, broken)
        return await self._connect_opportunistic(hop, source, broken)

    async def _connect_opportunistic(self, hop: NextHop, source: SourceAddress | None,
                                     broken: dict[str, float]) -> Connection:
        client = await self._open(hop, source)
        if client.supports("STARTTLS") and broken.get(hop.address, 0) < time.time():
            assert self.tls is not None
            try:
                await client.starttls(self.tls.plain, server_hostname=_sni(hop.name))
            except ReplyError as exc:
                if exc.stage == "starttls" and not client.usable:
                    raise  # 421: the host is closing, try the next one
                if exc.stage == "starttls":
                    return Connection(client, hop)  # refused (454): go on in plain text
                tls_failed = True  # EHLO refused inside TLS
            except (TlsFailed, ConnectionLost):
                # Includes failures that show after the handshake (a TLS 1.3 server that
                # wants a client certificate alerts us at the EHLO that follows).
                tls_failed = True
            else:
                tls_failed = False
            if tls_failed:
                # Remember the broken host, then talk plain text rather than defer forever.
                broken[hop.address] = time.time() + TLS_BROKEN_MEMORY
                client.close()
                client = await self._open(hop, source)
        return Connection(client, hop)

    async def _connect_enforced(self, hop: NextHop, requirement: TlsRequirement,
                                source: SourceAddress | None) -> Connection:
        """`required` / `verify`: TLS or nothing. No plain-text retry, no broken-host memory:
        a hop that fails is skipped."""
        client = await self._open(hop, source)
        where = f"{hop.name}[{hop.address}]:{hop.port}"
        if not client.supports("STARTTLS"):
            client.close()
            raise TlsRefused("4.7.4", f"TLS is required, but was not offered by {where}")
        verify = requirement.mode == TlsMode.VERIFY
        assert self.tls is not None
        context = self.tls.verifying if verify else self.tls.plain
        try:
            # Verified: the MX name, the name written in `routes`, or an IP literal's address.
            await client.starttls(context, server_hostname=hop.name if verify else _sni(hop.name))
        except ReplyError as exc:
            client.close()
            if exc.stage == "starttls":
                raise TlsRefused("4.7.4", f"TLS is required, but {where} refused STARTTLS: "
                                 f"{_one_line(exc.reply.text if exc.reply else str(exc))}"
                                 ) from None
            raise TlsRefused("4.7.5", f"TLS is required, but {where} refused EHLO after the"
                             f" handshake: {_one_line(str(exc))}") from None
        except (TlsFailed, ConnectionLost) as exc:
            client.close()
            unverified = _verification_error(exc)
            if unverified is not None:
                raise TlsRefused("4.7.5", f"Server certificate not verified for {where}:"
                                 f" {unverified}") from None
            raise TlsRefused("4.7.5", f"TLS is required, but the handshake with {where}"
                             f" failed: {_one_line(str(exc))}") from None
        return Connection(client, hop, requirement=requirement, verified=verify)

    async def _connect_reporting(self, hop: NextHop, requirement: TlsRequirement,
                                 source: SourceAddress | None, broken: dict[str, float]
                                 ) -> Connection:
        """MTA-STS testing: try what enforce would do, deliver as opportunistic either way,
        and keep what enforce would have refused for the tls_policy_report event. A host that
        fails verification costs a second connection (testing mode only)."""
        problems = []
        if not requirement.allows_host(hop.name):
            problems.append(f"{hop.name} matches no mx pattern of the policy")
        try:
            conn = await self._connect_enforced(hop, VERIFY, source)
        except TlsRefused as exc:
            problems.append(str(exc))
            conn = await self._connect_opportunistic(hop, source, broken)
        conn.requirement = requirement
        conn.report = "; ".join(problems) or None
        return conn

    async def deliver(self, job: Job, data: bytes, hops: Sequence[NextHop],
                      conn: Connection | None,
                      requirement: TlsRequirement = OPPORTUNISTIC,
                      ) -> tuple[list[Verdict], Connection | None]:
        """Deliver `job` over the first hop that answers and meets `requirement`; reuse
        `conn` when it fits."""
        ordered = list(hops)
        if requirement.mx_patterns is not None and not requirement.report_only:
            ordered = [hop for hop in ordered if requirement.allows_host(hop.name)]
            if not ordered:
                _close(conn)
                return self._all(job, Kind.TEMPORARY, _no_matching_hop(job, requirement),
                                 "4.7.5", None), None
        if conn is not None and conn.requirement is not requirement \
                and conn.requirement != requirement:
            conn = _close(conn)  # opened under another requirement (a policy changed)
        if conn is not None and conn.hop in ordered:
            if conn.hop.kind == "fallback" and ordered[0].kind != "fallback":
                # Not sticky on a fallback relay: each job tries the real next hops first.
                _close(conn)
                conn = None
            else:
                ordered.remove(conn.hop)
                ordered.insert(0, conn.hop)
        decision = self._smime_decision(job)
        if decision is not None and decision.refused:
            # `required` and the certificate became unusable while the message waited (it
            # expired): defer, never clear text. It bounces at max_lifetime as usual.
            return self._all(job, Kind.TEMPORARY, f"451 4.7.5 <{decision.rcpt}>: "
                             f"{NO_CERTIFICATE}: {decision.reason}", "4.7.5", None), conn
        # (reply, status, hop, whether the reply is the remote server's own text)
        last: tuple[str, str, NextHop | None, bool] = ("451 4.4.1 No next hop answered", "4.4.1",
                                                       None, False)
        # The first hop skipped for TLS: that reason is what the recipient defers with when
        # no hop took the mail (more telling than a later hop's connect failure).
        refused: tuple[str, str, NextHop | None, bool] | None = None
        lacked_utf8 = False
        prepared: dict[bool, Prepared] = {}  # per variant: each hop of this attempt reuses it
        try:
            for hop in ordered:
                if self.draining:
                    return self._released(job, hop), _close(conn)
                if self.is_own_listener(hop):
                    _close(conn)
                    return self._all(job, Kind.PERMANENT, f"554 5.4.6 Mail for {job.first.domain}"
                                     f" loops back to myself ({hop.address}:{hop.port})", "5.4.6",
                                     hop), None
                if conn is None or conn.hop != hop or not conn.client.usable:
                    _close(conn)
                    conn = None
                    try:
                        conn = await self.connect(hop, requirement, job.path)
                    except BindFailed as exc:
                        if job.path is None or job.path.source is None:
                            raise
                        # Not the hop's fault: no hop works from here. Another source may.
                        raise SourceUnusable(job.path.source, str(exc)) from None
                    except TlsRefused as exc:
                        # The first (best MX) reason, not a fallback relay's after it.
                        refused = refused or (exc.reply, exc.status, hop, False)
                        continue
                    except LocalAddressError as exc:
                        last = (f"451 4.4.0 Local source address problem: {exc}", "4.4.0", hop,
                                False)
                        continue
                    except SmtpClientError as exc:
                        last = (_describe(exc, hop), _status(exc, "4.4.1"), hop,
                                exc.reply is not None)
                        continue
                if job.first.smtputf8 and not conn.client.supports("SMTPUTF8"):
                    lacked_utf8 = True
                    _close(conn)
                    conn = None
                    continue
                ready = await self._prepare(job, data, conn.client, prepared, decision)
                job.client = conn.client
                try:
                    tx = await conn.client.send(job.first.sender,
                                                [r.rcpt for r in job.recipients], ready.data,
                                                mail_params=self._params(job, conn.client,
                                                                         ready.data))
                except ConnectionLost as exc:
                    if self.draining or isinstance(exc, Abandoned):
                        # Cut off by a graceful stop before the final dot: nothing was
                        # delivered and this was no real attempt.
                        return self._released(job, hop), conn if conn.client.usable \
                            else _close(conn)
                    last = (_describe(exc, hop), "4.4.2", hop, exc.reply is not None)
                    _close(conn)
                    conn = None
                    continue
                finally:
                    job.client = None
                job.answered = True
                if not tx.mail.is_ok and not tx.mail.is_permanent:
                    last = (tx.mail.text, _status_of(tx.mail, "4.0.0"), hop, True)
                    _close(conn)
                    conn = None
                    continue
                verdicts = self._judge(job, tx, conn, ready.sha256)
                for v in verdicts:
                    v.source, v.signed_by = conn.client.source, ready.signed_by
                conn.sent += 1
                if conn.report is not None:
                    _report(job, conn)
                return verdicts, conn if conn.client.usable else _close(conn)
        except BaseException:
            _close(conn)  # an error or a cancel mid-attempt: the session state is unknown
            raise
        _close(conn)
        if lacked_utf8 and last[2] is None and refused is None:
            return self._all(job, Kind.PERMANENT, "554 5.6.7 No next hop supports SMTPUTF8, which"
                             " this message needs", "5.6.7", None), None
        if refused is not None:
            last = refused
        else:
            job.unreachable = not job.answered and last[2] is not None
        return self._all(job, Kind.TEMPORARY, last[0], last[1], last[2], remote=last[3]), None

    def _smime_decision(self, job: Job) -> Decision | None:
        """The S/MIME decision for a job's copy; None when it goes plain without question.

        A recipient with an encrypting policy always has a job of its own (engine.dispatch),
        so the first recipient decides for the copy. `preferred` without a usable certificate
        goes plain, said once per attempt as `smime_skipped`."""
        if self.smime is None:
            return None
        decision = self.smime.decide(job.first.rcpt)
        if decision is not None and decision.certificate is None and not decision.refused:
            log.event("smime_skipped", level=30, id=job.msg, rcpt=job.first.rcpt,
                      policy=decision.target.match, reason=decision.reason,
                      note="encryption preferred: delivered without S/MIME")
        return decision

    async def _prepare(self, job: Job, data: bytes, client: SmtpClient,
                       cache: dict[bool, Prepared], decision: Decision | None = None
                       ) -> Prepared:
        """The bytes for this hop (relay.policy.prepare: content repair, S/MIME, then DKIM),
        made once per job and variant.

        Inline on the delivery loop: an RSA-2048 signature costs about 0.3 ms and
        `cryptography` holds the GIL while it signs, so a thread would add a hop, not
        parallelism. Only a large message that needs content repair goes to a thread."""
        variant = client.supports("8BITMIME")
        ready = cache.get(variant)
        if ready is None:
            domain = job.first.sender.rpartition("@")[2].lower()
            policy = self.config.sender_for(domain) if domain else None
            make = functools.partial(prepare, data, sender=job.first.sender,
                                     signer=self.signer, eight_bit_ok=variant,
                                     smtputf8=job.first.smtputf8,
                                     fallback_charset=policy.charset if policy else None,
                                     encrypt_to=decision.certificate if decision else None)
            if not charsets.ready() and not data.isascii():
                await asyncio.to_thread(charsets.warm)  # tens of ms, once per process
            encrypting = decision is not None and decision.certificate is not None
            if len(data) > REPAIR_INLINE_MAX and (encrypting or needs_repair(data)):
                ready = await asyncio.to_thread(make)
            else:
                ready = make()
            cache[variant] = ready
        return ready

    def _params(self, job: Job, client: SmtpClient, payload: bytes) -> list[str]:
        params = []
        if client.supports("8BITMIME") and not payload.isascii():
            params.append("BODY=8BITMIME")
        if job.first.smtputf8:
            params.append("SMTPUTF8")
        return params

    def _judge(self, job: Job, tx: Transaction, conn: Connection, sha256: str
               ) -> list[Verdict]:
        verdicts = self._judge_replies(job, tx, conn, sha256)
        cipher, verified = conn.client.tls_cipher, conn.verified
        if cipher is not None or verified:
            for v in verdicts:
                v.tls_cipher, v.tls_verified = cipher, verified
        return verdicts

    def _judge_replies(self, job: Job, tx: Transaction, conn: Connection, sha256: str
                       ) -> list[Verdict]:
        hop, tls = conn.hop, conn.client.tls_version
        sent = sha256 if tx.data is not None or tx.outcome_unknown else None
        if not tx.mail.is_ok:  # a 5xx to MAIL refuses every recipient
            return self._all(job, Kind.PERMANENT, tx.mail.text, _status_of(tx.mail, "5.0.0"), hop,
                             tls, remote=True)
        verdicts = []
        for due in job.recipients:
            reply = tx.rcpt.get(due.rcpt)
            if reply is None or not reply.is_ok:
                reply = reply or tx.mail
                kind = Kind.PERMANENT if reply.is_permanent else Kind.TEMPORARY
                verdicts.append(Verdict(due, kind, reply.text,
                                        _status_of(reply, "5.0.0" if kind == Kind.PERMANENT
                                                   else "4.0.0"), hop, tls, remote=True))
            elif tx.outcome_unknown:
                verdicts.append(Verdict(due, Kind.UNKNOWN, _UNKNOWN_STOPPING if self.draining
                                        else _UNKNOWN_LOST, "4.4.2", hop, tls, sent))
            elif tx.data is None:
                verdicts.append(Verdict(due, Kind.TEMPORARY, "451 4.4.2 no reply to DATA", "4.4.2",
                                        hop, tls))
            elif tx.data.is_ok:
                verdicts.append(Verdict(due, Kind.DELIVERED, tx.data.text,
                                        _status_of(tx.data, "2.0.0"), hop, tls, sent,
                                        remote=True))
            else:
                kind = Kind.PERMANENT if tx.data.is_permanent else Kind.TEMPORARY
                verdicts.append(Verdict(due, kind, tx.data.text, _status_of(
                    tx.data, "5.0.0" if kind == Kind.PERMANENT else "4.0.0"), hop, tls, sent,
                    remote=True))
        return verdicts

    @staticmethod
    def _all(job: Job, kind: str, reply: str, status: str, hop: NextHop | None,
             tls: str | None = None, *, remote: bool = False) -> list[Verdict]:
        return [Verdict(due, kind, reply, status, hop, tls, remote=remote)
                for due in job.recipients]

    @classmethod
    def _released(cls, job: Job, hop: NextHop | None) -> list[Verdict]:
        return cls._all(job, Kind.RELEASED, "relay stopping: transaction given up before the final"
                        " dot", "4.3.2", hop)


def _close(conn: Connection | None) -> None:
    if conn is not None:
        conn.client.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _verification_error(exc: BaseException) -> str | None:
    """The reason a certificate was refused (chain or name), if that is why TLS failed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return _one_line(seen.verify_message or str(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def _no_matching_hop(job: Job, requirement: TlsRequirement) -> str:
    patterns = ", ".join(requirement.mx_patterns or ())
    return (f"451 4.7.5 No MX host of {job.first.domain} matches its {requirement.origin}"
            f" policy (mx: {patterns})")


def _report(job: Job, conn: Connection) -> None:
    """MTA-STS testing: one event per attempt saying what enforce would have refused."""
    hop = conn.hop
    log.event("tls_policy_report", level=30, id=job.msg, domain=job.first.domain,
              host=hop.name, address=f"{hop.address}:{hop.port}",
              policy=conn.requirement.origin, tls=conn.client.tls_version,
              would_refuse=conn.report)


def _sni(name: str) -> str | None:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


def _describe(exc: SmtpClientError, hop: NextHop) -> str:
    if exc.reply is not None:
        return exc.reply.text
    return f"451 4.4.1 {hop.name}[{hop.address}]:{hop.port}: {exc}"


def _status(exc: SmtpClientError, default: str) -> str:
    if exc.reply is not None and exc.reply.enhanced:
        return "4" + exc.reply.enhanced[1:]  # a refusing greeting moves on: it is temporary here
    return default
