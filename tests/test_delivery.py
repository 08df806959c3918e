"""Delivery end to end: the real relay process, real SMTP sinks and a real DNS server on loopback.

MX tests bind each sink to its own 127.0.0.x on one shared port P and set `[delivery] port = P`,
so the MX names in the test DNS server resolve to distinct hosts as on the Internet.
Everything is polled (logs, sinks); the retry schedule is one second.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import sqlite3
import ssl
import time
from collections import Counter
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
from certs import make_certs, server_context
from dnsserver import DnsServer
from relayproc import RelayProcess, free_port
from sink import Received, Sink

from relay.config import Config, DestinationPolicy
from relay.delivery.attempt import Attempter
from relay.delivery.engine import DeliveryEngine, received_count
from relay.delivery.nexthop import NextHop
from relay.delivery.paths import Destination
from relay.delivery.paths import Path as DeliveryPath
from relay.queue.index import DueRecipient

SENDER = "app@invoices.test"
SENDER_DOMAIN = "invoices.test"

SinkFactory = Callable[..., Sink]
RelayFactory = Callable[..., RelayProcess]


# ---------------------------------------------------------------------------- helpers


def message(subject: str = "invoice 1", body: bytes = b"Please find the invoice.\r\n",
            extra: str = "") -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <ap@example.net>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@invoices.test>\r\n{extra}\r\n")
    return head.encode() + body


def send(relay: RelayProcess, rcpts: list[str], data: bytes | None = None, *,
         sender: str = SENDER, mail_options: tuple[str, ...] = ()) -> str:
    """Submit one message; return the queue id from `250 2.0.0 Ok: queued as ID`."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        code, reply = smtp.mail(sender, list(mail_options))
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(data if data is not None else message())
        assert code == 250, reply
    match = re.search(r"queued as (\S+)", reply.decode())
    assert match, reply
    return match.group(1)


def per_recipient(received: list[Received]) -> Counter[str]:
    return Counter(rcpt for m in received for rcpt in m.rcpt_tos)


def settle(seconds: float = 1.5) -> None:
    """Give the relay time to do something it must not do (a second delivery, a DSN)."""
    time.sleep(seconds)


def events_for(relay: RelayProcess, name: str, rcpt: str) -> list[dict[str, str]]:
    return [e for e in relay.events(name) if e.get("rcpt") == rcpt]


def parse(data: bytes) -> Message:
    return message_from_bytes(data)


def dsn_parts(dsn: Received) -> tuple[Message, list[Message], Message]:
    """(top, per-recipient status groups, original headers part) of an RFC 3464 report."""
    top = parse(dsn.data)
    assert top.get_content_type() == "multipart/report"
    assert top.get_param("report-type") == "delivery-status"
    parts = top.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    groups = parts[1].get_payload()
    assert parts[2].get_content_type() in ("text/rfc822-headers", "message/rfc822-headers")
    return top, groups[1:], parts[2]


def status_of(group: Message) -> tuple[str, str, str]:
    """(Final-Recipient address, Status, Diagnostic-Code text) of one recipient block."""
    final = group["Final-Recipient"].split(";", 1)[1].strip()
    diagnostic = group.get("Diagnostic-Code", "")
    diagnostic = diagnostic.split(";", 1)[1].strip() if ";" in diagnostic else diagnostic
    return final, group["Status"], re.sub(r"\s*\r?\n\s+", " ", diagnostic)


def assert_dsn_envelope(dsn: Received) -> Message:
    assert dsn.mail_from in ("", "<>")  # aiosmtpd keeps the brackets of the null sender
    assert dsn.rcpt_tos == [SENDER]
    top = parse(dsn.data)
    assert "MAILER-DAEMON@relay.test" in top["From"]
    return top


def mx_zone(domain: str, *entries: tuple[int, str, str]) -> str:
    """Zone text: MX records (preference, host label, address) of `domain` and their A records."""
    lines = []
    for pref, label, address in entries:
        lines.append(f"{domain}. 60 IN MX {pref} {label}.{domain}.")
        lines.append(f"{label}.{domain}. 60 IN A {address}")
    return "\n".join(lines)


def sender_route(sink: Sink) -> dict[str, list[str]]:
    return {SENDER_DOMAIN: [sink.address]}


# ---------------------------------------------------------------------------- 1. MX


