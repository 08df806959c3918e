"""Which config keys the relay parses but does not enforce yet: the one table to edit.

The contract names keys for capabilities that arrive in later releases. They are parsed and
checked now (so nobody writes them wrong), but a key that does nothing must never look as if it
did: `check-config` reports every such key SET in the user's files as `FILE: KEY: not enforced
yet`, a warning, and `serve` logs it. A "security" key is a protection (encryption, verified
TLS, access control): the relay refuses to run with one configured and off, so it is an error
in `check-config` and `serve` exits 78.

When a release makes a key real, it deletes that key's line from NOT_ENFORCED.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["warning", "security"]
NOT_ENFORCED_TEXT = "not enforced yet"


@dataclass(frozen=True, slots=True)
class NotEnforced:
    """A key path (`[]` for any index) and the values that ask for nothing beyond what runs.

    `harmless` lists values that ask for nothing the relay does not do (`tls =
    "opportunistic"`, an empty token; for a key enforced for some values only, those values):
    setting them is not reported.
    """

    kind: Kind
    harmless: tuple[object, ...] = ()


# Key paths as `check-config` prints them, with `[]` for "any index". Main config keys start
# with their section; policy keys with their table (destination, sender, recipient).
NOT_ENFORCED: dict[str, NotEnforced] = {
}

_INDEX_RE = re.compile(r"\[\d+\]")


@dataclass(frozen=True, slots=True)
class Unenforced:
    """One key set in one file that the relay does not enforce yet."""

    file: str
    key: str  # dotted, with indices: destination[2].tls
    kind: Kind

    @property
    def line(self) -> str:
        return f"{self.file}: {self.key}: {NOT_ENFORCED_TEXT}"

    @property
    def security(self) -> bool:
        return self.kind == "security"


def _nodes(data: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) under a parsed TOML table, tables and arrays of tables
    included, in file order."""
    if isinstance(data, dict):
        for name, value in data.items():
            key = f"{path}.{name}" if path else name
            yield key, value
            yield from _nodes(value, key)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            if isinstance(item, dict):
                yield from _nodes(item, f"{path}[{index}]")


def find_unenforced(file: str, data: dict[str, Any]) -> list[Unenforced]:
    """The keys of NOT_ENFORCED that one parsed file sets to a value that asks for something."""
    found = []
    for key, value in _nodes(data, ""):
        entry = NOT_ENFORCED.get(_INDEX_RE.sub("[]", key))
        if entry is None or _is_harmless(value, entry.harmless):
            continue
        found.append(Unenforced(file, key, entry.kind))
    return found


def _is_harmless(value: object, harmless: tuple[object, ...]) -> bool:
    # `0 == False` in Python: compare types too, so `false` never counts as "0".
    return any(type(value) is type(h) and value == h for h in harmless)
