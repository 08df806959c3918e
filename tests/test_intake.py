"""Intake end to end: the real relay process, real SMTP over loopback (smtplib and raw sockets).

What a client sees (the contract's exact replies, enhanced codes on every reply, PIPELINING,
relay access, AUTH, SIZE, limits, bad input) and what reaches the sink (byte-for-byte the
submitted message after our one Received header), and that nothing partial is ever queued.
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import pytest
from certs import make_certs
from inprocess import InProcessIntake
from queuefiles import partial_streams, pending_ids, stored_ids, stored_message
from rawsmtp import ENHANCED, QUEUED, Raw, b64, plain, send_raw, simple_message
from relayproc import RelayProcess, free_port
from sink import Sink

from relay.smtp.auth import hash_password

RelayFactory = Callable[..., RelayProcess]

BAD_ENDINGS = "554 5.6.0 Message contains bare CR or NUL"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
WRITE_FAILED = "451 4.3.0 Queue write failed, try again later"
PASSWORD = "pass w0rd-Secret!"
UTF8_PASSWORD = "p\u00e4ssw\u00f6rd \u53d1\u7968"


# --- helpers ---------------------------------------------------------------------------------

def stuff(message: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", message)


def send_raw_or_452(raw: Raw, message: bytes) -> str:
    """Like send_raw, but a 452 at DATA (storage) is returned after resetting the session."""
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
    assert raw.cmd("RCPT TO:<b@example.net>").startswith("250 ")
    reply = raw.cmd("DATA")
    if not reply.startswith("354"):
        assert raw.cmd("RSET").startswith("250 ")
        return reply
    raw.send(message + b".\r\n")
    return raw.reply()


def spool_files(relay: RelayProcess, root: Path | None = None) -> list[str]:
    """Acknowledged messages in the spool and large messages still being streamed."""
    where = root or relay.queue_dir
    return stored_ids(where) + partial_streams(where)


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(our Received header, the rest) of a delivered message."""
    assert data.startswith(b"Received: "), data[:200]
    lines = data.split(b"\r\n")
    n = 1
    while lines[n][:1] in (b" ", b"\t"):
        n += 1
    head = b"\r\n".join(lines[:n]) + b"\r\n"
    return head, data[len(head):]