def test_lower_preference_mx_gets_the_mail(relay_factory: RelayFactory, sinks: SinkFactory,
                                           dns_server: DnsServer, mx_port: int) -> None:
    primary = sinks(host="127.0.0.2", port=mx_port)
    backup = sinks(host="127.0.0.3", port=mx_port)
    # Listed backup first: the order in the answer must not matter, the preference does.
    dns_server.add(mx_zone("example.net", (20, "mx2", "127.0.0.3"), (10, "mx1", "127.0.0.2")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    queue_id = send(relay, ["ap@example.net"])
    [got] = primary.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    assert got.mail_from == SENDER
    [event] = relay.wait_for_log(r"event=delivered")
    assert f"id={queue_id}" in event and "host=mx1.example.net" in event
    assert "address=127.0.0.2:" in event and 'reply="250 2.0.0 OK queued"' in event
    settle(0.5)
    assert backup.messages == []


def test_refused_connection_moves_to_next_mx(relay_factory: RelayFactory, sinks: SinkFactory,
                                             dns_server: DnsServer, mx_port: int) -> None:
    backup = sinks(host="127.0.0.3", port=mx_port)  # nothing listens on 127.0.0.2
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["ap@example.net"])
    [got] = backup.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    [event] = relay.wait_for_log(r"event=delivered")
    assert "host=mx2.example.net" in event
    assert relay.events("deferred") == []


@pytest.mark.parametrize("refusal", [{"greeting_code": 421},
                                     {"mail_reply": "451 4.3.0 try again later"},
                                     {"greeting_code": 554}])
def test_refusing_first_mx_moves_to_next(relay_factory: RelayFactory, sinks: SinkFactory,
                                         dns_server: DnsServer, mx_port: int,
                                         refusal: dict[str, object]) -> None:
    refusing = sinks(host="127.0.0.2", port=mx_port, **refusal)
    backup = sinks(host="127.0.0.3", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["ap@example.net"])
    [got] = backup.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    assert refusing.messages == []
    [event] = relay.wait_for_log(r"event=delivered")
    assert "host=mx2.example.net" in event


def test_all_mx_down_uses_fallback_relay(relay_factory: RelayFactory, sinks: SinkFactory,
                                         dns_server: DnsServer, mx_port: int) -> None:
    sinks(host="127.0.0.2", port=mx_port, greeting_code=421)  # first MX refuses; second is dead
    fallback = sinks(host="127.0.0.4", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port, "fallback_relays": [fallback.address]}
                          ).start()
    send(relay, ["ap@example.net"])
    [got] = fallback.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    [event] = relay.wait_for_log(r"event=delivered")
    assert "address=127.0.0.4:" in event


def test_mx_is_preferred_over_fallback_relay(relay_factory: RelayFactory, sinks: SinkFactory,
                                             dns_server: DnsServer, mx_port: int) -> None:
    mx = sinks(host="127.0.0.2", port=mx_port)
    fallback = sinks(host="127.0.0.4", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port, "fallback_relays": [fallback.address]}
                          ).start()
    send(relay, ["ap@example.net"])
    mx.wait_for(1)
    relay.wait_for_log(r"event=delivered")
    assert fallback.messages == []


def test_no_mx_uses_the_domains_address(relay_factory: RelayFactory, sinks: SinkFactory,
                                        dns_server: DnsServer, mx_port: int) -> None:
    implicit = sinks(host="127.0.0.3", port=mx_port)
    dns_server.add("example.net. 60 IN A 127.0.0.3")
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["ap@example.net"])
    [got] = implicit.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    [event] = relay.wait_for_log(r"event=delivered")
    assert "host=example.net" in event
    assert ("example.net", "MX") in dns_server.queries


def test_equal_preference_mx_share_the_load(relay_factory: RelayFactory, sinks: SinkFactory,
                                            dns_server: DnsServer, mx_port: int) -> None:
    a = sinks(host="127.0.0.2", port=mx_port)
    b = sinks(host="127.0.0.3", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (10, "mx2", "127.0.0.3")))
    # One message per connection, so that every message picks its host afresh.
    policy = '[[destination]]\ndomain = "example.net"\nmax_messages_per_connection = 1\n'
    relay = relay_factory(dns={"nameservers": [dns_server.address]}, policies=policy,
                          delivery={"port": mx_port}).start()
    for n in range(16):
        send(relay, [f"ap{n}@example.net"], message(subject=f"invoice {n}"))
        relay.wait_for_log(r"event=delivered", count=n + 1)
    assert len(a.messages) + len(b.messages) == 16
    assert a.messages and b.messages  # all 16 on one host: 2 ** -15
    assert len({m.peer for m in a.messages + b.messages}) == 16


# ---------------------------------------------------------------------------- 2. routes


