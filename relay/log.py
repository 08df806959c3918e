"""The operator's log: one logfmt line per event on stderr, always with the queue id.

Never pass passwords or keys here; replies from remote servers are logged verbatim (quoted).
"""

from __future__ import annotations

import logging
import re
import sys
import time

_log = logging.getLogger("invoice-relay")


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and a deprecation warning on each AUTH: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


class _OneLine(logging.Formatter):
    """Our events as they are; anything another library logs (aiosmtpd, asyncio) as one
    logfmt line without its traceback, so that a client cannot fill the log with them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == _log.name:
            return record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        return _line("library_error", logger=record.name, message=record.getMessage(),
                     error=f"{type(error).__name__}: {error}" if error is not None else None)


def loop_exception(loop: object, context: dict[str, object]) -> None:
    """asyncio's exception handler: one line instead of a traceback (e.g. a client that
    breaks its TLS session, a callback that raised)."""
    error = context.get("exception")
    event("loop_error", level=logging.WARNING, message=context.get("message"),
          error=f"{type(error).__name__}: {error}" if error is not None else None)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


_PLAIN = re.compile(r"[A-Za-z0-9._@:/+\[\]<>=-]+")
_SPECIAL = re.compile(r'["\\\x00-\x1f\x7f\ud800-\udfff]')


def _quote(value: object) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    # Every control character stays visible (a CR in an address must not look clean), and
    # bytes that were not UTF-8 (lone surrogates) are shown as \xNN: the line stays writable.
    return '"' + _SPECIAL.sub(_escape, text) + '"'


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    if c in _ESCAPES:
        return _ESCAPES[c]
    code = ord(c)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\x{code:02x}" \
        if code < 0x100 else f"\\u{code:04x}"


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event: `time=... event=NAME key=value ...` (None values are left out)."""
    if not _log.isEnabledFor(level):
        return
    _log.log(level, _line(name, **fields))


def _line(name: str, **fields: object) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    parts = [f"time={stamp}Z", f"event={name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)
