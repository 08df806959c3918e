"""Everything that depends on aiosmtpd's internals, in one place (pinned to aiosmtpd 1.4.x).

The session subclasses aiosmtpd's SMTP protocol for its connection, STARTTLS and EHLO handling,
but runs its own command loop, MAIL/RCPT/DATA/AUTH and idle timer. What that needs from
aiosmtpd beyond its documented API is listed in INTERNALS and reached only through
`AiosmtpdSession` below; tests/test_compat.py checks every name against the installed aiosmtpd,
so an upgrade that moves one fails loudly instead of misbehaving.

Per-connection setup is made cheap too: aiosmtpd builds its command and AUTH tables in
`SMTP.__init__` with `inspect.getmembers` and `dir()` on every new connection, about 0.3 ms
of CPU each, a large share of a 4 KiB message when every client opens a new connection. The
tables depend only on the classes, so the aiosmtpd module gets cached versions of those two
functions (same results, computed once per class) when this module is imported.
"""

from __future__ import annotations

import inspect as _inspect
import logging as _logging
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as _aiosmtpd_smtp
from aiosmtpd.smtp import SMTP, TLSSetupException

TESTED_VERSIONS = ("1.4.6",)

# (object, attribute) pairs of aiosmtpd internals this module relies on.
INTERNALS: tuple[tuple[object, str], ...] = (
    (_aiosmtpd_smtp, "inspect"),           # patched: cached getmembers/signature
    (_aiosmtpd_smtp, "dir"),               # patched (module global lookup of the builtin)
    (_aiosmtpd_smtp, "sanitized_log"),     # patched: skipped when mail.log drops INFO
    (SMTP, "_handle_client"),              # replaced: our command loop
    (SMTP, "_timeout_cb"),                 # replaced: 421 before closing
    (SMTP, "_reset_timeout"),              # replaced: CheapIdleTimer
    (SMTP, "_getaddr"),                    # extended: FastAddressParsing
    (SMTP, "_set_rset_state"),
    (SMTP, "_set_post_data_state"),
    (SMTP, "smtp_STARTTLS"),               # wrapped: the handshake machinery is aiosmtpd's
    (SMTP, "line_length_limit"),
    (SMTP, "smtp_HELP"),                   # replaced: aiosmtpd's reads the table we leave empty
)
# Instance attributes set by SMTP.__init__ / connection_made that we read or write.
INSTANCE_INTERNALS = ("_reader", "_writer", "_tls_protocol", "_timeout_duration",
                      "_timeout_handle", "_handler_coroutine")


@lru_cache(maxsize=64)
def _class_dir(cls: type) -> tuple[str, ...]:
    # aiosmtpd only looks for "handle_"/"smtp_" methods: the rest would just be skipped.
    return tuple(n for n in dir(cls) if n.startswith(("handle_", "smtp_")))


@lru_cache(maxsize=64)
def command_names(cls: type) -> tuple[str, ...]:
    """The SMTP verbs a protocol class implements (its `smtp_X` methods)."""
    return tuple(n[5:] for n in _class_dir(cls) if n.startswith("smtp_"))


@lru_cache(maxsize=64)
def _auth_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name, _ in _inspect.getmembers(cls) if name.startswith("auth_"))


@lru_cache(maxsize=64)
def _method_signature(func: Callable[..., Any]) -> _inspect.Signature:
    """The signature of `func` as a bound method (without its first parameter)."""
    bound = _inspect.signature(func)
    return bound.replace(parameters=list(bound.parameters.values())[1:])


def _dir(obj: Any = None) -> list[str]:
    if isinstance(obj, AiosmtpdSession):
        # Our command loop dispatches by command_names(); aiosmtpd's table of bound methods
        # (built per connection from this list) would only feed its HELP, which we replace.
        return []
    return list(_class_dir(type(obj)))


def _sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    # aiosmtpd sanitises the arguments of every command's debug/info line before the logger
    # decides to drop it; we keep mail.log at ERROR, so skip the work up front.
    logger = getattr(func, "__self__", None)
    if logger is None or logger.isEnabledFor(_logging.INFO):
        _original_sanitized_log(func, msg, *args, **kwargs)