def test_static_route_replaces_mx_and_goes_before_fallback(
        relay_factory: RelayFactory, sinks: SinkFactory, dns_server: DnsServer,
        mx_port: int) -> None:
    route = sinks(host="127.0.0.3", port=mx_port)
    mx = sinks(host="127.0.0.2", port=mx_port)
    fallback = sinks(host="127.0.0.4", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    relay = relay_factory(routes={"example.net": [route.address]},
                          dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port, "fallback_relays": [fallback.address]}
                          ).start()
    send(relay, ["ap@example.net"])
    [got] = route.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    relay.wait_for_log(r"event=delivered")
    assert mx.messages == [] and fallback.messages == []
    assert not [q for q in dns_server.queries if q[0] == "example.net"]


def test_dead_route_falls_back_to_relay(relay_factory: RelayFactory, sinks: SinkFactory,
                                        dns_server: DnsServer, mx_port: int) -> None:
    fallback = sinks(host="127.0.0.4", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    mx = sinks(host="127.0.0.2", port=mx_port)
    relay = relay_factory(routes={"example.net": [f"127.0.0.3:{mx_port}"]},  # nobody there
                          dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port, "fallback_relays": [fallback.address]}
                          ).start()
    send(relay, ["ap@example.net"])
    [got] = fallback.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    [event] = relay.wait_for_log(r"event=delivered")
    assert "address=127.0.0.4:" in event
    assert mx.messages == []
    assert not [q for q in dns_server.queries if q[0] == "example.net"]


# ---------------------------------------------------------------------------- 3. per recipient


def attempts_rows(relay: RelayProcess, queue_id: str) -> list[tuple[str, str, str, str]]:
    """(recipient, outcome, host, reply) of every recorded attempt of one message."""
    with contextlib.closing(sqlite3.connect(relay.queue_dir / "index.sqlite", timeout=10)) as db:
        return db.execute(
            "SELECT r.rcpt, a.outcome, a.host, a.reply FROM attempts a JOIN recipients r"
            " ON r.msg = a.msg AND r.idx = a.idx WHERE a.msg = ? ORDER BY a.time, a.idx",
            (queue_id,)).fetchall()


def test_per_recipient_defer_bounce_and_deliver(relay_factory: RelayFactory,
                                               sinks: SinkFactory) -> None:
    refused_once: set[str] = set()

    def rcpt_reply(address: str) -> str | None:
        if address.startswith("later@") and address not in refused_once:
            refused_once.add(address)
            return "452 4.2.2 mailbox full, try later"
        if address.startswith("bad@"):
            return "550 5.1.1 <bad@example.net>: no such user here"
        return None

    dest = sinks(rcpt_reply=rcpt_reply)
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    rcpts = ["ok@example.net", "later@example.net", "bad@example.net"]
    queue_id = send(relay, rcpts, message(extra="X-Invoice-Id: INV-3\r\n"))

    relay.wait_for_log(r"event=delivered .*rcpt=later@example.net", timeout=15)
    [dsn] = home.wait_for(1)
    settle()
    # Each good recipient arrived exactly once; nobody was sent to twice, bad@ never.
    assert per_recipient(dest.messages) == {"ok@example.net": 1, "later@example.net": 1}
    assert [m.rcpt_tos for m in dest.messages] == [["ok@example.net"], ["later@example.net"]]

    [deferred] = relay.events("deferred", at_least=1)
    assert deferred["rcpt"] == "later@example.net" and deferred["id"] == queue_id
    assert deferred["reply"] == "452 4.2.2 mailbox full, try later"
    assert deferred["status"] == "4.2.2" and deferred["attempt"] == "1"
    [bounced] = relay.events("bounced", at_least=1)
    assert bounced["rcpt"] == "bad@example.net"
    assert bounced["reply"] == "550 5.1.1 <bad@example.net>: no such user here"
    assert bounced["status"] == "5.1.1" and bounced["host"] == "127.0.0.1"
    delivered = {e["rcpt"]: e for e in relay.events("delivered", at_least=2)}
    assert delivered["later@example.net"]["attempt"] == "2"
    assert delivered["ok@example.net"]["attempt"] == "1"

    # Exactly one DSN, to the sender, from the null sender, listing only the bounced one.
    settle(0.5)
    assert len(home.messages) == 1
    top = assert_dsn_envelope(dsn)
    assert "relay.test" in top["Message-ID"]
    _, groups, headers = dsn_parts(dsn)
    assert [status_of(g) for g in groups] == [
        ("bad@example.net", "5.1.1", "550 5.1.1 <bad@example.net>: no such user here")]
    assert "X-Invoice-Id: INV-3" in headers.get_payload()
    assert "Subject: invoice 1" in headers.get_payload()
    # The DSN is a queued message of its own, delivered like any other.
    relay.wait_for_log(r"event=delivered .*rcpt=" + re.escape(SENDER))

    # Every attempt is recorded with the remote host and its reply verbatim.
    rows = attempts_rows(relay, queue_id)
    assert ("later@example.net", "deferred", "127.0.0.1",
            "452 4.2.2 mailbox full, try later") in rows
    assert ("bad@example.net", "bounced", "127.0.0.1",
            "550 5.1.1 <bad@example.net>: no such user here") in rows
    assert [r[1] for r in rows if r[0] == "ok@example.net"] == ["delivered"]
    assert [r[1] for r in rows if r[0] == "later@example.net"] == ["deferred", "delivered"]


