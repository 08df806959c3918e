"""Metrics: a real relay delivers to a sink (one bounce, one deferral, a refused relay, a
duplicate), then what its processes wrote under <queue>/metrics is rendered and parsed as
Prometheus would; plus the label rules (policy domain, refusal reason) on their own."""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from certs import make_certs
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from relayproc import RelayProcess
from sink import Sink

from relay import metrics
from relay.smtp import rejections, replies

# Every name of the contract (interface.md, "Metrics"), as families (counters without _total).
CONTRACT = [
    "messages_accepted", "messages_rejected", "deliveries", "queue_recipients",
    "queue_oldest_age_seconds", "delivery_latency_seconds", "source_deliveries",
    "source_suspended", "spool_free_bytes", "commit_batch_messages", "auth_failures",
    "smtp_connections", "webhook_events_pending", "webhook_events_dropped",
    "certificate_expiry_timestamp_seconds", "redis_up",
]
SENDER = "billing@sender.test"
POLICIES = """
[[destination]]
domain = "*.example.org"
routes = ["{sink}"]

[[destination]]
domain = "*"
routes = ["{sink}"]
"""


def refuse(address: str) -> str | None:
    if address.startswith("bounce@"):
        return "550 5.1.1 No such user"
    if address.startswith("later@"):
        return "451 4.2.0 Try again later"
    return None


