"""Sender authorisation, `[[sender]] clients`: who may send as a domain, in MAIL FROM and From:.

The end-to-end tests run the real relay with STARTTLS and AUTH, connect from extra loopback
source addresses (127.0.0.2 is allowed by network, 127.0.0.3 is trusted for relaying but not
allowed to use the protected domain) and check what reached the sink and the spool.
"""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certs import make_certs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from queuefiles import partial_streams, stored_ids
from rawsmtp import QUEUED, Raw
from relayproc import RelayProcess, free_port
from sink import Sink
from test_config import problems, run_relay, write

from relay.config import SenderClients, load_config
from relay.smtp.auth import hash_password
from relay.smtp.senderauth import SenderAuth, from_domains, header_block

RelayFactory = Callable[..., RelayProcess]
PASSWORD = "s3cret pass-Word"
PROTECTED = "invoices.example.com"
FORGED_550 = "550 5.7.1 From header address not allowed for this client"

POLICIES = f"""
[[sender]]
domain = "{PROTECTED}"
clients = ["user:billing", "127.0.0.2/32"]

[[sender]]
domain = "*.{PROTECTED}"
clients = ["user:billing"]

[[sender]]
domain = "open.example.com"
priority = "high"
"""


def refused_553(address: str) -> str:
    return f"553 5.7.1 <{address}>: Sender address rejected: not allowed for this client"


def message(from_header: str, subject: str = "invoice") -> bytes:
    return (f"From: {from_header}\r\nTo: ap@example.net\r\nSubject: {subject}\r\n\r\n"
            "Please pay INV-1 to the account on file.\r\n").encode()


def transaction(raw: Raw, sender: str, data: bytes) -> str:
    """MAIL, RCPT, DATA on an open session; the reply to MAIL if refused, else to the dot."""
    reply = raw.cmd(f"MAIL FROM:<{sender}>")
    if not reply.startswith("250"):
        return reply
    assert raw.cmd("RCPT TO:<ap@example.net>").startswith("250 ")
    assert raw.cmd("DATA").startswith("354")
    raw.send(data + b".\r\n")
    return raw.reply()


# ---------------------------------------------------------------------------- config


def load(tmp_path: Path, policies: str) -> object:
    write(tmp_path / "policies" / "p.toml", policies)
    return load_config(write(tmp_path / "relay.toml", ""))


def test_clients_parse_into_users_and_networks(tmp_path: Path) -> None:
    config = load(tmp_path, '[[sender]]\ndomain = "a.example"\n'
                            'clients = ["user:billing", " 10.1.2.0/24 ", "::1/128", "user: erp"]\n'
                            '[[sender]]\ndomain = "b.example"\n')
    a, b = config.senders  # type: ignore[attr-defined]
    assert a.clients == SenderClients(
        users=frozenset({"billing", "erp"}),
        networks=(ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("::1/128")))
    assert b.clients is None
    assert config.sender_clients_in_force  # type: ignore[attr-defined]
    assert not load(tmp_path, '[[sender]]\ndomain = "b.example"\n').sender_clients_in_force  # type: ignore[attr-defined]


def test_allows_users_networks_and_ipv4_mapped_clients() -> None:
    clients = SenderClients(users=frozenset({"billing"}),
                            networks=(ipaddress.ip_network("10.1.2.0/24"),
                                      ipaddress.ip_network("2001:db8::/32")))
    assert clients.allows("billing", "192.0.2.1")
    assert not clients.allows("Billing", "192.0.2.1")  # user names are exact, as in users_file
    assert not clients.allows(None, "192.0.2.1")
    assert clients.allows(None, "10.1.2.77")
    assert clients.allows("erp", ipaddress.ip_address("10.1.2.1"))
    assert clients.allows(None, "::ffff:10.1.2.9")     # an IPv4 client on a dual-stack socket
    assert not clients.allows(None, "::ffff:10.1.3.9")
    assert clients.allows(None, "2001:db8::25")
    assert not clients.allows(None, "not an address")


