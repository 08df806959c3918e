"""The value grammar of relay.toml and the policy files: durations ("5m"), sizes ("10MiB",
"10%"), rates ("600/min"), domains and patterns, IP addresses and networks, host:port,
paths, regular expressions, URLs, dates and charsets.

Each parser takes the raw TOML value and returns the typed value, or raises ValueError with
the "what is wrong" part of a problem line (the caller adds `FILE: KEY:`).
"""

from __future__ import annotations

import codecs
import datetime
import ipaddress
import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relay.addresses import HostPort, parse_hostport

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SMTP_PORT, DNS_PORT, HTTP_PORT = 25, 53, 8025


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
    if text:
        _check_redis_url(text)
    return text


def _check_redis_url(text: str) -> None:
    """What redis-py would refuse at connect time, said now (the message never repeats the
    URL: it may hold a password)."""
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError("the port of the URL is not a number from 0 to 65535") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path, such as unix:///run/redis.sock")
        return
    if not parts.hostname:
        raise ValueError("the URL has no host, such as redis://127.0.0.1:6379/0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database in the URL path must be a number, not {_q(db)}")
