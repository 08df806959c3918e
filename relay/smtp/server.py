"""The inbound SMTP server: listeners, the state shared by their sessions, orderly shutdown.

Intake never does DNS and never blocks the event loop: spool writes and fsyncs happen on the
committer's threads, password checks on a worker thread. One session is relay.smtp.session.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from relay import metrics
from relay.addresses import HostPort, in_networks
from relay.queue.committer import Committer
from relay.queue.space import FreeSpaceGuard
from relay.smtp import replies
from relay.smtp.anvil import Anvil
from relay.smtp.authlimit import AuthFailureLimiter
from relay.smtp.priority import SenderPriority
from relay.smtp.senderauth import SenderAuth
from relay.smtp.session import RelaySMTP

if TYPE_CHECKING:
    from relay.config.values import Rate
    from relay.policy.smime import Smime
    from relay.queue.dedupe import DedupeTable

LISTEN_BACKLOG = 1024


class UserStore(Protocol):
    """What intake needs from the users file (relay.smtp.auth.Users)."""

    async def check(self, username: str, password: str) -> bool: ...


@dataclass
class IntakeContext:
    """State shared by every inbound session of this process."""

    hostname: str
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
    max_message_size: int
    committer: Committer
    users: UserStore | None = None
    tls_context: ssl.SSLContext | None = None
    draining: bool = False
    sessions: set[RelaySMTP] = field(default_factory=set)
    space: FreeSpaceGuard | None = None   # refuse new mail below [queue] min_free_space
    error_soft_limit: int = 10            # [server] error_*: see RelaySMTP._next_command
    error_hard_limit: int = 20
    error_delay: float = 1.0
    idle_timeout: float = 300.0
    auth_limiter: AuthFailureLimiter | None = None
    sender_auth: SenderAuth | None = None   # None: no [[sender]] has clients, nothing to check
    smime: Smime | None = None   # None: no [[recipient]] asks for encryption, nothing to check
    # `[[sender]] priority`; None: every sender is normal, nothing to look up
    sender_priority: SenderPriority | None = None
    # Backpressure (relay.smtp.anvil: counted across the intake processes) and duplicates.
    anvil: Anvil | None = None
    max_connections: int = 1000
    max_connections_per_client: int = 50
    max_messages_per_client: Rate | None = None
    max_queued: int = 1_000_000
    dedupe: DedupeTable | None = None
    dedupe_window: float = 0.0          # 0: off
    _trust_cache: dict[str, bool] = field(default_factory=dict)

    def is_trusted(self, peer: str) -> bool:
        known = self._trust_cache.get(peer)
        if known is None:
            if len(self._trust_cache) > 10_000:
                self._trust_cache.clear()
            known = self._trust_cache[peer] = in_networks(peer, self.trusted)
        return known


def bind_listeners(listen: Sequence[HostPort], listen_tls: Sequence[HostPort]
                   ) -> list[tuple[socket.socket, bool]]:
    """Bind every listener: (socket, implicit TLS?) pairs, ready to be shared by processes."""
    bound: list[tuple[socket.socket, bool]] = []
    try:
        for hps, implicit_tls in ((listen, False), (listen_tls, True)):
            for hp in hps:
                family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
                sock = socket.create_server((hp.host, hp.port), family=family,
                                            backlog=LISTEN_BACKLOG)
                sock.setblocking(False)
                bound.append((sock, implicit_tls))
    except OSError as exc:
        for sock, _ in bound:
            sock.close()
        raise OSError(exc.errno, f"cannot listen on {hp}: {exc.strerror or exc}") from exc
    return bound


class Intake:
    """The listeners of this process and their orderly shutdown."""

    def __init__(self, ctx: IntakeContext, listen: Sequence[HostPort],
                 listen_tls: Sequence[HostPort]) -> None:
        self.ctx = ctx  # replaced by `apply` at a reload; each session keeps the one it began with
        self.listen = listen
        self.listen_tls = listen_tls
        self.servers: list[asyncio.base_events.Server] = []
        self._implicit_tls: dict[int, socket.socket] = {}  # index in servers -> its socket

    async def start(self, sockets: Sequence[tuple[socket.socket, bool]] | None = None) -> None:
        """Listen on `listen`/`listen_tls`, or serve already bound `(socket, implicit_tls)`
        pairs (several intake processes accept from the same sockets)."""
        if sockets is None:
            sockets = bind_listeners(self.listen, self.listen_tls)
        for sock, implicit_tls in sockets:
            if implicit_tls:
                self._implicit_tls[len(self.servers)] = sock
            self.servers.append(await self._serve(sock, implicit_tls))

    async def _serve(self, sock: socket.socket, implicit_tls: bool) -> asyncio.base_events.Server:
        # The context is read per connection, so a reload applies to the next session.
        host, port = sock.getsockname()[:2]
        listener = metrics.listener_label(host, port)

        def session() -> RelaySMTP:
            return RelaySMTP(self.ctx, implicit_tls=implicit_tls, listener=listener)

        return await asyncio.get_running_loop().create_server(
            session, sock=sock, ssl=self.ctx.tls_context if implicit_tls else None,
            backlog=LISTEN_BACKLOG)  # create_server listens again: keep our backlog

    async def apply(self, ctx: IntakeContext) -> None:
        """Settings of a reload: the next session uses `ctx`; open sessions keep theirs.

        A listen_tls server holds its SSL context from its start, so when the certificate
        changed it is started again on a duplicate of the same listening socket (no
        connection is refused in between; accepted ones stay open) and the old one closed."""
        old, self.ctx = self.ctx, ctx
        if ctx.tls_context is old.tls_context or ctx.draining:
            return
        for index, sock in list(self._implicit_tls.items()):
            twin = sock.dup()
            twin.setblocking(False)
            previous = self.servers[index]
            self.servers[index] = await self._serve(twin, True)
            self._implicit_tls[index] = twin
            previous.close()

    def bound(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for srv in self.servers for sock in srv.sockets]

    async def drain(self, grace: float) -> None:
        """Stop listening now; let DATA in progress finish (up to `grace`); then close all."""
        for srv in self.servers:
            srv.close()
        self.ctx.draining = True
        for session in self.ctx.sessions:  # sessions begun before a reload hold an older ctx
            session.ctx.draining = True
        deadline = time.monotonic() + grace
        while any(s.in_data for s in self.ctx.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.ctx.sessions):
            if session.transport is not None and not session.transport.is_closing():
                session.write(replies.SHUTTING_DOWN.encode() + b"\r\n")
                session.transport.close()
        await asyncio.sleep(0)