def wait_until(predicate: Callable[[], object], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def assert_clean_log(relay: RelayProcess) -> None:
    text = relay.log
    assert "Traceback" not in text, text
    assert PASSWORD not in text and UTF8_PASSWORD not in text


def start(relay_factory: RelayFactory, sink: Sink | None = None, **kwargs: object,
          ) -> RelayProcess:
    if sink is not None:
        kwargs.setdefault("routes", {"example.net": [sink.address]})
    return relay_factory(**kwargs).start()


# --- 1. an invoice, byte for byte -------------------------------------------------------------

def invoice_bytes() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Rechnungen <billing@sender.test>"
    msg["To"] = "ap@example.net"
    msg["Subject"] = "发票 INV-2024-0042：贵公司三月份的服务费用"
    msg["Message-ID"] = "<inv-2024-0042@sender.test>"
    msg.set_content("尊敬的客户：\n\n附件是您的发票，金额 ¥12,345.00。\n谢谢！\n"
                    "Grüße — Ünïcödé line\n.a line starting with a dot\n",
                    charset="utf-8", cte="8bit")
    msg.add_attachment(os.urandom(200 * 1024), maintype="application", subtype="pdf",
                       filename="INV-2024-0042.pdf")
    data = msg.as_bytes(policy=SMTP_POLICY)
    assert b"\r\n" in data and b"=?utf-8?" in data.lower()
    return data


def test_invoice_arrives_byte_for_byte(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    data = invoice_bytes()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo("app.sender.test")
        assert client.has_extn("8bitmime")
        code, _ = client.mail("billing@sender.test", ["BODY=8BITMIME", f"SIZE={len(data)}"])
        assert code == 250
        assert client.rcpt("ap@example.net")[0] == 250
        code, text = client.data(data)
    reply = f"{code} {text.decode()}"
    match = QUEUED.match(reply)
    assert match, reply
    queue_id = match.group(1)
    [got] = sink.wait_for(1)
    received, rest = split_received(got.data)
    assert rest == data
    assert queue_id.encode() in received
    assert b"relay.test" in received and b"[127.0.0.1]" in received
    assert got.rcpt_tos == ["ap@example.net"] and got.mail_from == "billing@sender.test"
    assert "BODY=8BITMIME" in got.mail_options
    [event] = relay.events("received", at_least=1)
    assert event["id"] == queue_id
    assert_clean_log(relay)


def test_smtputf8_sender_and_recipient(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    sender, rcpt = "发票@例子.test", "müller@example.net"
    data = ("From: 发票@例子.test\r\nTo: müller@example.net\r\nSubject: Grüße\r\n\r\n"
            "Body ünïcödé 你好\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        refused = client.sendmail(sender, [rcpt], data, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    [got] = sink.wait_for(1)
    assert got.mail_from == sender and got.rcpt_tos == [rcpt]
    assert "SMTPUTF8" in got.mail_options
    received, rest = split_received(got.data)
    assert rest == data and b"UTF8SMTP" in received


def test_send_message_utf8_headers(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    msg = EmailMessage()
    msg["From"] = "发票@例子.test"
    msg["To"] = "ap@example.net"
    msg["Subject"] = "发票"
    msg.set_content("你好\n", charset="utf-8", cte="8bit")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.send_message(msg, mail_options=["SMTPUTF8"]) == {}
    [got] = sink.wait_for(1)
    assert got.mail_from == "发票@例子.test"
    assert split_received(got.data)[1] == msg.as_bytes(policy=SMTP_POLICY.clone(utf8=True))


# --- 2. enhanced status codes everywhere -------------------------------------------------------

def test_every_reply_has_an_enhanced_code(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, server={"max_message_size": 123456})
    with Raw(relay.port) as raw:
        assert raw.greeting.startswith("220 ")
        ehlo = raw.ehlo()
        assert ehlo[0].startswith("250-")
        keywords = {line[4:].upper() for line in ehlo[1:]}
        for needed in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "SIZE 123456"):
            assert needed in keywords, ehlo
        assert not any(k.startswith("AUTH") for k in keywords)  # no users_file
        replies = []
        for line in ["NOOP", "RSET", "HELP", "HELP MAIL", "VRFY <b@example.net>",
                     "MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.net>", "DATA"]:
            replies.append((line, raw.cmd(line)))
        assert replies[-1][1].startswith("354")
        raw.send(simple_message() + b".\r\n")
        replies.append(("<dot>", raw.reply()))
        for line in ["FROB", "MAIL FROM:<a@sender.test> BODY=NONSENSE",
                     "MAIL FROM:<a@sender.test>", "MAIL FROM:<a@sender.test>",
                     "RCPT TO:<b@example.net> NOTIFY=NEVER", "RSET", "EXPN list", "ETRN x",
                     "STARTTLS", "AUTH PLAIN", "DATA", "HELO again.test", "NOOP",
                     "MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.net>", "RSET"]:
            replies.append((line, raw.cmd(line)))
        replies.append(("QUIT", raw.cmd("QUIT")))
    for line, reply in replies:
        if line == "DATA" and reply.startswith("354"):
            continue
        if line.startswith("HELO") and reply.startswith("250"):
            continue  # RFC 2034: the HELO/EHLO greeting line carries no code
        for text in reply.split("\n"):
            assert ENHANCED.match(text), f"{line!r} -> {text!r}"
    assert QUEUED.match(dict(replies)["<dot>"])
    assert dict(replies)["QUIT"].startswith("221 2.")
    assert_clean_log(relay)


def test_bad_command_right_after_ehlo_has_enhanced_code(relay_factory: RelayFactory) -> None:
    relay = start(relay_factory)
    with Raw(relay.port) as raw:
        raw.ehlo()
        for line in ["FROB", "\x01\x02", "MAIL", "EHLO"]:
            reply = raw.cmd(line)
            assert reply.startswith("5") and ENHANCED.match(reply), f"{line!r} -> {reply!r}"
            raw.ehlo()


# --- 3. PIPELINING ------------------------------------------------------------------------------

def test_pipelining_in_one_write(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    message = simple_message("pipelined")
    with Raw(relay.port) as raw:
        raw.ehlo()
        raw.send("MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.net>\r\n"
                 "RCPT TO:<c@example.net>\r\nDATA\r\n")
        for _ in range(3):
            assert ENHANCED.match(raw.reply()).group(0).startswith("250 2.")
        assert raw.reply().startswith("354")
        raw.send(message + b".\r\nQUIT\r\n")
        assert QUEUED.match(raw.reply())
        assert raw.reply().startswith("221 2.0.0")
    [got] = sink.wait_for(1)
    assert sorted(got.rcpt_tos) == ["b@example.net", "c@example.net"]
    assert split_received(got.data)[1] == message


def test_pipelined_transactions_back_to_back(relay_factory: RelayFactory, sink: Sink) -> None:
    """Even a (non-conforming) client that sends everything at once is read correctly:
    bytes after the final dot are commands, not message data."""
    relay = start(relay_factory, sink)
    one, two = simple_message("first"), simple_message("second", b"..dot\r\nx\r\n")
    with Raw(relay.port) as raw:
        raw.ehlo()
        raw.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + one
                 + b".\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
                 + two + b".\r\nNOOP\r\nQUIT\r\n")
        got = [raw.reply() for _ in range(10)]
    assert [r[:3] for r in got] == ["250", "250", "354", "250", "250", "250", "354", "250",
                                    "250", "221"]
    assert QUEUED.match(got[3]) and QUEUED.match(got[7])
    msgs = sink.wait_for(2)
    bodies = {m.rcpt_tos[0]: split_received(m.data)[1] for m in msgs}
    assert bodies == {"b@example.net": one, "c@example.net": two.replace(b"..dot", b".dot")}


# --- 4. relay access and AUTH ------------------------------------------------------------------

def test_untrusted_client_gets_relay_denied(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, server={"trusted_networks": ["127.0.0.2/32"]})
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        assert raw.cmd("RCPT TO:<b@example.net>") == \
            "554 5.7.1 <b@example.net>: Relay access denied"
        assert raw.cmd("RCPT TO:<postmaster@relay.test>") == \
            "554 5.7.1 <postmaster@relay.test>: Relay access denied"
        assert raw.cmd("DATA").startswith("503 5.5.1")
    # the trusted address may relay
    with Raw(relay.port, source="127.0.0.2") as raw:
        raw.ehlo()
        assert QUEUED.match(send_raw(raw, simple_message()))
    sink.wait_for(1)
    assert_clean_log(relay)


@pytest.fixture
def tls_relay(relay_factory: RelayFactory, sink: Sink, tmp_path: Path,
              ) -> Iterator[tuple[RelayProcess, ssl.SSLContext, int]]:
    certs = make_certs(tmp_path / "pki")
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, ln=4)}\n"
                     f"bob:{hash_password('other', ln=4)}\n"
                     f"carol:{hash_password(UTF8_PASSWORD, ln=4)}\n")
    tls_port = free_port()
    relay = start(relay_factory, sink, server={
        "trusted_networks": ["127.0.0.2/32"], "tls_cert": str(certs.cert),
        "tls_key": str(certs.key), "users_file": str(users),
        "listen_tls": [f"127.0.0.1:{tls_port}"]})
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    yield relay, context, tls_port
    assert_clean_log(relay)


def test_auth_requires_tls(tls_relay: tuple[RelayProcess, ssl.SSLContext, int]) -> None:
    relay, _, _ = tls_relay
    with Raw(relay.port) as raw:
        ehlo = raw.ehlo()
        assert "250-STARTTLS" in ehlo or "250 STARTTLS" in ehlo
        assert not any("AUTH" in line for line in ehlo), ehlo
        assert raw.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == \
            "538 5.7.11 Encryption required"
        assert raw.cmd("AUTH LOGIN") == "538 5.7.11 Encryption required"
        # still unauthenticated: relaying is refused
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        assert raw.cmd("RCPT TO:<b@example.net>") == \
            "554 5.7.1 <b@example.net>: Relay access denied"


def test_auth_plain_after_starttls(tls_relay: tuple[RelayProcess, ssl.SSLContext, int],
                                   sink: Sink) -> None:
    relay, context, _ = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.starttls(context=context)
        client.ehlo()
        assert client.has_extn("auth")
        assert set(client.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}
        start_time = time.monotonic()
        code, text = client.docmd("AUTH", f"PLAIN {plain('alice', 'wrong password')}")
        assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
        assert time.monotonic() - start_time < 5
        # unknown user: the same reply
        assert client.docmd("AUTH", f"PLAIN {plain('mallory', PASSWORD)}")[0] == 535
        # the session still works and is still unauthenticated
        assert client.noop()[0] == 250
        client.mail("a@sender.test")
        assert client.rcpt("b@example.net") == \
            (554, b"5.7.1 <b@example.net>: Relay access denied")
        client.rset()
        code, text = client.docmd("AUTH", f"PLAIN {plain('alice', PASSWORD)}")
        assert code == 235 and ENHANCED.match(f"{code} {text.decode()}")
        # a second AUTH in the same session is refused
        assert client.docmd("AUTH", f"PLAIN {plain('alice', PASSWORD)}")[0] == 503
        assert client.sendmail("a@sender.test", ["b@example.net"], simple_message()) == {}
    [got] = sink.wait_for(1)
    assert b"ESMTPSA" in split_received(got.data)[0]
    [event] = relay.events("received", at_least=1)
    assert event.get("auth") == "alice"


def test_auth_plain_with_challenge(tls_relay: tuple[RelayProcess, ssl.SSLContext, int]) -> None:
    relay, context, _ = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.starttls(context=context)
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN")[0] == 334
        assert client.docmd(plain("alice", "nope")) == \
            (535, b"5.7.8 Authentication credentials invalid")
        assert client.docmd("AUTH", "PLAIN")[0] == 334
        assert client.docmd("*")[0] == 501  # client cancels
        assert client.docmd("AUTH", "PLAIN !!notbase64")[0] == 501
        assert client.docmd("AUTH", "PLAIN")[0] == 334
        assert client.docmd(plain("alice", PASSWORD))[0] == 235


def test_auth_login(tls_relay: tuple[RelayProcess, ssl.SSLContext, int], sink: Sink) -> None:
    relay, context, _ = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.starttls(context=context)
        client.ehlo()
        # without initial response
        assert client.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert client.docmd(b64("alice")) == (334, b"UGFzc3dvcmQ6")
        assert client.docmd(b64("wrong")) == (535, b"5.7.8 Authentication credentials invalid")
        # smtplib's own LOGIN (with initial response)
        client.user, client.password = "alice", PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        assert client.sendmail("a@sender.test", ["b@example.net"], simple_message()) == {}
    sink.wait_for(1)


def test_implicit_tls_listener(tls_relay: tuple[RelayProcess, ssl.SSLContext, int],
                               sink: Sink) -> None:
    _, context, tls_port = tls_relay
    with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=context, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("auth")
        assert not client.has_extn("starttls")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("alice", "wrong")
        assert failed.value.smtp_code == 535
        client.login("alice", PASSWORD)
        assert client.sendmail("a@sender.test", ["b@example.net"], simple_message()) == {}
    [got] = sink.wait_for(1)
    assert b"ESMTPSA" in split_received(got.data)[0]
    # without AUTH, the implicit TLS listener is no open relay
    with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=context, timeout=10) as client:
        client.ehlo()
        client.mail("a@sender.test")
        assert client.rcpt("b@example.net")[0] == 554


