"""Interoperability with real third-party MTA tools: swaks as a client, Postfix's smtp-sink
as the next hop. They are installed from Debian (`apt-get install swaks postfix`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from certs import make_certs
from relayproc import RelayProcess, free_port
from sink import Sink

from relay.smtp.auth import hash_password

PASSWORD = "s3cret pass"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} not found: apt-get install -y swaks postfix")
    return path


def test_swaks_starttls_auth_plain_is_relayed(relay_factory: type, sink: Sink,
                                              tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    users = tmp_path / "users"
    users.write_text(f"invoices:{hash_password(PASSWORD, ln=4)}\n")
    # 127.0.0.1 is not trusted here: relaying needs AUTH, which needs TLS.
    relay: RelayProcess = relay_factory(
        routes={"example.net": [sink.address]},
        server={"trusted_networks": ["127.0.0.2/32"], "tls_cert": str(certs.cert),
                "tls_key": str(certs.key), "users_file": str(users)}).start()
    base = [_tool("swaks"), "--server", f"127.0.0.1:{relay.port}", "--from", "ap@invoices.test",
            "--to", "customer@example.net", "--header", "Subject: Invoice 2026-0042",
            "--body", "Please find the invoice attached.", "--timeout", "20"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "554 5.7.1 <customer@example.net>: Relay access denied" in refused.stdout

    wrong = subprocess.run([*base, "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_cert),
                            "--auth", "PLAIN", "--auth-user", "invoices",
                            "--auth-password", "wrong"], capture_output=True, text=True,
                           timeout=60)
    assert "535 5.7.8 Authentication credentials invalid" in wrong.stdout

    done = subprocess.run([*base, "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_cert),
                           "--auth", "PLAIN", "--auth-user", "invoices",
                           "--auth-password", PASSWORD], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "250 2.0.0 Ok: queued as" in done.stdout
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["customer@example.net"]
    assert b"Subject: Invoice 2026-0042" in got.data
    assert b"with ESMTPSA id" in got.data  # our Received header records TLS and AUTH
    assert PASSWORD not in relay.log


def test_delivery_to_postfix_smtp_sink(relay_factory: type) -> None:
    port = free_port()
    # smtp-sink writes as the postfix user: pytest's tmp_path (mode 0700) is out of its reach
    dumps = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    shutil.chown(dumps, "postfix")
    sink = subprocess.Popen([_tool("smtp-sink"), "-u", "postfix", "-d", f"{dumps}/%M.",
                             f"127.0.0.1:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        relay: RelayProcess = relay_factory(routes={"example.net": [f"127.0.0.1:{port}"]})
        relay.start()
        body = b"".join(b"line %04d of the invoice \xe2\x82\xac\r\n" % i for i in range(300))
        message = (b"From: ap@invoices.test\r\nTo: c@example.net\r\nSubject: euro\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\n" + b".leading dot\r\n" + body)
        import smtplib

        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("ap@invoices.test", ["c@example.net", "d@example.net"], message,
                            mail_options=["BODY=8BITMIME"])
        assert sink.poll() is None, sink.communicate()[1]
        relay.wait_for_log("event=delivered", count=2, timeout=20)
        deadline = time.monotonic() + 10
        while not list(dumps.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        [dump] = list(dumps.iterdir())
        content = dump.read_bytes()
        # smtp-sink writes the transaction with LF line endings after its own headers
        assert message.replace(b"\r\n", b"\n") in content
        assert b"c@example.net" in content and b"d@example.net" in content
    finally:
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(dumps, ignore_errors=True)
