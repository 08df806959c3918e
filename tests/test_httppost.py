"""relay.delivery.httppost against a raw loopback server that answers exactly what each test
scripts: the answer shapes a webhook receiver may send, and connections that go away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from relay.delivery.httppost import HttpError, PostClient

Script = Callable[[bytes, int], bytes | None]  # (request, nth request on the conn) -> answer


class RawServer:
    """Reads one request (head + Content-Length body) at a time and writes what the script
    returns; None closes the connection without answering."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for nth in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request, nth)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], asyncio.Future[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        server = RawServer(script)
        await server.start()
        servers.append(server)
        return server
    yield start  # type: ignore[misc]
    for server in servers:
        await server.stop()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_request_carries_body_and_headers_and_reuses_the_connection(serve) -> None:
    server = await serve(lambda request, nth: OK)
    client = PostClient()
    url = f"http://127.0.0.1:{server.port}/hooks/mail?x=1"
    for n in range(3):
        answer = await client.post(url, b'{"n": %d}' % n, {"X-Sig": "sha256=ab"}, 5)
        assert (answer.status, answer.reason) == (200, "OK")
    await client.close()
    first = server.requests[0]
    assert first.startswith(b"POST /hooks/mail?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in first
    assert b"X-Sig: sha256=ab\r\n" in first and first.endswith(b'\r\n\r\n{"n": 0}')
    assert server.connections == 1  # keep-alive


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
])
async def test_answer_shapes_keep_the_connection_usable(serve, answer: bytes) -> None:
    server = await serve(lambda request, nth: answer)
    client = PostClient()
    url = f"http://127.0.0.1:{server.port}/"
    statuses = [(await client.post(url, b"{}", {}, 5)).status for _ in range(2)]
    await client.close()
    assert statuses[0] == statuses[1] and 200 <= statuses[0] < 300
    assert server.connections == 1


async def test_connection_close_and_unsized_bodies_are_not_reused(serve) -> None:
    answers = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.0 200 OK\r\n\r\nbody to the end"]
    server = await serve(lambda request, nth: answers[len(server.requests) - 1])
    client = PostClient()
    url = f"http://127.0.0.1:{server.port}/"
    assert (await client.post(url, b"{}", {}, 5)).status == 200
    assert (await client.post(url, b"{}", {}, 5)).status == 200
    await client.close()
    assert server.connections == 2


async def test_an_idle_connection_the_server_dropped_is_replaced_once(serve) -> None:
    # The first connection answers once and then closes on the next request unanswered.
    server = await serve(lambda request, nth: OK if nth == 0 else None)
    client = PostClient()
    url = f"http://127.0.0.1:{server.port}/"
    assert (await client.post(url, b"1", {}, 5)).status == 200
    assert (await client.post(url, b"2", {}, 5)).status == 200  # on a new connection
    await client.close()
    assert server.connections == 2


async def test_errors_are_httperrors_or_timeouts(serve) -> None:
    client = PostClient()
    garbage = await serve(lambda request, nth: b"SMTP 220 hello\r\n\r\n")
    with pytest.raises(HttpError, match=r"not an HTTP/1\.x answer"):
        await client.post(f"http://127.0.0.1:{garbage.port}/", b"{}", {}, 5)
    silent = await serve(lambda request, nth: b"")
    with pytest.raises(TimeoutError):
        await client.post(f"http://127.0.0.1:{silent.port}/", b"{}", {}, 0.3)
    closed = await serve(lambda request, nth: None)
    with pytest.raises(HttpError):
        await client.post(f"http://127.0.0.1:{closed.port}/", b"{}", {}, 5)
    with pytest.raises(HttpError, match="cannot connect"):
        await client.post("http://127.0.0.1:9/", b"{}", {}, 5)
    with pytest.raises(HttpError, match="not an http"):
        await client.post("ftp://127.0.0.1/", b"{}", {}, 5)
    await client.close()
