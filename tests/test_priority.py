"""Message priority at intake: the priority headers of trusted or authenticated clients, else
`[[sender]] priority`, else normal; kept in the spool envelope and the index, shown by
`queue show`, handed to delivery with each recipient.

The end-to-end test runs the real relay with STARTTLS and AUTH; its only destination refuses
connections, so every message stays queued for inspection.
"""

from __future__ import annotations

import smtplib
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import make_certs
from relayproc import RelayProcess, free_port
from test_config import write

from relay.config import load_config
from relay.delivery.engine import fresh_recipients
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import SCHEMA, Index
from relay.queue.notices import Committed, NoticeReader, encode
from relay.queue.segments import Location
from relay.smtp.auth import hash_password
from relay.smtp.priority import SenderPriority, header_priority, message_priority

RelayFactory = Callable[..., RelayProcess]
PASSWORD = "s3cret pass-Word"

POLICIES = """
[[sender]]
domain = "news.example.com"
priority = "bulk"

[[sender]]
domain = "*.invoices.example.com"
priority = "high"

[[sender]]
domain = "plain.example.com"
charset = "gb18030"
"""


# ---------------------------------------------------------------------------- the header


@pytest.mark.parametrize(("block", "expected"), [
    (b"X-Priority: 1\r\n", "high"),
    (b"Subject: x\r\nX-Priority: 2 (High)\r\n", "high"),
    (b"x-priority:5 (Lowest)\r\n", "bulk"),
    (b"X-PRIORITY: 4\r\n", "bulk"),
    (b"Priority: urgent\r\n", "high"),
    (b"Subject: x\r\npriority: Non-Urgent\r\n", "bulk"),
    (b"X-Priority: 3 (Normal)\r\n", None),       # normal: the sender's policy stays
    (b"Priority: normal\r\n", None),
    (b"X-Priority: 10\r\n", None),
    (b"X-Priority: high\r\n", None),
    (b"Subject: X-Priority: 1\r\n", None),       # not a field of its own
    (b"X-Importance-Priority: 1\r\n", None),
    (b"X-Priority: 3\r\nPriority: urgent\r\n", "high"),  # the first one that asks wins
    (b"", None),
])
def test_header_priority(block: bytes, expected: str | None) -> None:
    assert header_priority(block) == expected


def test_header_counts_only_from_trusted_or_authenticated_clients() -> None:
    block = b"From: a@b.example\r\nX-Priority: 1\r\n"
    assert message_priority("bulk", block, header_counts=True) == "high"
    assert message_priority("bulk", block, header_counts=False) == "bulk"
    assert message_priority("bulk", b"X-Priority: 3\r\n", header_counts=True) == "bulk"


def test_sender_policy_lookup(tmp_path: Path) -> None:
    write(tmp_path / "relay.toml", '[policies]\npath = "policies"\n')
    write(tmp_path / "policies" / "p.toml", POLICIES)
    by_sender = SenderPriority.from_config(load_config(tmp_path / "relay.toml"))
    assert by_sender is not None
    assert by_sender.of("list@News.Example.com") == "bulk"
    assert by_sender.of("ar@eu.invoices.example.com") == "high"
    assert by_sender.of("a@plain.example.com") == by_sender.of("a@other.example") == "normal"
    assert by_sender.of("") == "normal"
    # no sender asks for a priority: nothing to look up per message
    write(tmp_path / "policies" / "p.toml", '[[sender]]\ndomain = "x.example"\n')
    assert SenderPriority.from_config(load_config(tmp_path / "relay.toml")) is None


# ---------------------------------------------------------------------------- the queue


def envelope(priority: str = "normal") -> Envelope:
    return Envelope(id=new_queue_id(), sender="ar@invoices.example.com",
                    recipients=("a@example.net", "b@example.org"), received=time.time(),
                    priority=priority)


def test_envelope_json_and_notices_carry_it() -> None:
    high = envelope("high")
    assert Envelope.from_json(high.to_json()) == high
    normal = envelope()
    assert b"priority" not in normal.to_json()  # unchanged records for ordinary mail
    # a record written before priorities existed reads as normal
    assert Envelope.from_json(normal.to_json()).priority == "normal"
    [got], _ = NoticeReader().feed(encode([(high.to_json(), Location("s1", 0, 10))]))
    assert got.priority == "high"
    due = fresh_recipients(got, 3600.0)
    assert [d.priority for d in due] == ["high", "high"]