def test_bad_clients_entries_name_file_and_key(tmp_path: Path) -> None:
    policy = write(tmp_path / "policies" / "p.toml",
                   '[[sender]]\ndomain = "ok.example"\nclients = ["user:billing"]\n'
                   '[[sender]]\ndomain = "a.example"\n'
                   'clients = ["billing", "user:", "10.1.2.0/33", "user:two words", 7]\n'
                   '[[sender]]\ndomain = "b.example"\nclients = []\n'
                   '[[sender]]\ndomain = "c.example"\nclients = "user:billing"\n')
    assert problems(write(tmp_path / "relay.toml", "")) == [
        f'{policy}: sender[1].clients[0]: "billing" is neither user:NAME nor a network such as '
        "10.1.2.0/24 or ::1/128",
        f'{policy}: sender[1].clients[1]: "user:": write user:NAME with the name from users_file',
        f'{policy}: sender[1].clients[2]: "10.1.2.0/33" is neither user:NAME nor a network such '
        "as 10.1.2.0/24 or ::1/128",
        f'{policy}: sender[1].clients[3]: "user:two words": write user:NAME with the name from '
        "users_file",
        f"{policy}: sender[1].clients[4]: expected a string, got an integer",
        f"{policy}: sender[2].clients: empty: list user:NAME entries or networks, or leave the "
        "key out to let any client send as this domain",
        f"{policy}: sender[3].clients: expected an array, got a string",
    ]


def ed25519_pem(path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)  # a key readable by every user is a warning of its own
    return path


def test_check_config_warns_on_dkim_without_clients(tmp_path: Path) -> None:
    ed25519_pem(tmp_path / "keys" / "k.pem")
    certs = make_certs(tmp_path / "pki")
    write(tmp_path / "users", f"billing:{hash_password(PASSWORD, ln=4)}\n")
    dkim = 'dkim = [{ selector = "s1", key = "keys/k.pem" }]\n'
    policy = write(tmp_path / "policies" / "p.toml",
                   f'[[sender]]\ndomain = "signed.example"\n{dkim}'
                   f'[[sender]]\ndomain = "guarded.example"\n{dkim}'
                   'clients = ["user:billing", "10.0.0.0/8", "user:bilIing"]\n'
                   '[[sender]]\ndomain = "plain.example"\n')
    path = write(tmp_path / "relay.toml", f'[server]\ntls_cert = "{certs.cert}"\n'
                                          f'tls_key = "{certs.key}"\nusers_file = "users"\n')
    result = run_relay("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stderr.splitlines() == [
        f"{policy}: sender[0]: dkim without clients: any client may send (and get signed) as "
        "this domain",
        f'{policy}: sender[1].clients[2]: "bilIing" is not a user of server.users_file',
    ]
    assert result.stdout.startswith(f"OK: {path}:")
    # without a users_file nobody can log in as a listed user
    write(tmp_path / "relay.toml", "")
    result = run_relay("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert f'{policy}: sender[1].clients[0]: no server.users_file: nobody can log in as ' \
        '"billing"' in result.stderr.splitlines()
    assert load_config(path).warnings == (  # serve reads no users_file: only the dkim warning
        f"{policy}: sender[0]: dkim without clients: any client may send (and get signed) as "
        "this domain",)
    bad = write(tmp_path / "policies" / "p.toml",
                '[[sender]]\ndomain = "a.example"\nclients = ["nobody"]\n')
    result = run_relay("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (f'{bad}: sender[0].clients[0]: "nobody" is neither user:NAME nor '
                             "a network such as 10.1.2.0/24 or ::1/128\n")


# ---------------------------------------------------------------------------- the checker


def test_policy_lookup_covers_subdomains_wildcard_and_idna(tmp_path: Path) -> None:
    config = load(tmp_path, POLICIES + '[[sender]]\ndomain = "bücher.example"\n'
                                       'clients = ["user:books"]\n')
    auth = SenderAuth.from_config(config)  # type: ignore[arg-type]
    assert auth is not None
    assert auth.refused_envelope(f"x@{PROTECTED}", None, "127.0.0.3") == PROTECTED
    assert auth.refused_envelope(f"x@{PROTECTED.upper()}.", None, "127.0.0.2") is None
    assert auth.refused_envelope(f"x@eu.{PROTECTED}", None, "127.0.0.2") == f"eu.{PROTECTED}"
    assert auth.refused_envelope(f"x@eu.{PROTECTED}", "billing", "127.0.0.2") is None
    assert auth.refused_envelope("x@open.example.com", None, "127.0.0.3") is None
    assert auth.refused_envelope("x@elsewhere.test", None, "127.0.0.3") is None
    assert auth.refused_envelope("<>", None, "127.0.0.3") is None
    assert auth.refused_envelope("", None, "127.0.0.3") is None
    # An SMTPUTF8 sender in U-labels matches the policy (stored as xn--bcher-kva.example).
    assert auth.refused_envelope("x@bücher.example", None, "127.0.0.3") == "bücher.example"
    assert auth.refused_envelope("x@bücher.example", "books", "127.0.0.3") is None
    star = load(tmp_path, '[[sender]]\ndomain = "*"\nclients = ["10.0.0.0/8"]\n')
    star_auth = SenderAuth.from_config(star)  # type: ignore[arg-type]
    assert star_auth is not None
    assert star_auth.refused_envelope("a@any.test", None, "127.0.0.1") == "any.test"
    assert SenderAuth.from_config(load(tmp_path, "")) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "domains"), [
    (b"billing@invoices.example.com", ["invoices.example.com"]),
    (b"Billing <billing@Invoices.Example.COM.>", ["invoices.example.com"]),
    (b'"billing@invoices.example.com" <x@evil.test>', ["invoices.example.com", "evil.test"]),
    (b"a@one.test, Bee <b@two.test>", ["one.test", "two.test"]),
    (b"=?utf-8?q?billing=40invoices.example.com?= <x@evil.test>",
     ["evil.test", "invoices.example.com"]),
    (b"x@evil.test (on behalf of\r\n\tbilling@invoices.example.com)",
     ["evil.test", "invoices.example.com"]),
    (b"<billing@invoices.example.com", ["invoices.example.com"]),  # malformed: still seen
    (b"undisclosed", []),
])
def test_from_domains(field: bytes, domains: list[str]) -> None:
    block = b"Subject: hi\r\nFrom: " + field + b"\r\nTo: ap@example.net\r\n"
    assert from_domains(block) == domains


