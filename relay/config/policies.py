"""The policy files, policies/*.toml: [[destination]], [[sender]] (DKIM keys, webhook,
charset, clients) and [[recipient]] tables, checked across files for duplicates, and
`DomainIndex`, the most-specific-match lookup they are found by.

Paths in policy files are relative to the main config's folder (see relay/config/__init__.py).
"""

from __future__ import annotations

import ipaddress
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic

from relay.addresses import HostPort, in_networks
from relay.config.report import _read_toml, _Report, _Table, read_bytes
from relay.config.values import (
    SMTP_PORT,
    IPAddress,
    IPNetwork,
    Rate,
    T,
    _choice,
    _hostport,
    _ip,
    _path_in,
    _positive_duration,
    _positive_int,
    _q,
    _recipient_match,
    _regex,
    _required_path,
    _string,
    _url,
    normalize_domain,
    parse_charset,
    parse_domain_pattern,
    parse_rate,
)
from relay.config_status import Unenforced, find_unenforced

TLS_MODES = ("opportunistic", "required", "verify", "mta-sts")
ENCRYPTION_MODES = ("required", "preferred")
PRIORITIES = ("high", "normal", "bulk")
ON_REPLY_ACTIONS = ("suspend",)
DKIM_MIN_RSA_BITS = 1024  # RFC 8301: verifiers reject smaller keys


@dataclass(frozen=True)
class OnReply:
    """Reply-driven back-off: `match` is searched (case-insensitively) in the reply text."""

    match: re.Pattern[str]
    action: str
    duration: float


@dataclass(frozen=True)
class DestinationPolicy:
    domain: str
    routes: tuple[HostPort, ...] = ()  # empty: MX lookup
    rate: Rate | None = None  # None: unlimited
    burst: int | None = None  # token-bucket depth; one period's worth when rate is set
    max_connections: int = 20
    max_messages_per_connection: int = 100
    tls: str = "opportunistic"
    source_addresses: tuple[IPAddress, ...] = ()  # empty: any of [delivery] source_addresses
    on_reply: tuple[OnReply, ...] = ()


@dataclass(frozen=True)
class DkimKey:
    """A selector and the path of its private key. The key itself is never kept here: the
    signer loads it. `algorithm` ("rsa" | "ed25519") is read from the file at load time."""

    selector: str
    key: Path
    algorithm: str | None = None  # None: built by hand, not read from a file
    # `FILE: KEY` of this entry (e.g. `policies/a.toml: sender[1].dkim[0].key`), for the
    # signer's problem lines when the key fails to load at start.
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Webhook:
    """Where a sender's delivery events go. The secret itself is never kept here: the
    runtime reads it (relay/delivery/webhooks.py), so that it is never in a Config's repr."""

    url: str
    secret_file: Path
    # `FILE: KEY` of secret_file, for the runtime's problem line when the file went away.
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class SenderClients:
    """`[[sender]] clients`: the AUTH users and client networks that may send as a domain."""

    users: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows(self, user: str | None, address: str | IPAddress) -> bool:
        """True for a listed AUTH user, or a client inside a listed network (an IPv4-mapped
        IPv6 address counts as IPv4)."""
        if user is not None and user in self.users:
            return True
        return in_networks(str(address), self.networks)


@dataclass(frozen=True)
class SenderPolicy:
    domain: str
    dkim: tuple[DkimKey, ...] = ()
    priority: str = "normal"
    webhook: Webhook | None = None
    charset: str | None = None  # Python codec name for undeclared 8-bit text, when unsure
    clients: SenderClients | None = None  # None: any client may send as this domain


@dataclass(frozen=True)
class RecipientPolicy:
    match: str
    smime_certificate: Path | None = None
    encryption: str = "preferred"


class DomainIndex(Generic[T]):
    """Most-specific-match lookup: `example.net`, then the longest `*.suffix`, then `*`."""

    def __init__(self, items: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, T] = {}
        self._suffix: dict[str, T] = {}
        self._any: T | None = None
        for pattern, value in items:
            if pattern == "*":
                self._any = value
            elif pattern.startswith("*."):
                self._suffix[pattern[2:]] = value
            else:
                self._exact[pattern] = value

    def lookup(self, domain: str) -> T | None:
        domain = domain.lower().rstrip(".")
        found = self._exact.get(domain)
        if found is not None:
            return found
        # Walk up one label at a time: the first suffix hit is the longest pattern.
        # Starting after the first label keeps `*.example.net` off `example.net` itself.
        dot = domain.find(".")
        while dot >= 0:
            domain = domain[dot + 1 :]
            found = self._suffix.get(domain)
            if found is not None:
                return found
            dot = domain.find(".")
        return self._any


