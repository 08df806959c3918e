"""A configurable SMTP sink (aiosmtpd in a background thread) for tests of outbound delivery.

    with Sink(rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("bad") else None) as sink:
        ... deliver to 127.0.0.1:sink.port ...
        [msg] = sink.wait_for(1)

It runs its own event loop in a thread, so tests on any loop (or in another process, talking to it
over TCP) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax
from relayproc import free_port

DATA_SIZE_LIMIT = 32 * 1024 * 1024  # messages up to 30 MiB must fit


@dataclass(frozen=True, slots=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly the bytes received, dot-unstuffed, CRLF kept
    peer: tuple[str, int]
    tls: bool
    mail_options: list[str]
    helo: str


class _SinkSMTP(SMTP):
    # The stock 1001 also sizes the StreamReader buffer, which makes big bodies slow and
    # refuses long XML lines that real receivers accept.
    line_length_limit = 65_536

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self._sink = sink
        super().__init__(_Handler(sink), **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink._connections.add(self)
        self._sink.connected.append(time.monotonic())
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._connections.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        code = self._sink.greeting_code
        if code != 220:
            await self.push(f"{code} {self.hostname} service refused")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if not self._sink.broken_tls:
            await super().smtp_STARTTLS(arg)
            return
        # Agree, then answer the ClientHello with garbage and hang up.
        await self.push("220 Ready to start TLS")
        await self._reader.read(1)
        self._writer.write(b"this is not a TLS record\r\n")
        assert self.transport is not None
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _close_if_421(server: SMTP, reply: str) -> str:
    # A 421 means "closing the channel": flush the reply, then close (see dependencies.md §1).
    if reply.startswith("421"):
        assert server.transport is not None
        asyncio.get_running_loop().call_soon(server.transport.close)
    return reply


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # with an EHLO hook aiosmtpd leaves this to us
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if not self.sink.eight_bit_mime:
            responses = [r for r in responses if r[4:] != "8BITMIME"]
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> Any:
        if self.sink.mail_reply is not None:
            return _close_if_421(server, self.sink.mail_reply)
        return MISSING

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> Any:
        if self.sink.hang == "rcpt":
            await self.sink._hang()
        if self.sink.peer_reply is not None:
            reply = self.sink.peer_reply(session.peer[0])
            if reply is not None:
                return _close_if_421(server, reply)
        if self.sink.rcpt_reply is not None:
            reply = self.sink.rcpt_reply(address)
            if reply is not None:
                return _close_if_421(server, reply)
        return MISSING

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        if sink._should_drop():
            assert server.transport is not None
            server.transport.abort()
            # connection_lost() cancels this coroutine: no reply is ever sent.
            await asyncio.get_running_loop().create_future()
        if sink.hang == "dot":
            await sink._hang()
        if sink.accept_delay:
            await asyncio.sleep(sink.accept_delay)
        content = envelope.original_content or b""
        reply = sink.data_reply(content) if sink.data_reply is not None else None
        if reply is not None and not reply.startswith("2"):
            return _close_if_421(server, reply)
        sink._record(Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=content,
            peer=(session.peer[0], session.peer[1]),
            tls=session.ssl is not None,
            mail_options=list(envelope.mail_options),
            helo=session.host_name or "",
        ))
        return reply or "250 2.0.0 OK queued"


class Sink:
    """An SMTP server on `host:port` (port 0 picks a free one; read `sink.port` after start()).

    Options: `pipelining` adds PIPELINING to EHLO (stock aiosmtpd lacks it); `starttls` offers
    STARTTLS with that context; `broken_tls` offers STARTTLS, answers 220, then sends garbage
    and hangs up; `eight_bit_mime=False` leaves 8BITMIME out of EHLO (a 7-bit hop);
    `greeting_code` other than 220 greets with that code and closes; `mail_reply`
    answers every MAIL; `rcpt_reply(address)` / `data_reply(content)` return a reply to refuse
    (None accepts); any "421 ..." reply also closes the connection after it is sent;
    `drop_after_dot` (bool, or called with a counter of final dots 1, 2, 3 ...) aborts the
    connection after the final dot without replying and counts it in `dropped`;
    `accept_delay` waits that many seconds before replying to the final dot; `hang` ("rcpt" or
    "dot", settable while running) never answers that RCPT or the final dot, until the connection
    goes (`drop_connections()`), and counts the sessions stuck so in `hung`;
    `peer_reply(client_address)` refuses every RCPT of that client address (None accepts).
    `connected` lists when each connection came in (time.monotonic()).
    Accepted messages land in `messages` as `Received`; `dots` counts final dots that arrived.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pipelining: bool = True,
        starttls: ssl.SSLContext | None = None,
        broken_tls: bool = False,
        smtputf8: bool = True,
        eight_bit_mime: bool = True,
        greeting_code: int = 220,
        mail_reply: str | None = None,
        rcpt_reply: Callable[[str], str | None] | None = None,
        peer_reply: Callable[[str], str | None] | None = None,
        data_reply: Callable[[bytes], str | None] | None = None,
        drop_after_dot: Callable[[int], bool] | bool = False,
        accept_delay: float = 0,
        hang: str | None = None,
        hostname: str = "sink.test",
        data_size_limit: int = DATA_SIZE_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.pipelining = pipelining
        self.starttls = starttls
        self.broken_tls = broken_tls
        self.smtputf8 = smtputf8
        self.eight_bit_mime = eight_bit_mime
        self.greeting_code = greeting_code
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.peer_reply = peer_reply
        self.connected: list[float] = []
        self.data_reply = data_reply
        self.drop_after_dot = drop_after_dot
        self.accept_delay = accept_delay
        self.hang = hang
        self.hung = 0
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.messages: list[Received] = []
        self.dropped = 0
        self._counter = 0  # messages whose final dot arrived (accepted, refused or dropped)
        self._lock = threading.Lock()
        self._connections: set[_SinkSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Sink:
        if self._thread is not None:
            raise RuntimeError("sink already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name=f"sink-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("sink did not start within 10 s")
        if failure:
            self._thread.join(5)
            self._thread = None
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._make_protocol, self.host, self.port, backlog=1024, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _make_protocol(self) -> _SinkSMTP:
        tls_context = self.starttls
        if tls_context is None and self.broken_tls:
            # Only needs to be truthy so that STARTTLS is announced; the handshake never happens.
            tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        return _SinkSMTP(
            self,
            hostname=self.hostname,
            ident="invoice-relay test sink",
            tls_context=tls_context,
            enable_SMTPUTF8=self.smtputf8,
            data_size_limit=self.data_size_limit,
            timeout=300,  # also bounds DATA and handle_DATA (dependencies.md trap 2)
        )

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already gone
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in list(self._connections):
            protocol.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def drop_connections(self) -> None:
        """Abort every open connection without a reply (callable from any thread)."""
        loop = self._loop
        assert loop is not None

        def abort_all() -> None:
            for protocol in list(self._connections):
                protocol.abort()

        loop.call_soon_threadsafe(abort_all)

    # ------------------------------------------------------------- results

    @property
    def dots(self) -> int:
        with self._lock:
            return self._counter

    async def _hang(self) -> None:
        with self._lock:
            self.hung += 1
        await asyncio.get_running_loop().create_future()  # connection_lost() cancels us

    def _should_drop(self) -> bool:
        with self._lock:
            self._counter += 1
            counter = self._counter
        drop = self.drop_after_dot
        decision = drop(counter) if callable(drop) else bool(drop)
        if decision:
            with self._lock:
                self.dropped += 1
        return decision

    def _record(self, received: Received) -> None:
        with self._lock:
            self.messages.append(received)

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """Wait until at least `count` messages were accepted; return a snapshot of all."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.messages)
            if len(snapshot) >= count:
                return snapshot
            if time.monotonic() >= deadline:
                arrived = [(m.mail_from, m.rcpt_tos, len(m.data)) for m in snapshot]
                raise AssertionError(
                    f"sink {self.address}: expected {count} message(s) within {timeout}s, "
                    f"got {len(snapshot)}: {arrived} (dropped after dot: {self.dropped})"
                )
            time.sleep(0.01)


def shared_port(hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"),
                ) -> int:
    """A port that is free on every one of `hosts` (for MX hosts that all listen on port P)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError("no port free on all test addresses")
