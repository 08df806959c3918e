"""The main config (relay.toml) and the policy files, parsed once into frozen dataclasses.

Every problem is collected as one line `FILE: KEY: what is wrong` (KEY a dotted path such
as `server.listen[1]` or `destination[2].routes`); `load_config` raises `ConfigError` with
all of them at once, so an operator fixes a file in one round.

Relative paths in the main config are relative to its folder; with no config file, to the
working directory. Paths inside policy files (DKIM keys, S/MIME certificates, webhook
secrets) are relative to the *main config's* folder too, not the policy file's: the
contract writes `key = "keys/s2026.pem"`, and `dkim keygen` writes to `keys/` beside the
config, so both sides agree on one folder.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

from relay.addresses import HostPort, in_networks, parse_hostport
from relay.config_status import Unenforced, find_unenforced
from relay.smtp.auth import load_users

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EX_CONFIG = 78
SYSTEM_CONFIG = Path("/etc/invoice-relay/relay.toml")
ENV_CONFIG = "INVOICE_RELAY_CONFIG"
DEFAULTS_NAME = "embedded defaults"

SMTP_PORT, DNS_PORT, HTTP_PORT = 25, 53, 8025
DEFAULT_LISTEN = (HostPort("127.0.0.1", 2525),)
DEFAULT_TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
DEFAULT_MAX_MESSAGE_SIZE = 26_214_400
DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 3600.0, 14400.0)
DEFAULT_MAX_LIFETIME = 5 * 86400.0
DEFAULT_HTTP_LISTEN = HostPort("127.0.0.1", HTTP_PORT)
TLS_MODES = ("opportunistic", "required", "verify", "mta-sts")
ENCRYPTION_MODES = ("required", "preferred")
PRIORITIES = ("high", "normal", "bulk")
LOG_FORMATS = ("logfmt", "json")
ON_REPLY_ACTIONS = ("suspend",)
SPF_MODES = ("enforce", "off")
DKIM_MIN_RSA_BITS = 1024  # RFC 8301: verifiers reject smaller keys


class ConfigError(Exception):
    """The config cannot be used; `problems` holds one `FILE: KEY: what is wrong` a line,
    `warnings` the warning lines found on the way (shown too, so one round shows all)."""

    def __init__(self, problems: list[str], warnings: Iterable[str] = ()) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.warnings = list(warnings)


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` messages per `period` seconds (`"600/min"`)."""

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period, f"{self.period:g}s")
        return f"{self.count}/{unit}"


DEFAULT_AUTH_FAILURE_LIMIT = Rate(30, 3600.0)


@dataclass(frozen=True, slots=True)
class Percent:
    """A share of something (the filesystem for `min_free_space`), 0 to 100."""

    value: float


def _describe(value: object) -> str:
    """A TOML-ish name for the type of a value, for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _q(text: str) -> str:
    """A value quoted the way it is written in TOML."""
    return json.dumps(text, ensure_ascii=False)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _nonempty(value: object) -> str:
    text = _string(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _int(value: object) -> int:
    # TOML booleans are Python ints; `true` is never a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _positive_int(value: object) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"must be 1 or more, got {number}")
    return number


def _port(value: object) -> int:
    number = _int(value)
    if not 0 < number < 65536:
        raise ValueError(f"must be a port number 1-65535, got {number}")
    return number


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value)
        if text not in options:
            raise ValueError(f"{_q(text)} is not one of {' | '.join(options)}")
        return text

    return parse


_DURATION_RE = re.compile(r"(\d+)(s|m|h|d)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """Seconds from `"90s"`, `"5m"`, `"1h"`, `"5d"`; `"0"` (off) is 0.0."""
    if value == "0" or (type(value) is int and value == 0):
        return 0.0
    text = _string(value).strip()
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{_q(text)} is not a duration: write an integer and s, m, h or d, "
                         'such as "90s" or "5d" ("0" means off)')
    return float(int(match[1]) * _DURATION_UNITS[match[2]])


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


_SIZE_RE = re.compile(r"(\d+)\s*(KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_size(value: object, *, percent: bool = False) -> int | Percent:
    """Bytes from an integer or `"10KiB"`/`"MiB"`/`"GiB"`; `"10%"` only when `percent`."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    text = _string(value).strip()
    match = _SIZE_RE.fullmatch(text)
    if match is not None:
        return int(match[1]) * _SIZE_UNITS[match[2]]
    pmatch = _PERCENT_RE.fullmatch(text)
    if percent and pmatch is not None:
        share = float(pmatch[1])
        if share > 100:
            raise ValueError(f"{_q(text)}: a percentage must be 0-100")
        return Percent(share)
    extra = ' or a percentage such as "10%"' if percent else ""
    raise ValueError(f"{_q(text)} is not a size: write bytes or an integer with KiB, MiB "
                     f"or GiB{extra}")


