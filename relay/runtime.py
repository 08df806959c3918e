"""The live config of one process: a `Runtime` (the Config and every object built from it)
behind a `Live` handle with an epoch, replaced whole at SIGHUP (relay/reload.py).

Derived state (keys, certificates, SSL contexts, lookups) is built here and only here, each
kind by its own `from_config(config)`, so that a reload rebuilds all of it from the new Config
and a failure to build any of it refuses the reload with the old bundle kept. To add a kind,
add one field line to `Runtime`:
`name: Type | None = field(default=None, metadata=built_by(Type.from_config))`.

This module sits above the packages (like relay/serve.py): it may import smtp, policy and
delivery; none of them imports it. Components are handed what they need when a Runtime comes
into force (relay/serve.py's `apply_*` functions), and read it at the start of a session,
job or attempt.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.config import Config
from relay.delivery.spf import SpfChecker
from relay.delivery.tls import CaFileError, TlsContexts
from relay.delivery.webhooks import Webhooks
from relay.policy.dkim import Signer
from relay.policy.smime import Smime
from relay.smtp.auth import Users, load_users
from relay.smtp.priority import SenderPriority
from relay.smtp.senderauth import SenderAuth


class BuildFailed(Exception):
    """Derived state that could not be built: one `FILE: KEY: problem` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def built_by(build: Callable[[Config], Any]) -> dict[str, Any]:
    """Metadata of a Runtime field built from the Config by `build` (which raises an exception
    with a `problems` list of `FILE: KEY: problem` lines, or any other exception, on failure)."""
    return {"build": build}


def users_from_config(config: Config) -> Users | None:
    """The AUTH accounts of `server.users_file`; None without one (no AUTH offered)."""
    path = config.server.users_file
    return Users(load_users(path)) if path is not None else None


def server_tls_from_config(config: Config) -> ssl.SSLContext | None:
    """The context for STARTTLS and `listen_tls`; None without `server.tls_cert`."""
    server = config.server
    if not server.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server.tls_cert, server.tls_key)
    return ctx


def client_tls_from_config(config: Config) -> TlsContexts:
    """Delivery's SSL contexts (no-verify, and verifying when a destination needs it)."""
    try:
        return TlsContexts.from_config(config)
    except CaFileError as exc:
        raise BuildFailed([f"{config.source_name}: delivery.tls_ca_file: {exc}"]) from None


@dataclass(frozen=True)
class Runtime:
    config: Config
    epoch: int = 1
    # --- derived state: one line per kind ---
    signer: Signer | None = field(default=None, metadata=built_by(Signer.from_config))
    sender_auth: SenderAuth | None = field(default=None, metadata=built_by(SenderAuth.from_config))
    users: Users | None = field(default=None, metadata=built_by(users_from_config))
    server_tls: ssl.SSLContext | None = field(default=None,
                                              metadata=built_by(server_tls_from_config))
    smime: Smime | None = field(default=None, metadata=built_by(Smime.from_config))
    sender_priority: SenderPriority | None = field(
        default=None, metadata=built_by(SenderPriority.from_config))
    client_tls: TlsContexts | None = field(default=None,
                                           metadata=built_by(client_tls_from_config))
    spf: SpfChecker | None = field(default=None, metadata=built_by(SpfChecker.for_egress))
    webhooks: Webhooks | None = field(default=None, metadata=built_by(Webhooks.from_config))

    @classmethod
    def build(cls, config: Config, epoch: int = 1) -> Runtime:
        """Build every derived object from `config`; BuildFailed listing each that failed.

        Reads files (keys, certificates): call it off the event loop."""
        problems: list[str] = []
        built: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            build = f.metadata.get("build")
            if build is None:
                continue
            try:
                built[f.name] = build(config)
            except Exception as exc:  # every kind says what failed; never a traceback
                lines = getattr(exc, "problems", None)
                problems.extend(lines if isinstance(lines, list) else
                                [f"{config.source_name}: {f.name}: {type(exc).__name__}: {exc}"])
        if problems:
            raise BuildFailed(problems)
        return cls(config, epoch, **built)


class Live:
    """The one owner of this process's Runtime. `swap` replaces it whole (the event loop is
    single-threaded, so a reader sees the old bundle or the new one, never a mix)."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    @property
    def epoch(self) -> int:
        return self.current.epoch

    @property
    def config(self) -> Config:
        return self.current.config

    def swap(self, runtime: Runtime) -> None:
        self.current = runtime


# --- what a reload may change in place ---------------------------------------------------------

# Keys that are bound at start (sockets, the queue folder and its segments, memory shared across
# the fork, servers started once): a new value waits for a restart; the old one stays in force.
RESTART_KEYS: tuple[tuple[str, str], ...] = (
    ("server", "listen"),
    ("server", "listen_tls"),
    ("server", "auth_failure_limit"),  # its buckets are shared memory sized before the fork
    ("queue", "path"),
    ("queue", "segment_size"),
    ("queue", "min_free_space"),       # intake's free-space guard is set up once
    ("http", "listen"),
    ("cluster", "redis"),
    ("log", "format"),
)
SECTIONS = ("server", "queue", "dns", "delivery", "http", "policies", "cluster", "log")


def keep_restart_keys(new: Config, old: Config) -> tuple[Config, list[str]]:
    """`new` with the restart keys' values of `old`, and the names of those that differ."""
    waiting = []
    for section, key in RESTART_KEYS:
        before = getattr(getattr(old, section), key)
        if getattr(getattr(new, section), key) != before:
            waiting.append(f"{section}.{key}")
            table = dataclasses.replace(getattr(new, section), **{key: before})
            new = dataclasses.replace(new, **{section: table})
    return new, waiting


def changes(new: Config, old: Config) -> dict[str, object]:
    """What a reload changed, coarsely: section names, policy kinds and their counts."""
    changed = [name for name in SECTIONS if getattr(new, name) != getattr(old, name)]
    for kind in ("destinations", "senders", "recipients"):
        if getattr(new, kind) != getattr(old, kind):
            changed.append(kind)
    return {"changed": ",".join(changed) or "none", "destinations": len(new.destinations),
            "senders": len(new.senders), "recipients": len(new.recipients)}
