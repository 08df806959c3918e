"""`invoice-relay doctor [--domain D]`: is DNS set up so that receivers trust our mail?

For each sender domain of the policies (or D), asked of `[dns] nameservers`: SPF authorises
every `[delivery] source_addresses` address, each DKIM selector's TXT holds the public key of
the key on disk (same algorithm), a DMARC record exists; per source address, its PTR names its
EHLO hostname and that name's A/AAAA lead back to it (FCrDNS). MX and MTA-STS are shown for
information. One line per check, the fix under each failure; exit 1 if any check failed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from relay.config import (
    Config,
    DkimKey,
    SourceAddress,
    load_or_report,
    normalize_domain,
)
from relay.delivery import mtasts
from relay.delivery.nexthop import dns_resolver
from relay.delivery.spf import SpfChecker
from relay.exitcodes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE
from relay.ops.dkimcmd import txt_value, zone_line
from relay.policy.dkim import DkimKeyError, load_key

Status = Literal["PASS", "FAIL", "INFO"]


@dataclass(frozen=True, slots=True)
class Check:
    status: Status
    subject: str  # the domain or source address checked
    name: str     # what was checked: "spf 192.0.2.10", "dkim s2026", "dmarc", ...
    detail: str
    fix: str = ""


class DnsError(Exception):
    """A lookup that failed (timeout, SERVFAIL): the check cannot tell, so it fails."""


class Dns:
    """The few lookups doctor needs; NXDOMAIN and NODATA are empty answers."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def _resolve(self, name: str, rdtype: str) -> list[object]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DnsError(f"{name} {rdtype}: {str(exc).splitlines()[0][:200]}") from None
        return list(answer)

    async def txt(self, name: str) -> list[str]:
        """Each TXT record as one string (its character-strings joined, RFC 7208 3.3)."""
        rdatas = await self._resolve(name, "TXT")
        return [b"".join(rd.strings).decode("utf-8", "replace") for rd in rdatas]  # type: ignore[attr-defined]

    async def names(self, name: str, rdtype: str) -> list[str]:
        """Targets of PTR / MX records, lower case without the final dot."""
        rdatas: list = await self._resolve(name, rdtype)
        targets = [rd.target if rdtype == "PTR" else rd.exchange for rd in rdatas]
        return [str(t).rstrip(".").lower() for t in targets]

    async def addresses(self, name: str) -> list[str]:
        found = []
        for rdtype in ("A", "AAAA"):
            found.extend(str(ipaddress.ip_address(rd.to_text()))  # type: ignore[attr-defined]
                         for rd in await self._resolve(name, rdtype))
        return found


# ---- the checks ---------------------------------------------------------------------------

def _ip_mechanism(address: str) -> str:
    return f"ip6:{address}" if ":" in address else f"ip4:{address}"


async def check_spf(spf: SpfChecker, domain: str, source: SourceAddress) -> Check:
    address = str(source.address)
    found = await spf.check(address, f"postmaster@{domain}", source.hostname)
    name = f"spf {address}"
    detail = f"{found.result}: {found.explanation or f'no SPF record at {domain}'}"
    mechanism = _ip_mechanism(address)
    if found.result == "pass":
        return Check("PASS", domain, name, detail)
    if found.result == "none":
        fix = f'publish {domain}. IN TXT "v=spf1 {mechanism} -all"'
    elif found.result == "temperror":
        fix = "DNS did not answer; check the nameservers of the domain and run doctor again"
    elif found.result == "permerror":
        fix = f"repair the SPF record of {domain} (see the error above), and add {mechanism}"
    else:
        fix = f"add {mechanism} to the SPF record of {domain} (before its `all`)"
    return Check("FAIL", domain, name, detail, fix)


def _tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), "".join(value.split()))
    return tags


