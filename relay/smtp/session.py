"""One inbound SMTP session: our command loop, argument checks, AUTH and DATA.

aiosmtpd gives us the connection, STARTTLS and EHLO; the command loop is our own so that every
argument is checked once at its command (fixed replies, never exception text), errors are
counted per connection (Postfix's soft and hard error limits), and a session that has sent
`354` stays in DATA until the final dot whatever happens, then sends exactly one reply.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, TypeVar

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from relay import log, metrics
from relay.addresses import AddressProblem, address_problem
from relay.queue.committer import QueueWriteError
from relay.queue.dedupe import Busy as DedupeBusy
from relay.queue.dedupe import dedupe_key
from relay.queue.envelope import NORMAL, Envelope, new_queue_id
from relay.queue.segments import SingleWriter
from relay.smtp import rejections, replies
from relay.smtp.auth import AuthBusy
from relay.smtp.compat import AiosmtpdSession, TlsHandshakeFailed, command_names
from relay.smtp.data import DataReader
from relay.smtp.priority import message_priority
from relay.smtp.senderauth import header_block

if TYPE_CHECKING:
    from relay.smtp.server import IntakeContext

MAX_RECIPIENTS = 1000
MAX_RECEIVED = 50
MAX_HELO = 255
SPILL_BYTES = 1 << 20      # larger messages are streamed to their spool file while they arrive
READ_CHUNK = 1 << 18
WRITE_BUFFER_HIGH = 64 * 1024
HEAD_BYTES = 64 * 1024     # enough of the message to find its header block
LINGER = 1.0               # seconds a closing session keeps reading after its 421

_T = TypeVar("_T")
_RECEIVED = re.compile(rb"(?im)^received:")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(?:\r\n[ \t]+)?(<[^>\r\n]{1,900}>)")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
# Control characters (C0, DEL, C1) and lone surrogates (bytes that were not UTF-8).
_BAD_ARGUMENT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MAIL_PARAMS = {"BODY", "SIZE", "SMTPUTF8"}


class _EndSession(Exception):
    """Leave the command loop quietly: the connection is closed or closing."""


class RelaySMTP(AiosmtpdSession):
    """One inbound session."""

    # Our own replies to AUTH LOGIN's two questions (aiosmtpd's defaults end with NUL).
    LOGIN_USER = b"Username:"
    LOGIN_PASSWORD = b"Password:"

    def __init__(self, ctx: IntakeContext, *, implicit_tls: bool, listener: str = "") -> None:
        super().__init__(
            _Hooks(),
            hostname=ctx.hostname,
            ident="invoice-relay",
            data_size_limit=ctx.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else ctx.tls_context,
            require_starttls=False,
            auth_required=False,
            auth_require_tls=not implicit_tls,
            timeout=ctx.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.in_data = False
        self.errors = 0
        self._command = ""
        self._counted = False  # admitted by the anvil: uncount at the end
        self.listener = listener  # "host:port" of the listener, the smtp_connections label
        self._open = False        # counted in smtp_connections: uncount at the end
        self._client = "?"        # the peer's address, once connected

    @property
    def client(self) -> str:
        return self._client

    def _peer_address(self) -> str:
        return self.session.peer[0] if self.session and self.session.peer else "?"

    # --- connection bookkeeping ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Read about ten times per message; made again here after STARTTLS (same peer).
        self._client = self._peer_address()
        self.ctx.sessions.add(self)
        if self.listener:
            self._open = True
            metrics.add(metrics.SMTP_CONNECTIONS, self.listener)

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.discard(self)
        if self._open:
            self._open = False
            metrics.add(metrics.SMTP_CONNECTIONS, self.listener, amount=-1)
        if self._counted and self.ctx.anvil is not None:
            self._counted = False
            self.ctx.anvil.disconnect(self.client, trusted=self.ctx.is_trusted(self.client))
        if error is not None:  # a reset or a broken TLS session, not an orderly close
            self.session_error("connection lost", error)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.write(replies.IDLE_TIMEOUT.encode() + b"\r\n")
            self.session_error("idle timeout")
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def session_error(self, reason: str, error: BaseException | None = None,
                      level: int = logging.INFO) -> None:
        log.event("session_error", level=level, client=self.client, reason=reason,
                  command=self._command or None,
                  error=f"{type(error).__name__}: {error}" if error is not None else None)

    # --- replies -----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            # Only the EHLO/HELO greeting lines go without a code (RFC 2034).
            if not (self._command in ("EHLO", "HELO") and status.startswith("250")):
                status = replies.with_enhanced_code(status)
            if status[:1] in ("4", "5"):  # a refusal: counted (a 250 pays nothing here)
                self._refused(status)
            status = status.encode()
        self.write(status + b"\r\n")
        # One write per reply; waiting for the socket only when it does not keep up.
        if self.transport is not None and \
                self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.drain()

    def _refused(self, status: str) -> None:
        if replies.counts_as_error(status):
            self.errors += 1
        why = rejections.reason(status)
        if why is not None:
            metrics.child(metrics.REJECTED, why).inc()

    async def _close_with(self, reply: str) -> None:
        await self.push(reply)
        await self._linger_close()
        raise _EndSession

    async def _linger_close(self) -> None:
        """Close after a final reply without losing it. Closing a socket that still has unread
        input makes the kernel send a reset, and the client's kernel then drops the replies
        it has not read yet, this 421 among them (a client that pipelines into an error
        flood never learns why it was cut off). So: shut down our side, read and drop what
        the client still sends for a moment, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():  # plain TCP; TLS has no half close
            transport.write_eof()
            try:
                async with asyncio.timeout(LINGER):
                    while await self._reader.read(READ_CHUNK):
                        pass
            except (TimeoutError, ConnectionError, OSError):
                pass
        self.close()

    # --- the command loop --------------------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            if self.ctx.anvil is not None:
                await self._admit()
            await self.push(f"220 {self.hostname} ESMTP invoice-relay")
            while self.transport is not None and not self.transport.is_closing():
                await self._next_command()
        except (_EndSession, asyncio.IncompleteReadError):
            pass
        except (ConnectionError, OSError) as exc:
            self.session_error("connection lost", exc)
        except TlsHandshakeFailed as exc:
            self.session_error("TLS handshake failed", exc)
        except asyncio.CancelledError:
            # aiosmtpd cancels us when the connection is lost, and also at the client's FIN
            # (eof_received), which leaves a TCP transport half open: close it, or the socket
            # stays in CLOSE-WAIT until the idle timeout.
            self.close()
            raise
        except Exception as exc:
            # A bug of ours: one line in the log, a neutral reply, and the session ends.
            self.session_error("internal error", exc, level=logging.ERROR)
            if self.transport is not None and not self.transport.is_closing():
                self.write(replies.INTERNAL_ERROR_CLOSING.encode() + b"\r\n")
        self.close()

    async def _admit(self) -> None:
        """`max_connections` / `max_connections_per_client`: over them, 421 and close."""
        ctx = self.ctx
        assert ctx.anvil is not None
        over = ctx.anvil.connect(self.client, trusted=ctx.is_trusted(self.client),
                                 max_total=ctx.max_connections,
                                 max_per_client=ctx.max_connections_per_client)
        if over is None:
            self._counted = True
            return
        log.event("rejected", client=self.client, reason=over)
        await self._close_with(replies.TOO_MANY_CONNECTIONS)

    async def _next_command(self) -> None:
        if self.errors >= self.ctx.error_hard_limit:
            self.session_error("too many errors")
            await self._close_with(replies.TOO_MANY_ERRORS)
        line = await self._read_command_line()
        if line is None:
            return
        if self.errors >= self.ctx.error_soft_limit and self.ctx.error_delay:
            await asyncio.sleep(self.ctx.error_delay)
        verb_bytes, _, arg_bytes = line.partition(b" ")
        verb = verb_bytes.upper().decode("ascii", "replace")
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") or None
        if verb not in command_names(type(self)):
            self._command = ""
            await self.push(replies.UNKNOWN_COMMAND if line else replies.BAD_SYNTAX)
            return
        self._command = verb
        if arg is not None and _BAD_ARGUMENT.search(arg):
            await self.push(replies.BAD_ARGUMENT)
            return
        if self.ctx.draining:
            await self._close_with(replies.SHUTTING_DOWN)
        self._reset_timeout()
        await getattr(self, "smtp_" + verb)(arg)

    async def _read_command_line(self) -> bytes | None:
        """The next line without its line end; None (after a reply) when it was too long."""
        line = await self._read_bounded_line()
        if line is None:
            await self.push(replies.LINE_TOO_LONG)
        return line

    async def _read_bounded_line(self) -> bytes | None:
        """The next line without its line end; None (read and dropped) when it was too long."""
        try:
            line = await self.read_line()
        except asyncio.LimitOverrunError as exc:
            await self._skip_long_line(exc.consumed)
            self.session_error("line too long")
            return None
        # Exactly one line end goes: a CR left inside is a bare CR, refused as an argument.
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    async def _skip_long_line(self, consumed: int) -> None:
        while True:
            await self.discard(consumed)
            try:
                await self.read_line()
                return
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed

    async def smtp_HELP(self, arg: str | None) -> None:
        commands = " ".join(sorted(c for c in command_names(type(self))
                                   if c != "STARTTLS" or self.tls_context is not None))
        await self.push(f"{'501' if arg else '250'} Supported commands: {commands}")

    # --- HELO, EHLO, STARTTLS ------------------------------------------------------------------

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not self._valid_helo(hostname):
            await self.push(replies.BAD_HELO)
            return
        await super().smtp_HELO(hostname)  # type: ignore[arg-type]

    async def smtp_EHLO(self, hostname: str | None) -> None:
        """The greeting lines in one write (aiosmtpd writes each line on its own)."""
        if not self._valid_helo(hostname):
            await self.push(replies.BAD_HELO)
            return
        assert self.session is not None and hostname is not None
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [f"250-{self.hostname}", f"250-SIZE {self.data_size_limit}", "250-8BITMIME",
                 "250-SMTPUTF8", "250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.tls_active:
            lines.append("250-STARTTLS")
        if self.ctx.users is not None and (self.implicit_tls or self.tls_active):
            lines.append("250-AUTH PLAIN LOGIN")
        lines.append("250 HELP")
        await self.push("\r\n".join(lines))

    @staticmethod
    def _valid_helo(hostname: str | None) -> bool:
        return bool(hostname) and len(hostname.encode()) <= MAX_HELO  # type: ignore[union-attr]

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.implicit_tls or self.tls_active:
            await self.push(replies.TLS_ACTIVE)
        elif self.tls_context is None:
            await self.push(replies.NOT_IMPLEMENTED)
        elif arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        else:
            await self.start_tls()

    # --- the envelope ----------------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        text = _after_keyword("FROM:", arg)
        address, rest = self._getaddr(text) if text else (None, None)
        if text is None or not address:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        params = _parse_params(rest or "")
        if params is None or (params and not self.session.extended_smtp):
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        if params.keys() - _MAIL_PARAMS:
            await self.push("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        reply = self._check_mail_params(params)
        smtputf8 = "SMTPUTF8" in params
        problem = address_problem("" if address == "<>" else address, smtputf8=smtputf8)
        if reply is None and problem is not None:
            reply = _address_reply(problem, replies.BAD_SENDER)
        if reply is not None:
            await self.push(reply)
            return
        if self.ctx.max_messages_per_client is not None and not self._mail_allowed():
            log.event("rejected", client=self.client, sender=address,
                      reason="max_messages_per_client")
            await self.push(replies.TOO_MUCH_MAIL.format(self.client))
            return
        if self.ctx.sender_auth is not None and await self._sender_refused(address):
            return
        self.envelope.mail_from = address
        self.envelope.smtp_utf8 = smtputf8
        self.envelope.mail_options = [f"{k}={v}" if v is not True else k
                                      for k, v in params.items()]
        await self.push("250 2.1.0 Ok")

    def _mail_allowed(self) -> bool:
        rate, anvil = self.ctx.max_messages_per_client, self.ctx.anvil
        assert rate is not None
        if anvil is None:
            return True
        return anvil.take_message(self.client, rate.count, rate.period, time.monotonic())

    async def _sender_refused(self, address: str) -> bool:
        """`[[sender]] clients`: True (after 553 5.7.1) when this client may not use the
        envelope sender's domain."""
        assert self.ctx.sender_auth is not None
        user = self._auth_user
        domain = self.ctx.sender_auth.refused_envelope(address, user, self.client)
        if domain is None:
            return False
        log.event("sender_refused", client=self.client, user=user, domain=domain, where="mail")
        await self.push(replies.SENDER_NOT_ALLOWED.format(address))
        return True

    @property
    def _auth_user(self) -> str | None:
        session = self.session
        return session.auth_data if session is not None and session.authenticated else None

    def _check_mail_params(self, params: dict[str, str | bool]) -> str | None:
        body = params.get("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            return "501 5.5.4 BODY can only be 7BIT or 8BITMIME"
        if params.get("SMTPUTF8", True) is not True:
            return "501 5.5.4 SMTPUTF8 takes no value"
        size = params.get("SIZE")
        if size is not None:
            if not isinstance(size, str) or not size.isdigit() or len(size) > 20:
                return "501 5.5.4 SIZE needs a number"
            if int(size) > self.ctx.max_message_size:
                return replies.TOO_BIG
        return None

    async def _outside_transaction(self) -> bool:
        """True (after the reply) when there is no HELO/EHLO or no MAIL yet."""
        if await self.check_helo_needed():
            return True
        assert self.envelope is not None
        if not self.envelope.mail_from:
            await self.push(replies.NEED_MAIL)
            return True
        return False

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._outside_transaction():
            return
        assert self.envelope is not None and self.session is not None
        text = _after_keyword("TO:", arg)
        address, rest = self._getaddr(text) if text else (None, None)
        if text is None or address is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if rest and rest.strip():
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        problem = address_problem(address, smtputf8=bool(self.envelope.smtp_utf8))
        if problem is not None or address == "<>":
            await self.push(_address_reply(problem or AddressProblem.SYNTAX, replies.BAD_RECIPIENT))
            return
        if not (self.session.authenticated or self.ctx.is_trusted(self.client)):
            log.event("rejected", client=self.client, rcpt=address, reason="relay denied")
            await self.push(replies.RELAY_DENIED.format(address))
            return
        if len(self.envelope.rcpt_tos) >= MAX_RECIPIENTS:
            await self.push(replies.TOO_MANY_RECIPIENTS)
            return
        if self.ctx.smime is not None and await self._smime_refused(address):
            return
        self.envelope.rcpt_tos.append(address)
        await self.push("250 2.1.5 Ok")

    async def _smime_refused(self, address: str) -> bool:
        """`encryption = "required"` without a usable certificate: True after 550 5.7.1.

        Refused here, not after queueing: the sender learns at once, and nothing waits in the
        queue for a certificate that may never come. The reason goes to the log only."""
        assert self.ctx.smime is not None
        reason = self.ctx.smime.refusal(address)
        if reason is None:
            return False
        log.event("rejected", client=self.client, rcpt=address, reason="no usable S/MIME "
                  "certificate", detail=reason)
        await self.push(replies.NO_SMIME_CERTIFICATE.format(address))
        return True

    # --- AUTH --------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        reply = self._auth_refusal(arg)
        if reply is not None:
            await self.push(reply)
            return
        assert arg is not None and self.ctx.users is not None and self.session is not None
        mechanism, *initial = arg.split()
        mechanism = mechanism.upper()
        limiter = self.ctx.auth_limiter
        if limiter is not None and not limiter.try_take(self.client):
            log.event("auth_limited", client=self.client)
            # Slowly: a guesser that reconnects at once would otherwise make us do a TLS
            # handshake per attempt, as fast as it can.
            await asyncio.sleep(self.ctx.error_delay)
            await self._close_with(replies.AUTH_LIMITED)
        ask = self._ask_plain if mechanism == "PLAIN" else self._ask_login
        credentials = await ask(initial[0] if initial else None)
        if credentials is None:  # malformed or aborted: answered already, nothing was hashed
            if limiter is not None:
                limiter.give_back(self.client)
            return
        user, password = credentials
        try:
            ok = await self.ctx.users.check(user, password)
        except AuthBusy:
            if limiter is not None:
                limiter.give_back(self.client)
            await self.push(replies.AUTH_BUSY)
            return
        if ok:
            if limiter is not None:
                limiter.give_back(self.client)
            self.session.authenticated = True
            self.session.auth_data = user
            log.event("auth_ok", client=self.client, user=user, mechanism=mechanism)
            await self.push("235 2.7.0 Authentication successful")
        else:
            # The client address comes first: fail2ban's filter anchors on it (README).
            log.event("auth_failed", client=self.client, user=user, mechanism=mechanism)
            metrics.AUTH_FAILURES.inc()
            await self.push(replies.AUTH_FAILED)

    def _auth_refusal(self, arg: str | None) -> str | None:
        assert self.session is not None and self.envelope is not None
        if self.ctx.users is None:
            return replies.NOT_IMPLEMENTED
        if not self.session.extended_smtp:
            return "503 5.5.1 Error: send EHLO first"
        if not (self.implicit_tls or self.tls_active):
            return replies.AUTH_NEEDS_TLS
        if self.session.authenticated:
            return "503 5.5.1 Already authenticated"
        if self.envelope.mail_from:
            return "503 5.5.1 AUTH not permitted during a mail transaction"
        parts = (arg or "").split()
        if not 1 <= len(parts) <= 2:
            return replies.BAD_AUTH
        if parts[0].upper() not in ("PLAIN", "LOGIN"):
            return "504 5.5.4 Unrecognized authentication type"
        return None

    async def _ask_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await self._challenge(b"") if initial is None else _b64(initial)
        if blob is None:
            return await self._bad_auth()
        fields = blob.split(b"\0")
        if len(fields) != 3:
            return await self._bad_auth()
        authzid, user, password = (_utf8(f) for f in fields)
        if user is None or password is None or authzid is None or not user:
            return await self._bad_auth()
        if authzid and authzid != user:
            # Acting as someone else is not offered: say no without checking the password.
            log.event("auth_failed", client=self.client, user=user, mechanism="PLAIN",
                      reason="authorization identity differs")
            metrics.AUTH_FAILURES.inc()
            await self.push(replies.AUTH_FAILED)
            return None
        return user, password

    async def _ask_login(self, initial: str | None) -> tuple[str, str] | None:
        raw_user = await self._challenge(self.LOGIN_USER) if initial is None else _b64(initial)
        user = _utf8(raw_user) if raw_user is not None else None
        if not user:
            return await self._bad_auth()
        raw_password = await self._challenge(self.LOGIN_PASSWORD)
        password = _utf8(raw_password) if raw_password is not None else None
        if password is None:
            return await self._bad_auth()
        return user, password

    async def _challenge(self, text: bytes) -> bytes | None:
        """Send a 334 challenge; the client's decoded answer, or None (aborted, bad, too long)."""
        await self.push(b"334 " + base64.b64encode(text))
        line = await self._read_bounded_line()
        if line is None or line.strip() == b"*":
            return None
        return _b64(line.strip().decode("ascii", "replace"))

    async def _bad_auth(self) -> None:
        await self.push(replies.BAD_AUTH)
        return None

    # --- DATA --------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._outside_transaction():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.ctx.space is not None and not self.ctx.space.ok():
            log.event("rejected", client=self.client, reply=replies.INSUFFICIENT_STORAGE)
            await self.push(replies.INSUFFICIENT_STORAGE)
            return
        anvil = self.ctx.anvil
        if anvil is not None and anvil.queued >= self.ctx.max_queued:
            log.event("rejected", client=self.client, reason="max_queued", queued=anvil.queued)
            await self.push(replies.QUEUE_FULL)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            reply = await self._receive()
        finally:
            self.in_data = False
        self._set_post_data_state()
        if reply is None:
            raise _EndSession  # the client vanished mid-DATA
        if reply.startswith("250"):
            self.errors = 0  # a delivered message forgives earlier mistakes (as Postfix does)
        await self.push(reply)

    async def _receive(self) -> str | None:
        """Read the message to its final dot, make it durable, return the one reply.

        None: the client vanished (nothing was acknowledged, nothing is kept). Whatever fails
        on our side after the 354, the rest of the message is still read as data, never as
        commands."""
        queue_id = new_queue_id()
        now = time.time()
        reader = DataReader(self.ctx.max_message_size, digest=self.ctx.dedupe_window > 0)
        stream = _Stream(self.ctx, queue_id, self._headers_count())
        failure: str | None = None
        try:
            received = self._received_header(queue_id, now).encode()
            envelope = self._envelope(queue_id, now)
        except Exception as exc:  # cannot happen for checked arguments; never desync if it does
            self.session_error("internal error", exc, level=logging.ERROR)
            received, envelope, failure = b"", None, replies.INTERNAL_ERROR
        try:
            while not reader.done:
                chunk = await self.read_chunk(READ_CHUNK)
                if not chunk:
                    return None
                reader.feed(chunk)
                self._reset_timeout()  # the idle timeout counts silence, not the whole DATA
                if failure is not None or reader.error is not None:
                    reader.take_parts()  # refused already: read on to the final dot, keep none
                elif not reader.done and reader.size - stream.flushed > SPILL_BYTES:
                    failure = await stream.spill_or_fail(envelope, received, reader)
            if reader.leftover:
                self.unread(reader.leftover)  # pipelined commands after the final dot
            if failure is None:
                failure = self._refusal(queue_id, reader, stream)
            if failure is not None:
                return failure
            assert envelope is not None
            return await self._commit(envelope, received, reader, stream)
        finally:
            await stream.discard()

    def _refusal(self, queue_id: str, reader: DataReader, stream: _Stream) -> str | None:
        """The reply refusing a completely read message, or None to queue it."""
        reply = reader.error.value if reader.error is not None else None
        head = b""
        if reply is None:
            head = stream.head or b"".join(reader.parts)[:HEAD_BYTES]
            # Counted with our own Received header, as Postfix's hopcount_limit and our
            # delivery side do: what delivery would bounce as a loop is refused here instead.
            if len(_RECEIVED.findall(_header_block(head))) + 1 > MAX_RECEIVED:
                reply = replies.LOOP_DETECTED
        if reply is not None:
            log.event("rejected", id=queue_id, client=self.client, reply=reply)
            return reply
        if self.ctx.sender_auth is not None:
            return self._from_refusal(queue_id, head, whole=reader.size <= len(head))
        return None

    def _from_refusal(self, queue_id: str, head: bytes, *, whole: bool) -> str | None:
        """`[[sender]] clients` for the From header: the 550 refusing the message, or None."""
        assert self.ctx.sender_auth is not None
        user = self._auth_user
        block = header_block(head, whole=whole)
        if block is None:  # a From field past the first 64 KiB could not be seen
            domain, reply = None, replies.FROM_UNCHECKABLE
        else:
            domain = self.ctx.sender_auth.refused_from(block, user, self.client)
            if domain is None:
                return None
            reply = replies.FROM_NOT_ALLOWED
        log.event("sender_refused", id=queue_id, client=self.client, user=user, domain=domain,
                  where="from_header", reason=None if domain else "header block over 64 KiB")
        return reply

    async def _commit(self, envelope: Envelope, received: bytes, reader: DataReader,
                      stream: _Stream) -> str:
        if stream.envelope is not None:
            envelope = stream.envelope  # as written into the file when streaming began
        else:
            envelope = _with_head_facts(envelope, b"".join(reader.parts)[:HEAD_BYTES],
                                        headers_count=stream.headers_count)
        claims: list[tuple[int, bytes]] = []
        if self.ctx.dedupe is not None and envelope.message_id and reader.digest is not None:
            claims, firsts = await self._claim(envelope, reader.digest)
            kept = _not_duplicates(envelope, firsts)
            if not kept:  # every recipient was queued by an earlier message: name it
                return replies.QUEUED.format(_log_duplicates(envelope, firsts))
            if stream.single is None and len(kept) < len(envelope.recipients):
                # A streamed message's envelope is in its file already: it keeps them all.
                _log_duplicates(envelope, firsts)
                envelope = dataclasses.replace(envelope, recipients=kept)
        committed = False
        try:
            reply = await self._write(envelope, received, reader, stream)
            committed = reply.startswith("250")
        finally:
            if claims:
                assert self.ctx.dedupe is not None
                self.ctx.dedupe.settle(claims, envelope.id, committed=committed)
        return reply

    async def _claim(self, envelope: Envelope, digest: bytes
                     ) -> tuple[list[tuple[int, bytes]], list[str | None]]:
        """Claim each recipient for this message (relay.queue.dedupe); the claims to settle,
        and per recipient the queue id that already has it (or None). An identical message
        being committed right now is waited for: its outcome decides."""
        table = self.ctx.dedupe
        assert table is not None and envelope.message_id is not None
        keys = [dedupe_key(envelope.message_id, envelope.sender, rcpt, digest)
                for rcpt in envelope.recipients]
        while True:
            try:
                claim = table.claim(keys, envelope.id, time.time(), self.ctx.dedupe_window)
            except DedupeBusy:
                await asyncio.sleep(0.005)
                continue
            return claim.held, claim.firsts

    async def _write(self, envelope: Envelope, received: bytes, reader: DataReader,
                     stream: _Stream) -> str:
        size = len(received) + reader.size
        committer = self.ctx.committer
        try:
            single = stream.take()
            if single is not None:
                await committer.finish_stream(single, reader.take_parts())
            else:
                await committer.commit(envelope, [received, *reader.parts], size)
        except QueueWriteError as exc:
            log.event("queue_write_failed", level=logging.WARNING, id=envelope.id,
                      error=str(exc))
            return replies.QUEUE_WRITE_FAILED
        except Exception as exc:  # ours, not the disk's: say so in the log, not "write failed"
            self.session_error("internal error", exc, level=logging.ERROR)
            return replies.INTERNAL_ERROR
        if self.ctx.anvil is not None:
            self.ctx.anvil.add_queued(1)
        metrics.add(metrics.ACCEPTED)  # committed and about to get its 250 (a duplicate never is)
        log.event("received", id=envelope.id, client=self.client, sender=envelope.sender,
                  nrcpt=len(envelope.recipients), size=size, message_id=envelope.message_id,
                  auth=envelope.auth,
                  priority=envelope.priority if envelope.priority != NORMAL else None)
        return replies.QUEUED.format(envelope.id)

    def _headers_count(self) -> bool:
        """Whether the message's priority header counts: only from a client we trust with
        relaying (by network or AUTH), as the contract says."""
        session = self.session
        return bool(session is not None and session.authenticated) or \
            self.ctx.is_trusted(self.client)

    def _envelope(self, queue_id: str, now: float) -> Envelope:
        smtp_env, session = self.envelope, self.session
        assert smtp_env is not None and session is not None
        sender = "" if smtp_env.mail_from in (None, "<>") else smtp_env.mail_from
        by_sender = self.ctx.sender_priority
        return Envelope(
            id=queue_id,
            sender=sender,
            recipients=tuple(smtp_env.rcpt_tos),
            received=now,
            client=self.client,
            helo=session.host_name or "",
            auth=session.auth_data if session.authenticated else None,
            body="8BITMIME" if "BODY=8BITMIME" in smtp_env.mail_options else None,
            smtputf8=bool(smtp_env.smtp_utf8),
            # the sender's; the header may still override it (_with_head_facts)
            priority=by_sender.of(sender) if by_sender is not None else NORMAL,
        )

    def _received_header(self, queue_id: str, now: float) -> str:
        session, smtp_env = self.session, self.envelope
        assert session is not None and smtp_env is not None
        helo = _HELO_SAFE.sub("", session.host_name or "unknown")[:255] or "unknown"
        tls = self.implicit_tls or self.tls_active
        proto = "UTF8SMTP" if smtp_env.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
        proto += ("S" if tls else "") + ("A" if session.authenticated else "")
        rcpt = f"\r\n\tfor <{smtp_env.rcpt_tos[0]}>" if len(smtp_env.rcpt_tos) == 1 else ""
        return (f"Received: from {helo} ([{self.client}])\r\n\tby {self.ctx.hostname}"
                f" (invoice-relay) with {proto} id {queue_id}{rcpt};\r\n"
                f"\t{_date_header(now)}\r\n")


class _Hooks:
    """aiosmtpd's handler: HELO sets the client's name; everything else is ours."""

    async def handle_HELO(self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"


class _Stream:
    """A large message's segment, written while DATA is still arriving."""

    def __init__(self, ctx: IntakeContext, queue_id: str, headers_count: bool) -> None:
        self.ctx = ctx
        self.queue_id = queue_id
        self.headers_count = headers_count  # see RelaySMTP._headers_count
        self.single: SingleWriter | None = None
        self.envelope: Envelope | None = None
        self.flushed = 0  # message bytes already in the file
        self.head = b""

    async def spill_or_fail(self, envelope: Envelope | None, received: bytes,
                            reader: DataReader) -> str | None:
        """Append what has arrived; a reply refusing the message if that failed."""
        assert envelope is not None
        try:
            await self._spill(envelope, received, reader)
        except OSError as exc:  # disk full: answer 451 after the final dot
            log.event("queue_write_failed", level=logging.WARNING, id=self.queue_id,
                      error=f"{type(exc).__name__}: {exc}")
            await self.discard()
            return replies.QUEUE_WRITE_FAILED
        return None

    async def _spill(self, envelope: Envelope, received: bytes, reader: DataReader) -> None:
        parts = reader.take_parts()
        if self.single is None:
            self.head = b"".join(parts)[:HEAD_BYTES]
            envelope = self.envelope = _with_head_facts(envelope, self.head,
                                                        headers_count=self.headers_count)
            self.single, cancelled = await _run_to_end(functools.partial(
                self.ctx.committer.open_stream, envelope, [received, *parts]))
        else:
            _, cancelled = await _run_to_end(functools.partial(self.single.append, parts))
        self.flushed = reader.size
        if cancelled:
            raise asyncio.CancelledError

    def take(self) -> SingleWriter | None:
        """Hand the file over to the committer (which then owns its removal on failure)."""
        single, self.single = self.single, None
        return single

    async def discard(self) -> None:
        """Remove a partly streamed file that was never handed to the committer.

        Runs to the end even when cancelled: a TLS client that hangs up cancels the session
        twice (EOF, then connection lost), and a cancel must not drop the removal before its
        thread starts (the file would stay in the spool until the next start)."""
        if self.single is not None:
            single, self.single = self.single, None
            _, cancelled = await _run_to_end(single.discard)
            if cancelled:
                raise asyncio.CancelledError


async def _run_to_end(fn: Callable[[], _T]) -> tuple[_T, bool]:
    """Run blocking `fn` in a thread and return (its result, whether we were cancelled).

    A vanished client cancels the session task, but not the thread: waiting for it anyway
    keeps its result (a new file's fd) from being lost, and keeps anyone from closing an fd
    the thread is still writing to (the number could be reused by another message's file)."""
    future: Awaitable[_T] = asyncio.get_running_loop().run_in_executor(None, fn)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(future), cancelled
        except asyncio.CancelledError:
            if future.cancelled():  # type: ignore[attr-defined]
                raise
            cancelled = True


# --- small parsers ---------------------------------------------------------------------------

def _after_keyword(keyword: str, arg: str | None) -> str | None:
    """`arg` after `FROM:`/`TO:` (case-insensitive), or None when it does not start so."""
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _parse_params(text: str) -> dict[str, str | bool] | None:
    """ESMTP parameters `KEY[=VALUE] ...` (keys upper-cased), or None when malformed."""
    params: dict[str, str | bool] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        key = key.upper()
        if not key.isalnum() or not key.isascii() or (eq and not value):
            return None
        params[key] = value.upper() if eq and key == "BODY" else value if eq else True
    return params


def _address_reply(problem: AddressProblem, bad_syntax: str) -> str:
    if problem is AddressProblem.NEEDS_SMTPUTF8:
        return replies.NEEDS_SMTPUTF8
    if problem in (AddressProblem.CONTROL, AddressProblem.INVALID_UTF8):
        return replies.BAD_ARGUMENT
    if problem is AddressProblem.TOO_LONG:
        return bad_syntax.replace("syntax", "too long")
    return bad_syntax


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _utf8(raw: bytes) -> str | None:
    """Decoded UTF-8 without control characters (RFC 4616 SASL text), or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _BAD_ARGUMENT.search(text) else text


_date_cache: tuple[int, str] = (0, "")


def _date_header(now: float) -> str:
    """RFC 5322 date of `now`, formatted once per second (it costs more than the DATA scan)."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, localtime=True))
    return _date_cache[1]


def _with_head_facts(envelope: Envelope, head: bytes, *, headers_count: bool) -> Envelope:
    """The envelope with what the header block says: its Message-ID, and its priority
    (when `headers_count`: the client is trusted or authenticated)."""
    block = _header_block(head)
    match = _MESSAGE_ID.search(block)
    priority = message_priority(envelope.priority, block, header_counts=headers_count)
    if match is None and priority == envelope.priority:
        return envelope
    return dataclasses.replace(
        envelope, priority=priority,
        message_id=match.group(1).decode("utf-8", "replace") if match else envelope.message_id)


def _not_duplicates(envelope: Envelope, firsts: list[str | None]) -> tuple[str, ...]:
    return tuple(r for r, f in zip(envelope.recipients, firsts, strict=True) if f is None)


def _log_duplicates(envelope: Envelope, firsts: list[str | None]) -> str:
    """One `duplicate` line per suppressed recipient; the first earlier queue id."""
    named = ""
    for rcpt, first in zip(envelope.recipients, firsts, strict=True):
        if first is not None:
            named = named or first
            log.event("duplicate", id=envelope.id, first=first, rcpt=rcpt,
                      message_id=envelope.message_id)
    return named


def _header_block(head: bytes) -> bytes:
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]

