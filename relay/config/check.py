"""Loading and checking the whole config: finding the file, `load_config` (main config,
then the policy folder, then the keys not enforced yet: warnings, or problems when strict),
`check_config_command` and `load_or_exit` for serve.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from relay.config.main import (
    DEFAULTS_NAME,
    Config,
    ServerConfig,
    _delivery,
    _policies_section,
    _queue,
    _server,
    _simple_sections,
)
from relay.config.policies import (
    _PolicyContext,
    _read_policies,
)
from relay.config.report import (
    ConfigError,
    _read_toml,
    _Report,
    _Table,
)
from relay.config_status import find_unenforced
from relay.exitcodes import EXIT_CONFIG
from relay.smtp.auth import load_users

EX_CONFIG = EXIT_CONFIG  # the name the rest of relay.config has always used
SYSTEM_CONFIG = Path("/etc/invoice-relay/relay.toml")
ENV_CONFIG = "INVOICE_RELAY_CONFIG"


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

    `check_files` also reports what only check-config looks at (unknown `user:` names in
    `clients`); check-config asks for it. DKIM keys and webhook secrets are always read and
    checked. Keys the relay does not enforce yet (relay/config_status.py) become
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
    dns, http, cluster, log = _simple_sections(root, base)
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


def _user_names(server: ServerConfig) -> frozenset[str] | None:
    """The user names of users_file (its problems are reported with the server section)."""
    if server.users_file is None:
        return None
    try:
        return frozenset(load_users(server.users_file))
    except (OSError, ValueError, UnicodeDecodeError):
        return frozenset()


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
    # Only a warning here: the config may be checked on another machine than the relay's.
    _print_lines(unbindable_sources(config), sys.stderr)
    print(_summary(config, name))
    return 0


def unbindable_sources(config: Config) -> list[str]:
    """`FILE: delivery.source_addresses[i].address: ...` for each outbound address this
    machine cannot bind (`serve` refuses to start with one: exit 1, it may come up later)."""
    problems = []
    for index, source in enumerate(config.delivery.source_addresses):
        family = socket.AF_INET6 if source.address.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((str(source.address), 0))
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            problems.append(f"{config.source_name}: delivery.source_addresses[{index}].address:"
                            f" cannot bind {source.address} on this machine: {why}")
    return problems


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


def load_or_report(cli_value: str | None) -> Config | None:
    """The config for an operator command (queue, status, doctor); None after printing its
    problems to stderr (the command then exits 1)."""
    try:
        return load_config(find_config_file(cli_value))
    except ConfigError as exc:
        _print_lines(exc.problems, sys.stderr)
        return None
