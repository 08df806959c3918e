"""relay.toml and policies/*.toml: defaults, every key, and the exact problem lines."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from smimecerts import write_smime

from relay.addresses import HostPort
from relay.config import (
    ConfigError,
    Percent,
    Rate,
    find_config_file,
    load_config,
    parse_duration,
    parse_rate,
    parse_size,
)
from relay.config import check as config_module
from relay.smtp.auth import hash_password

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path | None, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, **kwargs)
    return caught.value.problems


def run_relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != config_module.ENV_CONFIG}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def write_dkim_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate and its key, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "relay.pem", folder / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("5d", 432000.0), ("0", 0.0), (0, 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "1.5h", "5 days", "-1m", 90, "", "m"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes() -> None:
    assert parse_size(1024) == 1024
    assert parse_size("10KiB") == 10240
    assert parse_size("25MiB") == 26214400
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("10%", percent=True) == Percent(10.0)
    for bad in ("10%", "10MB", "1.5GiB", -1, True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_rates() -> None:
    assert parse_rate("600/min") == Rate(600, 60.0)
    assert parse_rate("10/s").per_second == 10.0
    assert str(parse_rate("3600/h")) == "3600/h"
    for bad in ("600", "0/s", "5/day", 5):
        with pytest.raises(ValueError):
            parse_rate(bad)


# ---------------------------------------------------------------------------- finding


def test_find_config_file_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config_module.ENV_CONFIG, raising=False)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "relay.toml")
    assert find_config_file(None) is None
    write(tmp_path / "etc" / "relay.toml", "")
    assert find_config_file(None) == tmp_path / "etc" / "relay.toml"
    write(tmp_path / "relay.toml", "")
    assert find_config_file(None) == Path("relay.toml")
    env_file = write(tmp_path / "env.toml", "")
    monkeypatch.setenv(config_module.ENV_CONFIG, str(env_file))
    assert find_config_file(None) == env_file
    cli_file = write(tmp_path / "cli.toml", "")
    assert find_config_file(str(cli_file)) == cli_file


def test_named_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        find_config_file(missing)
    assert caught.value.problems == [f"{missing}: file not found"]
    monkeypatch.setenv(config_module.ENV_CONFIG, missing)
    with pytest.raises(ConfigError):
        find_config_file(None)


# ---------------------------------------------------------------------------- loading


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Without a config file no policy folder is read, even one in the working directory.
    write(tmp_path / "policies" / "a.toml", "[[destination]]\ndomain = 'example.net'\n")
    config = load_config(None)
    assert config.source is None and config.source_name == "embedded defaults"
    server = config.server
    assert server.hostname == socket.gethostname()
    assert server.listen == (HostPort("127.0.0.1", 2525),)
    assert server.listen_tls == ()
    assert [str(n) for n in server.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    assert (server.tls_cert, server.tls_key, server.users_file) == (None, None, None)
    assert server.max_message_size == 26214400
    assert config.queue.path == tmp_path.resolve() / "var"
    assert config.queue.retry_schedule == (60.0, 300.0, 900.0, 3600.0, 14400.0)
    assert config.queue.max_lifetime == 5 * 86400
    assert config.dns.nameservers == ()
    assert config.delivery.port == 25 and config.delivery.connect_timeout == 30.0
    assert config.delivery.source_addresses == () and config.delivery.fallback_relays == ()
    assert config.http.listen == HostPort("127.0.0.1", 8025)
    assert config.policies.path is None
    assert config.cluster.redis == "" and config.log.format == "logfmt"
    assert config.destinations == () and config.destination_for("example.net") is None


FULL = """
[server]
hostname = "Relay.Example.COM."
listen = ["127.0.0.1:2525", "[::1]:2526", "0.0.0.0"]
listen_tls = ["127.0.0.1:4650"]
trusted_networks = ["10.1.2.3/8", "192.0.2.7"]
tls_cert = "tls/relay.pem"
tls_key = "tls/relay.key"
users_file = "users"
max_message_size = "10MiB"
max_connections = 200
max_connections_per_client = 5
max_messages_per_client = "600/min"

