"""The main config, relay.toml: the [server], [queue], [dns], [delivery], [http], [policies],
[cluster] and [log] sections, and `Config`, the frozen result that also holds the policies
(relay/config/policies.py) with their lookups.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.addresses import HostPort, in_networks
from relay.config.policies import DestinationPolicy, DomainIndex, RecipientPolicy, SenderPolicy
from relay.config.report import _check_file, _Table
from relay.config.values import (
    DNS_PORT,
    HTTP_PORT,
    SMTP_PORT,
    IPAddress,
    IPNetwork,
    Percent,
    Rate,
    _choice,
    _count,
    _date,
    _hostport,
    _ip,
    _network,
    _path_in,
    _port,
    _positive_bytes,
    _positive_duration,
    _positive_int,
    _rate_or_off,
    _redis_url,
    _required_path,
    _string,
    normalize_domain,
    parse_duration,
    parse_size,
)
from relay.config_status import Unenforced
from relay.smtp.auth import load_users

DEFAULTS_NAME = "embedded defaults"

DEFAULT_LISTEN = (HostPort("127.0.0.1", 2525),)
DEFAULT_TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
DEFAULT_MAX_MESSAGE_SIZE = 26_214_400
DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 3600.0, 14400.0)
DEFAULT_MAX_LIFETIME = 5 * 86400.0
DEFAULT_HTTP_LISTEN = HostPort("127.0.0.1", HTTP_PORT)
LOG_FORMATS = ("logfmt", "json")
SPF_MODES = ("enforce", "off")
DEFAULT_AUTH_FAILURE_LIMIT = Rate(30, 3600.0)


def _cwd_path(name: str) -> Callable[[], Path]:
    return lambda: (Path.cwd() / name).resolve()


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.gethostname)
    listen: tuple[HostPort, ...] = DEFAULT_LISTEN
    listen_tls: tuple[HostPort, ...] = ()
    trusted_networks: tuple[IPNetwork, ...] = DEFAULT_TRUSTED
    tls_cert: Path | None = None
    tls_key: Path | None = None
    users_file: Path | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = 1000
    max_connections_per_client: int = 50
    # Postfix's smtpd_soft_error_limit / smtpd_hard_error_limit / smtpd_error_sleep_time.
    error_soft_limit: int = 10
    error_hard_limit: int = 20
    error_delay: float = 1.0
    auth_failure_limit: Rate | None = DEFAULT_AUTH_FAILURE_LIMIT  # None: off ("0")
    max_messages_per_client: Rate | None = None  # None: off ("0"), as Postfix's anvil default
    idle_timeout: float = 300.0  # our addition (Postfix's smtpd_timeout): then 421 4.4.2

    def is_trusted(self, address: IPAddress) -> bool:
        """True when a client at `address` may relay without AUTH."""
        return in_networks(str(address), self.trusted_networks)


@dataclass(frozen=True)
class QueueConfig:
    path: Path = field(default_factory=_cwd_path("var"))
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    max_queued: int = 1_000_000
    min_free_space: int | Percent = 2 << 30
    dedupe_window: float = 86400.0
    retention: float = 400 * 86400.0
    segment_size: int = 32 << 20  # our addition: size of each preallocated spool segment


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system resolver


@dataclass(frozen=True)
class Warmup:
    """A new outbound address: on day N after `start` (UTC, day 0 = start) at most
    `per_day[N]` messages per destination domain; no cap after the list ends."""

    start: datetime.date
    per_day: tuple[int, ...]


@dataclass(frozen=True)
class SourceAddress:
    address: IPAddress
    hostname: str
    weight: int = 1
    warmup: Warmup | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = SMTP_PORT
    source_addresses: tuple[SourceAddress, ...] = ()  # empty: the kernel's choice
    fallback_relays: tuple[HostPort, ...] = ()
    connect_timeout: float = 30.0  # our addition: seconds to wait for a TCP connect
    tls_ca_file: Path | None = None  # None: the system CAs (for tls = "verify" / "mta-sts")
    spf: str = "enforce"  # enforce | off (skipped without a source pool)
    # A failing or blocked path (source address, destination) rests this long, doubling with
    # each failure in a row up to path_cooldown_max (relay/delivery/health.py).
    path_cooldown: float = 60.0
    path_cooldown_max: float = 3600.0


@dataclass(frozen=True)
class HttpConfig:
    listen: HostPort | None = DEFAULT_HTTP_LISTEN  # None: `listen = ""`, no HTTP server
    # The effective token (from `token`, or read from `token_file`); never in a repr or a log.
    token: str = field(default="", repr=False)
    token_file: Path | None = None


@dataclass(frozen=True)
class PoliciesConfig:
    path: Path | None = None  # None: no policy folder is read (no config file)


@dataclass(frozen=True)
class ClusterConfig:
    redis: str = ""  # empty: limits are per node


@dataclass(frozen=True)
class LogConfig:
    format: str = "logfmt"


@dataclass(frozen=True)
class Config:
    source: Path | None = None  # None: embedded defaults
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    destinations: tuple[DestinationPolicy, ...] = ()
    senders: tuple[SenderPolicy, ...] = ()
    recipients: tuple[RecipientPolicy, ...] = ()
    # Keys set in the files that the relay does not enforce yet (relay/config_status.py),
    # and the warning lines check-config prints and serve logs.
    unenforced: tuple[Unenforced, ...] = field(default=(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    _destination_index: DomainIndex[DestinationPolicy] = field(
        init=False, repr=False, compare=False)
    _sender_index: DomainIndex[SenderPolicy] = field(init=False, repr=False, compare=False)
    _recipient_index: DomainIndex[RecipientPolicy] = field(init=False, repr=False, compare=False)
    _recipient_addresses: dict[str, RecipientPolicy] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: the lookup indexes are derived once, here.
        by_address = {r.match: r for r in self.recipients if "@" in r.match}
        by_domain = [(r.match, r) for r in self.recipients if "@" not in r.match]
        object.__setattr__(self, "_destination_index",
                           DomainIndex((d.domain, d) for d in self.destinations))
        object.__setattr__(self, "_sender_index", DomainIndex((s.domain, s) for s in self.senders))
        object.__setattr__(self, "_recipient_index", DomainIndex(by_domain))
        object.__setattr__(self, "_recipient_addresses", by_address)

    @property
    def source_name(self) -> str:
        return str(self.source) if self.source is not None else DEFAULTS_NAME

    def destination_for(self, domain: str) -> DestinationPolicy | None:
        """The policy for a recipient domain: exact, then longest `*.suffix`, then `*`."""
        return self._destination_index.lookup(domain)

    def sender_for(self, domain: str) -> SenderPolicy | None:
        """The policy for an envelope-sender domain, matched like destinations."""
        return self._sender_index.lookup(domain)

    @property
    def sender_clients_in_force(self) -> bool:
        """True when some `[[sender]]` restricts its clients (else intake skips the checks)."""
        return any(s.clients is not None for s in self.senders)

    def recipient_for(self, address: str) -> RecipientPolicy | None:
        """The policy for a recipient: the exact address first, then by its domain."""
        local, _, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        found = self._recipient_addresses.get(f"{local.lower()}@{domain}")
        return found if found is not None else self._recipient_index.lookup(domain)


def _server(t: _Table, base: Path) -> ServerConfig:
    hostname = t.value("hostname", normalize_domain, None)
    server = ServerConfig(
        hostname=hostname if hostname is not None else socket.gethostname(),
        listen=t.items("listen", _hostport(SMTP_PORT), DEFAULT_LISTEN),
        listen_tls=t.items("listen_tls", _hostport(SMTP_PORT)),
        trusted_networks=t.items("trusted_networks", _network, DEFAULT_TRUSTED),
        tls_cert=t.value("tls_cert", _path_in(base), None),
        tls_key=t.value("tls_key", _path_in(base), None),
        users_file=t.value("users_file", _path_in(base), None),
        max_message_size=t.value("max_message_size", _positive_bytes, DEFAULT_MAX_MESSAGE_SIZE),
        max_connections=t.value("max_connections", _positive_int, 1000),
        max_connections_per_client=t.value("max_connections_per_client", _positive_int, 50),
        error_soft_limit=t.value("error_soft_limit", _positive_int, 10),
        error_hard_limit=t.value("error_hard_limit", _positive_int, 20),
        error_delay=t.value("error_delay", parse_duration, 1.0),
        auth_failure_limit=t.value("auth_failure_limit", _rate_or_off,
                                   DEFAULT_AUTH_FAILURE_LIMIT),
        max_messages_per_client=t.value("max_messages_per_client", _rate_or_off, None),
        idle_timeout=t.value("idle_timeout", _positive_duration, 300.0),
    )
    t.finish()
    if server.error_soft_limit > server.error_hard_limit:
        t.report.add(t.key("error_soft_limit"),
                     f"must not exceed error_hard_limit ({server.error_hard_limit})")
    if not server.listen and not server.listen_tls:
        t.report.add(t.key("listen"), "no listener: listen and listen_tls are both empty")
    _check_tls(t, server)
    _check_users(t, server)
    return server


def _check_tls(t: _Table, server: ServerConfig) -> None:
    cert, key = server.tls_cert, server.tls_key
    if (cert is None) != (key is None):
        missing = "tls_key" if key is None else "tls_cert"
        t.report.add(t.key(missing), "missing: tls_cert and tls_key are set together")
    if server.listen_tls and cert is None:
        t.report.add(t.key("listen_tls"), "implicit TLS needs server.tls_cert and server.tls_key")
    _check_file(t, "tls_cert", cert)
    _check_file(t, "tls_key", key)
    if cert is None or key is None or not cert.is_file() or not key.is_file():
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        t.report.add(t.key("tls_cert"), f"cannot load the certificate with tls_key: {exc}")
        return
    _warn_tls_expiry(t, cert)


def _warn_tls_expiry(t: _Table, cert: Path) -> None:
    """A warning (never a refusal) when the server certificate expires within 30 days or has
    expired: clients that verify it will stop sending, so the operator must see it first."""
    from relay.config.certs import expiry_warning, read_certificate

    try:
        warning = expiry_warning(cert, read_certificate(cert), time.time())
    except ValueError:
        return  # loaded by ssl above; a chain cryptography cannot read is not ours to judge
    if warning is not None:
        t.report.warn(t.key("tls_cert"), warning)


def _check_users(t: _Table, server: ServerConfig) -> None:
    path = server.users_file
    if path is None:
        return
    if server.tls_cert is None:
        t.report.add(t.key("users_file"), "AUTH is only offered after TLS: "
                                          "set server.tls_cert and server.tls_key")
    if not path.is_file():
        t.report.add(t.key("users_file"), f"file not found: {path}")
        return
    try:
        load_users(path)
    except OSError as exc:
        t.report.add(t.key("users_file"), f"{path}: cannot read: {exc.strerror or exc}")
    except (ValueError, UnicodeDecodeError) as exc:
        t.report.add(t.key("users_file"), f"{path}: {exc}")


def _queue(t: _Table, base: Path) -> QueueConfig:
    schedule = t.items("retry_schedule", _positive_duration, DEFAULT_RETRY_SCHEDULE)
    if t.data.get("retry_schedule") == []:
        t.report.add(t.key("retry_schedule"), "needs at least one step")
        schedule = DEFAULT_RETRY_SCHEDULE
    queue = QueueConfig(
        path=t.value("path", _required_path(base), (base / "var").resolve()),
        retry_schedule=schedule,
        max_lifetime=t.value("max_lifetime", _positive_duration, DEFAULT_MAX_LIFETIME),
        max_queued=t.value("max_queued", _positive_int, 1_000_000),
        min_free_space=t.value("min_free_space", lambda v: parse_size(v, percent=True), 2 << 30),
        dedupe_window=t.value("dedupe_window", parse_duration, 86400.0),
        retention=t.value("retention", parse_duration, 400 * 86400.0),
        segment_size=t.value("segment_size", _segment_size, 32 << 20),
    )
    t.finish()
    return queue


def _segment_size(value: object) -> int:
    size = _positive_bytes(value)
    if not 64 << 10 <= size <= 1 << 30:
        raise ValueError(f"must be between 64KiB and 1GiB, got {value!r}")
    return size


def _warmup(t: _Table) -> Warmup | None:
    start = t.required("start", _date)
    per_day = t.items("per_day", _count)
    if "per_day" not in t.data:
        t.report.add(t.key("per_day"), "missing (required)")
    elif not per_day and t.data["per_day"] == []:
        t.report.add(t.key("per_day"), "needs at least one day")
    t.finish()
    return Warmup(start, per_day) if start is not None and per_day else None


def _source_address(t: _Table, hostname: str) -> SourceAddress | None:
    address = t.required("address", _ip)
    warmup = _warmup(t.table("warmup")) if "warmup" in t.data else None
    result = SourceAddress(
        address=address if address is not None else ipaddress.ip_address("0.0.0.0"),
        hostname=t.value("hostname", normalize_domain, hostname),
        weight=t.value("weight", _positive_int, 1),
        warmup=warmup,
    )
    t.finish()
    return result if address is not None else None


def _delivery(t: _Table, hostname: str, base: Path) -> DeliveryConfig:
    example = '{ address = "192.0.2.10", hostname = "out1.example.com", weight = 1 }'
    sources = [_source_address(s, hostname) for s in t.tables("source_addresses", example)]
    delivery = DeliveryConfig(
        port=t.value("port", _port, SMTP_PORT),
        source_addresses=tuple(s for s in sources if s is not None),
        fallback_relays=t.items("fallback_relays", _hostport(SMTP_PORT)),
        connect_timeout=t.value("connect_timeout", _positive_duration, 30.0),
        tls_ca_file=t.value("tls_ca_file", _path_in(base), None),
        spf=t.value("spf", _choice(SPF_MODES), "enforce"),
        path_cooldown=t.value("path_cooldown", _positive_duration, 60.0),
        path_cooldown_max=t.value("path_cooldown_max", _positive_duration, 3600.0),
    )
    t.finish()
    if delivery.path_cooldown > delivery.path_cooldown_max:
        t.report.add(t.key("path_cooldown"),
                     f"must not exceed path_cooldown_max ({delivery.path_cooldown_max:g}s)")
    _check_file(t, "tls_ca_file", delivery.tls_ca_file)
    _check_ca_file(t, delivery.tls_ca_file)
    seen: set[IPAddress] = set()
    for index, source in enumerate(delivery.source_addresses):
        if source.address in seen:
            t.report.add(f"{t.key('source_addresses')}[{index}].address",
                         f"{source.address} is listed twice")
        seen.add(source.address)
    return delivery


def _check_ca_file(t: _Table, path: Path | None) -> None:
    """`tls_ca_file` must load as a CA bundle (relay/delivery/tls.py loads it the same way)."""
    if path is None or not path.is_file():
        return  # unset, or already reported as missing
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:  # before OSError, its base class
        t.report.add(t.key("tls_ca_file"),
                     f"{path}: not a PEM certificate bundle ({exc.reason or exc})")
    except OSError as exc:
        t.report.add(t.key("tls_ca_file"), f"{path}: cannot read: {exc.strerror or exc}")


def _simple_sections(root: _Table, base: Path
                     ) -> tuple[DnsConfig, HttpConfig, ClusterConfig, LogConfig]:
    t = root.table("dns")
    dns = DnsConfig(nameservers=t.items("nameservers", _hostport(DNS_PORT)))
    t.finish()
    http = _http_section(root.table("http"), base)
    t = root.table("cluster")
    cluster = ClusterConfig(redis=t.value("redis", _redis_url, ""))
    t.finish()
    t = root.table("log")
    log = LogConfig(format=t.value("format", _choice(LOG_FORMATS), "logfmt"))
    t.finish()
    return dns, http, cluster, log


def _http_listen(value: object) -> HostPort | None:
    """`host:port`, or "" for no HTTP server at all."""
    return None if _string(value).strip() == "" else _hostport(HTTP_PORT)(value)


def _http_section(t: _Table, base: Path) -> HttpConfig:
    listen = t.value("listen", _http_listen, DEFAULT_HTTP_LISTEN)
    token = t.value("token", _string, "")
    token_file = t.value("token_file", _path_in(base), None)
    t.finish()
    if token_file is None:
        return HttpConfig(listen=listen, token=token)
    if token:
        t.report.add(t.key("token_file"), "set token or token_file, not both")
        return HttpConfig(listen=listen, token=token)
    try:
        # One line; surrounding whitespace (the newline an editor adds) is not part of it.
        from_file = token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        t.report.add(t.key("token_file"), f"{token_file}: cannot read: {reason}")
        return HttpConfig(listen=listen, token_file=token_file)
    if not from_file:
        t.report.add(t.key("token_file"), f"{token_file}: the file is empty")
    return HttpConfig(listen=listen, token=from_file, token_file=token_file)


def _policies_section(root: _Table, base: Path, has_file: bool) -> PoliciesConfig:
    t = root.table("policies")
    path = t.value("path", _required_path(base), (base / "policies").resolve())
    t.finish()
    if not has_file:
        return PoliciesConfig(path=None)
    if path.exists() and not path.is_dir():
        t.report.add(t.key("path"), f"not a folder: {path}")
    elif "path" in t.data and not path.exists():
        # The default folder may be absent (no policies); a folder named on purpose may not.
        t.report.add(t.key("path"), f"folder not found: {path}")
    return PoliciesConfig(path=path)