# ---------------------------------------------------------------------------- 4. after DATA


def test_5xx_after_data_bounces_every_recipient_in_one_dsn(relay_factory: RelayFactory,
                                                           sinks: SinkFactory) -> None:
    reply = "554 5.7.1 message content rejected"
    dest = sinks(data_reply=lambda _data: reply)
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    queue_id = send(relay, ["a@example.net", "b@example.net"])
    relay.wait_for_log(r"event=bounced", count=2)
    [dsn] = home.wait_for(1)
    settle()
    assert len(home.messages) == 1
    assert dest.messages == []
    assert relay.events("deferred") == []
    assert {e["rcpt"] for e in relay.events("bounced") if e["id"] == queue_id} == {
        "a@example.net", "b@example.net"}
    assert_dsn_envelope(dsn)
    _, groups, _ = dsn_parts(dsn)
    assert sorted(status_of(g) for g in groups) == [
        ("a@example.net", "5.7.1", reply), ("b@example.net", "5.7.1", reply)]
    [queued] = relay.events("dsn_queued", at_least=1)  # the log links the bounce to its DSN
    assert queued["original"] == queue_id and queued["id"] != queue_id


def test_4xx_after_data_defers_and_retries(relay_factory: RelayFactory,
                                          sinks: SinkFactory) -> None:
    calls = Counter[str]()

    def data_reply(_data: bytes) -> str | None:
        calls["data"] += 1
        return "451 4.3.0 queue file write error" if calls["data"] == 1 else None

    dest = sinks(data_reply=data_reply)
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    send(relay, ["a@example.net", "b@example.net"])
    relay.wait_for_log(r"event=delivered", count=2, timeout=15)
    settle()
    assert [m.rcpt_tos for m in dest.messages] == [["a@example.net", "b@example.net"]]
    deferred = relay.events("deferred")
    assert {e["rcpt"] for e in deferred} == {"a@example.net", "b@example.net"}
    assert all(e["reply"] == "451 4.3.0 queue file write error" for e in deferred)
    assert home.messages == []


# ---------------------------------------------------------------------------- 5. DNS


@pytest.mark.parametrize(("zone", "status", "words"), [
    ("", "5.1.2", "not found"),                    # NXDOMAIN: the domain does not exist
    ("example.net. 60 IN MX 0 .", "5.1.10", "nullMX"),  # RFC 7505: accepts no mail
])
def test_dns_permanent_failures_bounce(relay_factory: RelayFactory, sinks: SinkFactory,
                                       dns_server: DnsServer, mx_port: int, zone: str,
                                       status: str, words: str) -> None:
    if zone:
        dns_server.add(zone)
    dns_server.add("other.test. 60 IN A 127.0.0.9")  # the zone exists; example.net may not
    home = sinks()
    relay = relay_factory(routes=sender_route(home), dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    queue_id = send(relay, ["ap@example.net"])
    [bounced] = relay.wait_for_log(r"event=bounced")
    assert f"id={queue_id}" in bounced and f"status={status}" in bounced
    [dsn] = home.wait_for(1)
    assert_dsn_envelope(dsn)
    _, [group], _ = dsn_parts(dsn)
    rcpt, got_status, diagnostic = status_of(group)
    assert (rcpt, got_status) == ("ap@example.net", status)
    assert words in diagnostic
    assert relay.events("deferred") == []


def test_dns_servfail_defers_then_delivers(relay_factory: RelayFactory, sinks: SinkFactory,
                                           dns_server: DnsServer, mx_port: int) -> None:
    mx = sinks(host="127.0.0.2", port=mx_port)
    home = sinks()
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    dns_server.servfail("example.net")
    relay = relay_factory(routes=sender_route(home), dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["ap@example.net"])
    deferred = relay.wait_for_log(r"event=deferred", count=2, timeout=15)
    assert all("status=4.4.3" in line for line in deferred)
    assert mx.messages == [] and home.messages == []
    # The zone's server recovers: the next retry delivers.
    resolver = dns_server._resolver
    with resolver.lock:
        resolver.servfail.clear()
    [got] = mx.wait_for(1, timeout=15)
    assert got.rcpt_tos == ["ap@example.net"]
    relay.wait_for_log(r"event=delivered")
    assert relay.events("bounced") == [] and home.messages == []


def test_dns_timeout_defers(relay_factory: RelayFactory, sinks: SinkFactory,
                            dns_server: DnsServer, mx_port: int) -> None:
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    dns_server.timeout("example.net")
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["ap@example.net"])
    [line] = relay.wait_for_log(r"event=deferred", timeout=30)
    assert "status=4.4.3" in line
    assert relay.events("bounced") == []


