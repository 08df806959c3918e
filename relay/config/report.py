"""Reading a TOML file and reporting its problems: `ConfigError`, the per-file `_Report` of
`FILE: KEY: what is wrong` lines (and warnings), and `_Table`, a TOML table read key by key
that reports wrong values and unknown keys with their dotted path.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from relay.config.values import T, _describe


class ConfigError(Exception):
    """The config cannot be used; `problems` holds one `FILE: KEY: what is wrong` a line,
    `warnings` the warning lines found on the way (shown too, so one round shows all)."""

    def __init__(self, problems: list[str], warnings: Iterable[str] = ()) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.warnings = list(warnings)


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


def read_bytes(path: Path) -> bytes:
    """A file a key names (a certificate, a DKIM key); ValueError saying what is wrong."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
