"""RFC 3464 delivery status notifications (bounces), built directly as CRLF bytes.

Nothing goes through the `email` package's str generator: it would re-wrap and re-encode
the remote replies and the original headers that a DSN must quote verbatim.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = b"\r\n"
HEADER_CAP = 64 * 1024
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_STATUS_TEXT = {
    "4.4.7": "delivery time expired",
    "4.4.3": "name service error, try again",
    "5.1.1": "mailbox does not exist",
    "5.1.2": "bad destination system address",
    "5.1.10": "recipient domain does not accept mail (null MX)",
    "5.4.4": "unable to route",
    "5.4.7": "delivery time expired",
}


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    recipient: str
    status: str  # "5.1.1", "4.4.7" (expired) ...
    diagnostic: str | None  # the remote reply verbatim (multi-line allowed); None if none
    remote_mta: str | None  # host name that gave the reply
    last_attempt: float | None  # unix time
    action: str = "failed"  # or "delayed" for a delay warning


def original_headers(message: bytes) -> bytes:
    """The header block of a stored message, ending with the empty line, at most 64 KiB."""
    if message.startswith((b"\r\n", b"\n")):
        return b""  # no headers at all
    end = _BLANK_LINE.search(message, 0, HEADER_CAP + 4)
    if end is not None and end.end() <= HEADER_CAP:
        return message[: end.end()]
    # No blank line within the cap: keep whole lines only, then close the block.
    head = message[: HEADER_CAP - 2]
    cut = head.rfind(b"\n")
    head = head[: cut + 1] if cut >= 0 else b""
    return head + (CRLF if head.endswith(b"\r\n") else b"\n")


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    arrival: float,
    original_headers: bytes,
    failures: Sequence[FailedRecipient],
    now: float | None = None,
) -> bytes:
    """A complete multipart/report DSN to `original_sender`, as CRLF bytes.

    Raises ValueError for the null sender (never bounce a bounce) or no failures.
    """
    if not original_sender or original_sender == "<>":
        raise ValueError("no DSN for the null sender (RFC 5321 6.1)")
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    mta = _ascii_host(reporting_mta)
    parts = [
        _human_part(mta, failures),
        _status_part(mta, queue_id, arrival, failures),
        _headers_part(original_headers),
    ]
    boundary = _boundary(parts)
    head = _top_headers(mta, original_sender, failures, now, boundary, parts)
    out = [head, CRLF, b"This is a MIME-encapsulated message." + CRLF]
    for part in parts:
        out += [CRLF, b"--", boundary, CRLF, part]
    out += [CRLF, b"--", boundary, b"--", CRLF]
    return b"".join(out)


# ---- top level ---------------------------------------------------------------------------


def _top_headers(
    mta: str,
    sender: str,
    failures: Sequence[FailedRecipient],
    now: float,
    boundary: bytes,
    parts: list[bytes],
) -> bytes:
    delayed = all(f.action == "delayed" for f in failures)
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    eight_bit = any(_is_8bit(p) for p in parts)
    lines = [
        f"From: MAILER-DAEMON@{mta} (Mail Delivery System)",
        f"To: {_to_header(sender)}",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: autoresponders must not answer this
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary.decode("ascii")}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    return _lines(lines)


def _boundary(parts: Iterable[bytes]) -> bytes:
    """A random boundary that occurs in no part (so no line can be mistaken for it)."""
    while True:
        boundary = b"=_relay_" + secrets.token_hex(12).encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary


def _to_header(sender: str) -> str:
    """`<addr>`; a non-ASCII local part cannot be in an ASCII header: show it RFC 2047-encoded
    as the name of an empty group (the envelope, not this header, routes the DSN)."""
    local, _, domain = sender.rpartition("@")
    if domain and local.isascii():
        return f"<{local}@{_ascii_host(domain)}>"
    if sender.isascii():
        return f"<{sender}>"
    return _encoded_word(sender) + ":;"


# ---- part 1: the explanation for people ---------------------------------------------------


def _human_part(mta: str, failures: Sequence[FailedRecipient]) -> bytes:
    delayed = all(f.action == "delayed" for f in failures)
    text = [f"This is the mail system at host {mta}.", ""]
    if delayed:
        text += [
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying; you do not need to send it again.",
        ]
    else:
        text += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. Its headers are attached below.",
        ]
    text += ["", "For further assistance, please send mail to postmaster.", ""]
    text += ["                   The mail system", ""]
    for failure in failures:
        text += [*_explain(failure), ""]
    body = _lines(text)
    cte = "8bit" if _is_8bit(body) else "7bit"
    head = _lines(
        [
            "Content-Description: Notification",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Transfer-Encoding: {cte}",
        ]
    )
    return head + CRLF + body


def _explain(failure: FailedRecipient) -> list[str]:
    """`<rcpt>: host mx said:` then the reply verbatim, indented, one line per reply line."""
    recipient = _printable(failure.recipient)
    if failure.diagnostic is None:
        reason = _STATUS_TEXT.get(failure.status, "delivery failed")
        return [f"<{recipient}>: {reason} (status {failure.status})"]
    # Without a remote host the reply is our own (DNS, a loop, an unusable address).
    where = f" host {failure.remote_mta} said:" if failure.remote_mta else ""
    reply = [_printable(line) for line in _LINE_BREAK.split(failure.diagnostic) if line]
    return [f"<{recipient}>:{where}"] + ["    " + line for line in reply]


# ---- part 2: message/delivery-status, for programs --------------------------------------------


def _status_part(
    mta: str, queue_id: str, arrival: float, failures: Sequence[FailedRecipient]
) -> bytes:
    per_message = _lines(
        [
            f"Reporting-MTA: dns; {mta}",
            f"X-Queue-ID: {_token(queue_id)}",
            f"Arrival-Date: {_date(arrival)}",
        ]
    )
    blocks = [per_message] + [_recipient_block(f) for f in failures]
    head = _lines(
        [
            "Content-Description: Delivery report",
            "Content-Type: message/delivery-status",
        ]
    )
    return head + CRLF + CRLF.join(blocks)


def _recipient_block(failure: FailedRecipient) -> bytes:
    lines = [
        f"Final-Recipient: {_address_field(failure.recipient)}",
        f"Action: {failure.action}",
        f"Status: {failure.status}",
    ]
    if failure.remote_mta:
        lines.append(f"Remote-MTA: dns; {_ascii_host(failure.remote_mta)}")
    if failure.diagnostic:
        lines += _diagnostic_lines(failure.diagnostic)
    if failure.last_attempt is not None:
        lines.append(f"Last-Attempt-Date: {_date(failure.last_attempt)}")
    return _lines(lines)


def _diagnostic_lines(reply: str) -> list[str]:
    """`Diagnostic-Code: smtp; <first line>`, further reply lines as continuation lines.

    Empty reply lines are dropped: a whitespace-only continuation line would end the block.
    """
    reply_lines = [_xtext_unicode(line) for line in _LINE_BREAK.split(reply) if line.strip()]
    if not reply_lines:
        return []
    return [f"Diagnostic-Code: smtp; {reply_lines[0]}"] + [" " + ln for ln in reply_lines[1:]]


def _address_field(address: str) -> str:
    """RFC 3464 address type: `rfc822;` for printable ASCII, RFC 6533 `utf-8;` (7-bit xtext
    form, which also escapes control characters) else."""
    if address.isascii() and address.isprintable():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _utf8_addr_xtext(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: `+`, `=`, `\\`, controls and non-ASCII become \\x{HEX}."""
    out = []
    for char in text:
        code = ord(char)
        if 0x21 <= code <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


