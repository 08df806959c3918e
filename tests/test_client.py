"""relay.delivery.client against the aiosmtpd sink and small scripted servers (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from certs import Certs, client_context, make_certs, server_context
from sink import Sink

from relay.delivery.client import (
    Abandoned,
    ConnectFailed,
    ConnectionLost,
    LocalAddressError,
    Reply,
    ReplyError,
    SmtpClient,
    SmtpTimeout,
    Timeouts,
    TlsFailed,
    stuff_dots,
)

HELO = "out1.relay.test"
FAST = Timeouts(connect=2, greeting=2, ehlo=2, starttls=2, mail=2, rcpt=2, data_init=2,
                data_block=2, data_end=2, quit=1)
MESSAGE = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: invoice\r\n\r\nbody\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _refuse(address: str) -> str | None:
    if address.startswith("bad"):
        return "550 5.1.1 <bad@example.test>: no such user"
    if address.startswith("full"):
        return "452 4.2.2 mailbox full"
    return None


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def sink() -> Iterator[Sink]:
    """Overrides conftest's plain sink: bad* recipients get 550, full* get 452."""
    with Sink(rcpt_reply=_refuse) as running:
        yield running


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[int]:
    """A scripted server on the test's own loop; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *extensions: str) -> None:
    writer.write(b"220 raw.test ESMTP\r\n")
    await reader.readuntil(b"\r\n")  # EHLO
    lines = ["raw.test", *extensions]
    text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    writer.write(text.encode())


async def connect(port: int, **kwargs: object) -> SmtpClient:
    return await SmtpClient.connect("127.0.0.1", port, helo_name=HELO, timeouts=FAST,
                                    **kwargs)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ replies and stuffing


def test_reply_properties() -> None:
    reply = Reply(550, "550-first line\n550 5.1.1 <x@y>: no such user")
    assert reply.enhanced == "5.1.1"
    assert reply.is_permanent and not reply.is_ok and not reply.is_temporary
    assert Reply(250, "250 OK").enhanced is None
    assert Reply(451, "451 4.3.0").enhanced == "4.3.0"
    assert Reply(451, "451 4.3.0try").enhanced is None
    assert Reply(250, "250").enhanced is None


def test_stuff_dots_is_fast_and_exact() -> None:
    assert b"".join(stuff_dots(b".a\r\n..b\r\n.\r\n")) == b"..a\r\n...b\r\n..\r\n.\r\n"
    assert b"".join(stuff_dots(b"no crlf")) == b"no crlf\r\n.\r\n"
    assert b"".join(stuff_dots(b"")) == b".\r\n"
    # ~200 KiB of invoice text with a dot line every 50 lines.
    text = b"Invoice no. 4711, total 12.50 EUR, see www.example.test for details.\r\n" * 49
    body = (text + b".signature\r\n") * 60
    assert len(body) > 200_000
    assert b"".join(stuff_dots(body)) == body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    best = min(_cpu_time(lambda: stuff_dots(body)) for _ in range(7))
    assert best < 0.001, f"dot-stuffing 200 KiB took {best * 1000:.2f} ms of CPU"


def _cpu_time(work: Callable[[], object]) -> float:
    # Thread CPU time, not wall time: other test processes on a busy machine must not count.
    start = time.thread_time()
    work()
    return time.thread_time() - start


# ------------------------------------------------------------------------ transactions


async def test_pipelined_three_recipients(sink: Sink) -> None:
    client = await connect(sink.port)
    assert client.supports("pipelining")
    tx = await client.send("a@sender.test", ["ok@example.test", "bad@example.test",
                                             "full@example.test"], MESSAGE)
    assert tx.mail.code == 250
    assert [r.code for r in tx.rcpt.values()] == [250, 550, 452]
    assert tx.rcpt["bad@example.test"].enhanced == "5.1.1"
    assert tx.rcpt["bad@example.test"].text == "550 5.1.1 <bad@example.test>: no such user"
    assert tx.rcpt["full@example.test"].is_temporary
    assert tx.data is not None and tx.data.code == 250
    assert tx.accepted == ["ok@example.test"] and not tx.outcome_unknown
    assert client.usable
    await client.quit()
    [received] = sink.wait_for(1)
    assert received.rcpt_tos == ["ok@example.test"] and received.data == MESSAGE
    assert received.helo == HELO and not received.tls


async def test_serial_without_pipelining() -> None:
    with Sink(pipelining=False, rcpt_reply=_refuse) as sink:
        client = await connect(sink.port)
        assert not client.supports("PIPELINING")
        tx = await client.send("a@sender.test", ["ok@example.test", "bad@example.test",
                                                 "full@example.test"], MESSAGE)
        assert [r.code for r in tx.rcpt.values()] == [250, 550, 452]
        assert tx.data is not None and tx.data.is_ok
        assert tx.accepted == ["ok@example.test"]
        tx = await client.send("a@sender.test", ["bad@example.test"], MESSAGE)
        assert tx.data is None and tx.accepted == [] and client.usable
        await client.quit()
        assert len(sink.wait_for(1)) == 1


async def test_pipelining_really_pipelines_and_ends_an_empty_354() -> None:
    """The server replies only once DATA has arrived: a serial client would time out."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, "PIPELINING")
        seen.append(await asyncio.wait_for(reader.readuntil(b"DATA\r\n"), 1))
        writer.write(b"250 ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n354 go ahead\r\n")
        seen.append(await reader.readuntil(b"\r\n"))
        writer.write(b"250 empty message ok\r\n")
        seen.append(await reader.readuntil(b"\r\n"))
        writer.write(b"250 reset\r\n")
        await reader.readuntil(b"QUIT\r\n")
        writer.write(b"221 bye\r\n")

    async with raw_server(script) as port:
        client = await connect(port)
        tx = await client.send("a@s.test", ["x@y.test", "z@y.test"], MESSAGE)
        await client.quit()
    assert seen == [b"MAIL FROM:<a@s.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n",
                    b".\r\n", b"RSET\r\n"]
    assert tx.data is None and tx.accepted == [] and [r.code for r in tx.rcpt.values()] == [550] * 2


