"""Keys the relay parses but does not enforce yet: warned about, or refused when they are a
protection (relay/config_status.py, and the check-config / serve rule of the contract)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from relayproc import RelayProcess, free_port

from relay import config as config_module
from relay.config import ConfigError, load_config
from relay.config_status import NOT_ENFORCED, NotEnforced

# This release enforces every key of the contract, so the shipped table is empty. The machinery
# stays for keys of later releases: these tests list real keys in it for their duration (in
# this process by monkeypatch; in a relay subprocess through RUN_PATCHED), one of each kind
# and file: (the entry, main config text, policy file text).
SYNTHETIC: dict[str, tuple[NotEnforced, str, str]] = {
    "log.format": (NotEnforced("warning", ("logfmt",)), '[log]\nformat = "json"\n', ""),
    "http.token": (NotEnforced("security", ("",)), '[http]\ntoken = "s3cret"\n', ""),
    "sender[].priority": (NotEnforced("warning", ("normal",)), "",
                          '[[sender]]\ndomain = "a.example"\npriority = "high"\n'),
}

# The issue makes these real in the same release: they must never be listed.
ENFORCED_IN_THIS_RELEASE = ("sender[].dkim", "sender[].clients", "sender[].charset",
                            "destination[].tls", "delivery.tls_ca_file",
                            "recipient[].smime_certificate", "recipient[].encryption",
                            "destination[].rate", "destination[].burst",
                            "destination[].source_addresses",
                            "destination[].on_reply", "delivery.path_cooldown",
                            "delivery.path_cooldown_max", "sender[].priority",
                            "delivery.spf", "delivery.source_addresses[].warmup",
                            "cluster.redis", "http.listen", "http.token",
                            "sender[].webhook")

# `python -m relay` with one key of SYNTHETIC listed (argv[1]), then the relay's own argv.
RUN_PATCHED = ("import sys\n"
               "from relay.config_status import NOT_ENFORCED, NotEnforced\n"
               "key, kind, *harmless = sys.argv[1].split(',')\n"
               "NOT_ENFORCED[key] = NotEnforced(kind, tuple(harmless))\n"
               "from relay.cli import main\n"
               "sys.exit(main(sys.argv[2:]))\n")


def write_config(folder: Path, main: str, policy: str = "") -> tuple[Path, Path]:
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    policy_path = folder / "policies" / "p.toml"
    policy_path.write_text(policy)
    path = folder / "relay.toml"
    path.write_text(main + '[queue]\npath = "var"\n' * ("[queue]" not in main))
    return path, policy_path


def run_relay(*args: str, cwd: Path, listed: str | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The relay's command line; `listed`: a key of SYNTHETIC it treats as not enforced."""
    env = {k: v for k, v in os.environ.items() if k != config_module.ENV_CONFIG}
    command = [sys.executable, "-m", "relay", *args]
    if listed is not None:
        entry = SYNTHETIC[listed][0]
        spec = ",".join([listed, entry.kind, *map(str, entry.harmless)])
        command = [sys.executable, "-c", RUN_PATCHED, spec, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def add(key: str) -> None:
        monkeypatch.setitem(NOT_ENFORCED, key, SYNTHETIC[key][0])
    return add


def test_this_release_enforces_every_key() -> None:
    assert NOT_ENFORCED == {}
    assert set(SYNTHETIC) <= set(ENFORCED_IN_THIS_RELEASE) | {"log.format"}


@pytest.mark.parametrize("pattern", sorted(SYNTHETIC))
def test_each_listed_key_is_found_where_it_is_set(tmp_path: Path, pattern: str,
                                                  listed: Callable[[str], None]) -> None:
    listed(pattern)
    _, main, policy = SYNTHETIC[pattern]
    path, policy_path = write_config(tmp_path, main, policy)
    kind = NOT_ENFORCED[pattern].kind
    config = load_config(path)  # parsed and valid: a listed key is never an unknown key
    (item,) = [u for u in config.unenforced if re.sub(r"\[\d+\]", "[]", u.key) == pattern]
    file = policy_path if pattern.startswith(("destination", "sender", "recipient")) else path
    assert item.kind == kind
    line = f"{file}: {item.key}: not enforced yet"
    if kind == "warning":
        assert line in config.warnings
        assert line in load_config(path, strict=True).warnings
    else:
        assert line not in config.warnings
        with pytest.raises(ConfigError) as caught:
            load_config(path, strict=True)
        assert caught.value.problems == [line]


def test_values_that_ask_for_nothing_new_are_not_reported(tmp_path: Path) -> None:
    main = ('[server]\nmax_messages_per_client = "0"\n[queue]\ndedupe_window = "0"\n'
            '[delivery]\nspf = "off"\n[http]\ntoken = ""\n'
            '[cluster]\nredis = ""\n[log]\nformat = "logfmt"\n')
    policy = ('[[destination]]\ndomain = "example.net"\ntls = "opportunistic"\n'
              '[[destination]]\ndomain = "example.org"\ntls = "required"\n'
              '[[destination]]\ndomain = "example.com"\ntls = "verify"\n'
              '[[destination]]\ndomain = "example.io"\ntls = "mta-sts"\n'
              '[[destination]]\ndomain = "example.de"\n'
              'routes = ["127.0.0.1:10026"]\nmax_connections = 3\n'
              "max_messages_per_connection = 10\nsource_addresses = []\non_reply = []\n"
              '[[sender]]\ndomain = "a.example"\npriority = "normal"\n'
              '[[recipient]]\nmatch = "b.example"\nsmime_certificate = ""\n')
    path, _ = write_config(tmp_path, main, policy)
    config = load_config(path, strict=True)
    assert (config.unenforced, config.warnings) == ((), ())


def test_check_config_warns_and_exits_0(tmp_path: Path) -> None:
    _, main, policy = SYNTHETIC["sender[].priority"]
    path, policy_path = write_config(
        tmp_path, '[cluster]\nredis = "redis://127.0.0.1:6379/0"\n'
        '[http]\nlisten = "127.0.0.1:9025"\n' + main,
        '[[destination]]\ndomain = "example.net"\nrate = "1/min"\nmax_connections = 2\n'
        'routes = ["127.0.0.1:10026"]\n' + policy)
    (tmp_path / "hook.key").write_text("a secret\n")  # a file the sample may name
    result = run_relay("check-config", "--config", str(path), cwd=tmp_path,
                       listed="sender[].priority")
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the keys the relay ignores: a destination's rate, max_connections and routes are
    # real, and so are the cluster's Redis and [http] listen.
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(": not enforced yet"), lines
    assert "http" not in lines[0] and lines[0].startswith((str(path), str(policy_path)))
    assert result.stdout.startswith(f"OK: {path}: ")


def test_security_key_is_an_error_and_serve_refuses_it(tmp_path: Path) -> None:
    _, main, policy = SYNTHETIC["http.token"]
    path, policy_path = write_config(
        tmp_path, f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n' + main,
        '[[destination]]\ndomain = "example.net"\n' + policy)
    file = policy_path if policy else path
    result = run_relay("check-config", "--config", str(path), cwd=tmp_path, listed="http.token")
    assert result.returncode == 1
    (refusal,) = result.stdout.splitlines()
    assert refusal.startswith(f"{file}: ") and refusal.endswith(": not enforced yet")
    result = run_relay("serve", "--config", str(path), cwd=tmp_path, listed="http.token")
    assert result.returncode == 78
    assert result.stderr.splitlines()[-1] == refusal
    assert not (tmp_path / "var").exists()  # refused before touching the queue


def test_serve_logs_each_warning_once_and_runs(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    with relay:  # starts and waits for event=listening
        events = relay.events("config_warning")
    # RelayProcess sets [http] listen, which is served: nothing to warn about.
    assert events == []


def test_packaged_config_sets_nothing_unenforced(tmp_path: Path) -> None:
    # /etc/invoice-relay/relay.toml as shipped, its absolute paths moved into tmp_path.
    text = (Path(__file__).resolve().parent.parent / "systemd" / "relay.toml").read_text()
    text = text.replace("/var/lib/invoice-relay", str(tmp_path / "var"))
    text = text.replace("/etc/invoice-relay/policies", str(tmp_path / "policies"))
    (tmp_path / "policies").mkdir()
    path = tmp_path / "relay.toml"
    path.write_text(text)
    config = load_config(path, check_files=True, strict=True)
    assert (config.unenforced, config.warnings) == ((), ())


def test_a_wrong_value_gets_one_line_not_two(tmp_path: Path) -> None:
    path, policy = write_config(tmp_path, '[http]\nlisten = "127.0.0.1:9025"\n',
                                '[[destination]]\ndomain = "example.net"\ntls = "dane"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, strict=True)
    assert caught.value.problems == [
        f'{policy}: destination[0].tls: "dane" is not one of opportunistic | required | '
        "verify | mta-sts"]
    assert caught.value.warnings == []  # [http] listen is enforced
