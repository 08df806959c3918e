"""The inbound SMTP server: aiosmtpd's protocol with our access rules, AUTH and DATA reader.

Intake never does DNS and never blocks the event loop: spool writes and fsyncs happen on the
committer's threads, password checks on a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Protocol, TypeVar

from aiosmtpd.smtp import SMTP, AuthResult, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay import log
from relay.addresses import HostPort, domain_of
from relay.queue.committer import Committer, QueueWriteError
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.space import FreeSpaceGuard
from relay.smtp import replies
from relay.smtp.data import DataReader
from relay.smtp.fastinit import CheapIdleTimer, FastAddressParsing, command_names

MAX_RECIPIENTS = 1000
MAX_RECEIVED = 50
SPILL_BYTES = 1 << 20      # larger messages are streamed to their spool file while they arrive
READ_CHUNK = 1 << 18
HEAD_BYTES = 64 * 1024     # enough of the message to find its header block

_T = TypeVar("_T")
_RECEIVED = re.compile(rb"(?im)^received:")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(?:\r\n[ \t]+)?(<[^>\r\n]{1,900}>)")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


class UserStore(Protocol):
    """What intake needs from the users file (relay.smtp.auth.Users)."""

    async def check(self, username: str, password: str) -> bool: ...


@dataclass
class IntakeContext:
    """State shared by every inbound session of this process."""

    hostname: str
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
    max_message_size: int
    committer: Committer
    users: UserStore | None = None
    tls_context: ssl.SSLContext | None = None
    draining: bool = False
    sessions: set[RelaySMTP] = field(default_factory=set)
    space: FreeSpaceGuard | None = None   # refuse new mail below [queue] min_free_space
    _trust_cache: dict[str, bool] = field(default_factory=dict)

    def is_trusted(self, peer: str) -> bool:
        known = self._trust_cache.get(peer)
        if known is None:
            if len(self._trust_cache) > 10_000:
                self._trust_cache.clear()
            known = self._trust_cache[peer] = self._check_trusted(peer)
        return known

    def _check_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted)


class RelayHandler:
    """aiosmtpd hooks: EHLO keywords and the relay-access decision at RCPT."""

    def __init__(self, ctx: IntakeContext) -> None:
        self.ctx = ctx

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses if not (r.startswith("250-AUTH") and self.ctx.users is None)]
        # aiosmtpd reads commands one line at a time from a buffer, so pipelining really works.
        return [*kept[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", kept[-1]]

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not (session.authenticated or self.ctx.is_trusted(session.peer[0])):
            log.event("rejected", client=session.peer[0], rcpt=address, reason="relay denied")
            return replies.RELAY_DENIED.format(address)
        if rcpt_options:
            return "555 5.5.4 RCPT TO parameters not recognized or not implemented"
        if "@" not in address or not domain_of(address):
            return "501 5.1.3 Bad recipient address syntax"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)
        return "250 2.1.5 Ok"


def _never(*_: Any) -> AuthResult:
    return AuthResult(success=False, handled=False)


class _GuardedCommands:
    """aiosmtpd's command table, built lazily: each lookup returns the command wrapped so that
    a draining relay answers 421 (a table of wrappers per connection costs more than a
    message's worth of parsing)."""

    __slots__ = ("_smtp",)

    def __init__(self, smtp: RelaySMTP) -> None:
        self._smtp = smtp

    def get(self, name: str, default: Any = None) -> Any:
        if name not in command_names(type(self._smtp)):
            return default
        return self._smtp._guard(name, getattr(self._smtp, "smtp_" + name))

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self.get(name)) for name in command_names(type(self._smtp))]


