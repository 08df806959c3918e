"""Live reload (SIGHUP) of the real relay process: routes, DKIM keys, intake settings and the
hostname change for the next session / attempt in every process (main intake, second intake,
delivery), sessions opened before stay open, an invalid config is refused with its check-config
lines and the old one stays, and restart-only keys wait for a restart. Real sinks, real DNS for
the DKIM TXT records, dkimpy verifies. Every wait is on a log event or a sink arrival."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import dkim
from dkimkeys import dnsfunc_for, txt_zone, write_ed25519
from dnsserver import DnsServer
from relayproc import RelayProcess, free_port
from sink import Received, Sink

from relay.serve import INTAKE_PROCESSES

RelayFactory = Callable[..., RelayProcess]
# Every intake process, the delivery process and the http process reload.
PROCESSES = INTAKE_PROCESSES + 2


def route(domain: str, sink: Sink) -> str:
    return f'[[destination]]\ndomain = "{domain}"\nroutes = ["{sink.address}"]\n'


def message(subject: str, sender: str = "ar@invoices.test", pad: int = 0) -> bytes:
    return (f"From: <{sender}>\r\nTo: <ap@example.net>\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 20:00:00 +0000\r\nMessage-ID: <{subject}@app.test>\r\n\r\n"
            f"Invoice {subject}.\r\n{'x' * pad}\r\n").encode()


def transaction(smtp: smtplib.SMTP, subject: str, pad: int = 0,
                sender: str = "ar@invoices.test") -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session: (the first code that is not 2xx/354, or the DATA
    reply's code, and its text). MAIL carries SIZE as a client does when SIZE is announced."""
    data = message(subject, sender, pad)
    code, reply = smtp.mail(sender, [f"SIZE={len(data)}"])
    if code == 250:
        code, reply = smtp.rcpt("ap@example.net")
    if code == 250:
        code, reply = smtp.data(data)
    if code != 250:
        smtp.rset()
    return code, reply.decode()


def send(relay: RelayProcess, subject: str, pad: int = 0,
         sender: str = "ar@invoices.test") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        return transaction(smtp, subject, pad, sender)


def subjects(messages: list[Received]) -> list[str]:
    return [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in messages]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def policy_file(relay: RelayProcess) -> Path:
    return relay.dir / "policies" / "test.toml"


def reload(relay: RelayProcess, epoch: int) -> None:
    """SIGHUP to the main process (as `systemctl reload` sends it) and wait until every process
    has the new config in force."""
    relay.signal(signal.SIGHUP)
    relay.wait_for_log(rf"event=reloaded .*epoch={epoch} ", count=PROCESSES)


# --- routes, intake settings, open sessions --------------------------------------------------

def test_new_route_and_limits_apply_to_the_next_session_while_an_open_one_goes_on(
        relay_factory: RelayFactory, sink: Sink) -> None:
    with Sink() as second:
        relay = relay_factory(policies=route("example.net", sink)).start()
        assert send(relay, "before")[0] == 250
        sink.wait_for(1)
        opened = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        opened.ehlo("app.test")
        policy_file(relay).write_text(route("example.net", second))
        edit(relay.config, "[server]\n", "[server]\nmax_message_size = 4000\n")
        reload(relay, 2)

        assert send(relay, "after")[0] == 250
        assert subjects(second.wait_for(1)) == ["after"]
        # A new session has the new size limit...
        code, _ = send(relay, "too-big-now", pad=6000)
        assert code == 552
        # ...the one opened before the reload is still open, with the limit it began with; its
        # message is delivered by the next attempt's rules: the new route.
        assert transaction(opened, "opened-before", pad=6000)[0] == 250
        opened.quit()
        assert subjects(second.wait_for(2)) == ["after", "opened-before"]
        assert subjects(sink.messages) == ["before"]
        [event] = [e for e in relay.events("reloaded") if e["process"] == "delivery"]
        assert event["changed"] == "server,destinations"
        assert relay.stop() == 0