def test_index_keeps_priority_per_recipient(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    messages = [Committed(envelope(p), Location("seg", i * 100, 100))
                for i, p in enumerate(["high", "normal", "bulk"])]
    index.add(messages, 3600.0)
    claimed = index.claim_due(time.time() + 1, 10)
    assert {(d.msg, d.priority) for d in claimed} == \
        {(c.envelope.id, c.envelope.priority) for c in messages for _ in range(2)}
    # ordinary mail stores nothing in the column
    stored = dict(index.conn.execute("SELECT msg, priority FROM recipients WHERE idx = 0"))
    assert stored[messages[1].envelope.id] is None
    index.close()


def test_claims_take_high_priority_first_but_leave_older_mail_a_tenth(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    backlog = [Committed(envelope("bulk" if i % 2 else "normal"), Location("seg", i, 1))
               for i in range(50)]  # 100 recipients that waited longer
    index.add(backlog, 3600.0)
    urgent = Committed(envelope("high"), Location("seg", 99, 1))
    index.add([urgent], 3600.0)
    first = index.claim_due(time.time() + 1, 10)
    assert [d.priority for d in first].count("high") == 2  # both of its recipients, at once
    assert {d.msg for d in first if d.priority != "high"} == {c.envelope.id for c in backlog[:4]}
    # a flood of urgent mail still leaves older mail one recipient in ten of a batch
    index.add([Committed(envelope("high"), Location("seg", 100 + i, 1)) for i in range(20)],
              3600.0)
    assert [d.priority for d in index.claim_due(time.time() + 1, 10)].count("high") == 9
    plan = index.conn.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM recipients WHERE state IN"
        " ('queued', 'deferred', 'unknown') AND priority = 'high' AND next_attempt <= ?"
        " ORDER BY next_attempt LIMIT 5", (time.time(),)).fetchall()
    assert any("recipients_due_high" in str(row) for row in plan), plan
    index.close()


def test_index_from_before_priorities_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    # the schema as it was: no priority column, no index over it
    old_schema = ";".join(statement for statement in SCHEMA.split(";")
                          if "recipients_due_high" not in statement)
    old_schema = "\n".join(line for line in old_schema.splitlines()
                           if not line.strip().startswith("priority TEXT"))
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO messages (id, sender, received, expires, size, segment, offset)"
                 " VALUES ('OLD', 'a@b.example', 0, 9e9, 10, 'seg', 0)")
    conn.execute("INSERT INTO recipients (msg, idx, rcpt, domain, state, next_attempt, updated)"
                 " VALUES ('OLD', 0, 'x@example.net', 'example.net', 'queued', 0, 0)")
    conn.commit()
    conn.close()
    index = Index(path)
    index.add([Committed(envelope("bulk"), Location("seg", 100, 100))], 3600.0)
    claimed = [(d.msg == "OLD", d.priority) for d in index.claim_due(time.time() + 1, 10)]
    assert sorted(claimed) == [(False, "bulk"), (False, "bulk"), (True, "normal")]
    index.close()


# ---------------------------------------------------------------------------- end to end


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, check=False,
                          cwd=config.parent)


def send(client: smtplib.SMTP, sender: str, headers: str = "", size: int = 0) -> str:
    """One message; its queue id."""
    body = (f"From: {sender}\r\nTo: ap@example.net\r\n{headers}Subject: t\r\n\r\n"
            "Invoice attached.\r\n" + ("x" * 998 + "\r\n") * (size // 1000)).encode()
    assert client.mail(sender)[0] == 250
    assert client.rcpt("ap@example.net")[0] == 250
    code, reply = client.data(body)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def stored_priorities(queue_dir: Path) -> dict[str, str | None]:
    with sqlite3.connect(queue_dir / "index.sqlite") as conn:
        return dict(conn.execute("SELECT msg, priority FROM recipients"))


def test_intake_sets_priority_and_it_survives_restart_and_rebuild(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    users = tmp_path / "users"
    users.write_text(f"erp:{hash_password(PASSWORD, ln=4)}\n")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every message stays queued
    relay = relay_factory(
        routes={"example.net": [dead]}, policies=POLICIES,
        queue={"retry_schedule": ["1h"]},
        # 127.0.0.1 must AUTH; 127.0.0.2 is trusted by network
        server={"trusted_networks": ["127.0.0.2/32"], "tls_cert": str(certs.cert),
                "tls_key": str(certs.key), "users_file": str(users)}).start()
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    expected: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=context)
        client.login("erp", PASSWORD)
        # the header of an authenticated client wins over the sender policy
        expected[send(client, "list@news.example.com", "X-Priority: 1 (Highest)\r\n")] = "high"
        expected[send(client, "list@news.example.com")] = "bulk"            # the policy
        expected[send(client, "list@news.example.com", "X-Priority: 3\r\n")] = "bulk"
        expected[send(client, "a@plain.example.com", "Priority: non-urgent\r\n")] = "bulk"
        expected[send(client, "a@plain.example.com")] = "normal"             # the default
        # a large message is streamed to the spool while it arrives: the same decision
        expected[send(client, "a@plain.example.com", "X-Priority: 2\r\n",
                      size=1_500_000)] = "high"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10,
                      source_address=("127.0.0.2", 0)) as trusted:
        trusted.ehlo()
        expected[send(trusted, "ar@eu.invoices.example.com")] = "high"      # *. policy
        expected[send(trusted, "ar@eu.invoices.example.com", "X-Priority: 5\r\n")] = "bulk"
    events = relay.events("received", at_least=len(expected))
    received = {e["id"]: e.get("priority", "normal") for e in events}
    assert received == expected
    assert relay.stop() == 0

    def stored() -> dict[str, str]:
        return {msg: p or "normal" for msg, p in stored_priorities(relay.queue_dir).items()}

    assert stored() == expected
    relay.start()  # the index is reopened as it was
    assert relay.stop() == 0
    assert stored() == expected
    # the spool envelopes hold it too: an index rebuilt from them has the same priorities
    rebuilt = relay_cli(relay.config, "queue", "rebuild", "--force")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert stored() == expected
    high = next(msg for msg, p in expected.items() if p == "high")
    shown = relay_cli(relay.config, "queue", "show", high)
    assert shown.returncode == 0 and "priority:   high" in shown.stdout
    normal = next(msg for msg, p in expected.items() if p == "normal")
    assert "priority:   normal" in relay_cli(relay.config, "queue", "show", normal).stdout
