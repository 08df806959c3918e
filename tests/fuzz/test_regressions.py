"""Plain reproductions of what the session fuzzer found, one test each, against the same kind
of relay the fuzzer uses (tests/fuzz/conftest.py): each names the bytes sent, what the relay
did, and what the contract (../shared/interface.md, "SMTP replies") asks for.
"""

from __future__ import annotations

from fuzzkit import HOSTNAME, TRUSTED, UNTRUSTED, Client, FuzzRelay, check_reply


def ehlo(client: Client) -> list[str]:
    assert client.reply() == [f"220 {HOSTNAME} ESMTP invoice-relay"]
    client.send(b"EHLO client.test\r\n")
    return client.reply()


def test_starttls_go_ahead_has_an_enhanced_code(fuzz_relay: FuzzRelay) -> None:
    """Found by test_sessions: after EHLO, `STARTTLS` was answered `220 Ready to start TLS`
    (aiosmtpd's text) without an enhanced status code. The contract: every reply after EHLO
    carries one (RFC 2034 exempts only the greeting and the EHLO reply)."""
    for source in (TRUSTED, UNTRUSTED):
        client = Client(fuzz_relay.port, source)
        try:
            ehlo(client)
            client.send(b"STARTTLS\r\n")
            reply = client.reply()
            assert reply == ["220 2.0.0 Ready to start TLS"]
            check_reply(reply, after_ehlo=True, client=client)
            client.starttls(fuzz_relay.client_tls)
            client.send(b"EHLO client.test\r\n")
            assert "250-AUTH PLAIN LOGIN" in client.reply()
        finally:
            client.close()