def _bytes(value: object) -> int:
    size = parse_size(value)
    assert isinstance(size, int)  # percent=False never yields a Percent
    return size


def _positive_bytes(value: object) -> int:
    size = _bytes(value)
    if size < 1:
        raise ValueError("must be more than 0")
    return size


_RATE_RE = re.compile(r"(\d+)\s*/\s*(s|min|h)")
_RATE_PERIODS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def parse_rate(value: object) -> Rate:
    """A `Rate` from `"N/s"`, `"N/min"` or `"N/h"` (N at least 1)."""
    text = _string(value).strip()
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'{_q(text)} is not a rate: write N/s, N/min or N/h, such as "600/min"')
    count = int(match[1])
    if count < 1:
        raise ValueError(f"{_q(text)}: the count must be 1 or more")
    return Rate(count, _RATE_PERIODS[match[2]])


def _rate_or_off(value: object) -> Rate | None:
    """A rate, or "0" for off."""
    return None if value in ("0", 0) else parse_rate(value)


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_domain(value: object) -> str:
    """A domain name lower-cased, without the trailing dot, in A-label (xn--) form."""
    text = _string(value).strip().lower().rstrip(".")
    if not text:
        raise ValueError("empty domain")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{_q(text)} is not a valid internationalised domain") from None
    if len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in text.split(".")):
        raise ValueError(f"{_q(text)} is not a valid domain name")
    return text


def parse_domain_pattern(value: object) -> str:
    """`example.net`, `*.example.net` (proper subdomains) or `*` (everything), normalised."""
    text = _string(value).strip()
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if "*" in rest:
        raise ValueError(f"{_q(text)}: a pattern is *.domain or *, nothing else")
    try:
        domain = normalize_domain(rest)
    except ValueError:
        raise ValueError(f"{_q(text)} is not a valid domain or pattern") from None
    return f"*.{domain}" if wildcard else domain


def _recipient_match(value: object) -> str:
    """An address (`ap@customer.example`), a domain, `*.domain` or `*`."""
    text = _string(value).strip()
    if "@" not in text:
        return parse_domain_pattern(text)
    local, _, domain = text.rpartition("@")
    try:
        if not local or any(ch.isspace() for ch in local):
            raise ValueError
        return f"{local.lower()}@{normalize_domain(domain)}"
    except ValueError:
        raise ValueError(f"{_q(text)} is not a mail address") from None


def _ip(value: object) -> IPAddress:
    text = _string(value).strip()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{_q(text)} is not an IP address") from None


def _network(value: object) -> IPNetwork:
    text = _string(value).strip()
    try:
        # strict=False: "10.1.2.3/8" means the /8 it lies in, as Postfix reads mynetworks.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{_q(text)} is not a network such as 10.0.0.0/8 or ::1/128") from None


def _hostport(default_port: int) -> Callable[[object], HostPort]:
    def parse(value: object) -> HostPort:
        return parse_hostport(_string(value), default_port)

    return parse


def _path_in(base: Path) -> Callable[[object], Path | None]:
    """A path relative to `base`, resolved; the empty string means unset (None)."""

    def parse(value: object) -> Path | None:
        text = _string(value).strip()
        if not text:
            return None
        return (base / Path(text).expanduser()).resolve()

    return parse


def _required_path(base: Path) -> Callable[[object], Path]:
    optional = _path_in(base)

    def parse(value: object) -> Path:
        path = optional(value)
        if path is None:
            raise ValueError("must not be empty")
        return path

    return parse


def _regex(value: object) -> re.Pattern[str]:
    text = _nonempty(value)
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{_q(text)} is not a regular expression: {exc}") from None


def _url(value: object) -> str:
    text = _nonempty(value)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
        raise ValueError(f"{_q(text)} is not an http:// or https:// URL")
    return text


def _date(value: object) -> datetime.date:
    """A TOML date (`2026-12-01`) or the same as a string (`"2026-12-01"`)."""
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    text = _string(value).strip()
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{_q(text)} is not a date such as \"2026-12-01\"") from None