class RelaySMTP(CheapIdleTimer, FastAddressParsing, SMTP):
    """One inbound session."""

    # aiosmtpd's defaults are "User Name\0" and "Password\0"; clients expect the usual texts.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, ctx: IntakeContext, *, implicit_tls: bool) -> None:
        super().__init__(
            RelayHandler(ctx),
            hostname=ctx.hostname,
            ident="invoice-relay",
            data_size_limit=ctx.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else ctx.tls_context,
            require_starttls=False,
            auth_required=False,
            auth_require_tls=not implicit_tls,
            authenticator=_never,
            timeout=300,
            loop=asyncio.get_running_loop(),
        )
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.in_data = False
        self._command = ""
        # Wrap every command so a draining relay answers 421 at the session's next command.
        self._smtp_methods = _GuardedCommands(self)

    def _guard(self, name: str, method: Callable[[str | None], Any]) -> Callable[..., Any]:
        async def guarded(arg: str | None) -> None:
            if self.ctx.draining:
                await self.push(replies.SHUTTING_DOWN)
                if self.transport is not None:
                    self.transport.close()
                return
            self._command = name
            await method(arg)
        return guarded

    # --- connection bookkeeping ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ctx.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        # Only the EHLO/HELO greeting lines go without a code (RFC 2034); their error replies,
        # and replies to unknown commands (which leave _command as it was), get one.
        if isinstance(status, str) and not (
                self._command in ("EHLO", "HELO") and status.startswith("250")):
            status = replies.with_enhanced_code(status)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        text = arg.lstrip() if arg else arg
        if text and text.startswith("<>"):
            # The null reverse-path (bounces): "" would be taken as a syntax error.
            return "<>", text[2:]
        if text and text[0] == "<" and ">" not in text:
            return None, None  # aiosmtpd would take "<bad" as the address "bad"
        return super()._getaddr(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if self.ctx.users is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    # --- AUTH: checked off the event loop --------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False)
        else:
            blob = _b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        fields = blob.split(b"\0")
        if len(fields) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._login(fields[1], fields[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            user = _b64(args[1])
            if user is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(user, bytes):
            return AuthResult(success=False)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await self._login(user, password)

    async def _login(self, user: bytes, password: bytes) -> AuthResult:
        assert self.ctx.users is not None
        name = user.decode("utf-8", "replace")
        ok = await self.ctx.users.check(name, password.decode("utf-8", "replace"))
        log.event("auth", client=self.session.peer[0] if self.session else None, user=name,
                  result="ok" if ok else "failed")
        if ok:
            return AuthResult(success=True, auth_data=name)
        return AuthResult(success=False, handled=False)

    # --- DATA ------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.ctx.space is not None and not self.ctx.space.ok():
            log.event("rejected", client=self.session.peer[0] if self.session else None,
                      reply=replies.INSUFFICIENT_STORAGE)
            await self.push(replies.INSUFFICIENT_STORAGE)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            reply = await self._receive()
        finally:
            self.in_data = False
        self._set_post_data_state()
        if reply is not None:
            await self.push(reply)

    async def _receive(self) -> str | None:
        """Read the message, make it durable, return the reply (None: the client vanished)."""
        session, smtp_env = self.session, self.envelope
        assert session is not None and smtp_env is not None
        queue_id = new_queue_id()
        now = time.time()
        reader = DataReader(self.ctx.max_message_size)
        received = self._received_header(queue_id, now).encode()
        stream = _Stream(self.ctx, queue_id)
        write_error: OSError | None = None
        try:
            while not reader.done:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    return None  # EOF mid-DATA: nothing was acknowledged, nothing is kept
                reader.feed(chunk)
                self._reset_timeout()  # the idle timeout counts silence, not the whole DATA
                if write_error is not None:
                    reader.take_parts()  # refused already: read on to the final dot, keep nothing
                elif reader.error is None and not reader.done and \
                        reader.size - stream.flushed > SPILL_BYTES:
                    try:
                        await stream.spill(self._envelope(queue_id, now, reader), received,
                                           reader)
                    except OSError as exc:  # disk full: answer 451 after the final dot
                        write_error = exc
                        await stream.discard()
            if reader.leftover:
                # Pipelined commands after the final dot go back to aiosmtpd's line reader.
                self._reader._buffer[:0] = reader.leftover  # type: ignore[attr-defined]
            if reader.error is not None:
                log.event("rejected", id=queue_id, client=session.peer[0],
                          reply=reader.error.value)
                return reader.error.value
            if write_error is not None:
                raise QueueWriteError(f"{type(write_error).__name__}: {write_error}")
            head = stream.head or b"".join(reader.parts)[:HEAD_BYTES]
            # Counted with our own Received header, as Postfix's hopcount_limit and our delivery
            # side do: what delivery would bounce as a loop is refused here instead.
            if len(_RECEIVED.findall(_header_block(head))) + 1 > MAX_RECEIVED:
                log.event("rejected", id=queue_id, client=session.peer[0],
                          reply=replies.LOOP_DETECTED)
                return replies.LOOP_DETECTED
            envelope = stream.envelope or self._envelope(queue_id, now, reader)
            size = len(received) + reader.size
            parts = reader.take_parts() if stream.fd is not None else [received, *reader.parts]
            await self.ctx.committer.commit(envelope, parts, size, fd=stream.take_fd(),
                                            env_len=stream.env_len)
        except QueueWriteError as exc:
            log.event("queue_write_failed", id=queue_id, error=str(exc))
            return replies.QUEUE_WRITE_FAILED
        finally:
            await stream.discard()
        log.event("received", id=queue_id, client=session.peer[0], sender=envelope.sender,
                  nrcpt=len(envelope.recipients), size=size, message_id=envelope.message_id,
                  auth=envelope.auth)
        return replies.QUEUED.format(queue_id)

    def _envelope(self, queue_id: str, now: float, reader: DataReader) -> Envelope:
        smtp_env = self.envelope
        session = self.session
        assert smtp_env is not None and session is not None
        head = b"".join(reader.parts[:4])[:HEAD_BYTES]
        match = _MESSAGE_ID.search(_header_block(head))
        body = "8BITMIME" if "BODY=8BITMIME" in smtp_env.mail_options else None
        return Envelope(
            id=queue_id,
            sender="" if smtp_env.mail_from in (None, "<>") else smtp_env.mail_from,
            recipients=tuple(smtp_env.rcpt_tos),
            received=now,
            client=session.peer[0],
            helo=session.host_name or "",
            auth=session.auth_data if session.authenticated else None,
            body=body,
            smtputf8=bool(smtp_env.smtp_utf8),
            message_id=match.group(1).decode("utf-8", "replace") if match else None,
        )

    def _received_header(self, queue_id: str, now: float) -> str:
        session, smtp_env = self.session, self.envelope
        assert session is not None and smtp_env is not None
        helo = _HELO_SAFE.sub("", session.host_name or "unknown")[:255] or "unknown"
        tls = self.implicit_tls or bool(self._tls_protocol)
        proto = "UTF8SMTP" if smtp_env.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
        proto += ("S" if tls else "") + ("A" if session.authenticated else "")
        rcpt = f"\r\n\tfor <{smtp_env.rcpt_tos[0]}>" if len(smtp_env.rcpt_tos) == 1 else ""
        return (f"Received: from {helo} ([{session.peer[0]}])\r\n\tby {self.ctx.hostname}"
                f" (invoice-relay) with {proto} id {queue_id}{rcpt};\r\n"
                f"\t{_date_header(now)}\r\n")


class _Stream:
    """A large message's spool file, written while DATA is still arriving."""

    def __init__(self, ctx: IntakeContext, queue_id: str) -> None:
        self.ctx = ctx
        self.queue_id = queue_id
        self.fd: int | None = None
        self.envelope: Envelope | None = None
        self.env_len = 0
        self.flushed = 0  # message bytes already in the file
        self.head = b""

    async def spill(self, envelope: Envelope, received: bytes, reader: DataReader) -> None:
        parts = reader.take_parts()
        spool = self.ctx.committer.spool
        if self.fd is None:
            self.envelope = envelope
            self.head = b"".join(parts)[:HEAD_BYTES]
            self.env_len = len(envelope.to_json()) + 1
            parts = [received, *parts]
            self.fd, cancelled = await _run_to_end(
                functools.partial(spool.create, envelope, parts, complete=False))
        else:
            _, cancelled = await _run_to_end(functools.partial(spool.append, self.fd, parts))
        self.flushed = reader.size
        if cancelled:
            raise asyncio.CancelledError

    def take_fd(self) -> int | None:
        fd, self.fd = self.fd, None
        return fd

    async def discard(self) -> None:
        """Remove a partly streamed file that was never handed to the committer."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
            await asyncio.to_thread(self.ctx.committer.spool.remove, self.queue_id)


async def _run_to_end(fn: Callable[[], _T]) -> tuple[_T, bool]:
    """Run blocking `fn` in a thread and return (its result, whether we were cancelled).

    A vanished client cancels the session task, but not the thread: waiting for it anyway
    keeps its result (a new file's fd) from being lost, and keeps anyone from closing an fd
    the thread is still writing to (the number could be reused by another message's file)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(future), cancelled
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancelled = True


_date_cache: tuple[int, str] = (0, "")


def _date_header(now: float) -> str:
    """RFC 5322 date of `now`, formatted once per second (it costs more than the DATA scan)."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, localtime=True))
    return _date_cache[1]


def _header_block(head: bytes) -> bytes:
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None


def bind_listeners(listen: Sequence[HostPort], listen_tls: Sequence[HostPort]
                   ) -> list[tuple[socket.socket, bool]]:
    """Bind every listener: (socket, implicit TLS?) pairs, ready to be shared by processes."""
    bound: list[tuple[socket.socket, bool]] = []
    try:
        for hps, implicit_tls in ((listen, False), (listen_tls, True)):
            for hp in hps:
                family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
                sock = socket.create_server((hp.host, hp.port), family=family, backlog=1024)
                sock.setblocking(False)
                bound.append((sock, implicit_tls))
    except OSError as exc:
        for sock, _ in bound:
            sock.close()
        raise OSError(f"cannot listen on {hp}: {exc.strerror or exc}") from exc
    return bound


class Intake:
    """The listeners of this process and their orderly shutdown."""

    def __init__(self, ctx: IntakeContext, listen: Sequence[HostPort],
                 listen_tls: Sequence[HostPort]) -> None:
        self.ctx = ctx
        self.listen = listen
        self.listen_tls = listen_tls
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self, sockets: Sequence[tuple[socket.socket, bool]] | None = None) -> None:
        """Listen on `listen`/`listen_tls`, or serve already bound `(socket, implicit_tls)`
        pairs (several intake processes accept from the same sockets)."""
        if sockets is None:
            sockets = bind_listeners(self.listen, self.listen_tls)
        loop = asyncio.get_running_loop()
        for sock, implicit_tls in sockets:
            self.servers.append(await loop.create_server(
                functools.partial(RelaySMTP, self.ctx, implicit_tls=implicit_tls), sock=sock,
                ssl=self.ctx.tls_context if implicit_tls else None))

    def bound(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for srv in self.servers for sock in srv.sockets]

    async def drain(self, grace: float) -> None:
        """Stop listening now; let DATA in progress finish (up to `grace`); then close all."""
        for srv in self.servers:
            srv.close()
        self.ctx.draining = True
        deadline = time.monotonic() + grace
        while any(s.in_data for s in self.ctx.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.ctx.sessions):
            if session.transport is not None and not session.transport.is_closing():
                session._writer.write(replies.SHUTTING_DOWN.encode() + b"\r\n")
                session.transport.close()
        await asyncio.sleep(0)
