"""SPF-aware egress and IP warm-up end to end: the real relay process with a pool of two
loopback source addresses, a real DNS server answering the senders' SPF records, and a sink
that records which address each message came from."""

from __future__ import annotations

import datetime
import json
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dnsserver import DnsServer
from relayproc import RelayProcess
from sink import Sink

from relay.delivery.egress import next_utc_midnight

A, B = "127.0.0.2", "127.0.0.3"
ZONE = """
only-b.test.  300 IN TXT "v=spf1 ip4:127.0.0.3 -all"
nobody.test.  300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
soft.test.    300 IN TXT "v=spf1 ip4:192.0.2.1 ~all"
both.test.    300 IN TXT "v=spf1 ip4:127.0.0.0/24 -all"
"""


def start_relay(tmp_path: Path, dns: DnsServer, sink: Sink, sources: list[dict[str, Any]],
                spf: str | None = None) -> RelayProcess:
    delivery: dict[str, Any] = {"source_addresses": sources}
    if spf is not None:
        delivery["spf"] = spf
    return RelayProcess(tmp_path, routes={"example.net": [sink.address]}, delivery=delivery,
                        dns={"nameservers": [dns.address]})


def utc_today() -> str:
    """Today (UTC), not within seconds of its end: a warm-up day must not roll over mid-test."""
    left = next_utc_midnight(time.time()) - time.time()
    if left < 15:
        time.sleep(left + 0.1)
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def send(relay: RelayProcess, sender: str, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.sendmail(sender, rcpts, f"From: <{sender}>\r\nSubject: invoice\r\n\r\nhi\r\n")


def peers(sink: Sink) -> Counter[str]:
    return Counter(m.peer[0] for m in sink.messages for _ in m.rcpt_tos)


def wait_until(predicate: Any, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def recipient_rows(relay: RelayProcess) -> list[tuple[str, str, int, float]]:
    with sqlite3.connect(relay.queue_dir / "index.sqlite") as db:
        return db.execute("SELECT rcpt, state, attempts, next_attempt FROM recipients"
                          " ORDER BY rcpt").fetchall()


def test_every_message_leaves_from_the_source_spf_authorises(
        tmp_path: Path, dns_server: DnsServer, sink: Sink) -> None:
    dns_server.add(ZONE)
    # spf left at its default: enforce
    relay = start_relay(tmp_path, dns_server, sink, [{"address": A}, {"address": B}])
    with relay:
        for i in range(4):
            send(relay, "billing@only-b.test", [f"ap{i}@example.net"])
        sink.wait_for(4)
        relay.wait_for_log("event=delivered", count=4)
        assert peers(sink) == {B: 4}
        delivered = relay.events("delivered")
        assert {e["source"].rpartition(":")[0] for e in delivered} == {B}  # address:port
        shown = subprocess.run(
            [sys.executable, "-m", "relay", "--config", str(relay.config), "queue", "show",
             delivered[0]["id"]], capture_output=True, text=True, cwd=tmp_path, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert f"from {B}" in shown.stdout and f"from {A}" not in shown.stdout


def test_spf_fail_softfail_and_temperror_defer_and_send_nothing(
        tmp_path: Path, dns_server: DnsServer, sink: Sink) -> None:
    dns_server.add(ZONE)
    dns_server.servfail("broken.test")
    relay = start_relay(tmp_path, dns_server, sink, [{"address": A}, {"address": B}],
                        spf="enforce")
    with relay:
        send(relay, "billing@nobody.test", ["fail@example.net"])
        send(relay, "billing@soft.test", ["soft@example.net"])
        send(relay, "billing@broken.test", ["temp@example.net"])
        deferred = relay.wait_for_log("event=deferred", count=3)
        by_rcpt = {e["rcpt"]: e for e in relay.events("deferred")}
        assert "4.7.23" in by_rcpt["fail@example.net"]["reply"]
        assert f"{A}=fail" in by_rcpt["fail@example.net"]["reply"]
        assert f"{B}=softfail" in by_rcpt["soft@example.net"]["reply"]
        assert "4.7.24" in by_rcpt["temp@example.net"]["reply"]
        assert "temperror" in by_rcpt["temp@example.net"]["reply"], deferred
        # A working sender still gets through meanwhile, from an authorised address.
        send(relay, "billing@both.test", ["ok@example.net"])
        sink.wait_for(1)
        time.sleep(0.3)
        assert [m.rcpt_tos for m in sink.messages] == [["ok@example.net"]]
        rows = {r[0]: r for r in recipient_rows(relay)}
        assert rows["fail@example.net"][1] == "deferred" and rows["fail@example.net"][2] >= 1


def test_warmup_cap_moves_the_overflow_to_the_other_source_at_once(
        tmp_path: Path, dns_server: DnsServer, sink: Sink) -> None:
    dns_server.add(ZONE)
    today = utc_today()
    # A has ten times B's weight: without its cap it would carry nearly everything.
    sources = [{"address": A, "weight": 10,
                "warmup": {"start": today, "per_day": [3, 100]}},
               {"address": B, "weight": 1}]
    relay = start_relay(tmp_path, dns_server, sink, sources)
    with relay:
        send(relay, "billing@both.test", [f"r{i}@example.net" for i in range(8)])
        for i in range(4):
            send(relay, "billing@both.test", [f"s{i}@example.net"])
        sink.wait_for(2)
        wait_until(lambda: sum(peers(sink).values()) == 12)
        assert peers(sink) == {A: 3, B: 9}
        assert not relay.events("warmup_capped")  # nothing waited for the cap


def test_all_capped_waits_for_the_next_utc_day_and_counts_survive_a_restart(
        tmp_path: Path, dns_server: DnsServer, sink: Sink) -> None:
    dns_server.add(ZONE)
    today = utc_today()
    sources = [{"address": A, "warmup": {"start": today, "per_day": [2]}}]
    relay = start_relay(tmp_path, dns_server, sink, sources, spf="off")
    with relay:
        for i in range(3):
            send(relay, "billing@both.test", [f"a{i}@example.net"])
        relay.wait_for_log("event=warmup_capped")
        wait_until(lambda: len(sink.messages) == 2)
        midnight = next_utc_midnight(time.time())
        # postponed (in the index's next batch): due at midnight UTC, no attempt counted
        wait_until(lambda: [r[1:] for r in recipient_rows(relay) if r[1] != "delivered"]
                   == [("queued", 0, midnight)])
        assert relay.stop() == 0
    counts = json.loads((relay.queue_dir / "warmup-counts.json").read_text())
    assert counts == {"day": today, "counts": {A: {"example.net": 2}}}

    with relay:
        send(relay, "billing@both.test", ["after@example.net"])
        relay.wait_for_log("event=warmup_capped")
        time.sleep(0.3)
        assert len(sink.messages) == 2  # the cap still holds after the restart
        wait_until(lambda: ("after@example.net", "queued", 0, midnight)
                   in recipient_rows(relay))