# ---------------------------------------------------------------------------- 6. null sender


def test_null_sender_bounce_gets_no_dsn(relay_factory: RelayFactory, sinks: SinkFactory) -> None:
    dest = sinks(rcpt_reply=lambda _a: "550 5.1.1 no such user")
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        code, reply = smtp.docmd("MAIL FROM:<>")
        assert code == 250, reply
        assert smtp.rcpt("gone@example.net")[0] == 250
        code, reply = smtp.data(message())
        assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [line] = relay.wait_for_log(r"event=bounced")
    assert f"id={queue_id}" in line
    settle()
    assert dest.messages == [] and home.messages == []
    assert len(relay.events("received", at_least=1)) == 1  # no DSN was queued either
    assert not relay.events("delivered")


def test_bounced_dsn_gets_no_dsn(relay_factory: RelayFactory, sinks: SinkFactory) -> None:
    """A DSN (sender <>) whose delivery fails permanently is dropped, never bounced again."""
    dest = sinks(rcpt_reply=lambda _a: "550 5.1.1 no such user")
    home = sinks(rcpt_reply=lambda _a: "550 5.1.1 sender mailbox gone too")
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    send(relay, ["gone@example.net"])
    bounced = relay.wait_for_log(r"event=bounced", count=2)
    assert "rcpt=gone@example.net" in bounced[0]
    assert f"rcpt={SENDER}" in bounced[1]
    settle()
    assert len(relay.events("bounced", at_least=2)) == 2
    assert dest.messages == [] and home.messages == []
    assert not relay.events("delivered") and not relay.events("deferred")
    # Nothing is left in the queue: both messages are final and their spool files gone.
    with contextlib.closing(sqlite3.connect(relay.queue_dir / "index.sqlite")) as db:
        states = db.execute("SELECT state FROM recipients").fetchall()
    assert sorted(states) == [("bounced",), ("bounced",)]


# ---------------------------------------------------------------------------- 7. expiry


def test_expiry_after_max_lifetime_sends_one_dsn(relay_factory: RelayFactory,
                                                 sinks: SinkFactory) -> None:
    reply = "451 4.7.1 greylisted, come back later"
    dest = sinks(mail_reply=reply)
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)},
                          queue={"retry_schedule": ["1s"], "max_lifetime": "3s"}).start()
    started = time.monotonic()
    queue_id = send(relay, ["ap@example.net"])
    [expired] = relay.wait_for_log(r"event=expired", timeout=15)
    took = time.monotonic() - started
    assert 2.5 <= took <= 15, took  # 3 s lifetime, 1 s index poll, a busy machine
    assert f"id={queue_id}" in expired and "status=4.4.7" in expired
    deferred = relay.events("deferred")
    assert [e["attempt"] for e in deferred] == [str(n) for n in range(1, len(deferred) + 1)]
    assert len(deferred) >= 2
    assert all(e["reply"] == reply for e in deferred)
    [dsn] = home.wait_for(1)
    settle()
    assert len(home.messages) == 1 and dest.messages == []
    assert_dsn_envelope(dsn)
    _, [group], _ = dsn_parts(dsn)
    assert status_of(group) == ("ap@example.net", "4.4.7", reply)
    assert group["Action"] == "failed"
    assert group["Remote-MTA"].startswith("dns; ")  # the host that said it
    assert all("origin" not in e for e in deferred)  # the host's own reply


def test_a_local_error_is_never_what_the_host_said(relay_factory: RelayFactory,
                                                   sinks: SinkFactory) -> None:
    home = sinks()
    closed = free_port()  # nothing listens: connection refused, our own text
    relay = relay_factory(routes={"example.net": [f"127.0.0.1:{closed}"],
                                  **sender_route(home)},
                          queue={"retry_schedule": ["1s"], "max_lifetime": "2s"}).start()
    send(relay, ["ap@example.net"])
    relay.wait_for_log(r"event=expired", timeout=15)
    deferred = relay.events("deferred")
    assert deferred and all(e["origin"] == "relay" for e in deferred)
    assert "Connection refused" in deferred[0]["reply"]
    [dsn] = home.wait_for(1)
    text = dsn.data.decode()
    assert " said:" not in text and "Remote-MTA" not in text
    assert "Connection refused" in text