[queue]
path = "spool"
retry_schedule = ["90s", "2h"]
max_lifetime = "2d"
max_queued = 5000
min_free_space = "10%"
dedupe_window = "0"
retention = "30d"

[dns]
nameservers = ["127.0.0.1:5353", "192.0.2.53"]

[delivery]
port = 2525
source_addresses = [ { address = "192.0.2.10", hostname = "out1.example.com", weight = 3 },
                     { address = "2001:db8::10", warmup = { start = 2026-12-01, per_day = [50] } } ]
fallback_relays = ["smarthost.example.net:587", "[2001:db8::25]"]
connect_timeout = "10s"
tls_ca_file = "tls/relay.pem"
spf = "enforce"

[http]
listen = "127.0.0.1:9025"
token = "s3cret"

[policies]
path = "pol"

[cluster]
redis = "redis://127.0.0.1:6379/0"

[log]
format = "json"
"""

FULL_POLICY = """
[[destination]]
domain = "example.net"
routes = ["127.0.0.1:10026", "mx.example.net"]
rate = "600/min"
max_connections = 10
max_messages_per_connection = 50
tls = "verify"
source_addresses = ["192.0.2.10"]
on_reply = [ { match = "TSS04|rate limited", action = "suspend", duration = "2h" } ]

[[destination]]
domain = "*.example.org"
rate = "5/s"
burst = 20

[[sender]]
domain = "invoices.example.com"
dkim = [ { selector = "s2026", key = "keys/s2026.pem" } ]
priority = "high"
charset = "GB18030"
webhook = { url = "http://127.0.0.1:9000/mail-events", secret_file = "secrets/webhook.key" }

