"""SpfChecker: pyspf through the configured nameservers (a real DNS server on loopback),
cached for the records' TTL, one evaluation shared by concurrent callers."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import pytest
from dnsserver import DnsServer

from relay.addresses import HostPort
from relay.config import Config, DeliveryConfig, DnsConfig, SourceAddress
from relay.delivery.spf import SpfChecker
from relay.runtime import Runtime

ZONE = """
$ORIGIN test.
inv.test.          300 IN TXT "v=spf1 ip4:127.0.0.2 include:_spf.provider.test ~all"
_spf.provider.test. 300 IN TXT "v=spf1 ip4:127.0.0.3 -all"
hard.test.         300 IN TXT "v=spf1 ip4:127.0.0.2 -all"
neutral.test.      300 IN TXT "v=spf1 ?all"
short.test.        2   IN TXT "v=spf1 ip4:127.0.0.2 -all"
broken.test.       300 IN TXT "v=spf1 ip4:127.0.0.2 foo:bar -all"
nospf.test.        300 IN A   127.0.0.9
mta1.inv.test.     300 IN TXT "v=spf1 a -all"
mta1.inv.test.     300 IN A   127.0.0.2
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def checker_for(server: DnsServer, clock: Clock | None = None) -> SpfChecker:
    return SpfChecker([HostPort(server.host, server.port)], clock=clock or Clock())


@pytest.mark.parametrize(("ip", "sender", "result"), [
    ("127.0.0.2", "billing@inv.test", "pass"),
    ("127.0.0.3", "billing@inv.test", "pass"),      # through include:
    ("127.0.0.4", "billing@inv.test", "softfail"),  # ~all
    ("127.0.0.4", "billing@hard.test", "fail"),     # -all
    ("127.0.0.4", "billing@neutral.test", "neutral"),
    ("127.0.0.4", "billing@nospf.test", "none"),    # the name has no SPF record
    ("127.0.0.4", "billing@absent.test", "none"),   # NXDOMAIN
    ("127.0.0.2", "billing@broken.test", "permerror"),
])
async def test_results(dns_server: DnsServer, ip: str, sender: str, result: str) -> None:
    found = await checker_for(dns_server).check(ip, sender, "mta1.inv.test")
    assert found.result == result, found


async def test_null_sender_is_checked_against_the_helo_name(dns_server: DnsServer) -> None:
    checker = checker_for(dns_server)
    assert (await checker.check("127.0.0.2", "", "mta1.inv.test")).result == "pass"
    assert (await checker.check("127.0.0.3", "", "mta1.inv.test")).result == "fail"


async def test_dns_failure_is_temperror(dns_server: DnsServer) -> None:
    dns_server.servfail("inv.test")
    found = await checker_for(dns_server).check("127.0.0.2", "a@inv.test", "mta1.inv.test")
    assert found.result == "temperror"


async def test_second_check_within_ttl_asks_no_dns(dns_server: DnsServer) -> None:
    clock = Clock()
    checker = checker_for(dns_server, clock)
    first = await checker.check("127.0.0.3", "a@inv.test", "mta1.inv.test")
    assert ("_spf.provider.test", "TXT") in dns_server.queries
    dns_server.clear_queries()
    clock.now += 299  # both records have a TTL of 300 s
    again = await checker.check("127.0.0.3", "other@inv.test", "mta1.inv.test")
    assert again == first == checker.cached("127.0.0.3", "x@inv.test", "h")
    assert dns_server.queries == []
    clock.now += 2
    assert checker.cached("127.0.0.3", "a@inv.test", "h") is None
    await checker.check("127.0.0.3", "a@inv.test", "mta1.inv.test")
    assert ("inv.test", "TXT") in dns_server.queries


async def test_cache_holds_for_the_smallest_ttl_and_sees_a_changed_record(
        dns_server: DnsServer) -> None:
    clock = Clock()
    checker = checker_for(dns_server, clock)
    assert (await checker.check("127.0.0.2", "a@short.test", "h.test")).result == "pass"
    dns_server.remove("short.test")
    dns_server.add('short.test. 2 IN TXT "v=spf1 -all"')
    clock.now += 1
    assert (await checker.check("127.0.0.2", "a@short.test", "h.test")).result == "pass"
    clock.now += 1.5  # past the 2 s TTL: the new record counts
    assert (await checker.check("127.0.0.2", "a@short.test", "h.test")).result == "fail"


async def test_concurrent_callers_share_one_evaluation(dns_server: DnsServer) -> None:
    checker = checker_for(dns_server)
    results = await asyncio.gather(*(checker.check("127.0.0.2", f"u{i}@hard.test", "h.test")
                                     for i in range(20)))
    assert set(results) == {results[0]} and results[0].result == "pass"
    assert dns_server.queries.count(("hard.test", "TXT")) == 1



async def test_runtime_builds_a_checker_only_when_egress_enforces_spf(
        dns_server: DnsServer) -> None:
    pool = (SourceAddress(ipaddress.ip_address("127.0.0.2"), "mta1.inv.test"),)
    dns = DnsConfig((HostPort(dns_server.host, dns_server.port),))
    assert Runtime.build(Config(delivery=DeliveryConfig(spf="off", source_addresses=pool))
                         ).spf is None
    assert Runtime.build(Config(delivery=DeliveryConfig(spf="enforce"))).spf is None
    runtime = Runtime.build(Config(dns=dns, delivery=DeliveryConfig(
        spf="enforce", source_addresses=pool)))
    assert runtime.spf is not None
    found = await runtime.spf.check("127.0.0.2", "a@hard.test", "mta1.inv.test")
    assert found.result == "pass"  # asked of [dns] nameservers, not the system resolver
