"""SPF (RFC 7208) evaluation of our own source addresses, for SPF-aware egress and `doctor`.

pyspf evaluates `check_host`; it is blocking, so each evaluation runs in a worker thread, with
its DNS asked of `[dns] nameservers` through dnspython (not pyspf's process-wide default
resolver). The result is cached per (source address, domain) for the smallest TTL of every
answer the evaluation used (negative answers: their SOA's negative TTL), and concurrent callers
of one key share one evaluation: a message never waits on DNS that was answered within its TTL.

pyspf asks its module-global `spf.DNSLookup` for every record. We replace it once with a
dispatcher that sends a worker thread's lookups to the resolver of the evaluation running on
that thread (a thread-local), and anything else to pyspf's own lookup, so nothing outside this
module changes behaviour.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf  # pyspf

from relay.addresses import HostPort
from relay.config import Config
from relay.delivery.nexthop import negative_ttl

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
MAX_TTL = 86400.0            # never trust an evaluation longer than a day
TEMPERROR_TTL = 10.0         # DNS trouble: ask again soon, but not once per message
MAX_CACHE_ENTRIES = 20_000
LOOKUP_TIMEOUT = 5.0         # per DNS query
QUERY_TIME = 10.0            # the whole evaluation (RFC 7208 4.6.4 suggests at least 20 s)


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str       # one of RESULTS
    explanation: str  # pyspf's text: the mechanism that matched, or what went wrong


# ---- pyspf's DNS, per thread ------------------------------------------------------------

_local = threading.local()
_pyspf_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float | None = None
              ) -> list[tuple[tuple[str, str], Any]]:
    lookup: _Lookup | None = getattr(_local, "lookup", None)
    if lookup is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype, timeout)


spf.DNSLookup = _dispatch


def sync_resolver(nameservers: Sequence[HostPort] = (), timeout: float = LOOKUP_TIMEOUT
                  ) -> dns.resolver.Resolver:
    """A blocking dnspython resolver asking `[dns] nameservers` (system's when empty), the
    thread-side twin of relay.delivery.nexthop.dns_resolver."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port)
                                for ns in nameservers]
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout * 2
    return resolver


class _Lookup:
    """pyspf's DNSLookup for one evaluation: answers in pyspf's shape, TTLs remembered."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self._resolver = resolver
        self.ttl = MAX_TTL

    def __call__(self, name: str, qtype: str, timeout: float | None
                 ) -> list[tuple[tuple[str, str], Any]]:
        try:
            answer = self._resolver.resolve(name, qtype, search=False,
                                            lifetime=timeout or LOOKUP_TIMEOUT)
        except dns.resolver.NXDOMAIN as exc:
            self._seen(negative_ttl(_nx_response(exc, name)))
            return []
        except dns.resolver.NoAnswer as exc:
            self._seen(negative_ttl(exc.response()))
            return []
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL, no nameserver
            raise spf.TempError(f"DNS {str(exc).splitlines()[0][:200]}") from None
        self._seen(float(answer.chaining_result.minimum_ttl))
        return [((name, qtype), _value(qtype, rd)) for rd in answer]

    def _seen(self, ttl: float) -> None:
        self.ttl = min(self.ttl, ttl)


def _value(qtype: str, rd: Any) -> Any:
    """The value pyspf's own dnspython lookup gives for one record."""
    if qtype in ("A", "AAAA"):
        return rd.address
    if qtype == "MX":
        return (rd.preference, rd.exchange)
    if qtype == "PTR":
        return rd.target.to_text(True)
    return rd.strings  # TXT / SPF: a tuple of bytes, one per character-string


def _nx_response(exc: dns.resolver.NXDOMAIN, name: str) -> dns.message.Message | None:
    try:
        return exc.response(dns.name.from_text(name))
    except (KeyError, IndexError, dns.exception.DNSException):
        return None


def evaluate(resolver: dns.resolver.Resolver, ip: str, sender: str, helo: str
             ) -> tuple[SpfResult, float]:
    """Blocking: pyspf's `check_host` for (ip, sender, helo), and how long it holds (s).

    A null sender (`""`) is checked against the HELO identity (`postmaster@helo`)."""
    lookup = _Lookup(resolver)
    _local.lookup = lookup
    try:
        result, _code, explanation = spf.query(
            i=ip, s=sender, h=helo, timeout=LOOKUP_TIMEOUT, querytime=QUERY_TIME).check()
    except Exception as exc:  # a bad address or name pyspf did not expect
        result, explanation = "permerror", f"{type(exc).__name__}: {exc}"
    finally:
        _local.lookup = None
    if result not in RESULTS:  # pyspf spells nothing else with check2-style results
        result = "permerror"
    ttl = TEMPERROR_TTL if result == "temperror" else lookup.ttl
    return SpfResult(result, str(explanation)), max(0.0, min(ttl, MAX_TTL))


def identity_domain(sender: str, helo: str) -> str:
    """The domain SPF checks: the envelope sender's, or the HELO name's for the null sender."""
    _, at, domain = sender.rpartition("@")
    return (domain if at and domain else helo).strip().rstrip(".").lower()


# ---- the cached, shared checker ---------------------------------------------------------

class SpfChecker:
    """`await checker.check(ip, sender, helo)`: cached per (ip, domain) for the records' TTL."""

    def __init__(self, nameservers: Sequence[HostPort] = (), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resolver = sync_resolver(nameservers)
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, SpfResult]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[SpfResult]] = {}

    @classmethod
    def from_config(cls, config: Config) -> SpfChecker:
        return cls(config.dns.nameservers)

    @classmethod
    def for_egress(cls, config: Config) -> SpfChecker | None:
        """The checker SPF-aware egress consults; None when it has nothing to do (`[delivery]
        spf = "off"`, or no source pool: the kernel picks the address)."""
        delivery = config.delivery
        if delivery.spf != "enforce" or not delivery.source_addresses:
            return None
        return cls.from_config(config)

    def cached(self, ip: str, sender: str, helo: str) -> SpfResult | None:
        """The result if it is known and fresh (no DNS, no await): for hot paths."""
        key = (ip, identity_domain(sender, helo))
        entry = self._cache.get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        key = (ip, identity_domain(sender, helo))
        entry = self._cache.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                return entry[1]
            del self._cache[key]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._evaluate(key, ip, sender, helo))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._done(key, f))
        # shield: one caller cancelled must not cancel the evaluation others wait on
        return await asyncio.shield(future)

    async def _evaluate(self, key: tuple[str, str], ip: str, sender: str, helo: str
                        ) -> SpfResult:
        result, ttl = await asyncio.to_thread(evaluate, self._resolver, ip, sender, helo)
        if ttl > 0:
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._evict()
            self._cache[key] = (self._clock() + ttl, result)
        return result

    def _done(self, key: tuple[str, str], future: asyncio.Future[SpfResult]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # mark retrieved: every waiter may have gone

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]
        if len(self._cache) >= MAX_CACHE_ENTRIES:  # still full: drop the oldest half
            for key in list(self._cache)[: MAX_CACHE_ENTRIES // 2]:
                del self._cache[key]