# ---------------------------------------------------------------------------- 8. unknown outcome


def test_drop_after_final_dot_is_unknown_and_retried(relay_factory: RelayFactory,
                                                     sinks: SinkFactory) -> None:
    dest = sinks(drop_after_dot=lambda n: n == 1)
    relay = relay_factory(routes={"example.net": [dest.address]}).start()
    queue_id = send(relay, ["ap@example.net"])
    [unknown] = relay.wait_for_log(r"event=unknown")
    assert f"id={queue_id}" in unknown and "rcpt=ap@example.net" in unknown
    [delivered] = relay.wait_for_log(r"event=delivered", timeout=15)
    assert "attempt=2" in delivered
    assert dest.dropped == 1
    [got] = dest.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"]
    assert relay.events("deferred") == [] and relay.events("bounced") == []
    with contextlib.closing(sqlite3.connect(relay.queue_dir / "index.sqlite")) as db:
        states = db.execute("SELECT outcome FROM attempts WHERE msg = ? ORDER BY time",
                            (queue_id,)).fetchall()
        final = db.execute("SELECT state FROM recipients WHERE msg = ?", (queue_id,)).fetchall()
    assert states == [("unknown",), ("delivered",)]
    assert final == [("delivered",)]
    # Unknown outcomes are counted: the delivery process reports them when it stops.
    assert relay.stop() == 0
    [stopped] = [e for e in relay.events("stopped") if e.get("process") == "delivery"]
    assert stopped["unknown"] == "1" and stopped["delivered"] == "1"


# ---------------------------------------------------------------------------- 9. STARTTLS


def test_starttls_without_certificate_verification(relay_factory: RelayFactory,
                                                   sinks: SinkFactory, tmp_path: Path) -> None:
    # Our relay does not trust this CA (nobody told it about ca.pem), and the name differs.
    certs = make_certs(tmp_path / "pki", names=("mx.elsewhere.test",))
    dest = sinks(starttls=server_context(certs))
    relay = relay_factory(routes={"example.net": [dest.address]}).start()
    send(relay, ["ap@example.net"])
    [got] = dest.wait_for(1)
    assert got.tls is True
    [event] = relay.wait_for_log(r"event=delivered")
    assert re.search(r"tls=TLSv1\.[23]", event), event


def test_broken_starttls_falls_back_to_plain_text(relay_factory: RelayFactory,
                                                  sinks: SinkFactory) -> None:
    dest = sinks(broken_tls=True)
    relay = relay_factory(routes={"example.net": [dest.address]}).start()
    send(relay, ["ap@example.net"])
    [got] = dest.wait_for(1)
    assert got.tls is False
    [event] = relay.wait_for_log(r"event=delivered")
    assert " tls=" not in event
    assert relay.events("deferred") == []
    # The broken host is remembered: the next message goes in plain text at once.
    send(relay, ["ap2@example.net"])
    dest.wait_for(2)
    assert relay.events("deferred") == []


def test_tls_failing_after_handshake_falls_back_to_plain_text(
        relay_factory: RelayFactory, sinks: SinkFactory, tmp_path: Path) -> None:
    """A server demanding a client certificate: with TLS 1.3 our handshake completes, then the
    server's alert arrives at the EHLO that follows. That is a TLS failure too."""
    certs = make_certs(tmp_path / "pki")
    context = server_context(certs)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(certs.ca_cert)
    dest = sinks(starttls=context)
    relay = relay_factory(routes={"example.net": [dest.address]}).start()
    send(relay, ["ap@example.net"])
    [got] = dest.wait_for(1)
    assert got.tls is False
    relay.wait_for_log(r"event=delivered")
    assert relay.events("deferred") == []


async def test_broken_tls_host_is_remembered_for_an_hour(sinks: SinkFactory) -> None:
    """In process: after a failed handshake the host gets plain text without STARTTLS."""
    dest = sinks(broken_tls=True)
    attempter = Attempter(Config(), own_listeners=set())
    hop = NextHop("mx.example.net", dest.host, dest.port, "route")
    before = time.time()
    first = await attempter.connect(hop)
    remembered = attempter.tls_broken[dest.host]
    assert before + 3590 <= remembered <= time.time() + 3600
    assert first.client.tls_version is None and first.client.usable
    await first.client.quit()
    second = await attempter.connect(hop)
    assert second.client.tls_version is None and second.client.usable
    assert attempter.tls_broken[dest.host] == remembered  # no new handshake failed
    await second.client.quit()