async def test_mail_refused_pipelined_keeps_the_connection_in_sync() -> None:
    with Sink(mail_reply="451 4.3.0 try later") as sink:
        client = await connect(sink.port)
        tx = await client.send("a@s.test", ["x@y.test", "z@y.test"], MESSAGE)
        assert tx.mail.code == 451 and tx.mail.enhanced == "4.3.0"
        assert tx.rcpt == {} and tx.data is None
        assert client.usable
        await client.rset()  # the reply stream is still aligned
        await client.quit()


async def test_dot_stuffing_round_trip(sink: Sink) -> None:
    bodies = [
        b"Subject: dots\r\n\r\n.leading\r\n..double\r\nmid . dle\r\n.\r\n",
        b".first line is a dot line\r\n.\r\n..\r\n",
        b"Subject: no final CRLF\r\n\r\nlast line",
    ]
    client = await connect(sink.port)
    for body in bodies:
        tx = await client.send("a@s.test", ["ok@y.test"], body)
        assert tx.accepted == ["ok@y.test"]
    await client.quit()
    received = [m.data for m in sink.wait_for(3)]
    assert received == [bodies[0], bodies[1], bodies[2] + b"\r\n"]


async def test_200k_8bit_body_with_smtputf8(sink: Sink) -> None:
    line = "Rechnung Nr. 4711 – Größe: äöü ß € 請求書 ".encode() * 20 + b"\r\n"
    body = b"Subject: =?utf-8?q?R=C3=A9sum=C3=A9?=\r\n\r\n" + line * (200 * 1024 // len(line))
    assert len(body) > 190_000
    sender, rcpt = "fakturá@absender.test", "empfänger@example.test"
    client = await connect(sink.port)
    tx = await client.send(sender, [rcpt], body, mail_params=["BODY=8BITMIME", "SMTPUTF8"])
    assert tx.accepted == [rcpt]
    await client.quit()
    [received] = sink.wait_for(1)
    assert received.data == body
    assert received.mail_from == sender and received.rcpt_tos == [rcpt]
    assert received.mail_options == ["BODY=8BITMIME", "SMTPUTF8", f"SIZE={len(body)}"]


async def test_5xx_after_data_then_reuse() -> None:
    def spam(data: bytes) -> str | None:
        return "554 5.7.1 looks like spam" if b"viagra" in data else None

    with Sink(data_reply=spam) as sink:
        client = await connect(sink.port)
        tx = await client.send("a@s.test", ["x@y.test"], b"Subject: viagra\r\n\r\nx\r\n")
        assert tx.data is not None and tx.data.code == 554 and tx.data.enhanced == "5.7.1"
        assert tx.rcpt["x@y.test"].is_ok and tx.accepted == []
        assert client.usable
        tx = await client.send("a@s.test", ["x@y.test"], MESSAGE)
        assert tx.accepted == ["x@y.test"]
        await client.quit()
        assert len(sink.wait_for(1)) == 1


async def test_reuse_one_connection_for_five_transactions(sink: Sink) -> None:
    client = await connect(sink.port)
    for number in range(5):
        tx = await client.send(f"s{number}@s.test", [f"r{number}@y.test"], MESSAGE)
        assert tx.accepted == [f"r{number}@y.test"]
    assert client.usable
    await client.quit()
    assert not client.usable
    messages = sink.wait_for(5)
    assert [m.mail_from for m in messages] == [f"s{n}@s.test" for n in range(5)]
    assert len({m.peer for m in messages}) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_421_mid_session_makes_the_client_unusable(pipelining: bool) -> None:
    def closing(address: str) -> str | None:
        return "421 4.3.2 shutting down" if address.startswith("b@") else None

    with Sink(pipelining=pipelining, rcpt_reply=closing) as sink:
        client = await connect(sink.port)
        tx = await client.send("s@s.test", ["a@y.test", "b@y.test", "c@y.test"], MESSAGE)
        assert [r.code for r in tx.rcpt.values()] == [250, 421, 421]
        assert tx.data is None and tx.accepted == []
        assert not client.usable
        with pytest.raises(ConnectionLost):
            await client.send("s@s.test", ["a@y.test"], MESSAGE)
        await client.quit()


async def test_drop_after_dot_is_outcome_unknown() -> None:
    with Sink(drop_after_dot=True) as sink:
        client = await connect(sink.port)
        tx = await client.send("s@s.test", ["a@y.test"], MESSAGE)
        assert tx.outcome_unknown and tx.data is None and tx.accepted == []
        assert not client.usable
        assert sink.dropped == 1 and sink.messages == []


async def test_server_closing_after_mail_is_connection_lost() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, "8BITMIME")
        await reader.readuntil(b"\r\n")  # MAIL, then hang up

    async with raw_server(script) as port:
        client = await connect(port)
        with pytest.raises(ConnectionLost) as caught:
            await client.send("s@s.test", ["a@y.test"], MESSAGE)
    assert caught.value.stage == "mail"
    assert not client.usable