[[recipient]]
match = "AP@Customer.Example"
smime_certificate = "certs/ap.pem"
encryption = "required"
"""


def test_full_config_every_key(tmp_path: Path) -> None:
    make_cert(write(tmp_path / "tls" / ".keep", "").parent)
    write_dkim_key(tmp_path / "keys" / "s2026.pem")
    write_smime(tmp_path / "certs" / "ap", emails=["ap@customer.example"])
    write(tmp_path / "users", f"erp:{hash_password('pw', ln=4)}\n")
    write(tmp_path / "secrets" / "webhook.key", "s3cret\n")
    write(tmp_path / "pol" / "main.toml", FULL_POLICY)
    config = load_config(write(tmp_path / "relay.toml", FULL))
    s = config.server
    assert s.hostname == "relay.example.com"
    assert s.listen == (HostPort("127.0.0.1", 2525), HostPort("::1", 2526), HostPort("0.0.0.0", 25))
    assert s.listen_tls == (HostPort("127.0.0.1", 4650),)
    assert s.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),
                                  ipaddress.ip_network("192.0.2.7/32"))
    assert s.is_trusted(ipaddress.ip_address("10.9.9.9"))
    assert s.is_trusted(ipaddress.ip_address("::ffff:192.0.2.7"))
    assert not s.is_trusted(ipaddress.ip_address("127.0.0.1"))
    assert (s.tls_cert, s.tls_key) == (tmp_path / "tls/relay.pem", tmp_path / "tls/relay.key")
    assert s.users_file == tmp_path / "users"
    assert (s.max_message_size, s.max_connections, s.max_connections_per_client) == (
        10 << 20, 200, 5)
    assert s.max_messages_per_client == Rate(600, 60.0)
    q = config.queue
    assert q.path == tmp_path / "spool" and q.retry_schedule == (90.0, 7200.0)
    assert (q.max_lifetime, q.max_queued, q.min_free_space) == (172800.0, 5000, Percent(10.0))
    assert (q.dedupe_window, q.retention) == (0.0, 30 * 86400.0)
    assert config.dns.nameservers == (HostPort("127.0.0.1", 5353), HostPort("192.0.2.53", 53))
    d = config.delivery
    assert d.port == 2525 and d.connect_timeout == 10.0
    first, second = d.source_addresses
    assert (str(first.address), first.hostname, first.weight) == (
        "192.0.2.10", "out1.example.com", 3)
    assert (str(second.address), second.hostname, second.weight) == (
        "2001:db8::10", "relay.example.com", 1)
    assert first.warmup is None and second.warmup is not None
    assert second.warmup.start == datetime.date(2026, 12, 1)
    assert second.warmup.per_day == (50,)
    assert d.tls_ca_file == tmp_path / "tls/relay.pem" and d.spf == "enforce"
    assert d.fallback_relays == (HostPort("smarthost.example.net", 587),
                                 HostPort("2001:db8::25", 25))
    assert config.http.listen == HostPort("127.0.0.1", 9025) and config.http.token == "s3cret"
    assert config.policies.path == tmp_path / "pol"
    assert config.cluster.redis == "redis://127.0.0.1:6379/0" and config.log.format == "json"

    net, org = config.destinations
    assert net.routes == (HostPort("127.0.0.1", 10026), HostPort("mx.example.net", 25))
    assert (net.rate, net.burst) == (Rate(600, 60.0), 600)  # burst: one period's worth
    assert (net.max_connections, net.max_messages_per_connection, net.tls) == (10, 50, "verify")
    assert [str(a) for a in net.source_addresses] == ["192.0.2.10"]
    (rule,) = net.on_reply
    assert rule.match.search("421 4.7.0 [TSS04] Messages deferred") and rule.duration == 7200
    assert (org.rate, org.burst, org.tls) == (Rate(5, 1.0), 20, "opportunistic")
    (sender,) = config.senders
    assert sender.priority == "high"
    assert sender.dkim[0].selector == "s2026" and sender.dkim[0].algorithm == "rsa"
    assert sender.charset == "gb18030"
    # Policy paths are relative to the main config's folder, not the policy file's.
    assert sender.dkim[0].key == tmp_path / "keys/s2026.pem"
    assert sender.webhook is not None
    assert sender.webhook.secret_file == tmp_path / "secrets/webhook.key"
    (recipient,) = config.recipients
    assert recipient.match == "ap@customer.example" and recipient.encryption == "required"
    assert config.recipient_for("ap@CUSTOMER.example") is recipient
    assert config.recipient_for("other@customer.example") is None
    assert config.sender_for("invoices.example.com") is sender


def test_relative_paths_follow_the_config_folder(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(tmp_path / "etc" / "relay.toml", '[queue]\npath = "../state/q"\n')
    config = load_config(Path(os.path.relpath(path)))
    assert config.queue.path == tmp_path / "state" / "q"
    assert config.source == path
    assert config.policies.path == tmp_path / "etc" / "policies"


def test_destination_most_specific_match(tmp_path: Path) -> None:
    write(tmp_path / "policies" / "a.toml", """
