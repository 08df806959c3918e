"""TLS per destination (`[[destination]] tls`, `[delivery] tls_ca_file`): the real relay
process (or, where an MTA-STS requirement is injected, the real engine in process), real
aiosmtpd sinks with STARTTLS on 127.0.0.x, a real DNS server on loopback for the MX names, and
certificates made by a throw-away CA. Only the MTA-STS policy source is a test double: it is
the seam (relay/delivery/tlspolicy.py) and returns a fixed requirement per domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from certs import make_certs, make_pki, server_context
from dnsserver import DnsServer
from queuefiles import plant
from relayproc import RelayProcess
from test_delivery import SinkFactory, message, mx_zone, send

from relay.addresses import HostPort
from relay.config import Config, DestinationPolicy, QueueConfig, ServerConfig
from relay.config.main import DeliveryConfig, DnsConfig
from relay.delivery.attempt import Attempter
from relay.delivery.engine import DeliveryEngine
from relay.delivery.nexthop import NextHopResolver
from relay.delivery.store import DeliveryStore
from relay.delivery.tlspolicy import TlsMode, TlsRequirement
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.index import Index

RelayFactory = type[RelayProcess]


def policies(**modes: str) -> str:
    """`[[destination]]` tables: domain (underscores for dots) -> tls mode."""
    return "".join(f'[[destination]]\ndomain = "{d.replace("_", ".")}"\ntls = "{mode}"\n'
                   for d, mode in modes.items())


def deferred(relay: RelayProcess, rcpt: str) -> dict[str, str]:
    return next(e for e in relay.events("deferred") if e.get("rcpt") == rcpt)


def attempts(relay: RelayProcess, queue_id: str, rcpt: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(relay.queue_dir / "index.sqlite", timeout=10)) as db:
        return db.execute(
            "SELECT a.outcome, a.tls, a.tls_cipher, a.tls_verified FROM attempts a JOIN"
            " recipients r ON r.msg = a.msg AND r.idx = a.idx WHERE a.msg = ? AND r.rcpt = ?"
            " ORDER BY a.time", (queue_id, rcpt)).fetchall()


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, check=False,
                          cwd=config.parent)


# ------------------------------------------------------------------------- required


def test_required_never_sends_in_clear(relay_factory: RelayFactory, sinks: SinkFactory,
                                       dns_server: DnsServer, mx_port: int,
                                       tmp_path: Path) -> None:
    # Any certificate will do for `required`: this one is from a CA the relay never heard of.
    certs = make_certs(tmp_path / "pki", names=("somewhere.test",))
    plain = sinks(host="127.0.0.2", port=mx_port)
    tls = sinks(host="127.0.0.3", port=mx_port, starttls=server_context(certs))
    broken = sinks(host="127.0.0.4", port=mx_port, broken_tls=True)
    fallback = sinks(host="127.0.0.5", port=mx_port)  # plain text only: never good enough
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    dns_server.add(mx_zone("example.org", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    dns_server.add(mx_zone("example.com", (10, "mx1", "127.0.0.4")))
    dns_server.add(mx_zone("example.de", (10, "mx1", "127.0.0.4")))
    relay = relay_factory(
        dns={"nameservers": [dns_server.address]},
        delivery={"port": mx_port, "fallback_relays": [fallback.address]},
        policies=policies(example_net="required", example_org="required",
                          example_com="required", example_de="opportunistic")).start()
    queue_id = send(relay, ["ap@example.net", "ap@example.org", "ap@example.com",
                            "ap@example.de"])

    # The second MX offers STARTTLS: it gets example.org's copy, encrypted.
    [got] = tls.wait_for(1)
    assert got.rcpt_tos == ["ap@example.org"] and got.tls
    # Opportunistic to the broken host still falls back to plain text, as before.
    [clear] = broken.wait_for(1)
    assert clear.rcpt_tos == ["ap@example.de"] and not clear.tls
    relay.wait_for_log(r"event=deferred .*rcpt=ap@example.net", count=2)
    relay.wait_for_log(r"event=deferred .*rcpt=ap@example.com", count=2)

    no_tls = deferred(relay, "ap@example.net")
    assert no_tls["status"] == "4.7.4"
    assert no_tls["reply"].startswith("451 4.7.4 TLS is required, but was not offered by ")
    failed = deferred(relay, "ap@example.com")
    assert failed["status"] == "4.7.5"
    assert "TLS is required, but the handshake with mx1.example.com[127.0.0.4]" in \
        failed["reply"]
    # Nothing in clear: not to the plain MX, not to the fallback relay, and the broken host
    # (remembered as broken by the opportunistic delivery) is never retried in plain text.
    assert plain.messages == [] and fallback.messages == []
    assert [m.rcpt_tos for m in broken.messages] == [["ap@example.de"]]
    assert [a[0] for a in attempts(relay, queue_id, "ap@example.net")][:2] == ["deferred"] * 2


# ------------------------------------------------------------------------- verify


def test_verify_checks_chain_and_host_name(relay_factory: RelayFactory, sinks: SinkFactory,
                                           dns_server: DnsServer, mx_port: int,
                                           tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", {"good": ["mx1.example.net"],
                                      "wrong": ["mx.elsewhere.test"],
                                      "ip": ["127.0.0.5"]})
    stranger = make_certs(tmp_path / "other", names=("mx1.example.com",))  # unknown CA
    good = sinks(host="127.0.0.2", port=mx_port, starttls=server_context(pki["good"]))
    wrong = sinks(host="127.0.0.3", port=mx_port, starttls=server_context(pki["wrong"]))
    unknown = sinks(host="127.0.0.4", port=mx_port, starttls=server_context(stranger))
    literal = sinks(host="127.0.0.5", port=mx_port, starttls=server_context(pki["ip"]))
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2")))
    dns_server.add(mx_zone("example.org", (10, "mx1", "127.0.0.3")))
    dns_server.add(mx_zone("example.com", (10, "mx1", "127.0.0.4")))
    relay = relay_factory(
        dns={"nameservers": [dns_server.address]},
        delivery={"port": mx_port, "tls_ca_file": str(pki["good"].ca_cert)},
        policies=policies(example_net="verify", example_org="verify", example_com="verify")
        # A route written as an IP literal: that address is what the certificate must name.
        + f'[[destination]]\ndomain = "example.de"\ntls = "verify"\n'
          f'routes = ["{literal.address}"]\n').start()
    queue_id = send(relay, ["ap@example.net", "ap@example.org", "ap@example.com",
                            "ap@example.de"])
    [got] = good.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"] and got.tls
    [by_ip] = literal.wait_for(1)
    assert by_ip.rcpt_tos == ["ap@example.de"] and by_ip.tls
    relay.wait_for_log(r"event=deferred .*rcpt=ap@example.org")
    relay.wait_for_log(r"event=deferred .*rcpt=ap@example.com")

    name = deferred(relay, "ap@example.org")
    assert name["status"] == "4.7.5"
    assert name["reply"].startswith("451 4.7.5 Server certificate not verified for "
                                    "mx1.example.org[127.0.0.3]")
    assert "mx1.example.org" in name["reply"].split(":", 2)[2]  # the name that was asked for
    chain = deferred(relay, "ap@example.com")
    assert chain["status"] == "4.7.5" and "unable to get local issuer" in chain["reply"]
    assert wrong.messages == [] and unknown.messages == []  # and never in plain text

    delivered_events = relay.events("delivered", at_least=1)
    [delivered] = [e for e in delivered_events if e["rcpt"] == "ap@example.net"]
    assert delivered["verified"] == "yes" and delivered["cipher"]
    [(outcome, version, cipher, verified)] = attempts(relay, queue_id, "ap@example.net")
    assert (outcome, verified) == ("delivered", 1) and version.startswith("TLSv1.")
    shown = relay_cli(relay.config, "queue", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    [line] = [ln for ln in shown.stdout.splitlines() if " delivered mx1.example.net " in ln]
    assert f"tls={version} cipher={cipher} verified=yes:" in line
    assert " deferred mx1.example.org 127.0.0.3:" in shown.stdout
    assert "tls=no: 451 4.7.5 Server certificate not verified" in shown.stdout


def test_bad_tls_ca_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    relay = RelayProcess(tmp_path, delivery={"tls_ca_file": "ca.pem"},
                         policies=policies(example_net="verify"))
    result = relay_cli(relay.config, "check-config")
    line = (f"{relay.config}: delivery.tls_ca_file: {tmp_path / 'ca.pem'}:"
            " not a PEM certificate bundle")
    assert result.returncode == 1
    assert result.stdout.startswith(line), result.stdout
    served = relay_cli(relay.config, "serve")
    assert served.returncode == 78 and line in served.stderr
    assert "Traceback" not in served.stderr + result.stdout


def test_an_old_index_gets_the_tls_columns(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as old:
        old.execute("CREATE TABLE attempts (msg TEXT NOT NULL, idx INTEGER NOT NULL, time REAL"
                    " NOT NULL, outcome TEXT NOT NULL, host TEXT, address TEXT, reply TEXT,"
                    " tls TEXT, sha256 TEXT)")
        old.execute("INSERT INTO attempts VALUES ('OLD', 0, 1.0, 'delivered', 'h', 'a', 'r',"
                    " 'TLSv1.2', NULL)")
        old.commit()
    index = Index(db)
    try:
        rows = index.conn.execute("SELECT msg, tls, tls_cipher, tls_verified FROM attempts"
                                  ).fetchall()
    finally:
        index.close()
    assert rows == [("OLD", "TLSv1.2", None, None)]


# ------------------------------------------------------------------ MTA-STS requirements


class FixedSts:
    """The StsSource seam: a fixed requirement per domain (the real one is mtasts.py)."""

    def __init__(self, requirements: dict[str, TlsRequirement]) -> None:
        self.requirements = requirements
        self.asked: list[str] = []

    async def requirement(self, domain: str) -> TlsRequirement:
        self.asked.append(domain)
        return self.requirements[domain]


async def test_mta_sts_requirements_enforce_and_report(
        tmp_path: Path, sinks: SinkFactory, dns_server: DnsServer, mx_port: int,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="invoice-relay")
    pki = make_pki(tmp_path / "pki", {"mx1": ["mx1.example.net"], "mx2": ["mx2.example.net"]})
    stranger = make_certs(tmp_path / "other", names=("mx.example.com",))
    mx1 = sinks(host="127.0.0.2", port=mx_port, starttls=server_context(pki["mx1"]))
    mx2 = sinks(host="127.0.0.3", port=mx_port, starttls=server_context(pki["mx2"]))
    testing = sinks(host="127.0.0.4", port=mx_port, starttls=server_context(stranger))
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    dns_server.add(mx_zone("example.org", (10, "mx1", "127.0.0.2")))
    dns_server.add(mx_zone("example.com", (10, "mx", "127.0.0.4")))
    sts = FixedSts({
        # enforce: only mx2 may be used, although mx1 is preferred (and would verify).
        "example.net": TlsRequirement(TlsMode.VERIFY, ("mx2.example.net",), origin="mta-sts"),
        # enforce with a pattern no MX matches: nothing may be used.
        "example.org": TlsRequirement(TlsMode.VERIFY, ("*.mail.example.org",),
                                      origin="mta-sts"),
        # testing: delivered as opportunistic, and reported.
        "example.com": TlsRequirement(TlsMode.OPPORTUNISTIC, ("mx9.example.com",),
                                      report_only=True, origin="mta-sts"),
    })
    root = tmp_path / "var"
    config = Config(
        server=ServerConfig(hostname="relay.test"),
        queue=QueueConfig(path=root, retry_schedule=(30.0,), max_lifetime=3600.0),
        dns=DnsConfig(nameservers=(HostPort("127.0.0.1", dns_server.port),)),
        delivery=DeliveryConfig(port=mx_port, tls_ca_file=pki["mx1"].ca_cert),
        destinations=tuple(DestinationPolicy(d, tls="mta-sts")
                           for d in ("example.net", "example.org", "example.com")))
    root.mkdir()
    Index(root / "index.sqlite").close()
    env = Envelope(id=new_queue_id(), sender="app@invoices.test",
                   recipients=("ap@example.net", "ap@example.org", "ap@example.com"),
                   received=time.time(), client="127.0.0.1", helo="app.test")
    plant(root, env, message(), max_lifetime=3600.0)
    store = DeliveryStore(root, root / "index.sqlite", hostname="relay.test",
                          max_lifetime=3600.0)
    engine = DeliveryEngine(config, store, NextHopResolver(config.dns.nameservers),
                            Attempter(config, own_listeners=set()), sts=sts)
    await store.start()
    runner = asyncio.get_running_loop().create_task(engine.run())
    try:
        async with asyncio.timeout(10):
            while engine.counters.delivered + engine.counters.deferred < 3:
                await asyncio.sleep(0.02)
    finally:
        await engine.drain(2.0)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await store.close()

    assert sorted(sts.asked) == ["example.com", "example.net", "example.org"]
    assert [m.rcpt_tos for m in mx2.messages] == [["ap@example.net"]]
    assert mx1.messages == []  # preferred, verified, but not in the policy
    [reported] = [m for m in testing.messages]
    assert reported.rcpt_tos == ["ap@example.com"] and reported.tls
    lines = [r.getMessage() for r in caplog.records]
    [no_match] = [ln for ln in lines if "event=deferred" in ln and "ap@example.org" in ln]
    assert "status=4.7.5" in no_match
    assert "No MX host of example.org matches its mta-sts policy (mx: *.mail.example.org)" \
        in no_match
    [report] = [ln for ln in lines if "event=tls_policy_report" in ln]
    assert "domain=example.com" in report and "host=mx.example.com" in report
    assert "matches no mx pattern" in report and "Server certificate not verified" in report
    [verified] = [ln for ln in lines if "event=delivered" in ln and "ap@example.net" in ln]
    assert "verified=yes" in verified
    [unverified] = [ln for ln in lines if "event=delivered" in ln and "ap@example.com" in ln]
    assert "verified=no" in unverified
