"""The operator's log: one line per event on stderr, always with the queue id: logfmt
(`time=... event=NAME key=value`) or, with `[log] format = "json"`, one JSON object per line with
the same keys.

Never pass passwords or keys here; replies from remote servers are logged verbatim (quoted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time

_log = logging.getLogger("invoice-relay")


def setup(level: int = logging.INFO, fmt: str = "logfmt") -> None:
    """Log to stderr as `fmt` ("logfmt" or "json"; chosen once, at start)."""
    global _render
    _render = _json_line if fmt == "json" else _line
    handler = _BatchingHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and a deprecation warning on each AUTH: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


class _BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines written during one turn of the event loop reach stderr in one write, at the end
    of that turn; outside a loop (startup, commands) each line is written at once. Under load
    that saves a system call per event; a killed process loses at most the lines of the turn
    it was killed in."""

    def __init__(self, stream: object) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([line])
            return
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        with contextlib.suppress(OSError, ValueError):  # stderr gone: nothing else to tell
            self.stream.write("".join(lines))
            self.stream.flush()

    def flush(self) -> None:
        if self._pending:
            self._flush_pending()
        super().flush()


def flush() -> None:
    """Write out lines still waiting for the end of a loop turn (before a process exits)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


class _OneLine(logging.Formatter):
    """Our events as they are; anything another library logs (aiosmtpd, asyncio) as one
    logfmt line without its traceback, so that a client cannot fill the log with them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == _log.name:
            return record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        return _render("library_error", logger=record.name, message=record.getMessage(),
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
    _log.log(level, _render(name, **fields))


_stamp: tuple[int, str] = (0, "")


def _now() -> str:
    """`...Z`, the UTC time of this second, formatted once per second."""
    global _stamp
    second = int(time.time())
    if _stamp[0] != second:
        _stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return _stamp[1]


def _line(name: str, **fields: object) -> str:
    parts = [f"time={_now()}", f"event={name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def _json_line(name: str, **fields: object) -> str:
    """The same keys as a JSON object; numbers and booleans stay numbers and booleans, other
    values become their text. ASCII only: a control character or a byte that was not UTF-8
    stays an escape, never a raw byte in the log."""
    record: dict[str, object] = {"time": _now(), "event": name}
    for key, value in fields.items():
        if value is not None:
            record[key] = value if isinstance(value, int | float | str) else str(value)
    return json.dumps(record, separators=(",", ":"))


_render = _line
