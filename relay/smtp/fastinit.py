"""Make aiosmtpd's per-connection setup cheap.

aiosmtpd builds its command and AUTH tables in `SMTP.__init__` with `inspect.getmembers` and
`dir()` on every new connection: about 0.3 ms of CPU each, a large share of a 4 KiB message
when every client opens a new connection. The tables depend only on the classes, so we give
the aiosmtpd module cached versions of those two functions (same results, computed once per
class). Imported for its effect by relay.smtp.server.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import Any

import aiosmtpd.smtp as _aiosmtpd_smtp


@lru_cache(maxsize=64)
def _class_dir(cls: type) -> tuple[str, ...]:
    return tuple(dir(cls))


@lru_cache(maxsize=64)
def _auth_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name, _ in _inspect.getmembers(cls) if name.startswith("auth_"))


@lru_cache(maxsize=64)
def _signature(func: Callable[..., Any]) -> _inspect.Signature:
    return _inspect.signature(func)


def _dir(obj: Any = None) -> list[str]:
    # aiosmtpd only looks for "handle_"/"smtp_" methods, which live on the class.
    return list(_class_dir(type(obj)))


class _CachedInspect(ModuleType):
    """`inspect` for aiosmtpd.smtp, with getmembers/signature memoised per class."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_inspect, name)

    @staticmethod
    def getmembers(obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        if predicate is not None or isinstance(obj, type):
            return _inspect.getmembers(obj, predicate)
        return [(name, getattr(obj, name)) for name in _auth_names(type(obj))]

    @staticmethod
    def signature(obj: Any, **kwargs: Any) -> _inspect.Signature:
        func = getattr(obj, "__func__", None)
        if func is None or kwargs:
            return _inspect.signature(obj, **kwargs)
        bound = _signature(func)
        params = list(bound.parameters.values())[1:]  # drop `self`, as for a bound method
        return bound.replace(parameters=params)


_aiosmtpd_smtp.inspect = _CachedInspect("inspect")  # type: ignore[attr-defined]
_aiosmtpd_smtp.dir = _dir  # type: ignore[attr-defined]


_PLAIN_ADDRESS_BAD = frozenset('"\\ ()<>,;:[]\t')


class FastAddressParsing:
    """Mixin for SMTP: parse the common `<local@domain>` form without email's header parser.

    aiosmtpd parses every MAIL/RCPT address with email._header_value_parser (~0.1 ms each);
    plain addresses, by far the most common, need only a split. Anything unusual (quotes,
    source routes, address literals) still goes through aiosmtpd's full parser."""

    local_part_limit: int

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        text = arg.lstrip() if arg else arg
        if text and text[0] == "<":
            end = text.find(">")
            inner = text[1:end] if end > 0 else None
            if inner is not None and not _PLAIN_ADDRESS_BAD.intersection(inner):
                local, at, domain = inner.rpartition("@")
                if inner == "" or (at and local and domain and "@" not in local):
                    if self.local_part_limit and len(local) > self.local_part_limit:
                        return None, None
                    return inner, text[end + 1:]
        return super()._getaddr(arg)  # type: ignore[misc]
