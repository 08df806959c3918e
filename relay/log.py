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
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and a deprecation warning on each AUTH: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


# Escaped inside quoted values: a control character from a remote reply or an unusable address
# (a bare CR) must neither end the line nor be silently dropped from it.
_SPECIAL = re.compile(r'[\x00-\x1f\x7f"\\]')
_ESCAPES = {chr(c): f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    "\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-._@:/+[]<>=" for c in text):
        return text
    if _SPECIAL.search(text):
        text = _SPECIAL.sub(_escape, text)
    return f'"{text}"'


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event: `time=... event=NAME key=value ...` (None values are left out)."""
    if not _log.isEnabledFor(level):
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    parts = [f"time={stamp}Z", f"event={name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    _log.log(level, " ".join(parts))