def test_outbound_timeouts_follow_rfc_5321() -> None:
    t = Attempter(Config(), own_listeners=set()).timeouts()
    # RFC 5321 4.5.3.2: greeting 5 min, MAIL 5 min, RCPT 5 min, DATA 2 min, block 3 min, dot 10
    assert (t.greeting, t.mail, t.rcpt, t.data_init, t.data_block, t.data_end) == (
        300, 300, 300, 120, 180, 600)


# ---------------------------------------------------------------------------- 10. SMTPUTF8


def test_smtputf8_message_bounces_when_no_mx_supports_it(
        relay_factory: RelayFactory, sinks: SinkFactory, dns_server: DnsServer,
        mx_port: int) -> None:
    mx = sinks(host="127.0.0.2", port=mx_port, smtputf8=False)
    home = sinks()
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    relay = relay_factory(routes=sender_route(home), dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    send(relay, ["rechnung@example.net"],
         message(body="Grüße, 发票 attached\r\n".encode()), mail_options=("SMTPUTF8",
                                                                     "BODY=8BITMIME"))
    [bounced] = relay.wait_for_log(r"event=bounced")
    assert "status=5.6.7" in bounced
    [dsn] = home.wait_for(1)
    _, [group], _ = dsn_parts(dsn)
    assert status_of(group)[:2] == ("rechnung@example.net", "5.6.7")
    assert mx.messages == []


def test_smtputf8_message_skips_mx_without_it(relay_factory: RelayFactory, sinks: SinkFactory,
                                              dns_server: DnsServer, mx_port: int) -> None:
    plain = sinks(host="127.0.0.2", port=mx_port, smtputf8=False)
    modern = sinks(host="127.0.0.3", port=mx_port)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    relay = relay_factory(dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port}).start()
    data = message(body="Grüße, 发票 attached\r\n".encode())
    send(relay, ["rechnung@example.net"], data, mail_options=("SMTPUTF8", "BODY=8BITMIME"))
    [got] = modern.wait_for(1)
    assert "SMTPUTF8" in got.mail_options
    assert got.data.endswith(data)  # byte for byte, after our Received header
    assert plain.messages == []


# ---------------------------------------------------------------------------- 11. 8BITMIME


def test_body_8bitmime_is_replayed(relay_factory: RelayFactory, sinks: SinkFactory) -> None:
    dest = sinks()
    relay = relay_factory(routes={"example.net": [dest.address]}).start()
    data = message(subject="Rechnung", body="Betrag: 100 €\r\n".encode(),
                   extra="Content-Type: text/plain; charset=utf-8\r\n"
                         "Content-Transfer-Encoding: 8bit\r\n")
    send(relay, ["ap@example.net"], data, mail_options=("BODY=8BITMIME",))
    send(relay, ["ap@example.net"], message(subject="plain"))
    got = dest.wait_for(2)
    [first] = [m for m in got if b"Subject: Rechnung" in m.data]
    [second] = [m for m in got if b"Subject: plain" in m.data]
    assert "BODY=8BITMIME" in first.mail_options
    assert first.data.endswith(data)
    assert not any(o.startswith("BODY=") for o in second.mail_options)
    assert not any(o == "SMTPUTF8" for o in first.mail_options + second.mail_options)


# ---------------------------------------------------------------------------- 12. loops


def test_route_to_own_listener_bounces_as_loop(relay_factory: RelayFactory,
                                               sinks: SinkFactory) -> None:
    home = sinks()
    port = free_port()
    relay = relay_factory(port=port, routes={"example.net": [f"127.0.0.1:{port}"],
                                             **sender_route(home)}).start()
    queue_id = send(relay, ["ap@example.net"])
    [bounced] = relay.wait_for_log(r"event=bounced")
    assert f"id={queue_id}" in bounced and "status=5.4.6" in bounced
    [dsn] = home.wait_for(1)
    _, [group], _ = dsn_parts(dsn)
    assert status_of(group)[:2] == ("ap@example.net", "5.4.6")
    settle()
    assert len(relay.events("received", at_least=1)) == 1  # nothing looped back into our intake
    assert len(relay.events("bounced", at_least=1)) == 1
    assert len(home.messages) == 1