def _count(value: object) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def parse_charset(value: object) -> str:
    """Python's codec name for a charset (`"GBK"` -> `"gbk"`); a text codec, not base64."""
    text = _nonempty(value)
    try:
        name = codecs.lookup(text).name
        "".encode(name)  # LookupError for bytes-to-bytes codecs such as base64 or rot13
    except LookupError:
        raise ValueError(f"{_q(text)} is not a charset Python knows, such as \"gb18030\", "
                         '"big5" or "iso-8859-1"') from None
    return name


def _redis_url(value: object) -> str:
    text = _string(value).strip()
    if text and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{_q(text)} is not a redis://, rediss:// or unix:// URL")
    return text


# ---------------------------------------------------------------------------- sections


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

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based); the last step repeats."""
        index = min(max(attempt, 1), len(self.retry_schedule)) - 1
        return self.retry_schedule[index]


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
    spf: str = "off"  # enforce | off


@dataclass(frozen=True)
class HttpConfig:
    listen: HostPort = DEFAULT_HTTP_LISTEN
    token: str = ""


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
    url: str
    secret_file: Path


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


# ---------------------------------------------------------------------------- reading


class _Report:
    """Collects problem and warning lines for one file into lists shared by all files."""

    def __init__(self, lines: list[str], file: str, warnings: list[str] | None = None) -> None:
        self.lines = lines
        self.file = file
        self.warnings: list[str] = warnings if warnings is not None else []

    def _line(self, key: str, message: str) -> str:
        return f"{self.file}: {key}: {message}" if key else f"{self.file}: {message}"

    def for_file(self, file: str) -> _Report:
        """A report for another file, adding to the same lists."""
        return _Report(self.lines, file, self.warnings)

    def add(self, key: str, message: str) -> None:
        self.lines.append(self._line(key, message))

    def warn(self, key: str, message: str) -> None:
        """A line check-config prints on stderr (exit 0) and serve logs."""
        self.warnings.append(self._line(key, message))


_MISSING: Any = object()


class _Table:
    """A TOML table being read: which keys were used, and where problems are reported."""

    def __init__(self, data: dict[str, Any], path: str, report: _Report) -> None:
        self.data = data
        self.path = path
        self.report = report
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def value(self, name: str, parse: Callable[[Any], T], default: T) -> T:
        """The parsed value of `name`, or `default` when absent or wrong (then reported)."""
        self._used.add(name)
        if name not in self.data:
            return default
        try:
            return parse(self.data[name])
        except ValueError as exc:
            self.report.add(self.key(name), str(exc))
            return default

    def required(self, name: str, parse: Callable[[Any], T]) -> T | None:
        if name not in self.data:
            self._used.add(name)
            self.report.add(self.key(name), "missing (required)")
            return None
        return self.value(name, parse, None)

    def items(self, name: str, parse: Callable[[Any], T],
              default: tuple[T, ...] = ()) -> tuple[T, ...]:
        """An array parsed element by element; a bad element is reported as `name[i]`."""
        self._used.add(name)
        raw = self.data.get(name, _MISSING)
        if raw is _MISSING:
            return default
        if not isinstance(raw, list):
            self.report.add(self.key(name), f"expected an array, got {_describe(raw)}")
            return default
        parsed: list[T] = []
        for index, item in enumerate(raw):
            try:
                parsed.append(parse(item))
            except ValueError as exc:
                self.report.add(f"{self.key(name)}[{index}]", str(exc))
        return tuple(parsed)

    def table(self, name: str) -> _Table:
        self._used.add(name)
        raw = self.data.get(name, {})
        if not isinstance(raw, dict):
            self.report.add(self.key(name), f"expected a table, got {_describe(raw)}")
            raw = {}
        return _Table(raw, self.key(name), self.report)

    def tables(self, name: str, example: str) -> list[_Table]:
        """An array of tables (`[[name]]` or `[{...}]`), each with its `name[i]` path."""
        self._used.add(name)
        raw = self.data.get(name, [])
        if not isinstance(raw, list):
            self.report.add(self.key(name), f"expected an array of tables such as {example}, "
                                            f"got {_describe(raw)}")
            return []
        found: list[_Table] = []
        for index, item in enumerate(raw):
            path = f"{self.key(name)}[{index}]"
            if isinstance(item, dict):
                found.append(_Table(item, path, self.report))
            else:
                self.report.add(path, f"expected a table such as {example}, "
                                      f"got {_describe(item)}")
        return found

    def finish(self) -> None:
        """Report every key that no reader asked for."""
        for name in self.data:
            if name not in self._used:
                self.report.add(self.key(name), "unknown key")


_TOML_POSITION_RE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)


def _toml_error(exc: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's "msg (at line L, column C)" as "line L, column C: msg"."""
    message = str(exc)
    match = _TOML_POSITION_RE.match(message)
    if match is not None:
        return f"line {match[2]}, column {match[3]}: {match[1]}"
    # "(at end of document)": point just past the last character.
    message = message.replace(" (at end of document)", "")
    lines = text.splitlines() or [""]
    return f"line {len(lines)}, column {len(lines[-1]) + 1}: {message}"