class _CachedInspect(ModuleType):
    """`inspect` for aiosmtpd.smtp, with getmembers/signature memoised per class."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_inspect, name)

    @staticmethod
    def getmembers(obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        if predicate is not None or isinstance(obj, type):
            return _inspect.getmembers(obj, predicate)
        return [(name, getattr(obj, name)) for name in _auth_names(type(obj))]

    @staticmethod
    def signature(obj: Any, **kwargs: Any) -> _inspect.Signature:
        func = getattr(obj, "__func__", None)
        if func is None or kwargs:
            return _inspect.signature(obj, **kwargs)
        return _method_signature(func)


_original_sanitized_log = _aiosmtpd_smtp.sanitized_log
_aiosmtpd_smtp.inspect = _CachedInspect("inspect")  # type: ignore[attr-defined]
_aiosmtpd_smtp.dir = _dir  # type: ignore[attr-defined]
_aiosmtpd_smtp.sanitized_log = _sanitized_log


_PLAIN_ADDRESS_BAD = frozenset('"\\ ()<>,;:[]\t')


class CheapIdleTimer:
    """Mixin for SMTP: the idle timeout without a new timer handle per command.

    aiosmtpd cancels and re-arms a loop timer on every command (and we reset it per DATA
    chunk); here a reset only stamps the time, and one timer re-arms itself when it fires."""

    loop: Any
    _timeout_duration: float
    _timeout_handle: Any

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        if not getattr(self, "_idle_armed", False):
            self._idle_armed = True
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        # The handle stays set either way: aiosmtpd's connection_lost() cancels it.
        if self.loop.time() >= self._idle_deadline:
            self._timeout_cb()  # type: ignore[attr-defined]
        else:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)


class FastAddressParsing:
    """Mixin for SMTP: parse the common `<local@domain>` form without email's header parser.

    aiosmtpd parses every MAIL/RCPT address with email._header_value_parser (~0.1 ms each);
    plain addresses, by far the most common, need only a split. Anything unusual (quotes,
    source routes, address literals) still goes through aiosmtpd's full parser."""

    local_part_limit: int

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """(address, rest of the argument); "<>" for the null path, None when malformed."""
        text = arg.lstrip() if arg else arg
        if text and text.startswith("<>"):
            return "<>", text[2:]  # the null reverse-path (bounces)
        if text and text[0] == "<":
            end = text.find(">")
            if end < 0:
                return None, None  # aiosmtpd would take "<bad" as the address "bad"
            inner = text[1:end]
            if inner is not None and not _PLAIN_ADDRESS_BAD.intersection(inner):
                local, at, domain = inner.rpartition("@")
                if at and local and domain and "@" not in local:
                    if self.local_part_limit and len(local) > self.local_part_limit:
                        return None, None
                    return inner, text[end + 1:]
        try:
            return super()._getaddr(arg)  # type: ignore[misc]
        except Exception:
            # aiosmtpd catches only HeaderParseError, but email's parser raises more on hostile
            # input: IndexError on an empty quoted string `"` (bpo-27931), AttributeError on an
            # unterminated address literal `a@[`. To us they all mean "not an address".
            return None, None


class AiosmtpdSession(CheapIdleTimer, FastAddressParsing, SMTP):
    """aiosmtpd's protocol with its internals behind named methods."""

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None

    async def read_line(self) -> bytes:
        """One line up to LF; asyncio.LimitOverrunError past line_length_limit."""
        return await self._reader.readuntil(b"\n")

    async def read_chunk(self, size: int) -> bytes:
        return await self._reader.read(size)

    async def discard(self, size: int) -> None:
        await self._reader.read(size)

    def unread(self, data: bytes) -> None:
        """Give bytes back to the line reader (pipelined commands read with a DATA chunk)."""
        self._reader._buffer[:0] = data  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def start_tls(self) -> None:
        """aiosmtpd's STARTTLS (after our checks): 220, handshake, reset state.

        Raises TlsHandshakeFailed when the handshake fails."""
        try:
            await SMTP.smtp_STARTTLS(self, "")  # type: ignore[arg-type]
        except TLSSetupException as exc:
            raise TlsHandshakeFailed(str(exc.__cause__ or exc)) from None


class TlsHandshakeFailed(Exception):
    """The client's TLS handshake after STARTTLS failed."""


def version_tested() -> bool:
    return aiosmtpd.__version__ in TESTED_VERSIONS
