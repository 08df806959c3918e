"""`tls = "mta-sts"` end to end: the real relay process fetches the domain's policy from a real
HTTPS host on 127.0.0.1:443 (names from a real DNS server on loopback) and delivers only to the
MX hosts the policy names, with a verified certificate; a policy that names no MX defers.
"""

from __future__ import annotations

import errno
import http.server
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import Certs, make_pki, server_context
from dnsserver import DnsServer
from test_delivery import message, mx_zone, send
from test_tls_destination import RelayFactory, SinkFactory, attempts, deferred, policies

POLICIES = {
    # mx1 is preferred, and its certificate verifies: only the policy keeps mail off it.
    "example.net": "version: STSv1\nmode: enforce\nmx: mx2.example.net\nmax_age: 86400\n",
    "example.org": "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n",
}


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        text = POLICIES.get(self.headers.get("Host", "").removeprefix("mta-sts."))
        if text is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def policy_host(tmp_path: Path) -> Iterator[Certs]:
    """HTTPS on 127.0.0.1:443 for mta-sts.<domain>; yields the PKI the MX hosts use too."""
    pki = make_pki(tmp_path / "pki", {
        "web": [f"mta-sts.{d}" for d in POLICIES],
        "mx": ["mx1.example.net", "mx2.example.net", "mx1.example.org"]})
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 443), _PolicyHandler)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            pytest.skip("port 443 needs root (CI runs as root)")
        raise
    context = server_context(pki["web"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pki["mx"]
    finally:
        server.shutdown()
        server.server_close()


def test_mta_sts_enforce_uses_only_policy_hosts_with_verified_tls(
        relay_factory: RelayFactory, sinks: SinkFactory, dns_server: DnsServer,
        policy_host: Certs, mx_port: int) -> None:
    tls = server_context(policy_host)
    mx1 = sinks(host="127.0.0.2", port=mx_port, starttls=tls)
    mx2 = sinks(host="127.0.0.3", port=mx_port, starttls=tls)
    org = sinks(host="127.0.0.4", port=mx_port, starttls=tls)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    dns_server.add(mx_zone("example.org", (10, "mx1", "127.0.0.4")))
    for domain in POLICIES:
        dns_server.add(f'_mta-sts.{domain}. 300 IN TXT "v=STSv1; id=20261129;"\n'
                       f"mta-sts.{domain}. 300 IN A 127.0.0.1")
    relay = relay_factory(
        dns={"nameservers": [dns_server.address]},
        delivery={"port": mx_port, "tls_ca_file": str(policy_host.ca_cert)},
        policies=policies(example_net="mta-sts", example_org="mta-sts")).start()
    queue_id = send(relay, ["ap@example.net", "ap@example.org"])

    [got] = mx2.wait_for(1)
    assert got.rcpt_tos == ["ap@example.net"] and got.tls
    relay.wait_for_log(r"event=deferred .*rcpt=ap@example.org")
    refused = deferred(relay, "ap@example.org")
    assert refused["status"] == "4.7.5"
    assert "matches its mta-sts policy" in refused["reply"]
    assert mx1.messages == [] and org.messages == []
    [(outcome, version, _, verified)] = attempts(relay, queue_id, "ap@example.net")
    assert (outcome, verified) == ("delivered", 1) and version.startswith("TLSv1.")
    # The policy is kept on disk, so a restart or an outage of the policy host keeps it.
    assert (relay.queue_dir / "mta-sts" / "example.net.json").is_file()


def test_mta_sts_set_by_a_reload_applies_to_the_next_message(
        relay_factory: RelayFactory, sinks: SinkFactory, dns_server: DnsServer,
        policy_host: Certs, mx_port: int) -> None:
    tls = server_context(policy_host)
    mx1 = sinks(host="127.0.0.2", port=mx_port, starttls=tls)
    mx2 = sinks(host="127.0.0.3", port=mx_port, starttls=tls)
    dns_server.add(mx_zone("example.net", (10, "mx1", "127.0.0.2"), (20, "mx2", "127.0.0.3")))
    dns_server.add('_mta-sts.example.net. 300 IN TXT "v=STSv1; id=1;"\n'
                   "mta-sts.example.net. 300 IN A 127.0.0.1")
    relay = relay_factory(
        dns={"nameservers": [dns_server.address]},
        delivery={"port": mx_port, "tls_ca_file": str(policy_host.ca_cert)},
        policies=policies(example_net="opportunistic")).start()
    send(relay, ["ap@example.net"])
    mx1.wait_for(1)  # the preferred MX, while no policy applies

    (relay.dir / "policies" / "test.toml").write_text(policies(example_net="mta-sts"))
    relay.signal(signal.SIGHUP)
    relay.wait_for_log(r"event=reloaded process=delivery ")
    send(relay, ["ap@example.net"], message("invoice 2"))  # another invoice (not a duplicate)
    [got] = mx2.wait_for(1)
    assert got.tls and len(mx1.messages) == 1