# --- 5. SIZE ------------------------------------------------------------------------------------

def test_size_limit(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink, server={"max_message_size": 100_000})
    big = simple_message("big", (b"z" * 98 + b"\r\n") * 1100)  # ~110 KB
    with Raw(relay.port) as raw:
        assert "250-SIZE 100000" in raw.ehlo() or "250 SIZE 100000" in raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=100001") == TOO_BIG
        assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=5000000000") == TOO_BIG
        # without SIZE: refused after the final dot, and the session stays usable
        assert send_raw(raw, big) == TOO_BIG
        # a lying SIZE does not help either
        assert raw.cmd("MAIL FROM:<a@sender.test> SIZE=1000").startswith("250")
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
        assert raw.cmd("DATA").startswith("354")
        raw.send(big + b".\r\n")
        assert raw.reply() == TOO_BIG
        assert spool_files(relay) == []
        assert relay.events("received") == []
        assert QUEUED.match(send_raw(raw, simple_message()))
    assert len(sink.wait_for(1)) == 1
    time.sleep(0.2)
    assert len(sink.messages) == 1
    assert_clean_log(relay)


def test_size_limit_large_message_streamed(relay_factory: RelayFactory, sink: Sink) -> None:
    """Over the limit after the streaming spill began (> 1 MiB): the partial file goes too."""
    relay = start(relay_factory, sink, server={"max_message_size": 2 * 1024 * 1024})
    big = simple_message("big", (b"q" * 998 + b"\r\n") * 3000)  # 3 MB
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert send_raw(raw, big) == TOO_BIG
        assert spool_files(relay) == []
        assert QUEUED.match(send_raw(raw, simple_message()))
    sink.wait_for(1)


