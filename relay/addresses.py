"""Small value types shared by every package: next-hop `host[:port]` and mail addresses."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class HostPort:
    """A `host[:port]` or `[ipv6]:port` value from the config (a name means A/AAAA, never MX)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        return _is_ip_literal(self.host)


@functools.lru_cache(maxsize=1024)
def _is_ip_literal(host: str) -> bool:
    """Asked for every static route of every delivery: parse each host once."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_hostport(text: str, default_port: int) -> HostPort:
    """Parse `host`, `host:port`, `[v6]` or `[v6]:port`; raise ValueError with a readable reason."""
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses as [address]:port")
    else:
        host, _, port_text = text.partition(":")
        if ":" in text and not port_text:
            raise ValueError(f"{text!r}: empty port")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be 1-65535")
        port = int(port_text)
    if not host:
        raise ValueError(f"{text!r}: empty host")
    return HostPort(host.lower().rstrip("."), port)


def in_networks(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                ) -> bool:
    """True when the IP address in `address` (IPv4-mapped IPv6 counts as IPv4) is in one of
    `networks`; False for anything that is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def domain_of(address: str) -> str:
    """The domain of a mail address, lower-cased (empty for the null sender)."""
    return address.rpartition("@")[2].lower().rstrip(".")


# RFC 5321 4.5.3.1: local part 64 octets, domain 255, a path 256 including its angle brackets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


# Printable ASCII, a local part of at most 64 and a domain of at most 253 characters.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


class AddressProblem(Enum):
    """Why a mail address cannot be queued or sent (intake maps each to a fixed SMTP reply)."""

    CONTROL = "control character"
    INVALID_UTF8 = "invalid UTF-8"
    NEEDS_SMTPUTF8 = "non-ASCII without SMTPUTF8"
    TOO_LONG = "too long"
    SYNTAX = "bad syntax"


def address_problem(address: str, *, smtputf8: bool = True) -> AddressProblem | None:
    """What is wrong with `address` (no angle brackets; "" is the null sender), or None.

    Intake receives arguments decoded with surrogateescape, so a byte that is not UTF-8 shows
    up as a lone surrogate. Delivery runs the same check on every address it is about to send,
    so a spool file written before these checks existed cannot inject commands either."""
    if not address or (_PLAIN_ADDRESS.fullmatch(address) and len(address) + 2 <= MAX_PATH):
        return None  # the common case, in a microsecond
    if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in address):
        return AddressProblem.CONTROL
    if any("\ud800" <= ch <= "\udfff" for ch in address):
        return AddressProblem.INVALID_UTF8
    if not smtputf8 and not address.isascii():
        return AddressProblem.NEEDS_SMTPUTF8
    local, at, domain = address.rpartition("@")
    if len(address.encode()) + 2 > MAX_PATH or len(local.encode()) > MAX_LOCAL_PART \
            or len(domain.encode()) > MAX_DOMAIN:
        return AddressProblem.TOO_LONG
    if not at or not local or not domain.rstrip("."):
        return AddressProblem.SYNTAX
    return None