def _compare_dkim(published: dict[str, str], expected: dict[str, str]) -> str | None:
    """Why the published key record does not match the key on disk; None when it does."""
    if not published.get("p"):
        return "the record has an empty p= (the key is revoked)"
    algorithm = published.get("k", "rsa").lower()  # RFC 6376: k= defaults to rsa
    if algorithm != expected["k"]:
        return f"the record says k={algorithm}, the key on disk is {expected['k']}"
    try:
        same = base64.b64decode(published["p"], validate=True) == base64.b64decode(expected["p"])
    except (binascii.Error, ValueError):
        return "the record's p= is not valid base64"
    return None if same else "the record holds another public key than the key on disk"


async def check_dkim(resolver: Dns, domain: str, entry: DkimKey) -> Check:
    name = f"dkim {entry.selector}"
    owner = f"{entry.selector}._domainkey.{domain}"
    try:
        key = load_key(entry)
    except DkimKeyError as exc:
        return Check("FAIL", domain, name, "; ".join(exc.problems),
                     "make the key readable, or make a new one with `invoice-relay dkim keygen`")
    expected_value = txt_value(key.private)
    publish = f"publish {zone_line(entry.selector, domain, expected_value)}"
    records = [r for r in await resolver.txt(owner) if "p=" in r]
    if not records:
        return Check("FAIL", domain, name, f"no DKIM key record at {owner}", publish)
    why = _compare_dkim(_tags(records[0]), _tags(expected_value))
    if len(records) > 1:
        why = f"{len(records)} key records at {owner}; verifiers need exactly one"
    if why is not None:
        return Check("FAIL", domain, name, why, f"replace it: {publish}")
    return Check("PASS", domain, name, f"{owner} matches {entry.key} ({key.algorithm})")


async def check_dmarc(resolver: Dns, domain: str) -> Check:
    """`_dmarc.D`, else the parent domains' (the organisational domain's record applies;
    without the Public Suffix List we try each parent of two labels or more)."""
    labels = domain.split(".")
    for start in range(max(len(labels) - 1, 1)):
        owner = "_dmarc." + ".".join(labels[start:])
        records = [r for r in await resolver.txt(owner)
                   if r.replace(" ", "").lower().startswith("v=dmarc1")]
        if len(records) == 1:
            policy = _tags(records[0]).get("p", "")
            where = "" if start == 0 else f" (inherited from {owner})"
            if policy not in ("none", "quarantine", "reject"):
                return Check("FAIL", domain, "dmarc", f"{owner}: p={policy!r} is not a policy",
                             f"set p=none, p=quarantine or p=reject at {owner}")
            return Check("PASS", domain, "dmarc", f"p={policy}{where}")
        if records:
            return Check("FAIL", domain, "dmarc", f"{len(records)} DMARC records at {owner}",
                         "keep exactly one v=DMARC1 record")
    return Check("FAIL", domain, "dmarc", f"no DMARC record at _dmarc.{domain}",
                 f'publish _dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@{domain}"'
                 " (then move to p=quarantine or p=reject once reports look clean)")


async def check_ptr(resolver: Dns, source: SourceAddress) -> Check:
    address = str(source.address)
    hostname = source.hostname.rstrip(".").lower()
    name = "ptr/fcrdns"
    ptrs = await resolver.names(dns.reversename.from_address(address).to_text(), "PTR")
    if not ptrs:
        return Check("FAIL", address, name, "no PTR record",
                     f"ask the owner of {address} (your provider) to set its PTR to {hostname}")
    if hostname not in ptrs:
        return Check("FAIL", address, name, f"PTR is {', '.join(ptrs)}, EHLO name is {hostname}",
                     f"set the PTR of {address} to {hostname}, or make {ptrs[0]} the "
                     "source's `hostname` in [delivery] source_addresses")
    forward = await resolver.addresses(hostname)
    if address not in forward:
        shown = ", ".join(forward) or "no A/AAAA"
        kind = "AAAA" if ":" in address else "A"
        return Check("FAIL", address, name, f"PTR {hostname} resolves to {shown}",
                     f"publish {hostname}. IN {kind} {address}")
    return Check("PASS", address, name, f"PTR {hostname}, which resolves back to {address}")


async def info_mx(resolver: Dns, domain: str) -> Check:
    hosts = await resolver.names(domain, "MX")
    detail = ", ".join(hosts) if hosts else "none (bounces and replies go to its A/AAAA)"
    return Check("INFO", domain, "mx", detail)


