"""The operator's log: one logfmt line per event on stderr, always with the queue id.

Never pass passwords or keys here; replies from remote servers are logged verbatim (quoted).
"""

from __future__ import annotations

import logging
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


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-._@:/+[]<>=" for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "")
    return f'"{escaped}"'


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event: `time=... event=NAME key=value ...` (None values are left out)."""
    if not _log.isEnabledFor(level):
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    parts = [f"time={stamp}Z", f"event={name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    _log.log(level, " ".join(parts))