def message(rcpt: str, message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, rcpt, "Invoice"
    msg["Message-ID"] = message_id
    msg.set_content("Invoice attached.\n")
    return msg


def samples(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> its samples (name, labels, value)."""
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


def value(found: dict[str, list[tuple[str, dict[str, str], float]]], sample: str,
          **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    matching = [v for name, ls, v in found[f"invoice_relay_{family}"]
                if name == f"invoice_relay_{sample}" and ls.items() >= labels.items()]
    assert matching, (sample, labels)
    return sum(matching)


@pytest.fixture
def delivered_run(tmp_path: Path) -> tuple[str, RelayProcess]:
    """A relay that took six messages (one a duplicate) and refused a relay attempt: three
    delivered, one bounced (its DSN delivered), one deferred for an hour."""
    with Sink(rcpt_reply=refuse) as sink:
        policies = POLICIES.format(sink=sink.address)
        routes = {"example.net": [sink.address]}
        certs = make_certs(tmp_path / "tls", names=("relay.test",))
        server = {"trusted_networks": ["127.0.0.1/32"], "tls_cert": str(certs.cert),
                  "tls_key": str(certs.key)}
        relay = RelayProcess(tmp_path, routes=routes, policies=policies, server=server,
                             queue={"retry_schedule": ["1h"]})
        with relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                for n, rcpt in enumerate(["a@example.net", "b@eu.example.org",
                                          "c@unlisted.test", "bounce@example.net",
                                          "later@example.net"]):
                    client.send_message(message(rcpt, f"<m{n}@sender.test>"))
                # The same message again: a 250, but not a new acceptance (dedupe).
                client.send_message(message("a@example.net", "<m0@sender.test>"))
                with pytest.raises(smtplib.SMTPSenderRefused):  # 552: too big
                    client.sendmail(SENDER, ["a@example.net"], b"x" * 10,
                                    mail_options=["SIZE=999999999999"])
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10,
                              source_address=("127.0.0.2", 0)) as untrusted, \
                    pytest.raises(smtplib.SMTPRecipientsRefused):  # 554 relay denied
                untrusted.sendmail(SENDER, ["x@example.net"], b"Subject: x\r\n\r\nx\r\n")
            sink.wait_for(4)  # three messages and the DSN of the bounce
            relay.events("deferred", at_least=1)
            relay.events("delivered", at_least=4)
            body, content_type = settled(relay.queue_dir / metrics.DIRECTORY_NAME)
    assert content_type.startswith("text/plain")
    return body.decode(), relay


def settled(directory: Path, timeout: float = 5) -> tuple[bytes, str]:
    """A render once the run's last updates are in (each process writes its samples out
    twice a second): the last delivery's latency, the DSN's acceptance, and every session's
    connection_lost (the gauge back at 0)."""
    deadline = time.monotonic() + timeout
    while True:
        found = samples(metrics.render(directory)[0].decode())
        done = value(found, "delivery_latency_seconds_count") == 4 and \
            value(found, "messages_accepted_total") == 5 and \
            value(found, "smtp_connections") == 0
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.7)  # anything else counted by now is written out within half a second
    return metrics.render(directory)


def test_a_relay_counts_what_it_accepted_and_delivered(
        delivered_run: tuple[str, RelayProcess]) -> None:
    text, relay = delivered_run
    found = samples(text)
    for name in CONTRACT:  # every name, even those with no series yet (redis_up here)
        assert f"invoice_relay_{name}" in found, name
    assert value(found, "messages_accepted_total") == 5  # six 250s, one a duplicate
    # The policy's domain as written; `*` and unlisted domains are `other`.
    assert value(found, "deliveries_total", outcome="delivered", domain="example.net") == 1
    assert value(found, "deliveries_total", outcome="delivered", domain="*.example.org") == 1
    assert value(found, "deliveries_total", outcome="delivered", domain="other") == 2  # + DSN
    assert value(found, "deliveries_total", outcome="bounced", domain="example.net") == 1
    assert value(found, "deliveries_total", outcome="deferred", domain="example.net") == 1
    assert value(found, "deliveries_total", outcome="expired", domain="other") == 0
    assert not any(ls.get("domain") in ("eu.example.org", "unlisted.test", "*")
                   for _, ls, _ in found["invoice_relay_deliveries"])
    assert value(found, "source_deliveries_total", source="default", outcome="delivered") == 4
    assert value(found, "delivery_latency_seconds_count") == 4
    assert 0 < value(found, "delivery_latency_seconds_sum") < 30
    # Each accepted message was in exactly one durable commit.
    assert value(found, "commit_batch_messages_sum") == 5
    assert 1 <= value(found, "commit_batch_messages_count") <= 5
    assert value(found, "queue_recipients", state="deferred") == 1
    assert value(found, "queue_recipients", state="delivered") == 4  # with the DSN
    assert value(found, "queue_recipients", state="bounced") == 1
    assert value(found, "queue_recipients", state="hold") == 0
    assert 0 <= value(found, "queue_oldest_age_seconds") < 60
    assert value(found, "messages_rejected_total", reason="relay_denied") == 1
    assert value(found, "messages_rejected_total", reason="too_big") == 1
    assert value(found, "messages_rejected_total", reason="content") == 0
    assert value(found, "smtp_connections", listener=f"127.0.0.1:{relay.port}") == 0
    assert value(found, "spool_free_bytes") > 0
    assert not [s for s in found["invoice_relay_redis_up"]]  # no [cluster] redis: no series
    cert = x509.load_pem_x509_certificate((relay.dir / "tls" / "server.pem").read_bytes())
    assert value(found, "certificate_expiry_timestamp_seconds", kind="tls", name="relay.test") \
        == cert.not_valid_after_utc.timestamp()


def test_domain_label_is_the_policy_domain_or_other() -> None:
    assert metrics.domain_label("example.net") == "example.net"
    assert metrics.domain_label("*.example.org") == "*.example.org"
    assert metrics.domain_label("*") == "other"
    assert metrics.domain_label(None) == "other"
    assert metrics.source_label(None) == metrics.source_label("") == "default"
    assert metrics.source_label("192.0.2.20") == "192.0.2.20"
    assert metrics.listener_label("::1", 25) == "[::1]:25"


@pytest.mark.parametrize(("reply", "reason"), [
    (replies.RELAY_DENIED.format("x@example.net"), "relay_denied"),
    (replies.SENDER_NOT_ALLOWED.format("a@b.test"), "sender_refused"),
    (replies.FROM_NOT_ALLOWED, "sender_refused"),
    (replies.NO_SMIME_CERTIFICATE.format("ap@c.test"), "encryption_required"),
    (replies.TOO_BIG, "too_big"),
    (replies.TOO_MANY_RECIPIENTS, "too_many_recipients"),
    (replies.QUEUE_FULL, "backpressure"),
    (replies.TOO_MANY_CONNECTIONS, "backpressure"),
    (replies.TOO_MUCH_MAIL.format("10.0.0.1"), "backpressure"),
    (replies.INSUFFICIENT_STORAGE, "no_space"),
    (replies.QUEUE_WRITE_FAILED, "queue_write_failed"),
    (replies.TOO_MANY_ERRORS, "too_many_errors"),
    (replies.AUTH_LIMITED, "auth_limited"),
    (replies.AUTH_NEEDS_TLS, "tls_required"),
    ("554 5.6.0 Message contains bare CR or NUL", "content"),
    (replies.LOOP_DETECTED, "content"),
    (replies.BAD_ARGUMENT, "syntax"),
    (replies.SHUTTING_DOWN, "shutting_down"),
    (replies.INTERNAL_ERROR, "other"),
    (replies.AUTH_FAILED, None),  # counted as auth_failures_total instead
])
def test_each_refusal_has_a_bounded_reason(reply: str, reason: str | None) -> None:
    assert rejections.reason(reply) == reason
    assert reason is None or reason in metrics.REJECT_REASONS