def test_every_from_field_counts_and_only_the_header_block() -> None:
    block = b"From: a@one.test\r\nfrom : b@two.test\r\nX-From: c@three.test\r\n"
    assert from_domains(block) == ["one.test", "two.test"]
    assert header_block(b"From: a@one.test\r\n\r\nFrom: b@two.test\r\n", whole=True) == \
        b"From: a@one.test\r\n"
    assert header_block(b"\r\nFrom: b@two.test\r\n", whole=True) == b""
    assert header_block(b"From: a@one.test\r\n", whole=True) == b"From: a@one.test\r\n"
    assert header_block(b"From: a@one.test\r\nX-Pad: 1\r\n", whole=False) is None


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def auth_relay(relay_factory: RelayFactory, sink: Sink, tmp_path: Path,
               ) -> Iterator[tuple[RelayProcess, ssl.SSLContext]]:
    certs = make_certs(tmp_path / "pki")
    users = tmp_path / "users"
    users.write_text(f"billing:{hash_password(PASSWORD, ln=4)}\n"
                     f"erp:{hash_password(PASSWORD, ln=4)}\n")
    relay = relay_factory(
        routes={"example.net": [sink.address]}, policies=POLICIES,
        # 127.0.0.1 must AUTH to relay; .2 and .3 may relay without (only .2 is a client of
        # the protected domain).
        server={"trusted_networks": ["127.0.0.2/32", "127.0.0.3/32"],
                "tls_cert": str(certs.cert), "tls_key": str(certs.key),
                "users_file": str(users)}).start()
    yield relay, ssl.create_default_context(cafile=str(certs.ca_cert))
    log = relay.log
    assert "Traceback" not in log and PASSWORD not in log