def test_mx_pointing_at_own_listener_bounces_as_loop(
        relay_factory: RelayFactory, sinks: SinkFactory, dns_server: DnsServer,
        mx_port: int) -> None:
    home = sinks()
    # A relay listening on 127.0.0.2:P whose MX for example.net is 127.0.0.2 (port P).
    relay = relay_factory(port=mx_port, server={"listen": [f"127.0.0.2:{mx_port}"]},
                          routes=sender_route(home),
                          dns={"nameservers": [dns_server.address]},
                          delivery={"port": mx_port})
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    relay.start()
    with smtplib.SMTP("127.0.0.2", mx_port, timeout=10) as smtp:
        smtp.sendmail(SENDER, ["ap@example.net"], message())
    [bounced] = relay.wait_for_log(r"event=bounced")
    assert "status=5.4.6" in bounced and "rcpt=ap@example.net" in bounced
    [dsn] = home.wait_for(1)
    _, [group], _ = dsn_parts(dsn)
    assert status_of(group)[:2] == ("ap@example.net", "5.4.6")
    settle()
    assert len(relay.events("received", at_least=1)) == 1
    assert len(relay.events("bounced", at_least=1)) == 1


def test_too_many_received_headers_bounce_as_loop(relay_factory: RelayFactory,
                                                  sinks: SinkFactory) -> None:
    dest = sinks()
    home = sinks()
    relay = relay_factory(routes={"example.net": [dest.address], **sender_route(home)}).start()
    trace = "".join(f"Received: from hop{n}.test by hop{n + 1}.test; Tue, 24 Nov 2026"
                    f" 10:00:{n % 60:02d} +0000\r\n" for n in range(51))
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        smtp.mail(SENDER)
        smtp.rcpt("ap@example.net")
        code, reply = smtp.data(trace.encode() + message())
    if code != 250:  # refusing at DATA is as good as a bounce
        assert code == 554 and b"5.4.6" in reply, (code, reply)
    else:
        [bounced] = relay.wait_for_log(r"event=bounced")
        assert "status=5.4.6" in bounced
        [dsn] = home.wait_for(1)
        _, [group], _ = dsn_parts(dsn)
        assert status_of(group)[:2] == ("ap@example.net", "5.4.6")
    # 49 hops (ours included) is still fine.
    send(relay, ["ap@example.net"], trace.encode().split(b"\r\n", 3)[3] + message())
    [got] = dest.wait_for(1)
    assert got.data.count(b"\nReceived: ") + got.data.startswith(b"Received: ") == 49


# ---------------------------------------------------------------------------- 13. reuse


def test_connection_is_reused_for_several_messages(relay_factory: RelayFactory,
                                                   sinks: SinkFactory) -> None:
    dest = sinks()
    policy = (f'[[destination]]\ndomain = "example.net"\nroutes = ["{dest.address}"]\n'
              "max_connections = 1\n")
    relay = relay_factory(policies=policy).start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        for n in range(20):
            smtp.sendmail(SENDER, [f"ap{n}@example.net"], message(subject=f"invoice {n}"))
    got = dest.wait_for(20, timeout=20)
    relay.wait_for_log(r"event=delivered", count=20)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
        f"ap{n}@example.net" for n in range(20))
    ports = {m.peer for m in got}
    assert len(ports) < 20
    assert len(ports) <= 3, ports


async def test_burst_gets_new_connections_beside_idle_ones() -> None:
    """In process: jobs beyond the idle workers start workers, up to max_connections."""
    policy = DestinationPolicy("example.net", max_connections=4)
    store = type("Store", (), {"on_recorded": None})()
    engine = DeliveryEngine(Config(destinations=(policy,)), store, None, None)  # type: ignore[arg-type]
    started: list[str] = []

    def start(dest: Destination, path: DeliveryPath) -> None:
        started.append(dest.key)
        dest.workers += 1
        path.workers += 1

    engine._start_worker = start  # type: ignore[method-assign]
    dest = Destination.for_policy("example.net", policy)
    dest.hops = []  # resolved
    path = dest.path_for(None, engine.tls_memory)
    path.workers = path.idle = dest.workers = 1  # one idle connection
    engine.destinations["example.net"] = dest
    engine.dispatch([DueRecipient(f"M{n}", 0, f"ap{n}@example.net", "example.net", 0, SENDER,
                                  0.0, 1e12, None, False) for n in range(8)])
    assert len(path.jobs) == 8
    assert path.more.is_set()
    assert started == ["example.net"] * 3  # 1 idle + 3 new = max_connections
    engine.dispatch([DueRecipient("M9", 0, "x@other.test", "other.test", 0, SENDER, 0.0, 1e12,
                                  None, False)])
    # A new destination's next hops are resolved before any worker starts.
    other = engine.destinations["other.test"]
    assert started[-1] == "example.net" and other.resolving is not None
    other.resolving.cancel()


def test_received_count_looks_at_the_header_block_only() -> None:
    head = b"Received: from a\r\n\tby b\r\nRECEIVED : from c\r\nSubject: x\r\n\r\n"
    assert received_count(head + b"Received: in the body\r\n") == 2
    assert received_count(b"Subject: none\r\n\r\nReceived: body\r\n") == 0