# --- 6. recipients ------------------------------------------------------------------------------

def test_recipient_limit(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        raw.send("".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(1001)))
        got = [raw.reply() for _ in range(1001)]
        assert all(r.startswith("250 2.1.5") for r in got[:1000]), set(got[:1000])
        assert got[1000] == "452 4.5.3 Too many recipients"
        assert raw.cmd("DATA").startswith("354")
        raw.send(simple_message() + b".\r\n")
        assert QUEUED.match(raw.reply())
    msgs = sink.wait_for(1, timeout=30)
    deadline = time.monotonic() + 30
    while sum(len(m.rcpt_tos) for m in sink.messages) < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    rcpts = [r for m in sink.messages for r in m.rcpt_tos]
    assert sorted(rcpts) == sorted(f"r{i}@example.net" for i in range(1000)), len(msgs)
    # delivered in transactions of at most 50 recipients (every server takes 100)
    assert max(len(m.rcpt_tos) for m in sink.messages) == 50


# --- 7. and 8. bad DATA, smuggling ------------------------------------------------------------

@pytest.mark.parametrize(("body", "reply"), [
    (b"line one\rline two\r\n", BAD_ENDINGS),
    (b"line\x00one\r\n", BAD_ENDINGS),
], ids=["bare-cr", "nul"])
def test_bad_data_refused_session_usable(relay_factory: RelayFactory, sink: Sink, body: bytes,
                                         reply: str) -> None:
    relay = start(relay_factory, sink)
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert send_raw(raw, simple_message("bad", body)) == reply
        assert spool_files(relay) == []
        good = simple_message("good", b"x" * 998 + b"\r\n")
        assert QUEUED.match(send_raw(raw, good))
        assert raw.cmd("QUIT").startswith("221")
    [got] = sink.wait_for(1)
    assert split_received(got.data)[1] == good
    assert len(relay.events("received", at_least=1)) == 1
    assert_clean_log(relay)


