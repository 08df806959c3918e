"""Where to deliver: MX lookup for a recipient domain, or A/AAAA of configured routes/relays.

Answers are cached for their TTL (negative ones for the SOA negative TTL), and concurrent
lookups of one name share one query, so a burst to one domain costs one round trip.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver

from relay.addresses import HostPort

NEGATIVE_TTL_DEFAULT = 60.0
MAX_TTL = 86400.0  # never trust a cached answer longer than a day
MAX_CACHE_ENTRIES = 50_000

_HOSTNAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*"
)
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_Status = Literal["ok", "nxdomain", "nodata"]


@dataclass(frozen=True, slots=True)
class NextHop:
    name: str  # the MX host name, route/relay host name, or the IP literal
    address: str  # IP address to connect to
    port: int
    # "mx" | "implicit" (A/AAAA of the domain, or a domain literal) | "route" | "fallback"
    kind: str


class DnsFailure(Exception):
    """A lookup that gives no next hop; `temporary` decides defer (True) or bounce (False)."""

    def __init__(self, temporary: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.status = status
        self.text = text


@dataclass(frozen=True, slots=True)
class _Answer:
    status: _Status
    addresses: tuple[str, ...] = ()  # for A/AAAA
    mx: tuple[tuple[int, str], ...] = ()  # (preference, exchange); exchange "" = null MX


def _not_found(name: str, rdtype: str) -> str:
    return f"Host or domain name not found. Name service error for name={name} type={rdtype}"


def _temporary(name: str, rdtype: str, why: str) -> DnsFailure:
    return DnsFailure(
        True, "4.4.3", f"{_not_found(name, rdtype)}: Host not found, try again ({why})"
    )


def ascii_domain(domain: str) -> str:
    """Lower-case IDNA (A-label) form without the trailing dot; DnsFailure 5.1.2 if invalid."""
    try:
        name = dns.name.from_text(domain.strip().rstrip("."))
        text = name.to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise DnsFailure(False, "5.1.2", f"Invalid domain name {domain!r}: {exc}") from None
    # dnspython accepts any octets (escaped as \DDD); a mail domain is letters, digits, hyphens.
    if not _HOSTNAME.fullmatch(text):
        raise DnsFailure(False, "5.1.2", f"Invalid domain name {domain!r}")
    return text


def _literal_address(domain: str) -> str | None:
    """The address of a domain literal `[1.2.3.4]` / `[IPv6:2001:db8::1]`, None if not one."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DnsFailure(False, "5.1.2", f"Invalid address literal {domain}") from None


def negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: the lesser of the SOA record's TTL and its MINIMUM field."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


