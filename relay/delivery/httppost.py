"""A small HTTP/1.1 client that does one thing: POST a body and read the status, over
keep-alive connections (the webhook sender's transport).

Why not aiohttp here: a webhook event is sent for every delivered invoice, in the delivery
process, and bench/observe measured aiohttp's client at roughly a quarter of the delivery
process's CPU per message. This client writes one request in one `write()` and parses only
what it needs of the answer (status line, Content-Length, chunked bodies, Connection: close),
at a small fraction of that cost. Redirects are never followed (a webhook URL is configured,
not discovered); proxies from the environment are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 65536          # bytes of status line and headers we read at most
MAX_BODY = 1 << 20        # bytes of response body we drain at most before giving up on reuse
USER_AGENT = "invoice-relay"


class HttpError(Exception):
    """The exchange failed (connection, TLS, a malformed answer)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _split(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Origin(parts.scheme, parts.hostname, port), path


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class PostClient:
    """Keep-alive connections per origin, reused one request at a time (the caller bounds
    how many requests run at once)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._targets: dict[str, tuple[_Origin, bytes]] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> Answer:
        """POST `body`; the answer's status. HttpError or TimeoutError when there is none."""
        origin, start = self._target(url)
        head = [f"{name}: {value}\r\n" for name, value in headers.items()]
        request = b"".join((start, b"Content-Length: %d\r\n" % len(body),
                            "".join(head).encode("latin-1"), b"\r\n", body))
        async with asyncio.timeout(timeout):
            conn, reused = await self._connection(origin)
            try:
                answer, keep = await self._exchange(conn, request)
            except (HttpError, OSError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if not reused:
                    raise HttpError(str(exc) or type(exc).__name__) from exc
                # The server may close an idle connection just as we reuse it: once more on a
                # new one (the event carries an id for the receiver's dedupe either way).
                conn, _ = await self._connection(origin, fresh=True)
                try:
                    answer, keep = await self._exchange(conn, request)
                except (HttpError, OSError, asyncio.IncompleteReadError) as again:
                    conn.close()
                    raise HttpError(str(again) or type(again).__name__) from again
            except BaseException:
                conn.close()  # cancelled or timed out mid-exchange: the stream is unusable
                raise
        if keep:
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()
        return answer

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        """The URL's origin and the request's first lines, worked out once per URL."""
        known = self._targets.get(url)
        if known is None:
            origin, path = _split(url)
            start = (f"POST {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                     f"User-Agent: {USER_AGENT}\r\n").encode("latin-1")
            if len(self._targets) > 1000:  # URLs come from the policies: a reload may change them
                self._targets.clear()
            known = self._targets[url] = (origin, start)
        return known

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _connection(self, origin: _Origin, fresh: bool = False
                          ) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        while idle and not fresh:
            conn = idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn, True
            conn.close()
        tls = None
        if origin.scheme == "https":
            tls = self._tls or ssl.create_default_context()
        try:
            reader, writer = await asyncio.open_connection(
                origin.host, origin.port, ssl=tls, limit=MAX_HEAD,
                server_hostname=origin.host if tls is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"cannot connect to {origin.host}:{origin.port}: "
                            f"{exc.strerror or exc}" if isinstance(exc, OSError)
                            else str(exc)) from exc
        return _Connection(reader, writer), False

    async def _exchange(self, conn: _Connection, request: bytes) -> tuple[Answer, bool]:
        conn.writer.write(request)
        await conn.writer.drain()
        while True:
            answer, headers = await _read_head(conn.reader)
            if answer.status >= 200:
                break  # a 1xx (100 Continue) is followed by the real answer
        keep = await _drain_body(conn.reader, answer.status, headers)
        if headers.get("connection", "").lower() == "close":
            keep = False
        return answer, keep


async def _read_head(reader: asyncio.StreamReader) -> tuple[Answer, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HttpError("response headers too long") from exc
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Answer(int(code), reason.strip()), headers


async def _drain_body(reader: asyncio.StreamReader, status: int,
                      headers: dict[str, str]) -> bool:
    """Read and drop the answer's body; whether the connection can carry another request."""
    if status in (204, 304):
        return True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError as exc:
                raise HttpError("malformed chunked body") from exc
            if size == 0:  # the last chunk: trailer lines (rare), then an empty line
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return True
            total += size
            if total > MAX_BODY:
                return False
            await reader.readexactly(size + 2)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HttpError("malformed Content-Length")
        if int(length) > MAX_BODY:
            return False
        await reader.readexactly(int(length))
        return True
    return False  # the body runs to the end of the connection: do not reuse it