async def info_mta_sts(resolver: Dns, domain: str) -> Check:
    policy_id = mtasts.parse_txt(await resolver.txt(f"_mta-sts.{domain}"))
    detail = f"id={policy_id}" if policy_id else "none"
    return Check("INFO", domain, "mta-sts", detail)


# ---- running them ---------------------------------------------------------------------------

async def _guarded(subject: str, name: str, check: object) -> Check:
    try:
        return await check  # type: ignore[misc,no-any-return]
    except DnsError as exc:
        return Check("FAIL", subject, name, f"DNS error: {exc}",
                     "check that [dns] nameservers answer, and run doctor again")


async def run_checks(config: Config, domains: Sequence[str]) -> list[Check]:
    resolver = Dns(dns_resolver(config.dns.nameservers))
    spf = SpfChecker.from_config(config)
    sources = config.delivery.source_addresses
    keys = _dkim_keys(config)
    pending = []
    for domain in domains:
        if sources:
            pending.extend(_guarded(domain, f"spf {s.address}", check_spf(spf, domain, s))
                           for s in sources)
        pending.extend(_guarded(domain, f"dkim {k.selector}", check_dkim(resolver, domain, k))
                       for k in keys.get(domain, ()))
        pending.append(_guarded(domain, "dmarc", check_dmarc(resolver, domain)))
        pending.append(_guarded(domain, "mx", info_mx(resolver, domain)))
        pending.append(_guarded(domain, "mta-sts", info_mta_sts(resolver, domain)))
    pending.extend(_guarded(str(s.address), "ptr/fcrdns", check_ptr(resolver, s))
                   for s in sources)
    checks = list(await asyncio.gather(*pending))
    if not sources:
        checks.append(Check("INFO", "source", "spf, ptr", "no [delivery] source_addresses: the "
                            "kernel chooses the address, so doctor cannot check SPF or PTR"))
    return checks


def _dkim_keys(config: Config) -> dict[str, tuple[DkimKey, ...]]:
    return {_signing_domain(s.domain): s.dkim for s in config.senders if s.dkim}


def _signing_domain(pattern: str) -> str:
    return pattern[2:] if pattern.startswith("*.") else pattern


def sender_domains(config: Config) -> list[str]:
    """The domains of the `[[sender]]` policies (`*.d` as d; the catch-all `*` left out)."""
    return list(dict.fromkeys(_signing_domain(s.domain) for s in config.senders
                              if s.domain != "*"))


def print_table(checks: Sequence[Check], out: TextIO) -> None:
    width = max((len(c.subject) for c in checks), default=0)
    name_width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        print(f"{c.status}  {c.subject:<{width}}  {c.name:<{name_width}}  {c.detail}", file=out)
        if c.fix:
            print(f"{'':4}  {'':<{width}}  {'fix:':<{name_width}}  {c.fix}", file=out)
    failed = sum(c.status == "FAIL" for c in checks)
    passed = sum(c.status == "PASS" for c in checks)
    print(f"{passed} passed, {failed} failed", file=out)


def doctor_command(cli_config: str | None, domain: str | None) -> int:
    config = load_or_report(cli_config)
    if config is None:
        return EXIT_PROBLEM
    known = sender_domains(config)
    if domain is not None:
        try:
            domain = normalize_domain(domain)
        except ValueError as exc:
            print(f"invoice-relay doctor: --domain: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if domain not in known:
            print(f"invoice-relay doctor: --domain {domain}: no [[sender]] policy for this "
                  f"domain (known: {', '.join(known) or 'none'})", file=sys.stderr)
            return EXIT_USAGE
    domains = [domain] if domain is not None else known
    if not domains and not config.delivery.source_addresses:
        print("invoice-relay doctor: nothing to check: no [[sender]] policy names a domain "
              "and [delivery] source_addresses is empty", file=sys.stderr)
        return EXIT_OK
    checks = asyncio.run(run_checks(config, domains))
    print_table(checks, sys.stdout)
    return EXIT_PROBLEM if any(c.status == "FAIL" for c in checks) else EXIT_OK