def test_bare_lf_line_ends_are_stored_as_crlf(relay_factory: RelayFactory, sink: Sink) -> None:
    """A PDF or XML invoice an application wrote with Unix line ends arrives with CRLF, as
    Postfix 3.9's `smtpd_forbid_bare_newline = normalize` does it."""
    relay = start(relay_factory, sink)
    # (only CRLF . CRLF ends the data, so the last line before the dot ends with CRLF)
    body = b"<Invoice>\n  <Total>42.00</Total>\n</Invoice>\n" * 100 + b"<!-- end -->\r\n"
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert QUEUED.match(send_raw(raw, simple_message("unix", body)))
    [got] = sink.wait_for(1)
    assert split_received(got.data)[1].endswith(
        b"<Invoice>\r\n  <Total>42.00</Total>\r\n</Invoice>\r\n" * 100 + b"<!-- end -->\r\n")


def test_smtp_smuggling_is_never_a_second_transaction(relay_factory: RelayFactory,
                                                      sink: Sink) -> None:
    """Only CRLF . CRLF ends DATA: whatever a "." between bare line ends hides stays text of
    the one message the client sent."""
    relay = start(relay_factory, sink)
    smuggled = (b"Subject: legit\r\n\r\nhello\n.\r\n"
                b"MAIL FROM:<ceo@victim.test>\r\nRCPT TO:<evil@example.net>\r\nDATA\r\n"
                b"Subject: forged\r\n\r\nsend money\r\n")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
        assert raw.cmd("DATA").startswith("354")
        raw.send(smuggled + b".\r\nNOOP\r\n")
        assert QUEUED.match(raw.reply())
        # the very next reply answers our NOOP: nothing in the data was taken as a command
        assert raw.reply().startswith("250 2.0.0")
        for marker in (b"\r.\r\n", b"\r\n.\r"):  # a bare CR: refused as a whole
            raw.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            assert [raw.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
            raw.send(b"x" + marker + b"MAIL FROM:<x@y.test>\r\n.\r\nNOOP\r\n")
            assert raw.reply() == BAD_ENDINGS
            assert raw.reply().startswith("250 2.0.0")
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["b@example.net"]
    assert b"MAIL FROM:<ceo@victim.test>\r\n" in got.data  # text, never a command
    assert len(relay.events("received", at_least=1)) == 1
    relay.wait_for_log("event=delivered")
    assert relay.stop() == 0
    assert len(sink.messages) == 1


# --- 9. loops ------------------------------------------------------------------------------------

def received_headers(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.test by hop%d.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                    % (i, i + 1) for i in range(n))


def test_too_many_received_headers(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with Raw(relay.port) as raw:
        raw.ehlo()
        for hops in (51, 50, 200):
            # 50 + ours would be over the limit: delivery would bounce it as a loop, so
            # intake refuses it at once (as Postfix's hopcount_limit counts)
            reply = send_raw(raw, received_headers(hops) + simple_message("loop"))
            assert reply.startswith("554 5.4.6"), reply
        assert spool_files(relay) == []
        # 49 is still fine; "Received:" in the body does not count
        assert QUEUED.match(send_raw(raw, received_headers(49) + simple_message("ok")))
        body = received_headers(60)
        assert QUEUED.match(send_raw(raw, simple_message("body", body)))
    sink.wait_for(2)
    assert len(relay.events("received", at_least=2)) == 2


# --- 10. clients that vanish mid-DATA ---------------------------------------------------------

@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishes_mid_data(relay_factory: RelayFactory, sink: Sink, how: str) -> None:
    relay = start(relay_factory, sink)
    line = b"v" * 998 + b"\r\n"
    # a large message: streamed to its spool file while it arrives, then abandoned
    raw = Raw(relay.port)
    raw.ehlo()
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
    assert raw.cmd("DATA").startswith("354")
    raw.send(simple_message("huge", line * 1500))  # 1.5 MB of a 3 MB message
    wait_until(lambda: partial_streams(relay.queue_dir), 10, "the streaming spill to start")
    raw.abort() if how == "reset" else raw.close()
    wait_until(lambda: not spool_files(relay), 10, "the partial spool file to go")
    # a small one
    raw = Raw(relay.port)
    raw.ehlo()
    assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
    assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
    assert raw.cmd("DATA").startswith("354")
    raw.send(simple_message("small", b"half a messa"))
    time.sleep(0.1)
    raw.abort() if how == "reset" else raw.close()
    # and one that vanishes right after the 354, and one right after "\r\n." of the final dot
    raw = Raw(relay.port)
    raw.send("EHLO x\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    raw.reply_lines(), raw.reply(), raw.reply(), raw.reply()
    raw.send(b"Subject: x\r\n\r\nbody\r\n.")
    time.sleep(0.1)
    raw.abort() if how == "reset" else raw.close()
    # the relay still works
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert QUEUED.match(send_raw(raw, simple_message("after")))
    [got] = sink.wait_for(1)
    assert b"Subject: after" in got.data
    assert len(relay.events("received", at_least=1)) == 1
    time.sleep(0.2)
    assert len(sink.messages) == 1
    assert spool_files(relay) == [relay.events("received", at_least=1)[0]["id"]]
    assert_clean_log(relay)


def test_many_clients_vanish_while_streaming(relay_factory: RelayFactory) -> None:
    """Vanishing at any moment of the spill (file creation, appends) leaves no file behind."""
    relay = start(relay_factory)
    line = b"w" * 998 + b"\r\n"
    for i in range(40):
        raw = Raw(relay.port)
        raw.send("EHLO x\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        for _ in range(4):
            raw.reply_lines()
        raw.send(simple_message("huge", line * (1050 + 11 * i)))
        time.sleep(0.001 * (i % 7))
        raw.abort() if i % 2 else raw.close()
    with Raw(relay.port) as raw:  # the relay is still there
        raw.ehlo()
        assert raw.cmd("NOOP").startswith("250")
    wait_until(lambda: not spool_files(relay), 10, f"no spool files; left: {spool_files(relay)}")
    assert relay.events("received") == []
    assert_clean_log(relay)
    # and no descriptors leaked (a partly created file's fd lost on cancellation)
    assert relay.proc is not None
    fds = len(os.listdir(f"/proc/{relay.proc.pid}/fd"))
    assert fds < 40, fds


# --- 11. malformed commands ---------------------------------------------------------------------

def test_malformed_commands(relay_factory: RelayFactory, sink: Sink) -> None:
    # More errors than the default limits allow: those are tested on their own.
    relay = start(relay_factory, sink, server={"error_soft_limit": 100, "error_hard_limit": 100})
    with Raw(relay.port) as raw:
        raw.ehlo()
        cases = [
            "garbage here",
            "\xff\xfe binary",
            "MAIL FROM:<bad",
            "MAIL FROM:bad@address with spaces",
            "MAIL FROM:<a@sender.test> SIZE=abc",
            "MAIL FROM:<a@sender.test> UNKNOWN=1",
            "RCPT TO:<b@example.net>",        # before MAIL
            "DATA",                            # before MAIL
            "MAIL FROM:<a@sender.test>",       # (250, not checked)
            "MAIL FROM:<a@sender.test>",       # nested MAIL
            "RCPT TO:<>",
            "RCPT TO:<bad",
            "RCPT TO:<no-domain>",
            "RCPT TO:<b@>",
            "RCPT TO:<b@example.net> FOO=BAR",
            "RCPT TO:<@route,@path:b@example.net> SIZE=1",
            "DATA",                            # without RCPT
            "DATA now",
            "MAIL FROM:<" + "a" * 600 + "@sender.test>",   # command line over 512 octets
            "RCPT TO:<" + "b" * 2000 + "@example.net>",
            "NOOP " + "n" * 5000,
            "X" * 70000,
        ]
        results = []
        for line in cases:
            raw.send(line.encode("latin-1") + b"\r\n")
            results.append((line, raw.reply()))
        assert raw.cmd("NOOP").startswith("250")
    for line, reply in results:
        assert "Traceback" not in reply and "Error: (" not in reply, (line, reply)
        if line == "MAIL FROM:<a@sender.test>" and reply.startswith("250 "):
            continue
        assert reply[0] == "5", (line, reply)
        for text in reply.split("\n"):
            assert ENHANCED.match(text), (line, reply)
    assert_clean_log(relay)


def test_null_sender_is_relayed(relay_factory: RelayFactory, sink: Sink) -> None:
    """Bounces from other systems come with MAIL FROM:<> and must pass as the null sender."""
    relay = start(relay_factory, sink)
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<> SIZE=100").startswith("250 2.")
        assert raw.cmd("RCPT TO:<b@example.net>").startswith("250")
        assert raw.cmd("DATA").startswith("354")
        raw.send(simple_message("bounce") + b".\r\n")
        assert QUEUED.match(raw.reply())
        assert raw.cmd("MAIL FROM:<>").startswith("250 2.")
        assert raw.cmd("MAIL FROM:<>").startswith("503 5.5.1")  # nested
    [got] = sink.wait_for(1)
    assert got.mail_from == "<>"  # aiosmtpd's (the sink's) spelling of the null sender
    [event] = relay.events("received", at_least=1)
    assert event["sender"] == ""


def test_data_without_mail_and_session_after(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd("DATA").startswith("503 5.5.1")
        assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        assert raw.cmd("DATA").startswith("503 5.5.1")
        assert raw.cmd("RSET").startswith("250 2.0.0")
        assert QUEUED.match(send_raw(raw, simple_message()))
    sink.wait_for(1)


# --- 12. full disk ------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a 4 MiB tmpfs on {mount} (root needed): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


STORAGE = "452 4.3.1 Insufficient system storage"


def fill_disk(relay_port: int, root: Path) -> tuple[Raw, list[str], list[str]]:
    """Send 15 KB messages until the queue's disk is full; return session, ids, refusals.

    A refusal is `451 4.3.0` after the final dot (a write or fsync failed), or `452 4.3.1`
    at DATA once delivery had to spend its emergency reserve (intake then waits for room)."""
    raw = Raw(relay_port)
    raw.ehlo()
    accepted: list[str] = []
    refused: list[str] = []
    for i in range(400):
        body = (b"%06d" % i + b"f" * 92 + b"\r\n") * 150
        reply = send_raw_or_452(raw, simple_message(f"full {i}", body))
        match = QUEUED.match(reply)
        if match:
            accepted.append(match.group(1))
            continue
        assert reply in (WRITE_FAILED, STORAGE), reply
        refused.append(reply)
        if len(refused) >= 3:
            break
    assert refused, "the disk never filled"
    assert accepted
    # refusals leave no partial file behind, and the session stays usable
    assert set(spool_files_at(root)) == set(accepted)
    assert raw.cmd("RSET").startswith("250 2.0.0")
    assert raw.cmd("NOOP").startswith("250 2.0.0")
    return raw, accepted, refused


def spool_files_at(root: Path) -> list[str]:
    return stored_ids(root) + partial_streams(root)


def test_full_disk_refuses_with_451_and_keeps_nothing_partial(tiny_disk: Path) -> None:
    with InProcessIntake(tiny_disk) as intake:
        raw, accepted, refused = fill_disk(intake.port, tiny_disk)
        assert refused == [WRITE_FAILED] * 3
        # a large message, streamed to its spool file while it arrives: the same 451, after
        # the final dot (the rest of its data is never taken for commands)
        big = simple_message("big", (b"MAIL FROM:<x@y.test>" + b"g" * 978 + b"\r\n") * 2500)
        assert send_raw(raw, big) == WRITE_FAILED
        assert raw.cmd("NOOP").startswith("250 2.0.0")
        assert set(spool_files_at(tiny_disk)) == set(accepted)
        raw.close()
        # every acknowledged message is complete in its spool segment
        for queue_id in accepted:
            data = stored_message(tiny_disk, queue_id)
            assert data.startswith(b"Received: ") and data.endswith(b"f" * 92 + b"\r\n")


def deferring_sink(accepting: threading.Event) -> Sink:
    # defers every recipient until `accepting` is set, so that the queue really fills up
    return Sink(rcpt_reply=lambda _: None if accepting.is_set() else "451 4.3.2 try later")


def test_full_disk_drains_and_recovers(relay_factory: RelayFactory, tiny_disk: Path) -> None:
    accepting = threading.Event()
    with deferring_sink(accepting) as sink:
        relay = start(relay_factory, sink, queue={"path": str(tiny_disk), "min_free_space": "0",
                                                  "segment_size": "64KiB"})
        try:
            raw, accepted, _ = fill_disk(relay.port, tiny_disk)
            accepting.set()
            wait_until(lambda: {received_id(m.data) for m in sink.messages} >= set(accepted),
                       30, "every acknowledged message at the sink")
            # the relay keeps working once delivery freed the space (we delete nothing)
            wait_until(lambda: not pending_ids(tiny_disk), 30, "the queue to drain")
            # new mail waits (452 4.3.1) until delivery has its reserve back, then flows again
            deadline = time.monotonic() + 15
            while not QUEUED.match(reply := send_raw_or_452(raw, simple_message("after"))):
                assert reply in (STORAGE, WRITE_FAILED), reply  # both say: try again later
                assert time.monotonic() < deadline, "intake never took mail again"
                time.sleep(0.2)
            raw.close()
            sink.wait_for(len(accepted) + 1, timeout=30)
            assert relay.stop() == 0
        finally:
            relay.kill()
    assert "Traceback" not in relay.log


def test_min_free_space_floor_refuses_new_mail_with_452(relay_factory: RelayFactory,
                                                         tiny_disk: Path) -> None:
    accepting = threading.Event()
    with deferring_sink(accepting) as sink:
        relay = start(relay_factory, sink,
                      queue={"path": str(tiny_disk), "min_free_space": "50%",
                             "segment_size": "64KiB"})
        try:
            raw = Raw(relay.port)
            raw.ehlo()
            replies = []
            for i in range(200):
                assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
                assert raw.cmd("RCPT TO:<b@example.net>").startswith("250 ")
                reply = raw.cmd("DATA")
                if reply.startswith("354"):
                    raw.send(simple_message(f"floor {i}", (b"z" * 98 + b"\r\n") * 150) + b".\r\n")
                    reply = raw.reply()
                replies.append(reply)
                if not QUEUED.match(reply):
                    assert raw.cmd("RSET").startswith("250 2.0.0")
                    break
            assert QUEUED.match(replies[0])
            # below the floor: refused before any data is sent, the disk never fills up
            assert replies[-1] == "452 4.3.1 Insufficient system storage", replies
            assert all(QUEUED.match(r) for r in replies[:-1])
            assert raw.cmd("NOOP").startswith("250 2.0.0")
            raw.close()
            accepting.set()
            sink.wait_for(len(replies) - 1, timeout=30)
        finally:
            relay.kill()


def received_id(data: bytes) -> str:
    match = re.search(rb" id (\S+?)[;\r]", split_received(data)[0])
    assert match, data[:300]
    return match.group(1).decode()


# --- 13. group commit, end to end ---------------------------------------------------------------

def test_concurrent_clients(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = start(relay_factory, sink)
    clients, per_client = 16, 20
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
                smtp.ehlo()
                barrier.wait()
                for i in range(per_client):
                    smtp.mail("a@sender.test")
                    assert smtp.rcpt(f"c{n}m{i}@example.net")[0] == 250
                    code, text = smtp.data(simple_message(f"c{n} m{i}"))
                    match = QUEUED.match(f"{code} {text.decode()}")
                    assert match, (code, text)
                    with lock:
                        ids.append(match.group(1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(ids) == len(set(ids)) == clients * per_client
    msgs = sink.wait_for(clients * per_client, timeout=60)
    rcpts = sorted(r for m in msgs for r in m.rcpt_tos)
    assert rcpts == sorted(f"c{n}m{i}@example.net" for n in range(clients)
                           for i in range(per_client))
    assert_clean_log(relay)
