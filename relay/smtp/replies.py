"""Every reply after EHLO carries an RFC 3463 enhanced status code (ENHANCEDSTATUSCODES).

aiosmtpd's built-in replies mostly lack one; `with_enhanced_code` adds it, and rewrites the few
stock texts whose wording the contract fixes.
"""

from __future__ import annotations

import re

QUEUED = "250 2.0.0 Ok: queued as {}"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"
NO_SMIME_CERTIFICATE = "550 5.7.1 <{}>: no usable S/MIME certificate"
# `[[sender]] clients`: at MAIL (the address was checked, so it may be echoed), and after DATA
# (fixed text: the From header is the client's, never echoed).
SENDER_NOT_ALLOWED = "553 5.7.1 <{}>: Sender address rejected: not allowed for this client"
FROM_NOT_ALLOWED = "550 5.7.1 From header address not allowed for this client"
FROM_UNCHECKABLE = "550 5.7.1 Header block too long to check the From header"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
QUEUE_WRITE_FAILED = "451 4.3.0 Queue write failed, try again later"
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
LOOP_DETECTED = "554 5.4.6 Too many Received headers: mail forwarding loop"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
INTERNAL_ERROR_CLOSING = "421 4.3.0 Internal error, closing connection"

# Fixed texts for bad input (never the text of an exception).
BAD_ARGUMENT = "501 5.5.4 Invalid character in command argument"
BAD_HELO = "501 5.5.4 Syntax: EHLO hostname"
BAD_AUTH = "501 5.5.4 Invalid AUTH exchange"
BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
LINE_TOO_LONG = "500 5.5.2 Error: line too long"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
TLS_ACTIVE = "503 5.5.1 Error: TLS already active"
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs SMTPUTF8"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"

# Limits.
IDLE_TIMEOUT = "421 4.4.2 Error: timeout exceeded"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
AUTH_LIMITED = "421 4.7.0 Error: too many failed authentications, try again later"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required"
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections, try again later"
TOO_MUCH_MAIL = "450 4.7.1 Error: too much mail from {}"
QUEUE_FULL = "452 4.3.1 Insufficient system storage: the queue is full"
AUTH_BUSY = "454 4.7.0 Temporary authentication failure, try again later"

# Replies that are not the client's mistake, so they do not count towards the error limits:
# too many recipients (RFC 5321 asks clients to send the rest later), backpressure and our
# own failures, and replies after which we close anyway.
_NOT_ERRORS = ("452 4.5.3", "452 4.3.1", "451 4.3.0", "454 4.7.0", "450 4.7.1", "421 ")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_NO_ENHANCED = {"220", "334", "354"}  # greeting, AUTH challenge, DATA go-ahead (RFC 2034)
_DEFAULT = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.0.0", "421": "4.3.2", "450": "4.2.0", "451": "4.3.0",
    "452": "4.3.1", "454": "4.7.0", "500": "5.5.2", "501": "5.5.4", "502": "5.5.1",
    "503": "5.5.1", "504": "5.5.4", "530": "5.7.0", "534": "5.7.9", "535": "5.7.8",
    "538": "5.7.11", "550": "5.7.1", "551": "5.1.6", "552": "5.3.4", "553": "5.1.3",
    "554": "5.0.0", "555": "5.5.4",
}
_REWRITE = {
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",  # aiosmtpd's STARTTLS go-ahead
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed limit",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
    "538 5.7.11 Encryption required for requested authentication mechanism":
        "538 5.7.11 Encryption required",
}


def with_enhanced_code(reply: str) -> str:
    """Return `reply` with an enhanced status code inserted after the basic code if missing."""
    reply = _REWRITE.get(reply, reply)
    code = reply[:3]
    if code in _NO_ENHANCED or _HAS_ENHANCED.match(reply) or not code.isdigit():
        return reply
    enhanced = _DEFAULT.get(code, f"{code[0]}.0.0")
    sep, text = reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{enhanced} {text}".rstrip()


def counts_as_error(reply: str) -> bool:
    """True for a 4xx/5xx reply that counts towards [server] error_soft_limit/hard_limit."""
    return reply[:1] in ("4", "5") and not reply.startswith(_NOT_ERRORS)