# ------------------------------------------------------------------- connect and greeting


async def test_source_address_is_the_peer_the_sink_sees(sink: Sink) -> None:
    client = await connect(sink.port, source_address="127.0.0.2")
    await client.send("s@s.test", ["a@y.test"], MESSAGE)
    await client.quit()
    [received] = sink.wait_for(1)
    assert received.peer[0] == "127.0.0.2"


async def test_unconfigured_source_address_is_a_local_error(sink: Sink) -> None:
    with pytest.raises(LocalAddressError) as caught:
        await connect(sink.port, source_address="192.0.2.1")
    assert caught.value.stage == "connect"


async def test_greeting_554_is_reply_error() -> None:
    with Sink(greeting_code=554) as sink, pytest.raises(ReplyError) as caught:
        await connect(sink.port)
    assert caught.value.stage == "greeting"
    assert caught.value.reply is not None and caught.value.reply.code == 554


async def test_connection_refused_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        await connect(_free_port())
    assert not isinstance(caught.value, LocalAddressError)
    assert time.monotonic() - start < 0.5
    # What a DSN and `queue show` will say: readable, without Python's "[Errno 111]".
    assert str(caught.value).endswith("failed: Connection refused"), str(caught.value)


async def test_greeting_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(silent) as port:
        start = time.monotonic()
        with pytest.raises(SmtpTimeout) as caught:
            await SmtpClient.connect("127.0.0.1", port, helo_name=HELO,
                                     timeouts=Timeouts(greeting=0.5))
    assert 0.4 < time.monotonic() - start < 0.9
    assert caught.value.stage == "greeting"