def logged_in(relay: RelayProcess, context: ssl.SSLContext, user: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    client.starttls(context=context)
    client.login(user, PASSWORD)
    return client


def test_allowed_user_sends_wrong_user_gets_553(
        auth_relay: tuple[RelayProcess, ssl.SSLContext], sink: Sink) -> None:
    relay, context = auth_relay
    with logged_in(relay, context, "billing") as client:
        client.sendmail(f"ar@{PROTECTED}", ["ap@example.net"], message(f"AR <ar@{PROTECTED}>"))
    [got] = sink.wait_for(1)
    assert got.mail_from == f"ar@{PROTECTED}"
    with logged_in(relay, context, "erp") as client:
        assert client.mail(f"ar@{PROTECTED}") == \
            (553, refused_553(f"ar@{PROTECTED}")[4:].encode())
        assert client.mail(f"ar@eu.{PROTECTED}")[0] == 553      # *.domain policy
        # erp may still use a domain without clients, and the session goes on
        client.sendmail("app@open.example.com", ["ap@example.net"],
                        message("App <app@open.example.com>", "open"))
    assert len(sink.wait_for(2)) == 2
    [refused, sub] = relay.events("sender_refused", at_least=2)
    assert refused == {**refused, "client": "127.0.0.1", "user": "erp", "domain": PROTECTED,
                       "where": "mail"}
    assert sub["domain"] == f"eu.{PROTECTED}"


def test_allowed_network_vs_refused_network(
        auth_relay: tuple[RelayProcess, ssl.SSLContext], sink: Sink) -> None:
    relay, _ = auth_relay
    with Raw(relay.port, source="127.0.0.2") as raw:
        raw.ehlo()
        assert QUEUED.match(transaction(raw, f"ar@{PROTECTED}", message(f"ar@{PROTECTED}")))
        # the network grants the exact domain; *.domain lists only the user
        assert transaction(raw, f"ar@eu.{PROTECTED}", b"") == refused_553(f"ar@eu.{PROTECTED}")
    with Raw(relay.port, source="127.0.0.3") as raw:
        raw.ehlo()
        assert transaction(raw, f"ar@{PROTECTED}", b"") == refused_553(f"ar@{PROTECTED}")
        # no transaction was opened by the refused MAIL: RCPT needs a new MAIL
        assert raw.cmd("RCPT TO:<ap@example.net>").startswith("503 5.5.1")
        # trusted for relaying, so an unprotected domain and the null sender go through
        assert QUEUED.match(transaction(raw, "app@open.example.com",
                                        message("app@open.example.com")))
        assert QUEUED.match(transaction(raw, "", message("MAILER-DAEMON@app.test")))
    assert {m.mail_from for m in sink.wait_for(3)} == {f"ar@{PROTECTED}",
                                                       "app@open.example.com", "<>"}
    refused = relay.events("sender_refused", at_least=2)
    assert [(e["client"], e["where"], e.get("user")) for e in refused] \
        == [("127.0.0.2", "mail", None), ("127.0.0.3", "mail", None)]


FORGERIES = [
    f"Accounts <billing@{PROTECTED}>",
    f"app@open.example.com, billing@{PROTECTED}",                     # one of several
    f'"billing@{PROTECTED}" <app@open.example.com>',                  # display-name spoof
    "=?utf-8?q?billing=40invoices.example.com?= <app@open.example.com>",
    f"<billing@{PROTECTED}",                                           # malformed
]


def test_from_header_forgery_gets_550_and_nothing_is_queued(
        auth_relay: tuple[RelayProcess, ssl.SSLContext], sink: Sink) -> None:
    relay, context = auth_relay
    with Raw(relay.port, source="127.0.0.3") as raw:
        raw.ehlo()
        for forged in FORGERIES:
            assert transaction(raw, "app@open.example.com", message(forged)) == FORGED_550, forged
        # a large message (streamed to the spool while it arrives) is refused and removed too
        big = message(f"billing@{PROTECTED}") + (b"x" * 900 + b"\r\n") * 1400
        assert transaction(raw, "app@open.example.com", big) == FORGED_550
        # headers so long that From could hide past the checked part
        padded = b"".join(b"X-Pad: " + b"p" * 900 + b"\r\n" for _ in range(80)) + \
            message(f"billing@{PROTECTED}")
        assert transaction(raw, "app@open.example.com", padded) == \
            "550 5.7.1 Header block too long to check the From header"
        assert stored_ids(relay.queue_dir) == [] and partial_streams(relay.queue_dir) == []
        # the same session then sends an honest message, which is the only one to arrive
        assert QUEUED.match(transaction(raw, "app@open.example.com",
                                        message("App <app@open.example.com>", "honest")))
    # an allowed user may put the protected domain in From
    with logged_in(relay, context, "billing") as client:
        client.sendmail("app@open.example.com", ["ap@example.net"],
                        message(f"billing@{PROTECTED}", "allowed"))
    got = sink.wait_for(2)
    assert sorted(b"honest" in m.data for m in got) == [False, True]
    events = relay.events("sender_refused", at_least=len(FORGERIES) + 2)
    assert len(events) == len(FORGERIES) + 2
    assert {e["where"] for e in events} == {"from_header"}
    assert all(e["id"] and e["client"] == "127.0.0.3" for e in events)
    assert events[0]["domain"] == PROTECTED
    assert len(relay.events("received", at_least=2)) == 2


def test_ipv6_client_network(relay_factory: RelayFactory, sink: Sink) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port6 = probe.getsockname()[1]
    relay = relay_factory(
        routes={"example.net": [sink.address]}, port=port,
        policies=f'[[sender]]\ndomain = "{PROTECTED}"\nclients = ["::1/128"]\n',
        server={"listen": [f"127.0.0.1:{port}", f"[::1]:{port6}"],
                "trusted_networks": ["::1/128", "127.0.0.3/32"]}).start()
    with Raw(port6, host="::1") as raw:
        raw.ehlo()
        assert QUEUED.match(transaction(raw, f"ar@{PROTECTED}", message(f"ar@{PROTECTED}")))
    with Raw(port, source="127.0.0.3") as raw:
        raw.ehlo()
        assert transaction(raw, f"ar@{PROTECTED}", b"") == refused_553(f"ar@{PROTECTED}")
    sink.wait_for(1)
    assert [e["client"] for e in relay.events("sender_refused", at_least=1)] == ["127.0.0.3"]


def test_no_clients_anywhere_changes_nothing(relay_factory: RelayFactory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": [sink.address]},
                          policies=f'[[sender]]\ndomain = "{PROTECTED}"\n',
                          server={"trusted_networks": ["127.0.0.3/32"]}).start()
    with Raw(relay.port, source="127.0.0.3") as raw:
        raw.ehlo()
        assert QUEUED.match(transaction(raw, f"ar@{PROTECTED}", message(f"ar@{PROTECTED}")))
    sink.wait_for(1)
    assert relay.events("sender_refused") == []


def test_relay_dsn_is_not_checked(relay_factory: RelayFactory, sink: Sink) -> None:
    """The relay's own DSNs (null sender, From: MAILER-DAEMON@hostname) never pass intake, so
    even a `*` policy that only lets 127.0.0.2 send does not stop them."""
    with Sink(rcpt_reply=lambda a: "550 5.1.1 no such user" if a.startswith("bad") else None
              ) as refusing:
        relay = relay_factory(
            routes={"example.net": [refusing.address], PROTECTED: [sink.address]},
            policies='[[sender]]\ndomain = "*"\nclients = ["127.0.0.2/32"]\n',
            server={"trusted_networks": ["127.0.0.2/32"]}).start()
        with Raw(relay.port, source="127.0.0.2") as raw:
            raw.ehlo()
            reply = raw.cmd(f"MAIL FROM:<ar@{PROTECTED}>")
            assert reply.startswith("250 ")
            assert raw.cmd("RCPT TO:<bad@example.net>").startswith("250 ")
            assert raw.cmd("DATA").startswith("354")
            raw.send(message(f"ar@{PROTECTED}") + b".\r\n")
            assert QUEUED.match(raw.reply())
        [dsn] = sink.wait_for(1)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [f"ar@{PROTECTED}"]
    assert b"From: MAILER-DAEMON@relay.test" in dsn.data
    assert relay.events("sender_refused") == []