def _read_toml(path: Path, report: _Report) -> dict[str, Any] | None:
    """The parsed file, or None after reporting why it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        report.add("", f"cannot read: {exc.strerror or exc}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add("", f"not valid UTF-8 (byte {exc.start})")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        report.add("", _toml_error(exc, text))
        return None


def _check_file(table: _Table, name: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        table.report.add(table.key(name), f"file not found: {path}")


# ---------------------------------------------------------------------------- main config


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
        raise ValueError(f"{_describe(value)}: must be between 64KiB and 1GiB")
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
        spf=t.value("spf", _choice(SPF_MODES), "off"),
    )
    t.finish()
    _check_file(t, "tls_ca_file", delivery.tls_ca_file)
    seen: set[IPAddress] = set()
    for index, source in enumerate(delivery.source_addresses):
        if source.address in seen:
            t.report.add(f"{t.key('source_addresses')}[{index}].address",
                         f"{source.address} is listed twice")
        seen.add(source.address)
    return delivery


def _simple_sections(root: _Table) -> tuple[DnsConfig, HttpConfig, ClusterConfig, LogConfig]:
    t = root.table("dns")
    dns = DnsConfig(nameservers=t.items("nameservers", _hostport(DNS_PORT)))
    t.finish()
    t = root.table("http")
    http = HttpConfig(listen=t.value("listen", _hostport(HTTP_PORT), DEFAULT_HTTP_LISTEN),
                      token=t.value("token", _string, ""))
    t.finish()
    t = root.table("cluster")
    cluster = ClusterConfig(redis=t.value("redis", _redis_url, ""))
    t.finish()
    t = root.table("log")
    log = LogConfig(format=t.value("format", _choice(LOG_FORMATS), "logfmt"))
    t.finish()
    return dns, http, cluster, log


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


# ---------------------------------------------------------------------------- policies


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

    def file(self, t: _Table, name: str, path: Path | None) -> None:
        if self.check_files:
            _check_file(t, name, path)


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
    for index, address in enumerate(policy.source_addresses):
        if address not in ctx.source_addresses:
            t.report.add(f"{t.key('source_addresses')}[{index}]",
                         f"{address} is not one of [delivery] source_addresses")
    return policy if ctx.claim(t, "destination", "domain", domain) else None


def dkim_key_algorithm(path: Path) -> str:
    """"rsa" or "ed25519" for a PEM private key file; ValueError saying what is wrong.

    The key is parsed to prove the signer can use it, then dropped: no key material stays in
    the config, and none goes into a message (only the path)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
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
    ctx.file(t, "secret_file", secret_file)
    return Webhook(url, secret_file) if url is not None and secret_file is not None else None


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


def _user_names(server: ServerConfig) -> frozenset[str] | None:
    """The user names of users_file (its problems are reported with the server section)."""
    if server.users_file is None:
        return None
    try:
        return frozenset(load_users(server.users_file))
    except (OSError, ValueError, UnicodeDecodeError):
        return frozenset()


def _recipient(t: _Table, ctx: _PolicyContext) -> RecipientPolicy | None:
    match = t.required("match", _recipient_match)
    policy = RecipientPolicy(
        match=match or "",
        smime_certificate=t.value("smime_certificate", _path_in(ctx.base), None),
        encryption=t.value("encryption", _choice(ENCRYPTION_MODES), "preferred"),
    )
    t.finish()
    ctx.file(t, "smime_certificate", policy.smime_certificate)
    return policy if ctx.claim(t, "recipient", "match", match) else None


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


# ---------------------------------------------------------------------------- entry points


