"""NextHopResolver against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import dns.asyncquery
import dns.message
import pytest
from dnsserver import DnsServer

from relay.addresses import HostPort
from relay.delivery.nexthop import DnsFailure, NextHop, NextHopResolver

ZONE = """
$TTL 300
example.test.          IN MX   10 mx1.example.test.
example.test.          IN MX   20 mx2a.example.test.
example.test.          IN MX   20 mx2b.example.test.
mx1.example.test.      IN A    127.0.0.11
mx1.example.test.      IN AAAA ::1
mx2a.example.test.     IN A    127.0.0.21
mx2b.example.test.     IN A    127.0.0.22
implicit.test.         IN A    127.0.0.30
implicit.test.         IN AAAA 2001:db8::30
nullmx.test.           IN MX   0 .
partial.test.          IN MX   10 noaddr.partial.test.
partial.test.          IN MX   20 mx.partial.test.
noaddr.partial.test.   IN TXT  "no address here"
mx.partial.test.       IN A    127.0.0.40
deadmx.test.           IN MX   10 gone.deadmx.test.
deadmx.test.           IN MX   20 failing.deadmx.test.
bare.test.             IN TXT  "exists, but no MX and no A/AAAA"
dup.test.              IN MX   10 a.dup.test.
dup.test.              IN MX   20 b.dup.test.
a.dup.test.            IN A    127.0.0.50
b.dup.test.            IN A    127.0.0.50
b.dup.test.            IN A    127.0.0.51
xn--bcher-kva.test.    IN MX   10 mx.xn--bcher-kva.test.
mx.xn--bcher-kva.test. IN A    127.0.0.60
relay.test.            IN A    127.0.0.70
relay.test.            IN AAAA 2001:db8::70
shortneg.test.         0 IN SOA ns.shortneg.test. hm.shortneg.test. 1 3600 600 86400 0
"""


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        server.servfail("broken.test")
        server.servfail("failing.deadmx.test")
        server.timeout("slow.test")
        yield server


@pytest.fixture
def resolver(dns_server: DnsServer) -> NextHopResolver:
    return NextHopResolver([HostPort("127.0.0.1", dns_server.port)], timeout=0.5, lifetime=1.0)


def addresses(hops: list[NextHop]) -> list[str]:
    return [hop.address for hop in hops]


async def test_mx_preference_order_and_equal_preferences_shuffled(
    resolver: NextHopResolver,
) -> None:
    orders = set()
    for _ in range(40):
        hops = await resolver.for_domain("example.test", 25)
        assert hops[:2] == [
            NextHop("mx1.example.test", "127.0.0.11", 25, "mx"),
            NextHop("mx1.example.test", "::1", 25, "mx"),
        ]
        orders.add(tuple(addresses(hops[2:])))
    assert orders == {("127.0.0.21", "127.0.0.22"), ("127.0.0.22", "127.0.0.21")}


async def test_implicit_mx_uses_a_then_aaaa(resolver: NextHopResolver) -> None:
    hops = await resolver.for_domain("Implicit.Test.", 2525)
    assert hops == [
        NextHop("implicit.test", "127.0.0.30", 2525, "implicit"),
        NextHop("implicit.test", "2001:db8::30", 2525, "implicit"),
    ]


async def test_nxdomain_is_permanent_5_1_2(resolver: NextHopResolver) -> None:
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("nosuch.test", 25)
    assert (info.value.temporary, info.value.status) == (False, "5.1.2")
    assert info.value.text == (
        "Host or domain name not found. Name service error for name=nosuch.test type=MX: "
        "Host not found"
    )


async def test_name_without_mx_and_address_is_permanent(resolver: NextHopResolver) -> None:
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("bare.test", 25)
    assert (info.value.temporary, info.value.status) == (False, "5.1.2")


async def test_null_mx_is_permanent_5_1_10(resolver: NextHopResolver) -> None:
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("nullmx.test", 25)
    assert (info.value.temporary, info.value.status) == (False, "5.1.10")
    assert "nullmx.test" in str(info.value)


async def test_servfail_is_temporary_and_not_cached(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    for _ in range(2):
        with pytest.raises(DnsFailure) as info:
            await resolver.for_domain("broken.test", 25)
        assert (info.value.temporary, info.value.status) == (True, "4.4.3")
    assert dns_server.queries.count(("broken.test", "MX")) == 2


async def test_timeout_is_temporary_and_quick(dns_server: DnsServer) -> None:
    resolver = NextHopResolver([HostPort("127.0.0.1", dns_server.port)], timeout=0.3, lifetime=1)
    started = time.monotonic()
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("slow.test", 25)
    assert time.monotonic() - started < 3
    assert (info.value.temporary, info.value.status) == (True, "4.4.3")
    assert "try again" in info.value.text


async def test_unreachable_nameserver_is_temporary() -> None:
    with DnsServer() as server:
        port = server.port
    resolver = NextHopResolver([HostPort("127.0.0.1", port)], timeout=0.3, lifetime=1)
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("example.test", 25)
    assert (info.value.temporary, info.value.status) == (True, "4.4.3")


async def test_mx_name_without_address_is_skipped(resolver: NextHopResolver) -> None:
    hops = await resolver.for_domain("partial.test", 25)
    assert hops == [NextHop("mx.partial.test", "127.0.0.40", 25, "mx")]


async def test_no_mx_name_resolves_is_temporary(resolver: NextHopResolver) -> None:
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("deadmx.test", 25)
    assert (info.value.temporary, info.value.status) == (True, "4.4.3")
    assert "gone.deadmx.test" in info.value.text
    assert "failing.deadmx.test" in info.value.text


async def test_duplicate_addresses_removed_in_order(resolver: NextHopResolver) -> None:
    hops = await resolver.for_domain("dup.test", 25)
    assert hops == [
        NextHop("a.dup.test", "127.0.0.50", 25, "mx"),
        NextHop("b.dup.test", "127.0.0.51", 25, "mx"),
    ]


async def test_unicode_domain_is_looked_up_as_idna(resolver: NextHopResolver) -> None:
    hops = await resolver.for_domain("bücher.test", 25)
    assert hops == [NextHop("mx.xn--bcher-kva.test", "127.0.0.60", 25, "mx")]


async def test_domain_literals_need_no_dns(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    assert await resolver.for_domain("[127.0.0.9]", 25) == [
        NextHop("127.0.0.9", "127.0.0.9", 25, "implicit")
    ]
    assert await resolver.for_domain("[IPv6:2001:DB8::1]", 25) == [
        NextHop("2001:db8::1", "2001:db8::1", 25, "implicit")
    ]
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain("[not-an-ip]", 25)
    assert (info.value.temporary, info.value.status) == (False, "5.1.2")
    assert dns_server.queries == []


async def test_positive_and_negative_answers_are_cached(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    first = await resolver.for_domain("implicit.test", 25)
    with pytest.raises(DnsFailure):
        await resolver.for_domain("nosuch.test", 25)
    seen = len(dns_server.queries)
    assert seen == 4  # implicit.test MX, A, AAAA; nosuch.test MX
    assert await resolver.for_domain("implicit.test", 25) == first
    with pytest.raises(DnsFailure):
        await resolver.for_domain("nosuch.test", 25)
    assert len(dns_server.queries) == seen


async def test_negative_ttl_follows_soa_minimum(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    # The SOA of shortneg.test has MINIMUM 0: its NXDOMAIN answers must not be cached.
    for _ in range(2):
        with pytest.raises(DnsFailure):
            await resolver.for_domain("gone.shortneg.test", 25)
    assert dns_server.queries.count(("gone.shortneg.test", "MX")) == 2


async def test_concurrent_lookups_share_one_query(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    results = await asyncio.gather(*(resolver.for_domain("example.test", 25) for _ in range(50)))
    assert all(set(addresses(r)) == set(addresses(results[0])) for r in results)
    assert dns_server.queries.count(("example.test", "MX")) == 1
    assert dns_server.queries.count(("mx2a.example.test", "A")) == 1


async def test_cancelled_caller_does_not_break_shared_query(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    first = asyncio.create_task(resolver.for_domain("implicit.test", 25))
    second = asyncio.create_task(resolver.for_domain("implicit.test", 25))
    await asyncio.sleep(0)
    first.cancel()
    assert len(await second) == 2
    assert dns_server.queries.count(("implicit.test", "MX")) == 1


async def test_routes_with_names_ips_and_ports(resolver: NextHopResolver) -> None:
    hosts = [HostPort("relay.test", 587), HostPort("127.0.0.5", 2525), HostPort("::1", 25)]
    assert await resolver.for_hosts(hosts, "route") == [
        NextHop("relay.test", "127.0.0.70", 587, "route"),
        NextHop("relay.test", "2001:db8::70", 587, "route"),
        NextHop("127.0.0.5", "127.0.0.5", 2525, "route"),
        NextHop("::1", "::1", 25, "route"),
    ]


async def test_routes_never_use_mx_and_skip_failing_hosts(
    resolver: NextHopResolver, dns_server: DnsServer
) -> None:
    hosts = [HostPort("example.test", 25), HostPort("broken.test", 25), HostPort("relay.test", 26)]
    hops = await resolver.for_hosts(hosts, "fallback")
    assert addresses(hops) == ["127.0.0.70", "2001:db8::70"]
    assert {hop.kind for hop in hops} == {"fallback"}
    assert all(qtype in ("A", "AAAA") for _, qtype in dns_server.queries)


async def test_all_route_hosts_failing_is_temporary(resolver: NextHopResolver) -> None:
    hosts = [HostPort("nosuch.test", 25), HostPort("broken.test", 25)]
    with pytest.raises(DnsFailure) as info:
        await resolver.for_hosts(hosts, "route")
    assert (info.value.temporary, info.value.status) == (True, "4.4.3")
    assert "nosuch.test:25" in info.value.text
    assert "broken.test:25" in info.value.text


@pytest.mark.parametrize("domain", ["", ".", "a b.test", "x" * 64 + ".test", "-bad.test"])
async def test_invalid_domain_is_permanent_without_query(
    resolver: NextHopResolver, dns_server: DnsServer, domain: str
) -> None:
    with pytest.raises(DnsFailure) as info:
        await resolver.for_domain(domain, 25)
    assert (info.value.temporary, info.value.status) == (False, "5.1.2")
    assert dns_server.queries == []


async def test_dns_server_answers_over_tcp_too(dns_server: DnsServer) -> None:
    query = dns.message.make_query("mx1.example.test", "A")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", timeout=2, port=dns_server.port)
    assert [rd.to_text() for rd in response.answer[0]] == ["127.0.0.11"]
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