@dataclass
class _PolicyContext:
    """What policy parsing needs from the main config, and duplicates seen so far."""

    base: Path
    source_addresses: frozenset[IPAddress]
    check_files: bool
    seen: dict[tuple[str, str], str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    users: frozenset[str] | None = None  # users_file names, for check-config; None: no file

    def claim(self, t: _Table, kind: str, name: str, value: str | None) -> bool:
        """Record `value` for `kind`; report and return False when it is taken."""
        if value is None:
            return False
        earlier = self.seen.get((kind, value))
        if earlier is not None:
            t.report.add(t.key(name), f"{_q(value)} is already defined at {earlier}")
            return False
        self.seen[(kind, value)] = f"{t.report.file}: {t.path}"
        return True


def _on_reply(t: _Table) -> OnReply | None:
    match = t.required("match", _regex)
    action = t.required("action", _choice(ON_REPLY_ACTIONS))
    duration = t.value("duration", _positive_duration, None)
    t.finish()
    if action == "suspend" and duration is None and "duration" not in t.data:
        t.report.add(t.key("duration"), "missing (required for suspend)")
    if match is None or action is None or duration is None:
        return None
    return OnReply(match, action, duration)


def _destination(t: _Table, ctx: _PolicyContext) -> DestinationPolicy | None:
    domain = t.required("domain", parse_domain_pattern)
    rate = t.value("rate", parse_rate, None)
    burst = t.value("burst", _positive_int, None)
    if burst is not None and rate is None:
        t.report.add(t.key("burst"), "needs rate")
    example = '{ match = "TSS04", action = "suspend", duration = "2h" }'
    on_reply = [_on_reply(r) for r in t.tables("on_reply", example)]
    policy = DestinationPolicy(
        domain=domain or "",
        routes=t.items("routes", _hostport(SMTP_PORT)),
        rate=rate,
        burst=burst if burst is not None or rate is None else rate.count,
        max_connections=t.value("max_connections", _positive_int, 20),
        max_messages_per_connection=t.value("max_messages_per_connection", _positive_int, 100),
        tls=t.value("tls", _choice(TLS_MODES), "opportunistic"),
        source_addresses=t.items("source_addresses", _ip),
        on_reply=tuple(r for r in on_reply if r is not None),
    )
    t.finish()
    if policy.tls == "mta-sts" and policy.routes:
        # RFC 8461 checks the MX hosts a domain publishes; static routes bypass MX entirely.
        t.report.add(t.key("tls"), '"mta-sts" applies to MX hosts and cannot be used with '
                     'routes (use "verify" to check the routes\' own names)')
    for index, address in enumerate(policy.source_addresses):
        if address not in ctx.source_addresses:
            t.report.add(f"{t.key('source_addresses')}[{index}]",
                         f"{address} is not one of [delivery] source_addresses")
    return policy if ctx.claim(t, "destination", "domain", domain) else None


def dkim_key_algorithm(path: Path) -> str:
    """"rsa" or "ed25519" for a PEM private key file; ValueError saying what is wrong.

    The key is parsed to prove the signer can use it, then dropped: no key material stays in
    the config, and none goes into a message (only the path)."""
    data = read_bytes(path)
    # Imported here: only a config with DKIM keys pays for it (queue commands stay quick).
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if b"-----BEGIN" not in data:
        raise ValueError(f"{path}: not a PEM file (make one with `invoice-relay dkim keygen`)")
    if b"PRIVATE KEY-----" not in data:
        raise ValueError(f"{path}: not a private key (a public key or certificate?)")
    try:
        # OpenSSL's RSA key check costs ~55 ms a key here; the probe signature below proves
        # the same thing that matters (signatures will verify) in about 2 ms.
        key = load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise ValueError(f"{path}: the key is encrypted with a passphrase; the relay needs it "
                         "unencrypted, readable only by its own user") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a valid PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < DKIM_MIN_RSA_BITS:
            raise ValueError(f"{path}: an RSA key of {key.key_size} bits; DKIM verifiers reject "
                             f"keys under {DKIM_MIN_RSA_BITS} bits (use 2048)")
        _probe_rsa(key, path)
        return "rsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"{path}: not an RSA or Ed25519 key; DKIM signs with those two only")


def _probe_rsa(key: Any, path: Path) -> None:
    """Sign and verify a probe: a damaged key (parts that do not belong together) fails here
    instead of producing signatures that never verify."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    probe = b"invoice-relay dkim key probe"
    try:
        signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise ValueError(f"{path}: the RSA key is damaged: its signatures do not verify") from None


def _dkim_key(t: _Table, ctx: _PolicyContext) -> DkimKey | None:
    selector = t.required("selector", normalize_domain)
    key = t.required("key", _required_path(ctx.base))
    t.finish()
    if key is None:
        return None
    # Checked on every load, serve included: signing is real, a bad key must stop the start.
    try:
        algorithm = dkim_key_algorithm(key)
    except ValueError as exc:
        t.report.add(t.key("key"), str(exc))
        return None
    if key.stat().st_mode & stat.S_IROTH:
        t.report.warn(t.key("key"), f"{key} is readable by every user: chmod 0600, or 0640 "
                                    "with the service's group")
    where = f"{t.report.file}: {t.key('key')}"
    return DkimKey(selector, key, algorithm, where) if selector is not None else None


def _dkim_keys(t: _Table, ctx: _PolicyContext, domain: str | None) -> tuple[DkimKey, ...]:
    example = '{ selector = "s2026", key = "keys/s2026.pem" }'
    tables = t.tables("dkim", example)
    if tables and domain == "*":
        t.report.add(t.key("dkim"), 'not allowed under domain = "*": a signature needs a '
                                    "domain of its own (d=)")
        return ()
    keys: list[DkimKey] = []
    seen: dict[str, str] = {}
    for table in tables:
        key = _dkim_key(table, ctx)
        if key is None:
            continue
        if key.selector in seen:
            table.report.add(table.key("selector"),
                             f"{_q(key.selector)} is already used at {seen[key.selector]}")
            continue
        seen[key.selector] = table.path
        keys.append(key)
    return tuple(keys)


def _webhook(t: _Table, ctx: _PolicyContext) -> Webhook | None:
    url = t.required("url", _url)
    secret_file = t.required("secret_file", _required_path(ctx.base))
    t.finish()
    if secret_file is None:
        return None
    # Checked on every load, serve included: events are real, unsigned ones must never go out.
    problem = secret_file_problem(secret_file)
    if problem is not None:
        t.report.add(t.key("secret_file"), problem)
        return None
    where = f"{t.report.file}: {t.key('secret_file')}"
    return Webhook(url, secret_file, where) if url is not None else None


def secret_file_problem(path: Path) -> str | None:
    """What is wrong with a webhook secret file (missing, unreadable, empty), or None."""
    try:
        secret = read_bytes(path)
    except ValueError as exc:
        return str(exc)
    return f"file is empty: {path}" if not secret.strip() else None


def _sender(t: _Table, ctx: _PolicyContext) -> SenderPolicy | None:
    domain = t.required("domain", parse_domain_pattern)
    keys = _dkim_keys(t, ctx, domain)
    webhook = None
    if "webhook" in t.data:
        webhook = _webhook(t.table("webhook"), ctx)
    policy = SenderPolicy(
        domain=domain or "",
        dkim=keys,
        priority=t.value("priority", _choice(PRIORITIES), "normal"),
        webhook=webhook,
        charset=t.value("charset", parse_charset, None),
        clients=_sender_clients(t, ctx),
    )
    t.finish()
    if "dkim" in t.data and policy.clients is None:
        ctx.warnings.append(f"{t.report.file}: {t.path}: dkim without clients: any client may "
                            "send (and get signed) as this domain")
    return policy if ctx.claim(t, "sender", "domain", domain) else None


def _client_entry(value: object) -> str | IPNetwork:
    """One `clients` entry: `user:NAME` (the AUTH user name) or a network."""
    text = _string(value).strip()
    if text.startswith("user:"):
        name = text[len("user:"):].strip()
        if not name or ":" in name or any(ch.isspace() for ch in name):
            raise ValueError(f"{_q(text)}: write user:NAME with the name from users_file")
        return name
    try:
        # strict=False: "10.1.2.3/24" means the /24 it lies in, as for trusted_networks.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{_q(text)} is neither user:NAME nor a network such as "
                         "10.1.2.0/24 or ::1/128") from None


def _sender_clients(t: _Table, ctx: _PolicyContext) -> SenderClients | None:
    entries = t.items("clients", _client_entry)
    if "clients" not in t.data:
        return None
    if t.data["clients"] == []:
        t.report.add(t.key("clients"), "empty: list user:NAME entries or networks, or leave "
                                       "the key out to let any client send as this domain")
    if ctx.check_files:
        _warn_unknown_users(t, ctx)
    return SenderClients(users=frozenset(e for e in entries if isinstance(e, str)),
                         networks=tuple(e for e in entries if not isinstance(e, str)))


def _warn_unknown_users(t: _Table, ctx: _PolicyContext) -> None:
    """A `user:NAME` nobody can log in as is harmless (it lets no one in) but surely a typo."""
    raw = t.data["clients"]
    for index, item in enumerate(raw if isinstance(raw, list) else []):
        try:
            entry = _client_entry(item)
        except ValueError:
            continue  # reported as an error already
        if not isinstance(entry, str):
            continue
        key = f"{t.key('clients')}[{index}]"
        if ctx.users is None:
            ctx.warnings.append(f"{t.report.file}: {key}: no server.users_file: nobody can "
                                f"log in as {_q(entry)}")
        elif entry not in ctx.users:
            ctx.warnings.append(f"{t.report.file}: {key}: {_q(entry)} is not a user of "
                                "server.users_file")


def _recipient(t: _Table, ctx: _PolicyContext) -> RecipientPolicy | None:
    match = t.required("match", _recipient_match)
    policy = RecipientPolicy(
        match=match or "",
        smime_certificate=t.value("smime_certificate", _path_in(ctx.base), None),
        encryption=t.value("encryption", _choice(ENCRYPTION_MODES), "preferred"),
    )
    t.finish()
    if match is not None:
        _check_smime(t, ctx, policy)
    return policy if ctx.claim(t, "recipient", "match", match) else None


def _check_smime(t: _Table, ctx: _PolicyContext, policy: RecipientPolicy) -> None:
    """The certificate is read on every load, serve included (encryption is real): one that
    cannot encrypt for `match` is an error; one that has expired, expires within 30 days or
    is not valid yet is a warning (one customer's certificate must not stop the relay: at RCPT
    and delivery `required` refuses or defers, `preferred` goes plain)."""
    path = policy.smime_certificate
    if path is None:
        if policy.encryption == "required":
            t.report.add(t.key("encryption"), '"required" needs smime_certificate: every '
                                              f"message to {policy.match} would be refused")
        return
    if policy.match == "*":
        t.report.add(t.key("smime_certificate"), 'not allowed under match = "*": one '
                                                 "certificate cannot be every recipient's")
        return
    # Imported here: only a config with certificates pays for it (queue commands stay quick).
    from relay.config.certs import (
        expiry_warning,
        not_yet_valid_warning,
        read_certificate,
        smime_problem,
    )

    try:
        cert = read_certificate(path)
    except ValueError as exc:
        t.report.add(t.key("smime_certificate"), str(exc))
        return
    problem = smime_problem(cert, policy.match)
    if problem is not None:
        t.report.add(t.key("smime_certificate"), f"{path}: {problem}")
        return
    now = time.time()
    for warning in (expiry_warning(path, cert, now), not_yet_valid_warning(path, cert, now)):
        if warning is not None:
            t.report.warn(t.key("smime_certificate"), warning)


@dataclass
class _Policies:
    destinations: list[DestinationPolicy] = field(default_factory=list)
    senders: list[SenderPolicy] = field(default_factory=list)
    recipients: list[RecipientPolicy] = field(default_factory=list)
    unenforced: list[Unenforced] = field(default_factory=list)


def _policy_file(root: _Table, ctx: _PolicyContext, into: _Policies) -> None:
    examples = {"destination": "[[destination]]", "sender": "[[sender]]",
                "recipient": "[[recipient]]"}
    for t in root.tables("destination", examples["destination"]):
        if (destination := _destination(t, ctx)) is not None:
            into.destinations.append(destination)
    for t in root.tables("sender", examples["sender"]):
        if (sender := _sender(t, ctx)) is not None:
            into.senders.append(sender)
    for t in root.tables("recipient", examples["recipient"]):
        if (recipient := _recipient(t, ctx)) is not None:
            into.recipients.append(recipient)
    root.finish()


def _read_policies(folder: Path | None, ctx: _PolicyContext, main: _Report) -> _Policies:
    found = _Policies()
    if folder is None or not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.toml"), key=lambda p: p.name):
        report = main.for_file(str(path))
        data = _read_toml(path, report)
        if data is None:
            continue
        found.unenforced.extend(find_unenforced(str(path), data))
        try:
            _policy_file(_Table(data, "", report), ctx, found)
        except Exception as exc:  # a bug here must still come out as a problem line
            report.add("", f"unexpected error: {type(exc).__name__}: {exc}")
    return found
