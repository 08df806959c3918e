"""Hostile clients against the real relay: bad bytes in every argument, DATA desync attempts,
error floods, password guessing, broken TLS. Each test that attacks from loopback narrows
`trusted_networks` to 127.0.0.2, so the attacker (127.0.0.1) is a stranger.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certs import make_certs
from inprocess import InProcessIntake
from queuefiles import stored_ids
from rawsmtp import QUEUED, Raw, b64, plain, send_raw, simple_message
from relayproc import RelayProcess, free_port
from sink import Sink

from relay.queue.committer import Committer
from relay.queue.envelope import Envelope, new_queue_id
from relay.queue.segments import Location
from relay.smtp.auth import hash_password

RelayFactory = Callable[..., RelayProcess]
PASSWORD = "s3cret-Pa55word"
BAD_ARGUMENT = "501 5.5.4 Invalid character in command argument"
TRUSTED = "127.0.0.2"


def start(relay_factory: RelayFactory, sink: Sink, **server: object) -> RelayProcess:
    return relay_factory(routes={"example.net": [sink.address]},
                         server={"trusted_networks": [f"{TRUSTED}/32"], **server}).start()


def trusted(relay: RelayProcess) -> Raw:
    raw = Raw(relay.port, source=TRUSTED)
    raw.ehlo()
    return raw


def assert_no_traceback(relay: RelayProcess) -> None:
    text = relay.log
    assert "Traceback" not in text and "Error: (" not in text, text
    assert PASSWORD not in text


def closed(raw: Raw) -> bool:
    try:
        raw.sock.settimeout(5)
        return raw.sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- arguments are checked at their command ----------------------------------------------------

@pytest.mark.parametrize("rcpt", [b"bo\rb@example.net", b"b\x00b@example.net",
                                  b"b\xf8b@example.net", b"b\x1bb@example.net",
                                  b"b\xc2\x85b@example.net"])
def test_bad_bytes_in_rcpt_are_refused_at_rcpt(relay_factory: RelayFactory, sink: Sink,
                                                rcpt: bytes) -> None:
    relay = start(relay_factory, sink)
    with trusted(relay) as raw:
        assert raw.cmd("MAIL FROM:<a@sender.test>") == "250 2.1.0 Ok"
        raw.send(b"RCPT TO:<" + rcpt + b">\r\n")
        assert raw.reply() == BAD_ARGUMENT
        # The co-recipient goes through; the bad one was never queued.
        assert raw.cmd("RCPT TO:<ok@example.net>").startswith("250 2.1.5")
        assert raw.cmd("DATA").startswith("354")
        raw.send(simple_message() + b".\r\n")
        assert QUEUED.match(raw.reply())
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["ok@example.net"]
    assert_no_traceback(relay)


def test_bad_bytes_in_every_command(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, error_hard_limit=100, error_soft_limit=100)
    with trusted(relay) as raw:
        for line in [b"EHLO bad\rname", b"EHLO b\xffd", b"HELO x\x00y",
                     b"MAIL FROM:<a\r@sender.test>", b"MAIL FROM:<a@sender.test>\x00",
                     b"MAIL FROM:<\xe9@sender.test>", b"NOOP \x07", b"VRFY a\rb",
                     b"AUTH PLAIN \x01"]:
            raw.send(line + b"\r\n")
            assert raw.reply() == BAD_ARGUMENT, line
        assert raw.cmd("NOOP").startswith("250")
    assert_no_traceback(relay)


def test_non_ascii_needs_smtputf8(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with trusted(relay) as raw:
        assert raw.cmd("MAIL FROM:<rechnung@bücher.test>") == \
            "553 5.6.7 Non-ASCII address needs SMTPUTF8"
        assert raw.cmd("MAIL FROM:<a@sender.test>") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<bö@example.net>") == "553 5.6.7 Non-ASCII address needs SMTPUTF8"
        assert raw.cmd("RSET").startswith("250")
        assert raw.cmd("MAIL FROM:<rechnung@bücher.test> SMTPUTF8") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<bö@example.net>").startswith("250 2.1.5")


def test_path_length_limits(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    long_local = "l" * 65 + "@example.net"
    long_domain = "a@" + ".".join(["d" * 60] * 5) + ".net"   # over 255 octets
    long_path = "p" * 60 + "@" + ".".join(["d" * 60] * 3) + ".example.net"  # over 256 with <>
    with trusted(relay) as raw:
        for address in (long_local, long_domain, long_path):
            assert raw.cmd(f"MAIL FROM:<{address}>").startswith("501 5.1.7"), address
        assert raw.cmd("MAIL FROM:<" + "l" * 64 + "@sender.test>") == "250 2.1.0 Ok"
        for address in (long_local, long_domain, long_path):
            assert raw.cmd(f"RCPT TO:<{address}>").startswith("501 5.1.3"), address
        assert raw.cmd("RCPT TO:<" + "l" * 64 + "@example.net>").startswith("250 2.1.5")


def test_sequence_errors(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with trusted(relay) as raw:
        assert raw.cmd("DATA") == "503 5.5.1 Error: need MAIL command"
        assert raw.cmd("RCPT TO:<b@example.net>") == "503 5.5.1 Error: need MAIL command"
        assert raw.cmd("MAIL FROM:<a@sender.test>") == "250 2.1.0 Ok"
        assert raw.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
        assert raw.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"


# --- once 354 is sent, the session stays in DATA ---------------------------------------------

def test_body_is_never_read_as_commands(relay_factory: RelayFactory, sink: Sink) -> None:
    """The smuggling of the hardening report: a body holding a whole second transaction."""
    relay = start(relay_factory, sink)
    smuggled = (b"RSET\r\nMAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.net>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\npay here\r\n")
    with Raw(relay.port) as raw:  # a stranger: its RCPT is refused, its DATA has no recipient
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        raw.send(b"RCPT TO:<b\xf8b@example.net>\r\n")
        assert raw.reply() == BAD_ARGUMENT
        assert raw.cmd("DATA").startswith("503")
    with trusted(relay) as raw:
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
        assert raw.cmd("DATA").startswith("354")
        raw.send(b"Subject: outer\r\n\r\n" + smuggled + b".\r\n")
        assert QUEUED.match(raw.reply())
        assert raw.cmd("NOOP").startswith("250")  # exactly one reply to the final dot
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["b@example.net"] and b"Subject: smuggled" in got.data
    time.sleep(0.3)
    assert len(sink.messages) == 1


# --- error limits -------------------------------------------------------------------------------

def test_error_hard_limit_closes_with_421(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, error_soft_limit=3, error_hard_limit=5,
                  error_delay="0")
    with Raw(relay.port) as raw:  # a stranger probing for an open relay
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        replies = [raw.cmd(f"RCPT TO:<r{i}@example.net>") for i in range(5)]
        assert all(r.startswith("554 5.7.1") for r in replies)
        raw.send("RCPT TO:<r5@example.net>\r\n")
        assert raw.reply() == "421 4.7.0 Error: too many errors"
        assert closed(raw)
    # Log lines reach the file at the end of the relay's loop turn, which can come after the
    # client has seen the close: wait for the last one.
    deadline = time.monotonic() + 5
    while not relay.events("session_error") and time.monotonic() < deadline:
        time.sleep(0.01)
    # The flood stops: five log lines, not 20,000.
    assert len(relay.events("rejected", at_least=5)) == 5
    [event] = relay.events("session_error", at_least=1)
    assert event["reason"] == "too many errors" and event["client"] == "127.0.0.1"


def test_error_soft_limit_delays_replies(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, error_soft_limit=2, error_hard_limit=10,
                  error_delay="1s")
    with trusted(relay) as raw:
        for _ in range(2):
            began = time.monotonic()
            assert raw.cmd("BOGUS").startswith("500")
            assert time.monotonic() - began < 0.5
        began = time.monotonic()
        assert raw.cmd("NOOP").startswith("250")
        assert time.monotonic() - began >= 0.9  # every reply now waits error_delay


def test_successful_data_resets_errors_and_452_does_not_count(
        relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, error_soft_limit=2, error_hard_limit=3,
                  error_delay="0")
    with trusted(relay) as raw:
        for _ in range(2):
            assert raw.cmd("BOGUS").startswith("500")
        assert QUEUED.match(send_raw(raw, simple_message("one")))
        for _ in range(2):
            assert raw.cmd("BOGUS").startswith("500")  # 2 < 3: the count started again
        assert QUEUED.match(send_raw(raw, simple_message("two")))
        # 1,000 recipients, then 452 4.5.3 for each further one: not the client's error.
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        raw.send("".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(1005)))
        replies = [raw.reply() for _ in range(1005)]
        assert replies[-1] == "452 4.5.3 Too many recipients"
        assert raw.cmd("RSET").startswith("250")
    sink.wait_for(2)


# --- TLS, AUTH and password guessing -----------------------------------------------------------

@pytest.fixture
def auth_relay(relay_factory: RelayFactory, sink: Sink, tmp_path: Path
               ) -> Iterator[tuple[RelayProcess, ssl.SSLContext, int]]:
    certs = make_certs(tmp_path / "pki")
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, ln=4)}\nbob:{hash_password('x', ln=4)}\n")
    tls_port = free_port()
    relay = start(relay_factory, sink, tls_cert=str(certs.cert), tls_key=str(certs.key),
                  users_file=str(users), listen_tls=[f"127.0.0.1:{tls_port}"],
                  error_hard_limit=100, error_soft_limit=100)
    yield relay, ssl.create_default_context(cafile=str(certs.ca_cert)), tls_port
    assert_no_traceback(relay)


def tls_raw(port: int, context: ssl.SSLContext) -> Raw:
    """A raw session on the implicit-TLS listener, after EHLO."""
    raw = Raw.__new__(Raw)
    raw.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                   server_hostname="localhost")
    raw.buf = b""
    raw.greeting = raw.reply()
    raw.ehlo()
    return raw


def test_starttls_inside_tls_and_garbage_handshake(
        auth_relay: tuple[RelayProcess, ssl.SSLContext, int]) -> None:
    relay, context, tls_port = auth_relay
    with tls_raw(tls_port, context) as raw:
        assert raw.cmd("STARTTLS") == "503 5.5.1 Error: TLS already active"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=context)
        assert client.docmd("STARTTLS") == (503, b"5.5.1 Error: TLS already active")
    for junk in (b"this is not TLS\r\n" * 3, b"\x16\x03\x01\x00\x05hello"):
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd("STARTTLS").startswith("220")
            raw.send(junk)
            assert closed(raw)
    errors = relay.wait_for_log("reason=\"TLS handshake failed\"", count=2)
    assert all("client=127.0.0.1" in line for line in errors)


def test_auth_plain_authzid_must_match(auth_relay: tuple[RelayProcess, ssl.SSLContext, int]
                                       ) -> None:
    relay, context, tls_port = auth_relay
    with tls_raw(tls_port, context) as raw:
        assert raw.cmd(f"AUTH PLAIN {plain('alice', PASSWORD, authzid='mallory')}") == \
            "535 5.7.8 Authentication credentials invalid"
        assert raw.cmd(f"AUTH PLAIN {plain('alice', PASSWORD, authzid='alice')}") == \
            "235 2.7.0 Authentication successful"
    [failed] = relay.events("auth_failed", at_least=1)
    assert failed["user"] == "alice" and failed["client"] == "127.0.0.1"


@pytest.mark.parametrize("exchange", [
    ["AUTH LOGIN", "A" * 5000],                 # overlong answer
    ["AUTH LOGIN", "not base64!"],
    ["AUTH PLAIN", "*"],                        # cancelled
    ["AUTH PLAIN " + b64("no-nul-separators")],
    ["AUTH PLAIN " + b64("\0user\0pw\0extra")],
    ["AUTH CRAM-MD5"],
    ["AUTH PLAIN a b c"],
])
def test_bad_auth_exchanges_get_fixed_replies(
        auth_relay: tuple[RelayProcess, ssl.SSLContext, int], exchange: list[str]) -> None:
    _, context, tls_port = auth_relay
    with tls_raw(tls_port, context) as raw:
        for line in exchange[:-1]:
            assert raw.cmd(line).startswith("334")
        reply = raw.cmd(exchange[-1])
        assert re.match(r"^50[14] 5\.5\.4 ", reply), reply
        assert raw.cmd("NOOP").startswith("250")


def test_password_guessing_is_limited_across_connections(
        auth_relay: tuple[RelayProcess, ssl.SSLContext, int]) -> None:
    """auth_failure_limit (default 30/h, a bucket 5 deep) per client address, over all
    connections and both intake processes: the 6th guess is turned away unhashed."""
    relay, context, tls_port = auth_relay
    replies: list[str] = []
    lock = threading.Lock()

    def guess(n: int) -> None:
        with tls_raw(tls_port, context) as raw:
            for i in range(4):
                reply = raw.cmd(f"AUTH PLAIN {plain('alice', f'guess{n}-{i}')}")
                with lock:
                    replies.append(reply)
                if reply.startswith("421"):
                    assert closed(raw)
                    return

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert replies.count("535 5.7.8 Authentication credentials invalid") == 5, replies
    limited = [r for r in replies if r.startswith("421")]
    assert len(limited) == 8 and set(limited) == {
        "421 4.7.0 Error: too many failed authentications, try again later"}
    assert len(relay.events("auth_failed", at_least=5)) == 5
    # The right password from that address is turned away too, until the bucket refills...
    with tls_raw(tls_port, context) as raw:
        assert raw.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").startswith("421 4.7.0")
    # ...while a trusted client's mail is not held up at all.
    with trusted(relay) as raw:
        assert QUEUED.match(send_raw(raw, simple_message()))


# --- session errors are one line each -----------------------------------------------------------

def test_idle_timeout_says_421(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, idle_timeout="1s")
    with trusted(relay) as raw:
        began = time.monotonic()
        assert raw.reply() == "421 4.4.2 Error: timeout exceeded"
        assert 0.9 <= time.monotonic() - began < 5
        assert closed(raw)
    [event] = relay.events("session_error", at_least=1)
    assert event["reason"] == "idle timeout"


def test_overlong_lines_and_resets_leave_one_line_each(relay_factory: RelayFactory,
                                                       sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with trusted(relay) as raw:
        assert raw.cmd("NOOP " + "n" * 70_000) == "500 5.5.2 Error: line too long"
        assert raw.cmd("NOOP").startswith("250")
    with trusted(relay) as raw:
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        raw.abort()
    relay.wait_for_log("reason=\"line too long\"")
    [reset] = relay.wait_for_log("reason=\"connection lost\"")
    assert f"client={TRUSTED}" in reset and "ConnectionResetError" in reset
    assert_no_traceback(relay)


def test_listen_backlog_is_kept(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    out = subprocess.run(["ss", "-Hltn", f"sport = :{relay.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "LISTEN" and out[2] == "1024", out  # Send-Q of a listener: its backlog



# --- one message's problem never fails another's --------------------------------------------

class BrokenCommitter(Committer):
    """A commit that fails with a bug of ours, not with an I/O error."""

    async def commit(self, *args: object, **kwargs: object) -> Location:
        raise RuntimeError("a bug in the queue code")


def test_internal_failure_after_354_keeps_the_session_in_data(tmp_path: Path) -> None:
    with InProcessIntake(tmp_path, committer=BrokenCommitter) as intake, \
            Raw(intake.port) as raw:
        raw.ehlo()
        body = (b"Subject: x\r\n\r\nRSET\r\nMAIL FROM:<evil@sender.test>\r\n"
                b"RCPT TO:<victim@example.net>\r\nDATA\r\n")
        assert send_raw(raw, body) == "451 4.3.0 Internal error, try again later"
        assert raw.cmd("NOOP").startswith("250")  # nothing of the body was taken as commands
    assert stored_ids(tmp_path) == []


async def test_one_bad_envelope_never_fails_its_batch(tmp_path: Path) -> None:
    committer = Committer(tmp_path / "spool", 0, segment_size=1 << 20)
    committer.start()
    try:
        def envelope(n: int, helo: str = "client.test") -> Envelope:
            return Envelope(id=new_queue_id(), sender="a@sender.test",
                            recipients=("b@example.net",), received=time.time(), helo=helo)

        good = [envelope(n) for n in range(20)]
        bad = envelope(99, helo="b\udcffd")  # not UTF-8: cannot be written as JSON text
        results = await asyncio.gather(
            *(committer.commit(e, [b"Subject: x\r\n\r\nbody\r\n"], 25) for e in good[:10]),
            committer.commit(bad, [b"x\r\n"], 3),
            *(committer.commit(e, [b"Subject: x\r\n\r\nbody\r\n"], 25) for e in good[10:]),
            return_exceptions=True)
    finally:
        committer.stop()
    assert isinstance(results[10], UnicodeEncodeError)
    assert all(isinstance(r, Location) for i, r in enumerate(results) if i != 10)
    assert committer.stats.failed_batches == 0
    assert stored_ids(tmp_path) == sorted(e.id for e in good)


def test_fail2ban_filter_finds_every_failed_auth(
        auth_relay: tuple[RelayProcess, ssl.SSLContext, int]) -> None:
    """The filter shipped in systemd/fail2ban, run by fail2ban's own fail2ban-regex on the
    relay's real log: each failed AUTH is one hit on the client address, and a user name
    crafted to look like another address bans nobody else."""
    relay, context, tls_port = auth_relay
    forged = "x event=auth_failed client=198.51.100.77"
    with tls_raw(tls_port, context) as raw:
        for user in ("alice", "bob", forged):
            assert raw.cmd(f"AUTH PLAIN {plain(user, 'wrong')}").startswith("535")
        assert raw.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").startswith("235")
    relay.wait_for_log("event=auth_ok")
    filter_file = Path(__file__).parents[1] / "systemd" / "fail2ban" / "invoice-relay.conf"
    out = subprocess.run(["fail2ban-regex", "-v", str(relay.log_path), str(filter_file)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    hits = re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3}", out, re.MULTILINE)
    assert hits == ["127.0.0.1"] * 3, out
    assert "198.51.100.77" not in "".join(hits)
