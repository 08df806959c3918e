"""MTA-STS policy source (relay/delivery/mtasts.py) against a real DNS server on loopback and a
real HTTPS policy host on 127.0.0.1:443 with a certificate from a CA made per module.

Every `<domain>` below has `_mta-sts.<domain>` TXT and `mta-sts.<domain>` A 127.0.0.1 in the
DNS server; the HTTPS server answers by Host header from `PolicyHost.pages`. Time is a fake
wall clock: max_age and the TXT re-check interval pass without sleeping.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from certs import Certs, make_certs, server_context
from dnsserver import DnsServer

from relay.addresses import HostPort
from relay.delivery.mtasts import (
    MAX_POLICY_BYTES,
    TXT_RECHECK,
    MtaStsResolver,
    PolicyError,
    parse_policy,
    parse_txt,
)
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsMode, TlsRequirement

DOMAINS = ("enforce.example", "testing.example", "none.example", "bad.example",
           "moved.example", "big.example", "html.example", "many.example", "down.example")
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.enforce.example\nmx: *.MX.enforce.example\n" \
          "max_age: 86400\n"


@dataclass
class Page:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


class PolicyHost:
    """The HTTPS server for every mta-sts.<domain>: pages by host, fetches counted."""

    def __init__(self) -> None:
        self.pages: dict[str, Page] = {}
        self.fetches: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None

    def set(self, domain: str, text: str, **kwargs: object) -> None:
        self.pages[f"mta-sts.{domain}"] = Page(text.encode(), **kwargs)  # type: ignore[arg-type]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0]
        self.fetches[host.removeprefix("mta-sts.")] += 1
        page = self.pages.get(host)
        if page is None or request.path != "/.well-known/mta-sts.txt":
            return web.Response(status=404)
        return web.Response(body=page.body, status=page.status, headers=dict(page.headers),
                            content_type=page.content_type)

    async def start(self, certs: Certs) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 443, ssl_context=server_context(certs))
        try:
            await site.start()
        except PermissionError:
            await self.runner.cleanup()
            pytest.skip("port 443 needs root (CI runs as root)")
        except OSError as exc:
            await self.runner.cleanup()
            if exc.errno == errno.EACCES:
                pytest.skip("port 443 needs root (CI runs as root)")
            raise

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"), [f"mta-sts.{d}" for d in DOMAINS])


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        for domain in DOMAINS:
            set_txt(server, domain, "1")
            server.add(f"mta-sts.{domain}. 300 IN A 127.0.0.1")
        yield server


@pytest.fixture
async def host(certs: Certs) -> AsyncIterator[PolicyHost]:
    server = PolicyHost()
    await server.start(certs)
    yield server
    await server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(tmp_path: Path, dns: DnsServer, certs: Certs, clock: Clock,
               ) -> AsyncIterator[type]:
    made: list[MtaStsResolver] = []

    def build(ca_file: Path | None = None) -> MtaStsResolver:
        resolver = MtaStsResolver(tmp_path / "mta-sts",
                                  nameservers=[HostPort("127.0.0.1", dns.port)],
                                  ca_file=ca_file or certs.ca_cert, fetch_timeout=3.0, clock=clock)
        made.append(resolver)
        return resolver

    yield build  # type: ignore[misc]
    for resolver in made:
        await resolver.close()


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")


def set_txt(dns: DnsServer, domain: str, policy_id: str, extra: str = "") -> None:
    dns.remove(f"_mta-sts.{domain}")
    dns.add(f'_mta-sts.{domain}. 300 IN TXT "v=STSv1; id={policy_id};"{extra}')


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f" event={name} " in r.getMessage() + " "]


def enforce(*mx: str) -> TlsRequirement:
    return TlsRequirement(TlsMode.VERIFY, mx_patterns=mx, origin="mta-sts")


# ---- the mapping and the cache file --------------------------------------------------------


async def test_modes_map_to_requirements(make: type, host: PolicyHost, dns: DnsServer,
                                         tmp_path: Path) -> None:
    host.set("enforce.example", ENFORCE)
    host.set("testing.example", ENFORCE.replace("enforce", "testing"))
    host.set("none.example", "version: STSv1\nmode: none\nmax_age: 86400\n")
    resolver = make()
    got = await resolver.requirement("Enforce.Example.")
    assert got == enforce("mx1.enforce.example", "*.mx.enforce.example")
    assert got.allows_host("a.mx.enforce.example") and not got.allows_host("evil.example")
    assert await resolver.requirement("testing.example") == TlsRequirement(
        TlsMode.OPPORTUNISTIC, mx_patterns=("mx1.testing.example", "*.mx.testing.example"),
        report_only=True, origin="mta-sts")
    assert await resolver.requirement("none.example") == OPPORTUNISTIC
    # no TXT record at all: no fetch is tried
    dns.remove("_mta-sts.many.example")
    assert await resolver.requirement("many.example") == OPPORTUNISTIC
    assert host.fetches["many.example"] == 0
    cached = json.loads((tmp_path / "mta-sts" / "enforce.example.json").read_text())
    assert (cached["id"], cached["mode"], cached["max_age"]) == ("1", "enforce", 86400)
    await resolver.close()


# ---- refresh: TXT id -----------------------------------------------------------------------


async def test_unchanged_id_is_not_fetched_again_and_a_new_id_is(
        make: type, host: PolicyHost, dns: DnsServer, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    host.set("enforce.example", ENFORCE)
    resolver = make()
    first = await resolver.requirement("enforce.example")
    assert first.mode == TlsMode.VERIFY and host.fetches["enforce.example"] == 1
    dns.clear_queries()
    clock.now += 10  # before the re-check: no DNS query at all
    assert await resolver.requirement("enforce.example") == first
    assert dns.queries == []
    clock.now += TXT_RECHECK  # the TXT record is checked, the id is the same: no fetch
    assert await resolver.requirement("enforce.example") == first
    await resolver.idle()
    assert dns.queries == [("_mta-sts.enforce.example", "TXT")]
    assert host.fetches["enforce.example"] == 1

    host.set("enforce.example", ENFORCE.replace("mode: enforce", "mode: testing"))
    set_txt(dns, "enforce.example", "2")
    clock.now += TXT_RECHECK
    # The cached policy answers at once; the new one is fetched in the background.
    assert await resolver.requirement("enforce.example") == first
    await resolver.idle()
    assert host.fetches["enforce.example"] == 2
    now = await resolver.requirement("enforce.example")
    assert (now.mode, now.report_only) == (TlsMode.OPPORTUNISTIC, True)
    (changed,) = [e for e in events(caplog, "mta_sts_policy") if "id=2" in e]
    assert "mode=testing" in changed and "previous=1" in changed
    await resolver.close()


# ---- what keeps a policy, what drops it ------------------------------------------------------


async def test_outage_keeps_cached_policy_also_after_restart(
        make: type, host: PolicyHost, dns: DnsServer, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    host.set("enforce.example", ENFORCE)
    resolver = make()
    policy = await resolver.requirement("enforce.example")
    assert policy.mode == TlsMode.VERIFY
    # The policy host goes down while the id changes: the fetch fails, the policy stays.
    await host.stop()
    set_txt(dns, "enforce.example", "2")
    clock.now += TXT_RECHECK
    await resolver.requirement("enforce.example")
    await resolver.idle()
    assert await resolver.requirement("enforce.example") == policy
    (failed,) = events(caplog, "mta_sts_failed")
    assert "domain=enforce.example" in failed and "kept=1" in failed
    await resolver.close()

    # Restart while DNS fails too: the disk cache still says enforce.
    dns.servfail("_mta-sts.enforce.example")
    restarted = make()
    assert await restarted.requirement("enforce.example") == policy
    clock.now += TXT_RECHECK
    assert await restarted.requirement("enforce.example") == policy
    await restarted.idle()
    assert await restarted.requirement("enforce.example") == policy
    await restarted.close()


async def test_removed_txt_record_keeps_cached_policy(
        make: type, host: PolicyHost, dns: DnsServer, clock: Clock) -> None:
    # An attacker who strips the TXT record (or a domain that drops it without publishing
    # `mode: none` first) must not turn an unexpired enforce policy off (RFC 8461 section 5).
    host.set("enforce.example", ENFORCE)
    resolver = make()
    policy = await resolver.requirement("enforce.example")
    dns.remove("_mta-sts.enforce.example")
    clock.now += TXT_RECHECK
    await resolver.requirement("enforce.example")
    await resolver.idle()
    assert await resolver.requirement("enforce.example") == policy
    assert host.fetches["enforce.example"] == 1


async def test_expired_max_age_drops_the_policy(
        make: type, host: PolicyHost, dns: DnsServer, clock: Clock) -> None:
    host.set("down.example", ENFORCE.replace("86400", "600").replace("enforce.", "down."))
    resolver = make()
    assert (await resolver.requirement("down.example")).mode == TlsMode.VERIFY
    await host.stop()
    dns.servfail("_mta-sts.down.example")
    clock.now += 599
    assert (await resolver.requirement("down.example")).mode == TlsMode.VERIFY
    await resolver.idle()
    clock.now += 2
    assert await resolver.requirement("down.example") == OPPORTUNISTIC
    await resolver.close()
    restarted = make()  # an expired policy on disk does not come back either
    assert await restarted.requirement("down.example") == OPPORTUNISTIC
    await restarted.close()


async def test_bad_new_policy_keeps_the_cached_one(
        make: type, host: PolicyHost, dns: DnsServer, clock: Clock) -> None:
    host.set("enforce.example", ENFORCE)
    resolver = make()
    policy = await resolver.requirement("enforce.example")
    host.set("enforce.example", "version: STSv1\nmode: enforce\nmax_age: 86400\n")  # no mx
    set_txt(dns, "enforce.example", "2")
    clock.now += TXT_RECHECK
    await resolver.requirement("enforce.example")
    await resolver.idle()
    assert host.fetches["enforce.example"] == 2
    assert await resolver.requirement("enforce.example") == policy
    await resolver.close()


# ---- what is never accepted ----------------------------------------------------------------


async def test_redirect_is_not_followed(make: type, host: PolicyHost,
                                        caplog: pytest.LogCaptureFixture) -> None:
    host.set("enforce.example", ENFORCE)
    target = "https://mta-sts.enforce.example/.well-known/mta-sts.txt"
    host.set("moved.example", "", status=301, headers=(("Location", target),))
    resolver = make()
    assert await resolver.requirement("moved.example") == OPPORTUNISTIC
    assert host.fetches["moved.example"] == 1 and host.fetches["enforce.example"] == 0
    (failed,) = events(caplog, "mta_sts_failed")
    assert "HTTP 301 redirect" in failed and "not followed" in failed
    await resolver.close()


async def test_bad_policies_are_ignored(make: type, host: PolicyHost,
                                        caplog: pytest.LogCaptureFixture) -> None:
    host.set("bad.example", ENFORCE.replace("STSv1", "STSv2"))
    host.set("html.example", ENFORCE, content_type="text/html")
    host.set("big.example", ENFORCE + "x: " + "y" * MAX_POLICY_BYTES + "\n")
    host.set("none.example", ENFORCE, status=404)
    resolver = make()
    for domain in ("bad.example", "html.example", "big.example", "none.example"):
        assert await resolver.requirement(domain) == OPPORTUNISTIC, domain
    reasons = "\n".join(events(caplog, "mta_sts_failed"))
    for why in ("'STSv2'", "'text/html', not text/plain", "over 65536", "HTTP 404"):
        assert why in reasons
    await resolver.close()


async def test_untrusted_certificate_gives_no_policy(
        make: type, host: PolicyHost, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host.set("enforce.example", ENFORCE)
    other_ca = make_certs(tmp_path / "other").ca_cert
    resolver = make(ca_file=other_ca)
    assert await resolver.requirement("enforce.example") == OPPORTUNISTIC
    (failed,) = events(caplog, "mta_sts_failed")
    assert "not trusted" in failed
    await resolver.close()


# ---- sharing ---------------------------------------------------------------------------------


async def test_concurrent_callers_share_one_lookup(make: type, host: PolicyHost,
                                                   dns: DnsServer) -> None:
    host.set("many.example", ENFORCE.replace("enforce.", "many."))
    resolver = make()
    dns.clear_queries()
    answers = await asyncio.gather(*(resolver.requirement("many.example") for _ in range(200)))
    assert {a.mode for a in answers} == {TlsMode.VERIFY}
    assert host.fetches["many.example"] == 1
    assert dns.queries.count(("_mta-sts.many.example", "TXT")) == 1
    await resolver.close()


# ---- parsers (no network) --------------------------------------------------------------------


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20260101T0000;"], "20260101T0000"),
    (["v=STSv1; id=abc123"], "abc123"),
    (["v=STSv1;id=abc;ext=1;"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=7;"], "7"),
    (["v=STSv1; id=1;", "v=STSv1; id=2;"], None),  # two records: no policy
    (["v=STSv1; id=a-b;"], None),
    (["v=STSv1; id=" + "a" * 33 + ";"], None),
    (["v=STSv1 id=1"], None),
    (["v=STSv1; ;"], None),
    ([], None),
])
def test_parse_txt(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


def test_parse_policy_accepts_crlf_and_unknown_keys() -> None:
    text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.net.\r\nfoo: bar\r\n" \
           "max_age: 31557600\r\n"
    policy = parse_policy(text, "9", 5.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.expires) == (
        "enforce", ("mail.example.net",), 31557600, 31557605.0)


@pytest.mark.parametrize("text", [
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.example\n",
    "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
    "version: STSv1\nmode: testing\nmax_age: 1\n",
    "mode: enforce\nmx: a.example\nmax_age: 1\n",
    "version STSv1\n",
])
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text, "1", 0.0)


async def test_damaged_cache_file_is_ignored_and_replaced(
        make: type, host: PolicyHost, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mta-sts"
    folder.mkdir()
    (folder / "enforce.example.json").write_text('{"domain": "enforce.example", "mode"')
    host.set("enforce.example", ENFORCE)
    resolver = make()
    assert (await resolver.requirement("enforce.example")).mode == TlsMode.VERIFY
    (problem,) = events(caplog, "mta_sts_failed")
    assert "enforce.example.json: ignored" in problem
    # the fetched policy replaced it, atomically: no temporary file is left behind
    assert sorted(p.name for p in folder.iterdir()) == ["enforce.example.json"]
    assert json.loads((folder / "enforce.example.json").read_text())["mode"] == "enforce"