def dns_resolver(
    nameservers: Sequence[HostPort] = (), *, timeout: float = 5.0, lifetime: float = 10.0
) -> dns.asyncresolver.Resolver:
    """A dnspython resolver asking `[dns] nameservers`, or /etc/resolv.conf's when empty
    (shared with relay/delivery/mtasts.py, so every lookup goes to the same servers)."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
        ]
    else:
        resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    return resolver


class NextHopResolver:
    def __init__(
        self,
        nameservers: Sequence[HostPort] = (),
        *,
        timeout: float = 5.0,
        lifetime: float = 10.0,
    ) -> None:
        self._resolver = dns_resolver(nameservers, timeout=timeout, lifetime=lifetime)
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[_Answer]] = {}

    # ---- public API -------------------------------------------------------------------

    async def for_domain(self, domain: str, port: int) -> list[NextHop]:
        literal = _literal_address(domain.strip())
        if literal is not None:
            return [NextHop(literal, literal, port, "implicit")]
        name = ascii_domain(domain)
        mx = await self._lookup(name, "MX")
        if mx.status == "nxdomain":
            raise DnsFailure(False, "5.1.2", f"{_not_found(name, 'MX')}: Host not found")
        if mx.status == "nodata":
            return await self._implicit(name, port)
        exchanges = list(mx.mx)
        if any(host == "" for _, host in exchanges):
            exchanges = [(pref, host) for pref, host in exchanges if host]
            if not exchanges:  # RFC 7505 null MX: the domain accepts no mail at all
                raise DnsFailure(False, "5.1.10", f"Domain {name} does not accept mail (nullMX)")
        return await self._mx_hops(name, _mx_order(exchanges), port)

    async def for_hosts(self, hosts: Sequence[HostPort], kind: str) -> list[NextHop]:
        hops: list[NextHop] = []
        failed: list[str] = []
        for hp in hosts:
            if hp.is_ip:
                hops.append(NextHop(hp.host, hp.host, hp.port, kind))
                continue
            try:
                name = ascii_domain(hp.host)
                addresses = await self._addresses(name)
            except DnsFailure as exc:
                failed.append(f"{hp}: {exc.text}")
                continue
            if not addresses:
                failed.append(f"{hp}: no A/AAAA record")
            hops.extend(NextHop(name, addr, hp.port, kind) for addr in addresses)
        if not hops:
            detail = "; ".join(failed) or "no hosts configured"
            raise DnsFailure(True, "4.4.3", f"No usable {kind} host: {detail}")
        return _unique_hops(hops)

    # ---- resolution steps -------------------------------------------------------------

    async def _implicit(self, name: str, port: int) -> list[NextHop]:
        """No MX: the domain itself is the host (RFC 5321 5.1)."""
        addresses = await self._addresses(name)
        if not addresses:
            raise DnsFailure(
                False, "5.1.2", f"{_not_found(name, 'MX')}: No MX and no A/AAAA record"
            )
        return [NextHop(name, addr, port, "implicit") for addr in addresses]

    async def _mx_hops(self, domain: str, hosts: list[str], port: int) -> list[NextHop]:
        hops: list[NextHop] = []
        seen: set[str] = set()
        problems: list[str] = []
        for host in hosts:
            try:
                addresses = await self._addresses(host)
            except DnsFailure as exc:
                problems.append(exc.text)
                continue
            if not addresses:
                problems.append(f"MX host {host} has no address")
            for addr in addresses:
                if addr not in seen:  # several MX names may share an address
                    seen.add(addr)
                    hops.append(NextHop(host, addr, port, "mx"))
        if not hops:
            detail = "; ".join(problems)
            raise DnsFailure(True, "4.4.3", f"No usable MX host for {domain}: {detail}")
        return hops

    async def _addresses(self, name: str) -> list[str]:
        """A then AAAA addresses; [] if none exist; DnsFailure if none and a lookup failed."""
        found: list[str] = []
        failure: DnsFailure | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._lookup(name, rdtype)
            except DnsFailure as exc:
                failure = failure or exc
                continue
            found.extend(answer.addresses)
        if not found and failure is not None:
            raise failure
        return _unique(found)

    # ---- cached, de-duplicated queries ------------------------------------------------

    async def _lookup(self, name: str, rdtype: str) -> _Answer:
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > time.monotonic():
                return cached[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._query_done(key, t))
        # shield: one caller being cancelled must not cancel the query others wait on
        return await asyncio.shield(task)

    def _query_done(self, key: tuple[str, str], task: asyncio.Task[_Answer]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: all waiters may have gone (cancelled)

    async def _query(self, name: str, rdtype: str) -> _Answer:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            return self._store(name, rdtype, _Answer("nxdomain"), _nx_ttl(exc, name))
        except dns.resolver.NoAnswer as exc:
            return self._store(name, rdtype, _Answer("nodata"), negative_ttl(exc.response()))
        except dns.resolver.LifetimeTimeout:
            raise _temporary(name, rdtype, "timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise _temporary(name, rdtype, _short(exc)) from None
        except dns.exception.DNSException as exc:
            raise _temporary(name, rdtype, _short(exc)) from None
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else NEGATIVE_TTL_DEFAULT
        return self._store(name, rdtype, _to_answer(answer), ttl)

    def _store(self, name: str, rdtype: str, answer: _Answer, ttl: float) -> _Answer:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._evict()
        expires = time.monotonic() + min(ttl, MAX_TTL)
        self._cache[(name, rdtype)] = (expires, answer)
        return answer

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, (exp, _) in self._cache.items() if exp <= now]:
            del self._cache[key]
        if len(self._cache) >= MAX_CACHE_ENTRIES:  # still full: drop the oldest half
            for key in list(self._cache)[: MAX_CACHE_ENTRIES // 2]:
                del self._cache[key]


def _nx_ttl(exc: dns.resolver.NXDOMAIN, name: str) -> float:
    try:
        return negative_ttl(exc.response(dns.name.from_text(name)))
    except (KeyError, IndexError):
        return NEGATIVE_TTL_DEFAULT


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300]


def _to_answer(answer: dns.resolver.Answer) -> _Answer:
    mx = tuple(
        (rd.preference, rd.exchange.to_text().rstrip(".").lower())
        for rd in answer
        if isinstance(rd, dns.rdtypes.ANY.MX.MX)
    )
    addresses = tuple(rd.to_text() for rd in answer if rd.rdtype in _ADDRESS_TYPES)
    return _Answer("ok", addresses, mx)


def _mx_order(exchanges: list[tuple[int, str]]) -> list[str]:
    """Hosts by preference; equal preferences shuffled to spread load (RFC 5321 5.1)."""
    ordered: list[str] = []
    for _, group in groupby(sorted(exchanges), key=lambda e: e[0]):
        hosts = list(dict.fromkeys(host for _, host in group))
        random.shuffle(hosts)
        ordered.extend(hosts)
    return ordered


def _unique_hops(hops: list[NextHop]) -> list[NextHop]:
    seen: set[tuple[str, int]] = set()
    unique: list[NextHop] = []
    for hop in hops:
        if (hop.address, hop.port) not in seen:
            seen.add((hop.address, hop.port))
            unique.append(hop)
    return unique