[[destination]]
domain = "*"
[[destination]]
domain = "*.example.net"
[[destination]]
domain = "*.b.example.net"
[[destination]]
domain = "example.net"
""")
    config = load_config(write(tmp_path / "relay.toml", ""))

    def match(domain: str) -> str | None:
        found = config.destination_for(domain)
        return found.domain if found else None

    assert match("example.net") == "example.net"
    assert match("EXAMPLE.NET.") == "example.net"
    assert match("a.example.net") == "*.example.net"
    assert match("x.y.a.example.net") == "*.example.net"
    assert match("a.b.example.net") == "*.b.example.net"
    assert match("b.example.net") == "*.example.net"  # *.b.example.net: proper subdomains only
    assert match("example.org") == "*"
    assert match("notexample.net") == "*"


def test_policy_files_read_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "policies" / "b.toml", "[[destination]]\ndomain = 'b.example'\n")
    write(tmp_path / "policies" / "a.toml", "[[destination]]\ndomain = 'a.example'\n")
    write(tmp_path / "policies" / "notes.txt", "not a policy")
    config = load_config(write(tmp_path / "relay.toml", ""))
    assert [d.domain for d in config.destinations] == ["a.example", "b.example"]


# ---------------------------------------------------------------------------- problems


@pytest.mark.parametrize(("toml", "expected"), [
    ("[server]\nlisen = []\n", "server.lisen: unknown key"),
    ("[serverr]\n", "serverr: unknown key"),
    ('[server]\nlisten = ["127.0.0.1:2525", "127.0.0.1:0"]\n',
     "server.listen[1]: '127.0.0.1:0': port must be 1-65535"),
    ("[server]\nlisten = []\n", "server.listen: no listener: listen and listen_tls are both empty"),
    ('[server]\nlisten = "127.0.0.1:25"\n', "server.listen: expected an array, got a string"),
    ('[server]\ntrusted_networks = ["10.0.0.0/33"]\n',
     'server.trusted_networks[0]: "10.0.0.0/33" is not a network such as 10.0.0.0/8 or ::1/128'),
    ('[server]\nhostname = "bad_name"\n', 'server.hostname: "bad_name" is not a valid domain name'),
    ("[server]\nmax_message_size = true\n",
     "server.max_message_size: expected a string, got a boolean"),
    ('[server]\nlisten_tls = ["127.0.0.1:465"]\n',
     "server.listen_tls: implicit TLS needs server.tls_cert and server.tls_key"),
    ('[queue]\nretry_schedule = ["1m", "5 min"]\n',
     'queue.retry_schedule[1]: "5 min" is not a duration: write an integer and s, m, h or d, '
     'such as "90s" or "5d" ("0" means off)'),
    ("[queue]\nretry_schedule = []\n", "queue.retry_schedule: needs at least one step"),
    ('[queue]\nmax_lifetime = "0"\n', "queue.max_lifetime: must be more than 0"),
    ('[queue]\nmin_free_space = "2GB"\n',
     'queue.min_free_space: "2GB" is not a size: write bytes or an integer with KiB, MiB or GiB '
     'or a percentage such as "10%"'),
    ("[queue]\nmax_queued = 0\n", "queue.max_queued: must be 1 or more, got 0"),
    ("[delivery]\nport = 70000\n", "delivery.port: must be a port number 1-65535, got 70000"),
    ('[delivery]\nsource_addresses = [{ hostname = "a.example" }]\n',
     "delivery.source_addresses[0].address: missing (required)"),
    ('[delivery]\nsource_addresses = [{ address = "192.0.2.1", wieght = 2 }]\n',
     "delivery.source_addresses[0].wieght: unknown key"),
    ('[delivery]\nsource_addresses = ["192.0.2.1"]\n',
     'delivery.source_addresses[0]: expected a table such as { address = "192.0.2.10", '
     'hostname = "out1.example.com", weight = 1 }, got a string'),
    ('[log]\nformat = "text"\n', 'log.format: "text" is not one of logfmt | json'),
    ('[cluster]\nredis = "127.0.0.1:6379"\n',
     'cluster.redis: "127.0.0.1:6379" is not a redis://, rediss:// or unix:// URL'),
    ('[cluster]\nredis = "redis://:pw@127.0.0.1:63x9/0"\n',
     "cluster.redis: the port of the URL is not a number from 0 to 65535"),
    ('[cluster]\nredis = "redis://127.0.0.1:6379/cache"\n',
     'cluster.redis: the database in the URL path must be a number, not "cache"'),
    ('[policies]\npath = "nowhere"\n', "policies.path: folder not found: {dir}/nowhere"),
    ("server = 1\n", "server: expected a table, got an integer"),
])
def test_problem_lines(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path / "relay.toml", toml)
    assert problems(path) == [f"{path}: {expected.replace('{dir}', str(tmp_path))}"]


@pytest.mark.parametrize(("policy", "expected"), [
    ("[[destination]]\nrate = '1/s'\n", "destination[0].domain: missing (required)"),
    ("[[destination]]\ndomain = 'example.net'\nrate = '5/day'\n",
     'destination[0].rate: "5/day" is not a rate: write N/s, N/min or N/h, such as "600/min"'),
    ("[[destination]]\ndomain = 'example.net'\nburst = 5\n", "destination[0].burst: needs rate"),
    ("[[destination]]\ndomain = 'example.net'\ntls = 'dane'\n",
     'destination[0].tls: "dane" is not one of opportunistic | required | verify | mta-sts'),
    ("[[destination]]\ndomain = 'example.net'\nroutes = ['127.0.0.1']\ntls = 'mta-sts'\n",
     'destination[0].tls: "mta-sts" applies to MX hosts and cannot be used with routes '
     '(use "verify" to check the routes\' own names)'),
    ("[[destination]]\ndomain = 'example.net'\nroutes = ['[::1']\n",
     "destination[0].routes[0]: '[::1': missing ']'"),
    ("[[destination]]\ndomain = 'ex*.net'\n",
     'destination[0].domain: "ex*.net": a pattern is *.domain or *, nothing else'),
    ("[[destination]]\ndomain = 'example.net'\nsource_addresses = ['192.0.2.9']\n",
     "destination[0].source_addresses[0]: 192.0.2.9 is not one of [delivery] source_addresses"),
    ("[[destination]]\ndomain = 'example.net'\non_reply = [{ match = '(', action = 'suspend', "
     "duration = '1h' }]\n",
     'destination[0].on_reply[0].match: "(" is not a regular expression: '
     "missing ), unterminated subpattern at position 0"),
    ("[[destination]]\ndomain = 'example.net'\nmax_connections = 0\n",
     "destination[0].max_connections: must be 1 or more, got 0"),
    ("[destination]\ndomain = 'example.net'\n",
     "destination: expected an array of tables such as [[destination]], got a table"),
    ("[[sender]]\ndomain = 'a.example'\npriority = 'urgent'\n",
     'sender[0].priority: "urgent" is not one of high | normal | bulk'),
    ("[[sender]]\ndomain = 'a.example'\n"
     "webhook = { url = 'ftp://x', secret_file = 'policies/p.toml' }\n",
     'sender[0].webhook.url: "ftp://x" is not an http:// or https:// URL'),
    ("[[recipient]]\nmatch = 'ap@'\n", 'recipient[0].match: "ap@" is not a mail address'),
    ("[[recipient]]\nmatch = 'ap@x.example'\nencryption = 'always'\n",
     'recipient[0].encryption: "always" is not one of required | preferred'),
    ("[[recipeint]]\nmatch = 'x.example'\n", "recipeint: unknown key"),
])
def test_policy_problem_lines(tmp_path: Path, policy: str, expected: str) -> None:
    policy_path = write(tmp_path / "policies" / "p.toml", policy)
    assert problems(write(tmp_path / "relay.toml", "")) == [f"{policy_path}: {expected}"]


def test_all_problems_are_collected(tmp_path: Path) -> None:
    write(tmp_path / "policies" / "p.toml", "[[destination]]\ndomain = 'x..y'\n")
    path = write(tmp_path / "relay.toml", "[server]\nfoo = 1\n[queue]\nmax_lifetime = '1y'\n")
    found = problems(path)
    assert len(found) == 3
    assert found[0] == f"{path}: server.foo: unknown key"
    assert found[2].startswith(f"{tmp_path}/policies/p.toml: destination[0].domain:")


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path / "relay.toml", '[server]\nlisten = ["127.0.0.1:2525"\n')
    assert problems(path) == [f"{path}: line 2, column 27: Unclosed array"]
    policy = write(tmp_path / "policies" / "p.toml", "[[destination]]\ndomain = \n")
    path.write_text("")
    assert problems(path) == [f"{policy}: line 2, column 10: Invalid value"]


def test_duplicate_destination_across_files(tmp_path: Path) -> None:
    first = write(tmp_path / "policies" / "10-a.toml",
                  "[[destination]]\ndomain = 'other.example'\n"
                  "[[destination]]\ndomain = 'example.net'\n")
    second = write(tmp_path / "policies" / "20-b.toml",
                   "[[destination]]\ndomain = 'Example.NET.'\n"
                   "[[recipient]]\nmatch = '*.example.net'\n"
                   "[[recipient]]\nmatch = '*.EXAMPLE.net'\n")
    assert problems(write(tmp_path / "relay.toml", "")) == [
        f'{second}: destination[0].domain: "example.net" is already defined at {first}: '
        "destination[1]",
        f'{second}: recipient[1].match: "*.example.net" is already defined at {second}: '
        "recipient[0]",
    ]


def test_tls_and_auth_cross_checks(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    users = write(tmp_path / "users", "erp:not-a-hash\n")
    path = write(tmp_path / "relay.toml",
                 '[server]\nusers_file = "users"\ntls_cert = "relay.pem"\n')
    assert problems(path) == [
        f"{path}: server.tls_key: missing: tls_cert and tls_key are set together",
        f"{path}: server.users_file: {users}: line 1: the hash for user 'erp' is not a "
        "$scrypt$ PHC string made by hash-password",
    ]
    path.write_text('[server]\nusers_file = "users"\n')
    assert problems(path)[0] == (f"{path}: server.users_file: AUTH is only offered after TLS: "
                                 "set server.tls_cert and server.tls_key")
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    write(tmp_path / "other.key", other_key.decode())
    path.write_text('[server]\ntls_cert = "relay.pem"\ntls_key = "other.key"\n')
    (line,) = problems(path)
    assert line.startswith(f"{path}: server.tls_cert: cannot load the certificate with tls_key:")
    users.write_text(f"erp:{hash_password('pw', ln=4)}\n")
    path.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key.name}"\n'
                    'users_file = "users"\nlisten_tls = ["127.0.0.1:4650"]\n')
    assert load_config(path).server.tls_key == key


def test_webhook_secret_is_checked_on_every_load(tmp_path: Path) -> None:
    # Events are real: serve (and every other load) must see a missing, unreadable or empty
    # secret, naming the file and the key.
    policy = write(tmp_path / "policies" / "s.toml",
                   "[[sender]]\ndomain = 'a.example'\n"
                   "webhook = { url = 'http://127.0.0.1:9000/e', secret_file = 'hook.key' }\n")
    path = write(tmp_path / "relay.toml", "")
    where = f"{policy}: sender[0].webhook.secret_file"
    assert problems(path) == [f"{where}: file not found: {tmp_path}/hook.key"]
    (tmp_path / "hook.key").write_text("\n")
    assert problems(path, check_files=True) == [f"{where}: file is empty: {tmp_path}/hook.key"]
    (tmp_path / "hook.key").write_text("s3cret\n")
    (sender,) = load_config(path).senders
    assert sender.webhook is not None and sender.webhook.where == where


def test_dkim_keys_are_checked_on_every_load(tmp_path: Path) -> None:
    # Signing is real: serve (and every other load) must see a missing key, not sign nothing.
    policy = write(tmp_path / "policies" / "s.toml", "[[sender]]\ndomain = 'a.example'\n"
                   "dkim = [{ selector = 's1', key = 'keys/a.pem' }]\n")
    path = write(tmp_path / "relay.toml", "")
    assert problems(path) == [
        f"{policy}: sender[0].dkim[0].key: file not found: {tmp_path}/keys/a.pem"]


# ---------------------------------------------------------------------------- command line


def test_check_config_ok_and_problems(tmp_path: Path) -> None:
    write(tmp_path / "policies" / "p.toml", "[[destination]]\ndomain = 'example.net'\n"
          "[[sender]]\ndomain = 'a.example'\n")
    good = write(tmp_path / "good.toml", '[server]\nlisten = ["127.0.0.1:2525", "[::1]:2525"]\n')
    result = run_relay("check-config", "--config", str(good), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"OK: {good}: 2 listeners, 1 destination policies, 1 sender "
                             "policies, 0 recipient policies\n")
    bad = write(tmp_path / "bad.toml", "[server]\nlisen = 1\n[queue]\nmax_lifetime = 'long'\n")
    result = run_relay("--config", str(bad), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{bad}: server.lisen: unknown key",
        f'{bad}: queue.max_lifetime: "long" is not a duration: write an integer and s, m, h or '
        'd, such as "90s" or "5d" ("0" means off)',
    ]
    assert "Traceback" not in result.stderr


def test_check_config_defaults_and_missing_file(tmp_path: Path) -> None:
    result = run_relay("check-config", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "OK: embedded defaults: 1 listeners, "
                                                  "0 destination policies, 0 sender policies, "
                                                  "0 recipient policies\n")
    result = run_relay("check-config", "--config", "missing.toml", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "missing.toml: file not found\n")


def test_check_config_unreadable_utf8(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"[server]\nhostname = '\xff'\n")
    assert problems(path) == [f"{path}: not valid UTF-8 (byte 21)"]


def test_shipped_examples_pass_check_config() -> None:
    result = run_relay("--config", "relay.toml.example", "check-config", cwd=REPO)
    assert result.returncode == 0, result.stdout
    assert result.stderr == ""  # the examples promise only what runs: no "not enforced yet"
    policy_files = len(list((REPO / "policies").glob("*.toml")))
    assert policy_files >= 1
    config = load_config(REPO / "relay.toml.example")
    assert config.policies.path == REPO / "policies" and config.destinations


def test_load_or_exit_uses_ex_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path / "relay.toml", "[server]\nlisen = 1\n")
    with pytest.raises(SystemExit) as caught:
        config_module.load_or_exit(str(bad))
    assert caught.value.code == 78
    assert capsys.readouterr().err == f"{bad}: server.lisen: unknown key\n"


# ---------------------------------------------------------------------------- [[sender]] dkim


def _pem(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_dkim_key_problems(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    good = write_dkim_key(keys / "good.pem")
    (keys / "folder.pem").mkdir()  # exists, cannot be read as a file
    write(keys / "text.pem", "not a key\n")
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (keys / "public.pem").write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (keys / "locked.pem").write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
    (keys / "ec.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    (keys / "small.pem").write_bytes(subprocess.run(
        ["openssl", "genrsa", "768"], capture_output=True, check=True).stdout)
    (keys / "ed.pem").write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    entries = ", ".join(f'{{ selector = "s{n}", key = "keys/{name}" }}' for n, name in
                        enumerate(["good.pem", "folder.pem", "text.pem", "public.pem",
                                   "locked.pem", "ec.pem", "small.pem", "ed.pem", "none.pem"]))
    policy = write(tmp_path / "policies" / "s.toml",
                   f'[[sender]]\ndomain = "a.example"\ndkim = [{entries}]\n'
                   '[[sender]]\ndomain = "b.example"\ndkim = [{ selector = "s1", key = '
                   '"keys/good.pem" }, { selector = "S1", key = "keys/ed.pem" }]\n'
                   '[[sender]]\ndomain = "*"\ndkim = [{ selector = "s1", key = '
                   '"keys/good.pem" }]\n'
                   '[[sender]]\ndomain = "c.example"\ncharset = "klingon"\n'
                   '[[sender]]\ndomain = "d.example"\ncharset = "base64"\n')
    found = problems(write(tmp_path / "relay.toml", ""))
    k = f"{policy}: sender[0].dkim"
    assert found == [
        f"{k}[1].key: {keys}/folder.pem: cannot read: Is a directory",
        f"{k}[2].key: {keys}/text.pem: not a PEM file (make one with `invoice-relay dkim "
        "keygen`)",
        f"{k}[3].key: {keys}/public.pem: not a private key (a public key or certificate?)",
        f"{k}[4].key: {keys}/locked.pem: the key is encrypted with a passphrase; the relay "
        "needs it unencrypted, readable only by its own user",
        f"{k}[5].key: {keys}/ec.pem: not an RSA or Ed25519 key; DKIM signs with those two only",
        f"{k}[6].key: {keys}/small.pem: an RSA key of 768 bits; DKIM verifiers reject keys "
        "under 1024 bits (use 2048)",
        f"{k}[8].key: file not found: {keys}/none.pem",
        f'{policy}: sender[1].dkim[1].selector: "s1" is already used at sender[1].dkim[0]',
        f'{policy}: sender[2].dkim: not allowed under domain = "*": a signature needs a '
        "domain of its own (d=)",
        f'{policy}: sender[3].charset: "klingon" is not a charset Python knows, such as '
        '"gb18030", "big5" or "iso-8859-1"',
        f'{policy}: sender[4].charset: "base64" is not a charset Python knows, such as '
        '"gb18030", "big5" or "iso-8859-1"',
    ]
    assert good.is_file()
    # No key material in the config object or in any message: only paths.
    assert all("BEGIN" not in line for line in found)


def test_dkim_keys_and_charset_parsed(tmp_path: Path) -> None:
    write_dkim_key(tmp_path / "keys" / "rsa.pem")
    (tmp_path / "keys" / "ed.pem").write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    write(tmp_path / "policies" / "s.toml",
          '[[sender]]\ndomain = "*.example.com"\ncharset = "GBK"\n'
          'dkim = [{ selector = "r2026", key = "keys/rsa.pem" }, '
          '{ selector = "e2026", key = "keys/ed.pem" }]\n')
    (sender,) = load_config(write(tmp_path / "relay.toml", "")).senders
    assert [(k.selector, k.algorithm) for k in sender.dkim] == [("r2026", "rsa"),
                                                                ("e2026", "ed25519")]
    assert sender.dkim[0].key == tmp_path / "keys" / "rsa.pem"
    assert sender.charset == "gbk"


def test_serve_refuses_a_bad_dkim_key(tmp_path: Path) -> None:
    write(tmp_path / "keys" / "k.pem", "-----BEGIN PRIVATE KEY-----\ngarbage\n")
    policy = write(tmp_path / "policies" / "s.toml", '[[sender]]\ndomain = "a.example"\n'
                   'dkim = [{ selector = "s1", key = "keys/k.pem" }]\nclients = ["::1/128"]\n')
    path = write(tmp_path / "relay.toml", '[server]\nlisten = ["127.0.0.1:1"]\n')
    line = f"{policy}: sender[0].dkim[0].key: {tmp_path}/keys/k.pem: not a valid PEM private key"
    result = run_relay("serve", "--config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (78, line + "\n")
    result = run_relay("check-config", "--config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, line + "\n")


def test_damaged_rsa_key_is_refused(tmp_path: Path) -> None:
    # Well-formed PEM whose numbers do not belong together: it would sign, and nothing would
    # ever verify. The check must catch it at load, not at the receiver.
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    damaged = rsa.RSAPrivateNumbers(n.p, n.q, n.d + 2, n.dmp1 + 2, n.dmq1, n.iqmp,
                                    n.public_numbers)
    key = damaged.private_key(unsafe_skip_rsa_key_validation=True)
    write(tmp_path / "keys" / "k.pem", _pem(key).decode())
    policy = write(tmp_path / "policies" / "s.toml", '[[sender]]\ndomain = "a.example"\n'
                   'dkim = [{ selector = "s1", key = "keys/k.pem" }]\n')
    assert problems(write(tmp_path / "relay.toml", "")) == [
        f"{policy}: sender[0].dkim[0].key: {tmp_path}/keys/k.pem: the RSA key is damaged: its "
        "signatures do not verify"]


def test_world_readable_dkim_key_is_a_warning(tmp_path: Path) -> None:
    key = write_dkim_key(tmp_path / "keys" / "k.pem")
    policy = write(tmp_path / "policies" / "s.toml", '[[sender]]\ndomain = "a.example"\n'
                   'dkim = [{ selector = "s1", key = "keys/k.pem" }]\nclients = ["::1/128"]\n')
    path = write(tmp_path / "relay.toml", "")
    key.chmod(0o644)
    assert load_config(path).warnings == (
        f"{policy}: sender[0].dkim[0].key: {key} is readable by every user: chmod 0600, or "
        "0640 with the service's group",)
    key.chmod(0o640)
    assert load_config(path).warnings == ()


def test_segment_size_out_of_range_names_the_value(tmp_path: Path) -> None:
    path = write(tmp_path / "relay.toml", '[queue]\nsegment_size = "8KiB"\n')
    assert problems(path) == [
        f"{path}: queue.segment_size: must be between 64KiB and 1GiB, got '8KiB'"]