def _printable(text: str) -> str:
    """`text` for a human-readable line: control characters (a bare CR from an unusable address)
    and lone surrogates escaped as \\x{HEX}, so they can neither end nor break a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{{{ord(c):02X}}}" for c in text)


def _xtext_unicode(line: str) -> str:
    """Keep ASCII text verbatim; escape only what a 7-bit report cannot carry."""
    if line.isascii() and line.isprintable():
        return line
    return "".join(c if c.isascii() and c.isprintable() else f"\\x{{{ord(c):02X}}}" for c in line)


# ---- part 3: the original headers -----------------------------------------------------------


def _headers_part(headers: bytes) -> bytes:
    """text/rfc822-headers with the original header block verbatim, line ends made CRLF."""
    block = _BLANK_LINE.split(headers, maxsplit=1)[0]
    lines = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    body = b"".join(line + CRLF for line in lines if line)
    cte = "8bit" if _is_8bit(body) else "7bit"
    head = _lines(
        [
            "Content-Description: Undelivered Message Headers",
            "Content-Type: text/rfc822-headers",
            f"Content-Transfer-Encoding: {cte}",
        ]
    )
    return head + CRLF + body


# ---- small helpers -----------------------------------------------------------------------------


def _lines(lines: Iterable[str]) -> bytes:
    return b"".join(line.encode("utf-8") + CRLF for line in lines)


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _is_8bit(data: bytes) -> bool:
    return not data.isascii()


def _token(text: str) -> str:
    """Only characters safe inside a Message-ID or a report field."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


def _ascii_host(host: str) -> str:
    host = host.strip().rstrip(".")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return _utf8_addr_xtext(host)


def _encoded_word(text: str) -> str:
    """RFC 2047 base64 encoded-word(s), each under 75 characters."""
    words, chunk = [], ""
    for char in text:
        if len((chunk + char).encode("utf-8")) > 45:  # 45 bytes -> 60 base64 chars
            words.append(chunk)
            chunk = ""
        chunk += char
    words.append(chunk)
    return " ".join(
        f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words
    )
