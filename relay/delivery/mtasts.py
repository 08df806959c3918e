"""MTA-STS (RFC 8461): the TLS requirement of `tls = "mta-sts"` destinations.

The `_mta-sts.<domain>` TXT record (through `[dns] nameservers`) names the domain's current
policy id; the policy comes over verified HTTPS from `mta-sts.<domain>` (resolved through the
same nameservers). The last good policy is kept in memory and on disk, under
`<queue.path>/mta-sts/`, until its max_age runs out, whatever happens to the TXT record or the
policy host meanwhile: an attacker who blocks them must not downgrade delivery to clear text
(RFC 8461 section 5), and neither must a restart.

Lookups never sit on a message's path once a policy is known: a fresh answer is a dict lookup,
a due TXT check runs in the background while the cached policy answers, and concurrent callers
for one domain share one lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from relay import log
from relay.addresses import HostPort
from relay.delivery.nexthop import DnsFailure, ascii_domain, dns_resolver
from relay.delivery.tls import verifying_context
from relay.delivery.tlspolicy import OPPORTUNISTIC, TlsMode, TlsRequirement
from relay.queue.segments import write_atomically

if TYPE_CHECKING:
    from relay.config import Config

CACHE_FOLDER = "mta-sts"  # under [queue] path
POLICY_PATH = "/.well-known/mta-sts.txt"
TXT_RECHECK = 300.0  # seconds between TXT checks of one domain
FAILURE_RECHECK = 60.0  # after a failed TXT lookup or policy fetch
REFRESH_AFTER = 86400.0  # refetch an unchanged policy once a day (or at half its max_age)
MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: about a year
FETCH_TIMEOUT = 30.0  # the whole HTTPS fetch; RFC 8461 section 3.3 suggests a minute at most
CONNECT_TIMEOUT = 10.0
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class PolicyError(ValueError):
    """A policy text (or its HTTP response) that is not a valid MTA-STS policy."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    id: str  # the TXT record's id this policy was fetched for
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # lower-case patterns: "mx.example.net" or "*.example.net"
    max_age: int  # seconds
    fetched: float  # wall-clock time of the fetch (it outlives a restart)

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def requirement(self) -> TlsRequirement:
        if self.mode == "enforce":
            return TlsRequirement(TlsMode.VERIFY, mx_patterns=self.mx, origin="mta-sts")
        if self.mode == "testing":
            return TlsRequirement(TlsMode.OPPORTUNISTIC, mx_patterns=self.mx,
                                  report_only=True, origin="mta-sts")
        return OPPORTUNISTIC


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id of the one `v=STSv1;` record among a name's TXT records, or None.

    RFC 8461 section 3.1: records not starting with `v=STSv1;` are ignored; zero, several, or
    a malformed one mean the domain has no available policy."""
    sts = [r for r in records if r.startswith("v=STSv1;")]
    if len(sts) != 1:
        return None
    fields = {}
    for part in sts[0].split(";")[1:]:
        if not part.strip():
            continue
        key, eq, value = part.strip().partition("=")
        if not eq:
            return None
        fields.setdefault(key, value)
    policy_id = fields.get("id")
    return policy_id if policy_id is not None and _ID.fullmatch(policy_id) else None


def parse_policy(text: str, policy_id: str, fetched: float) -> StsPolicy:
    """An StsPolicy from the policy file text (RFC 8461 section 3.2); PolicyError if invalid.

    Unknown keys are ignored (extensions); a repeated key other than `mx` keeps its first value."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line without a colon: {line[:60]!r}")
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r}, not one of {', '.join(MODES)}")
    max_age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age) or int(max_age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age!r}, not a number of seconds up to {MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without any mx line")
    return StsPolicy(policy_id, mode, tuple(dict.fromkeys(mx)), int(max_age), fetched)


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    if not _MX_PATTERN.fullmatch(pattern):
        raise PolicyError(f"mx {value[:80]!r} is not a host name or *.domain")
    return pattern


@dataclass(slots=True)
class _Domain:
    """What is known about one recipient domain."""

    policy: StsPolicy | None = None
    requirement: TlsRequirement = OPPORTUNISTIC  # the policy's, precomputed
    expires: float = 0.0  # when the policy stops applying (wall clock)
    next_check: float = 0.0  # when the TXT record is due to be checked again (wall clock)

    def set_policy(self, policy: StsPolicy | None) -> None:
        self.policy = policy
        self.requirement = policy.requirement() if policy else OPPORTUNISTIC
        self.expires = policy.expires if policy else 0.0

    def current(self, now: float) -> TlsRequirement:
        return self.requirement if now < self.expires else OPPORTUNISTIC

    def valid_policy(self, now: float) -> StsPolicy | None:
        return self.policy if now < self.expires else None


class _LookupFailed(Exception):
    """A temporary failure: DNS did not answer, or the policy fetch failed."""


class MtaStsResolver:
    """An StsSource (relay/delivery/tlspolicy.py). Build it with `from_config`; `close()` it."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        nameservers: Sequence[HostPort] = (),
        ca_file: Path | None = None,
        port: int = 443,
        fetch_timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache_dir = cache_dir
        self._dns = dns_resolver(nameservers)
        self._ssl = verifying_context(ca_file, with_system_cas=True)
        self._port = port
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout,
                                              sock_connect=min(CONNECT_TIMEOUT, fetch_timeout))
        self._clock = clock
        self._domains: dict[str, _Domain] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._loaded: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.inputs: tuple[object, ...] = ()  # what from_config built it from (reuse at reload)

    @classmethod
    def from_config(cls, config: Config) -> MtaStsResolver:
        resolver = cls(config.queue.path / CACHE_FOLDER, nameservers=config.dns.nameservers,
                       ca_file=config.delivery.tls_ca_file)
        resolver.inputs = _inputs(config)
        return resolver

    @classmethod
    def for_config(cls, config: Config, current: MtaStsResolver | None
                   ) -> MtaStsResolver | None:
        """The resolver a (re)loaded config needs: None when no destination uses
        `tls = "mta-sts"`, `current` (with its cache) when it asks the same servers and trusts
        the same CAs, else a new one. The caller closes a `current` it no longer uses."""
        if not any(d.tls == "mta-sts" for d in config.destinations):
            return None
        if current is not None and current.inputs == _inputs(config):
            return current
        return cls.from_config(config)

    # ---- the StsSource API ------------------------------------------------------------

    async def requirement(self, domain: str) -> TlsRequirement:
        """The domain's requirement now; never raises (no policy: OPPORTUNISTIC)."""
        # The common case, a known ASCII domain checked recently, is a dict lookup: the keys
        # are ascii_domain() results, so a hit on the plain lower-case form is one of them.
        state = self._domains.get(domain.lower().rstrip("."))
        now = self._clock()
        if state is not None and now < state.next_check:
            return state.current(now)
        try:
            name = ascii_domain(domain)
        except DnsFailure:
            return OPPORTUNISTIC
        state = self._domains.get(name)
        try:
            if self._loaded is None or not self._loaded.done():
                await self._load_cache()
                state = self._domains.get(name)
            if state is not None and state.valid_policy(now) is not None:
                # A policy applies meanwhile: check for a new one without making anyone wait.
                self._refresh_task(name)
                return state.current(now)
            # wait() neither cancels the shared lookup if this caller is cancelled, nor raises
            # what it raised (_refresh_done logs that)
            await asyncio.wait([self._refresh_task(name)])
        except Exception as exc:  # a bug must not stop delivery; the cached policy still holds
            log.event("mta_sts_failed", level=40, domain=name, reason=f"internal: {exc!r}")
        state = self._domains.get(name)
        return state.current(self._clock()) if state is not None else OPPORTUNISTIC

    async def idle(self) -> None:
        """Wait until no lookup or fetch is running (tests, and before close)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def close(self) -> None:
        if self._loaded is not None:
            self._loaded.cancel()
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- refresh: TXT check, then fetch when the id changed ---------------------------

    def _refresh_task(self, name: str) -> asyncio.Task[None]:
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.create_task(self._refresh(name), name=f"mta-sts {name}")
            self._inflight[name] = task
            task.add_done_callback(lambda t: self._refresh_done(name, t))
        return task

    def _refresh_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.event("mta_sts_failed", level=40, domain=name,
                      reason=f"internal: {task.exception()!r}")

    async def _refresh(self, name: str) -> None:
        state = self._domains.setdefault(name, _Domain())
        now = self._clock()
        cached = state.valid_policy(now)
        try:
            policy_id = await self._txt_id(name)
        except _LookupFailed as exc:
            self._failed(name, state, now, f"TXT lookup: {exc}")
            return
        if policy_id is None:
            # No STS record: a cached policy still applies until it expires (RFC 8461 5.1);
            # a domain that withdraws MTA-STS publishes `mode: none` under a new id first.
            state.set_policy(cached)
            state.next_check = now + TXT_RECHECK
            return
        if cached is not None and cached.id == policy_id and not _due_refresh(cached, now):
            state.next_check = now + TXT_RECHECK
            return
        try:
            policy = parse_policy(await self._fetch(name), policy_id, now)
        except (_LookupFailed, PolicyError) as exc:
            self._failed(name, state, now, f"policy fetch: {exc}")
            return
        state.set_policy(policy)
        state.next_check = now + TXT_RECHECK
        log.event("mta_sts_policy", domain=name, id=policy.id, mode=policy.mode,
                  max_age=policy.max_age, mx=",".join(policy.mx),
                  previous=cached.id if cached is not None else None)
        await self._save(name, policy)

    def _failed(self, name: str, state: _Domain, now: float, reason: str) -> None:
        cached = state.valid_policy(now)
        state.next_check = now + FAILURE_RECHECK
        log.event("mta_sts_failed", level=30, domain=name, reason=reason,
                  kept=cached.id if cached is not None else None)

    async def _txt_id(self, name: str) -> str | None:
        try:
            answer = await self._dns.resolve(f"_mta-sts.{name}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise _LookupFailed(_first_line(exc)) from None
        records = [b"".join(rd.strings).decode("ascii", "replace") for rd in answer]
        return parse_txt(records)

    # ---- the HTTPS fetch --------------------------------------------------------------

    async def _fetch(self, name: str) -> str:
        """The policy text from https://mta-sts.<name>/.well-known/mta-sts.txt.

        No redirects, no HTTP caching (we keep no HTTP cache), text/plain only, at most 64 KiB."""
        host = f"mta-sts.{name}"
        port = "" if self._port == 443 else f":{self._port}"
        try:
            async with self._client().get(f"https://{host}{port}{POLICY_PATH}",
                                          allow_redirects=False) as response:
                return await _policy_text(response)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _LookupFailed(f"certificate of {host} not trusted: "
                                f"{_first_line(exc.certificate_error)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _LookupFailed(f"{host}: {type(exc).__name__}: {_first_line(exc)}") from None
        except TimeoutError:
            raise _LookupFailed(f"{host}: timed out") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_PolicyHostResolver(self._dns),
                                             ssl=self._ssl, use_dns_cache=False, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": "invoice-relay"})
        return self._session

    # ---- the disk cache ---------------------------------------------------------------

    async def _load_cache(self) -> None:
        """Read every cached policy once, on first use (shared by concurrent callers)."""
        if self._loaded is None:
            self._loaded = asyncio.create_task(self._read_cache())
        await asyncio.shield(self._loaded)

    async def _read_cache(self) -> None:
        policies, problems = await asyncio.to_thread(_read_cache_dir, self._cache_dir)
        for problem in problems:
            log.event("mta_sts_failed", level=30, reason=f"cache: {problem}")
        now = self._clock()
        for name, policy in policies.items():
            if name not in self._domains and policy.expires > now:
                self._domains.setdefault(name, _Domain()).set_policy(policy)

    async def _save(self, name: str, policy: StsPolicy) -> None:
        data = json.dumps({"domain": name, "id": policy.id, "mode": policy.mode,
                           "mx": list(policy.mx), "max_age": policy.max_age,
                           "fetched": policy.fetched}).encode()
        try:
            await asyncio.to_thread(write_atomically, self._cache_dir / f"{name}.json", data)
        except OSError as exc:  # the policy still applies from memory
            log.event("mta_sts_failed", level=30, domain=name,
                      reason=f"cache write: {exc.strerror or exc}")


class _PolicyHostResolver(AbstractResolver):
    """aiohttp's name lookups through our dnspython resolver ([dns] nameservers)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        problem = "no A/AAAA record"
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                answer = await self._resolver.resolve(host, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                problem = _first_line(exc)
                continue
            results.extend(
                ResolveResult(hostname=host, host=rd.address, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST) for rd in answer)
        if not results:
            raise OSError(f"cannot resolve {host}: {problem}")
        return results

    async def close(self) -> None:
        return None


def _inputs(config: Config) -> tuple[object, ...]:
    return config.queue.path, config.dns.nameservers, config.delivery.tls_ca_file


async def _policy_text(response: aiohttp.ClientResponse) -> str:
    if 300 <= response.status < 400:
        raise PolicyError(f"HTTP {response.status} redirect to "
                          f"{response.headers.get('Location', '?')[:120]!r} (not followed)")
    if response.status != 200:
        raise PolicyError(f"HTTP {response.status}")
    if response.content_type != "text/plain":
        raise PolicyError(f"content type {response.content_type!r}, not text/plain")
    if (response.content_length or 0) > MAX_POLICY_BYTES:
        raise PolicyError(f"{response.content_length} bytes, over {MAX_POLICY_BYTES}")
    body = b""
    while len(body) <= MAX_POLICY_BYTES:
        chunk = await response.content.read(MAX_POLICY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"over {MAX_POLICY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text") from None


def _due_refresh(policy: StsPolicy, now: float) -> bool:
    """An unchanged policy is fetched again now and then, so that its max_age restarts before
    it runs out while the domain still publishes it."""
    return now - policy.fetched >= min(REFRESH_AFTER, policy.max_age / 2)


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _read_cache_dir(folder: Path) -> tuple[dict[str, StsPolicy], list[str]]:
    policies: dict[str, StsPolicy] = {}
    problems: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(folder.glob("*.json")):
            try:
                name, policy = _cached_policy(json.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError, DnsFailure) as exc:
                problems.append(f"{path}: ignored: {_first_line(exc)}")
                continue
            policies[name] = policy
    return policies, problems


def _cached_policy(data: Any) -> tuple[str, StsPolicy]:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    name = ascii_domain(str(data["domain"])) if isinstance(data["domain"], str) else ""
    mx = data["mx"]
    if not name or not isinstance(mx, list) or data["mode"] not in MODES:
        raise ValueError("unexpected content")
    policy = StsPolicy(str(data["id"]), data["mode"], tuple(_mx_pattern(str(m)) for m in mx),
                       int(data["max_age"]), float(data["fetched"]))
    return name, policy