def find_config_file(cli_value: str | None) -> Path | None:
    """The main config file: --config, $INVOICE_RELAY_CONFIG, ./relay.toml, /etc/…, or None.

    A file named explicitly (option or environment) must exist; ConfigError otherwise.
    """
    explicit = cli_value or os.environ.get(ENV_CONFIG) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ConfigError([f"{explicit}: file not found"])
        if not path.is_file():
            raise ConfigError([f"{explicit}: not a file"])
        return path
    for candidate in (Path("relay.toml"), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None, *, check_files: bool = False,
                strict: bool = False) -> Config:
    """Parse the main config (None: embedded defaults) and its policy folder.

    `check_files` also reports referenced files that are not used yet (S/MIME certificates,
    webhook secrets) when they are missing; check-config asks for it. DKIM keys are always
    read and checked. Keys the relay does not enforce yet (relay/config_status.py) become
    warning lines in `Config.warnings`; with `strict` (check-config, serve) a security key
    among them is a problem. Raises ConfigError with every problem found.
    """
    lines: list[str] = []
    if path is None:
        base, data = Path.cwd(), {}
        report = _Report(lines, DEFAULTS_NAME)
    else:
        base = path.resolve().parent
        report = _Report(lines, str(path))
        data = _read_toml(path, report)
        if data is None:
            raise ConfigError(lines)
    try:
        config = _build(data, path, base, report, check_files)
    except Exception as exc:  # never a traceback for a config problem
        report.add("", f"unexpected error: {type(exc).__name__}: {exc}")
        raise ConfigError(lines, report.warnings) from exc
    for item in config.unenforced:
        if any(line.startswith(f"{item.file}: {item.key}") for line in lines):
            continue  # the value (or one inside it) is wrong anyway: its own line says so
        if not item.security:
            report.warnings.append(item.line)
        elif strict:
            # `serve` never runs with a protection configured and off.
            lines.append(item.line)
    if lines:
        raise ConfigError(lines, report.warnings)
    return dataclasses.replace(config, warnings=tuple(report.warnings))


def _build(data: dict[str, Any], path: Path | None, base: Path, report: _Report,
           check_files: bool) -> Config:
    root = _Table(data, "", report)
    server = _server(root.table("server"), base)
    queue = _queue(root.table("queue"), base)
    delivery = _delivery(root.table("delivery"), server.hostname, base)
    dns, http, cluster, log = _simple_sections(root)
    policies = _policies_section(root, base, path is not None)
    root.finish()
    # Policy warnings go to the same list as the rest (check-config prints, serve logs them).
    ctx = _PolicyContext(base, frozenset(s.address for s in delivery.source_addresses),
                         check_files, warnings=report.warnings)
    if check_files:
        ctx.users = _user_names(server)
    found = _read_policies(policies.path, ctx, report)
    unenforced = find_unenforced(report.file, data) + found.unenforced
    return Config(
        source=path.resolve() if path is not None else None,
        server=server, queue=queue, dns=dns, delivery=delivery, http=http,
        policies=policies, cluster=cluster, log=log,
        destinations=tuple(found.destinations), senders=tuple(found.senders),
        recipients=tuple(found.recipients), unenforced=tuple(unenforced),
    )


def _summary(config: Config, name: str) -> str:
    listeners = len(config.server.listen) + len(config.server.listen_tls)
    return (f"OK: {name}: {listeners} listeners, {len(config.destinations)} destination "
            f"policies, {len(config.senders)} sender policies, {len(config.recipients)} "
            "recipient policies")


def check_config_command(cli_value: str | None) -> int:
    """`invoice-relay check-config`: 0 and a summary line, or 1 and one line per problem.

    Warnings (keys not enforced yet) go to stderr either way; they do not change the status.
    """
    name = cli_value or DEFAULTS_NAME
    try:
        path = find_config_file(cli_value)
        name = str(path) if path is not None else DEFAULTS_NAME
        config = load_config(path, check_files=True, strict=True)
    except ConfigError as exc:
        _print_lines(exc.warnings, sys.stderr)
        _print_lines(exc.problems, sys.stdout)
        return 1
    except Exception as exc:  # never a traceback
        print(f"{name}: unexpected error: {type(exc).__name__}: {exc}")
        return 1
    _print_lines(config.warnings, sys.stderr)
    print(_summary(config, name))
    return 0


def _print_lines(lines: Iterable[str], stream: TextIO) -> None:
    for line in lines:
        print(line, file=stream)
    stream.flush()  # stderr and stdout may be one file: keep the order


def load_or_exit(cli_value: str | None) -> Config:
    """The config for `serve`; on problems print them to stderr and exit 78 (EX_CONFIG).

    Strict: a security key the relay does not enforce yet is refused, never run without.
    The caller logs `Config.warnings`."""
    warnings: list[str] = []
    try:
        return load_config(find_config_file(cli_value), strict=True)
    except ConfigError as exc:
        problems, warnings = exc.problems, exc.warnings
    except Exception as exc:
        problems = [f"{cli_value or DEFAULTS_NAME}: unexpected error: {type(exc).__name__}: {exc}"]
    _print_lines([*warnings, *problems], sys.stderr)
    sys.exit(EX_CONFIG)
