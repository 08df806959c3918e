"""Which refusal a 4xx/5xx reply is, for `messages_rejected_total{reason}` (a bounded set:
relay.metrics.REJECT_REASONS). Runs only for refusing replies, never for a 250."""

from __future__ import annotations

from relay.smtp import replies

# Exact replies first (several share a code), then by code and enhanced code.
_EXACT = {
    replies.QUEUE_FULL: "backpressure",
    replies.INSUFFICIENT_STORAGE: "no_space",
    replies.QUEUE_WRITE_FAILED: "queue_write_failed",
    replies.TOO_MANY_ERRORS: "too_many_errors",
    replies.AUTH_LIMITED: "auth_limited",
    replies.TOO_MANY_CONNECTIONS: "backpressure",
    replies.SHUTTING_DOWN: "shutting_down",
    replies.FROM_NOT_ALLOWED: "sender_refused",
    replies.FROM_UNCHECKABLE: "sender_refused",
}
_BY_PREFIX = (
    ("554 5.7.1", "relay_denied"),
    ("553 5.7.1", "sender_refused"),
    ("550 5.7.1", "encryption_required"),   # NO_SMIME_CERTIFICATE (the From ones are exact)
    ("552", "too_big"),
    ("452 4.5.3", "too_many_recipients"),
    ("450 4.7.1", "backpressure"),          # max_messages_per_client
    ("538", "tls_required"),
    ("554 5.6.0", "content"),               # bare CR or NUL
    ("554 5.4.6", "content"),               # too many Received headers
    ("553 5.6.7", "syntax"),
    ("500", "syntax"), ("501", "syntax"), ("502", "syntax"), ("503", "syntax"),
    ("504", "syntax"), ("555", "syntax"),
)


def reason(reply: str) -> str | None:
    """The reason label of a refusing reply (with its enhanced code); None for a reply that
    is not a refusal to count here (a failed AUTH is `auth_failures_total`)."""
    found = _EXACT.get(reply)
    if found is not None:
        return found
    if reply.startswith("535"):
        return None
    for prefix, name in _BY_PREFIX:
        if reply.startswith(prefix):
            return name
    return "other"