async def test_a_shorter_timeout_after_a_longer_one_still_fires_on_time() -> None:
    """Each reply has its own deadline: a short one right after a long one is not extended."""
    async def greets_then_hangs(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await reader.read()

    async with raw_server(greets_then_hangs) as port:
        start = time.monotonic()
        with pytest.raises(SmtpTimeout) as caught:
            await SmtpClient.connect("127.0.0.1", port, helo_name=HELO,
                                     timeouts=Timeouts(greeting=30, ehlo=0.3))
    assert 0.25 < time.monotonic() - start < 0.9
    assert caught.value.stage == "ehlo"


@pytest.mark.parametrize("reply", [b"220 ok\r\n250-x\r\n" + b"250-" + b"y" * 3000 + b"\r\n",
                                   b"hello, I am not SMTP\r\n"])
async def test_garbage_replies_are_protocol_errors(reply: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if reply.startswith(b"220"):
            writer.write(b"220 raw.test\r\n")
            await reader.readuntil(b"\r\n")
            reply_after = reply[len(b"220 ok\r\n"):]
            writer.write(reply_after)
        else:
            writer.write(reply)
        await reader.read()

    async with raw_server(script) as port:
        with pytest.raises(ConnectionLost, match="protocol error"):
            await connect(port)


async def test_ehlo_5xx_falls_back_to_helo() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"EHLO ")
        writer.write(b"502 5.5.1 what?\r\n")
        assert await reader.readuntil(b"\r\n") == f"HELO {HELO}\r\n".encode()
        writer.write(b"250 old.test\r\n")
        await reader.read()

    async with raw_server(script) as port:
        client = await connect(port)
        assert client.extensions == {} and client.usable
        client.close()


# --------------------------------------------------------------------------------- TLS


async def test_starttls(certs: Certs) -> None:
    with Sink(starttls=server_context(certs)) as sink:
        client = await connect(sink.port)
        assert client.supports("STARTTLS") and client.tls_version is None
        await client.starttls(client_context(certs), server_hostname="localhost")
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
        assert not client.supports("STARTTLS")  # EHLO was repeated inside TLS
        tx = await client.send("s@s.test", ["a@y.test"], MESSAGE)
        assert tx.accepted == ["a@y.test"]
        await client.quit()
        [received] = sink.wait_for(1)
        assert received.tls and received.data == MESSAGE


async def test_broken_tls_is_tls_failed(certs: Certs) -> None:
    with Sink(broken_tls=True) as sink:
        client = await connect(sink.port)
        assert client.supports("STARTTLS")
        with pytest.raises(TlsFailed) as caught:
            await client.starttls(client_context(certs))
        assert caught.value.stage == "starttls"
        assert not client.usable


async def test_untrusted_certificate_is_tls_failed(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    with Sink(starttls=server_context(other)) as sink:
        client = await connect(sink.port)
        with pytest.raises(TlsFailed):
            await client.starttls(client_context(certs))


def test_starttls_and_send_under_uvloop(certs: Certs) -> None:
    async def deliver(port: int) -> list[str]:
        client = await connect(port)
        await client.starttls(client_context(certs))
        tx = await client.send("s@s.test", ["a@y.test", "bad@y.test"], MESSAGE * 100)
        await client.quit()
        return tx.accepted

    with Sink(starttls=server_context(certs), rcpt_reply=_refuse) as sink:
        loop = uvloop.new_event_loop()
        try:
            assert loop.run_until_complete(deliver(sink.port)) == ["a@y.test"]
        finally:
            loop.close()
        [received] = sink.wait_for(1)
        assert received.tls and received.data == MESSAGE * 100


# ------------------------------------------------------------------- abandon (graceful stop)


async def test_abandon_before_data_ends_with_rset_at_the_next_reply() -> None:
    """Unpipelined, waiting for a RCPT reply: the transaction stops there with RSET, the
    connection stays usable, DATA is never sent."""
    seen: list[bytes] = []
    rcpt_arrived = asyncio.Event()
    answer_rcpt = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, "8BITMIME")
        seen.append(await reader.readuntil(b"\r\n"))  # MAIL
        writer.write(b"250 2.1.0 ok\r\n")
        seen.append(await reader.readuntil(b"\r\n"))  # first RCPT
        rcpt_arrived.set()
        await answer_rcpt.wait()
        writer.write(b"250 2.1.5 ok\r\n")
        seen.append(await reader.readuntil(b"\r\n"))  # RSET, not the second RCPT
        writer.write(b"250 2.0.0 reset\r\n")
        seen.append(await reader.readuntil(b"\r\n"))
        writer.write(b"221 bye\r\n")

    async with raw_server(script) as port:
        client = await connect(port)
        sending = asyncio.create_task(client.send("a@s.test", ["x@y.test", "z@y.test"], MESSAGE))
        await rcpt_arrived.wait()
        assert client.abandon() is False  # the dot is not out
        answer_rcpt.set()
        with pytest.raises(Abandoned):
            await sending
        assert client.usable
        with pytest.raises(Abandoned):  # no new transaction on an abandoned connection
            await client.send("a@s.test", ["x@y.test"], MESSAGE)
        await client.quit()
    assert seen == [b"MAIL FROM:<a@s.test>\r\n", b"RCPT TO:<x@y.test>\r\n", b"RSET\r\n",
                    b"QUIT\r\n"]


async def test_abandon_while_the_body_is_still_buffered_never_sends_the_dot() -> None:
    """A receiver that stops reading mid-body: the rest of the body, dot included, is still in
    our buffer; abandoning closes the connection and discards it."""
    received = bytearray()
    stalled = asyncio.Event()
    resume = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, "PIPELINING")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
        stalled.set()
        await resume.wait()  # read nothing until the client gave up
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 20):
                received.extend(chunk)

    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    body *= 40_000  # 40 MB: more than the loopback socket buffers hold
    async with raw_server(script) as port:
        client = await connect(port)
        sending = asyncio.create_task(client.send("a@s.test", ["x@y.test"], body))
        await stalled.wait()
        deadline = time.monotonic() + 5
        while not client._writer.transport.get_write_buffer_size():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert not client.final_dot_sent
        assert client.abandon() is False
        with pytest.raises(Abandoned):
            await sending
        resume.set()
        await asyncio.sleep(0.1)
    assert not client.usable
    assert len(received) < len(body) and not received.endswith(b"\r\n.\r\n")


async def test_abandon_after_the_dot_keeps_waiting_for_the_reply() -> None:
    with Sink(hang="dot") as sink:
        client = await connect(sink.port)
        sending = asyncio.create_task(client.send("s@s.test", ["a@y.test"], MESSAGE))
        deadline = time.monotonic() + 5
        while not sink.hung:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert client.final_dot_sent
        assert client.abandon() is True  # the server may be delivering: wait for its word
        assert client.usable and not sending.done()
        client.close()  # what a stop does once its grace is over
        tx = await sending
        assert tx.outcome_unknown and tx.data is None