# --- DKIM key rotation -----------------------------------------------------------------------

def signer_policy(selector: str, key: str) -> str:
    return (f'[[sender]]\ndomain = "invoices.test"\n'
            f'dkim = [ {{ selector = "{selector}", key = "keys/{key}" }} ]\n')


def test_a_new_dkim_key_signs_the_next_message(relay_factory: RelayFactory, sink: Sink,
                                               tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    zone = txt_zone("s1", "invoices.test", write_ed25519(tmp_path / "keys" / "s1.pem"))
    zone += txt_zone("s2", "invoices.test", write_ed25519(tmp_path / "keys" / "s2.pem"))
    with DnsServer(zone) as dns:
        relay = relay_factory(policies=route("example.net", sink)
                              + signer_policy("s1", "s1.pem")).start()
        assert send(relay, "old-key")[0] == 250
        policy_file(relay).write_text(route("example.net", sink) + signer_policy("s2", "s2.pem"))
        reload(relay, 2)
        assert send(relay, "new-key")[0] == 250
        first, second = sink.wait_for(2)
        assert subjects([first, second]) == ["old-key", "new-key"]
        assert selector_of(first.data) == "s1"
        assert selector_of(second.data) == "s2"
        checker = dnsfunc_for(dns.host, dns.port)
        assert dkim.DKIM(first.data).verify(dnsfunc=checker)
        assert dkim.DKIM(second.data).verify(dnsfunc=checker)
        assert relay.stop() == 0


def selector_of(data: bytes) -> str:
    checker = dkim.DKIM(data)
    [sig] = [v for k, v in checker.headers if k.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(b"".join(sig.split()))[b"s"].decode()


# --- invalid configs are refused -------------------------------------------------------------

def test_an_invalid_config_is_refused_and_the_old_one_stays(relay_factory: RelayFactory,
                                                            sink: Sink, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    write_ed25519(tmp_path / "keys" / "good.pem")
    with Sink() as second:
        relay = relay_factory(policies=route("example.net", sink)
                              + signer_policy("good", "good.pem")).start()
        # 1. A TOML syntax error in relay.toml (with a route change in the policies that must
        #    not apply either).
        policy_file(relay).write_text(route("example.net", second)
                                      + signer_policy("good", "good.pem"))
        edit(relay.config, "[server]\n", "[server\n")
        relay.signal(signal.SIGHUP)
        [refused] = relay.wait_for_log("event=reload_refused")
        assert "relay.toml: line 1, column" in refused
        assert send(relay, "after-syntax-error")[0] == 250
        assert subjects(sink.wait_for(1)) == ["after-syntax-error"]
        # 2. The syntax fixed, but the new DKIM key is not a key.
        edit(relay.config, "[server\n", "[server]\n")
        (tmp_path / "keys" / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
        policy_file(relay).write_text(route("example.net", second)
                                      + signer_policy("bad", "bad.pem"))
        relay.signal(signal.SIGHUP)
        relay.wait_for_log("event=reload_refused", count=2)
        problems = [e["problem"] for e in relay.events("reload_refused")]
        assert "test.toml: sender[0].dkim[0].key: " in problems[1]
        assert "bad.pem: not a valid PEM private key" in problems[1]
        assert send(relay, "after-bad-key")[0] == 250
        delivered = sink.wait_for(2)
        assert selector_of(delivered[1].data) == "good"  # still signed with the old key
        # No process took either config: the children were never asked.
        assert relay.events("reloaded") == []
        # 3. Fixed: now it applies everywhere.
        policy_file(relay).write_text(route("example.net", second))
        reload(relay, 2)
        assert send(relay, "after-fix")[0] == 250
        assert subjects(second.wait_for(1)) == ["after-fix"]
        assert "Traceback" not in relay.log
        assert relay.stop() == 0


# --- restart keys; every process --------------------------------------------------------------

def intake_pid(queue_id: str) -> int:
    """The low 12 bits of the pid of the intake process that queued it (relay.queue.envelope)."""
    return int(queue_id[14:], 16) >> 20


def test_a_listen_change_waits_for_a_restart_while_the_rest_applies_in_every_process(
        relay_factory: RelayFactory, sink: Sink) -> None:
    with Sink() as second:
        relay = relay_factory(policies=route("example.net", sink)).start()
        relay.wait_for_log("event=listening addresses=", count=INTAKE_PROCESSES)
        pids = {int(e["pid"]) & 0xFFF for e in relay.events("listening")
                if e.get("process") != "http"}
        assert len(pids) == INTAKE_PROCESSES
        new_port = free_port()
        edit(relay.config, f'"127.0.0.1:{relay.port}"', f'"127.0.0.1:{new_port}"')
        edit(relay.config, 'hostname = "relay.test"', 'hostname = "relay2.test"')
        policy_file(relay).write_text(route("example.net", second))
        reload(relay, 2)
        waiting = relay.events("reload_needs_restart")
        assert len(waiting) == PROCESSES
        assert {e["keys"] for e in waiting} == {"server.listen"}

        # Still on the old port; the new hostname and route are in force in every process:
        # each intake process writes it into the Received header, delivery says it in EHLO.
        seen: set[int] = set()
        for n in range(200):
            code, reply = send(relay, f"m{n}")
            assert code == 250, reply
            seen.add(intake_pid(reply.rsplit(" ", 1)[1]))
            if seen == pids:
                break
        assert seen == pids, "every intake process took a message"
        arrived = second.wait_for(n + 1)
        assert all(b"by relay2.test" in m.data for m in arrived)
        assert {m.helo for m in arrived} == {"relay2.test"}
        assert sink.messages == []
        assert relay.stop() == 0


# --- the bundle, without a process -----------------------------------------------------------

def test_the_bundle_is_refused_whole_when_one_derived_object_fails(tmp_path: Path) -> None:
    from relay.config import Config, DkimKey, SenderPolicy
    from relay.runtime import BuildFailed, Runtime

    good, gone = tmp_path / "good.pem", tmp_path / "gone.pem"
    write_ed25519(good)
    where = "policies/a.toml: sender[0].dkim[1].key"
    config = Config(senders=(SenderPolicy("invoices.test", dkim=(
        DkimKey("good", good), DkimKey("gone", gone, where=where))),))
    try:
        Runtime.build(config, 2)
    except BuildFailed as exc:
        assert len(exc.problems) == 1
        assert exc.problems[0].startswith(f"{where}: cannot read {gone}")
    else:
        raise AssertionError("a missing key must refuse the bundle")
    gone.write_bytes(good.read_bytes())
    runtime = Runtime.build(config, 2)
    assert runtime.epoch == 2 and runtime.signer is not None and runtime.server_tls is None


def test_restart_keys_keep_their_running_value_and_are_named(tmp_path: Path) -> None:
    import dataclasses

    from relay.addresses import HostPort
    from relay.config import Config
    from relay.runtime import changes, keep_restart_keys

    old = Config()
    new = dataclasses.replace(old, server=dataclasses.replace(
        old.server, listen=(HostPort("127.0.0.1", 2600),), hostname="other.test"),
        queue=dataclasses.replace(old.queue, path=tmp_path, max_lifetime=60.0))
    pinned, waiting = keep_restart_keys(new, old)
    assert waiting == ["server.listen", "queue.path"]
    assert pinned.server.listen == old.server.listen and pinned.queue.path == old.queue.path
    assert pinned.server.hostname == "other.test" and pinned.queue.max_lifetime == 60.0
    assert changes(pinned, old)["changed"] == "server,queue"


# --- TLS certificate ---------------------------------------------------------------------------

def test_a_renewed_certificate_serves_the_next_tls_session(relay_factory: RelayFactory,
                                                           sink: Sink, tmp_path: Path) -> None:
    import shutil
    import ssl

    from certs import make_certs
    from cryptography import x509

    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    live = tmp_path / "tls"
    live.mkdir()
    shutil.copy(old.cert, live / "cert.pem")
    shutil.copy(old.key, live / "key.pem")
    tls_port = free_port()
    relay = relay_factory(policies=route("example.net", sink), server={
        "tls_cert": "tls/cert.pem", "tls_key": "tls/key.pem",
        "listen_tls": [f"127.0.0.1:{tls_port}"]}).start()
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE

    def served(smtp: smtplib.SMTP) -> x509.Certificate:
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        return x509.load_der_x509_certificate(der)

    def starttls() -> x509.Certificate:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.starttls(context=unverified)
            return served(smtp)

    def pem(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    implicit = smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=unverified)
    implicit.ehlo("app.test")
    assert served(implicit) == pem(old.cert) == starttls()
    shutil.copy(new.cert, live / "cert.pem")
    shutil.copy(new.key, live / "key.pem")
    reload(relay, 2)
    assert starttls() == pem(new.cert)
    with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=unverified) as fresh:
        assert served(fresh) == pem(new.cert)
        fresh.ehlo("app.test")
        assert transaction(fresh, "fresh-implicit")[0] == 250
    # The implicit-TLS session opened before the reload is still up and can send.
    assert transaction(implicit, "opened-before")[0] == 250
    implicit.quit()
    assert sorted(subjects(sink.wait_for(2))) == ["fresh-implicit", "opened-before"]
    assert relay.stop() == 0


# --- confidentiality: TLS mode and S/MIME certificates ----------------------------------------

def test_tls_mode_and_smime_certificate_apply_to_the_next_attempt(
        relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    from smimecerts import write_smime

    relay = relay_factory(policies=route("example.net", sink)).start()
    assert send(relay, "plain-before")[0] == 250
    [first] = sink.wait_for(1)
    assert not first.tls and b"pkcs7" not in first.data

    # An S/MIME certificate for the recipient: its next copy is encrypted.
    cert, _ = write_smime(tmp_path / "ap", emails=["ap@example.net"])
    policy_file(relay).write_text(
        route("example.net", sink)
        + f'[[recipient]]\nmatch = "ap@example.net"\nsmime_certificate = "{cert}"\n'
          'encryption = "required"\n')
    reload(relay, 2)
    assert send(relay, "encrypted-after")[0] == 250
    second = sink.wait_for(2)[1]
    assert b"application/pkcs7-mime" in second.data and b"encrypted-after" in second.data

    # `tls = "required"` on a hop without STARTTLS: never again in clear text.
    policy_file(relay).write_text(route("example.net", sink) + 'tls = "required"\n')
    reload(relay, 3)
    assert send(relay, "required-after")[0] == 250
    relay.wait_for_log(r"event=deferred .*status=4\.7\.4")
    assert len(sink.messages) == 2

    # Bad input at reload (an EC certificate for S/MIME): refused, naming file and key, and
    # the running config (tls = "required") stays in force.
    ec_cert, _ = write_smime(tmp_path / "ec", emails=["ap@example.net"], ec_key=True)
    policy_file(relay).write_text(
        route("example.net", sink)
        + f'[[recipient]]\nmatch = "ap@example.net"\nsmime_certificate = "{ec_cert}"\n')
    relay.signal(signal.SIGHUP)
    relay.wait_for_log(r"event=reload_refused ")
    # The main process refuses; no child is asked.
    [refused] = relay.events("reload_refused", at_least=1)
    assert refused["problem"].startswith(f"{policy_file(relay)}: recipient[0].smime_certificate:")
    code, reply = send(relay, "still-required")
    assert code == 250
    queue_id = reply.rsplit(" ", 1)[1]
    relay.wait_for_log(rf"event=deferred id={queue_id} .*status=4\.7\.4")
    assert len(sink.messages) == 2
