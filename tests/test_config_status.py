"""Keys the relay parses but does not enforce yet: warned about, or refused when they are a
protection (relay/config_status.py, and the check-config / serve rule of the contract)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from relayproc import RelayProcess, free_port

from relay import config as config_module
from relay.config import ConfigError, load_config
from relay.config_status import NOT_ENFORCED

# One value for every key of NOT_ENFORCED that asks for something: (main config, policy file).
# A key added to the table needs a sample here; a key made real is deleted from both.
SAMPLES: dict[str, tuple[str, str]] = {
    "http.listen": ('[http]\nlisten = "127.0.0.1:9025"\n', ""),
    "http.token": ('[http]\ntoken = "s3cret"\n', ""),
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
                            "cluster.redis", "sender[].webhook")


def write_config(folder: Path, main: str, policy: str = "") -> tuple[Path, Path]:
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    policy_path = folder / "policies" / "p.toml"
    policy_path.write_text(policy)
    path = folder / "relay.toml"
    path.write_text(main + '[queue]\npath = "var"\n' * ("[queue]" not in main))
    return path, policy_path


def run_relay(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != config_module.ENV_CONFIG}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_every_listed_key_has_a_sample() -> None:
    assert set(SAMPLES) == set(NOT_ENFORCED)
    assert not set(ENFORCED_IN_THIS_RELEASE) & set(NOT_ENFORCED)


@pytest.mark.parametrize("pattern", sorted(NOT_ENFORCED))
def test_each_listed_key_is_found_where_it_is_set(tmp_path: Path, pattern: str) -> None:
    main, policy = SAMPLES[pattern]
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
    path, _ = write_config(
        tmp_path, '[cluster]\nredis = "redis://127.0.0.1:6379/0"\n'
        '[http]\nlisten = "127.0.0.1:9025"\n',
        '[[destination]]\ndomain = "example.net"\nrate = "1/min"\nmax_connections = 2\n'
        'routes = ["127.0.0.1:10026"]\n')
    result = run_relay("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the keys the relay ignores: a destination's rate, max_connections and routes are
    # real, and so is the cluster's Redis.
    assert result.stderr.splitlines() == [
        f"{path}: http.listen: not enforced yet",
    ]
    assert result.stdout.startswith(f"OK: {path}: ")


def test_security_key_is_an_error_and_serve_refuses_it(tmp_path: Path) -> None:
    path, _ = write_config(
        tmp_path, f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
        '[http]\nlisten = "127.0.0.1:9025"\ntoken = "s3cret"\n',
        '[[destination]]\ndomain = "example.net"\n')
    warning = f"{path}: http.listen: not enforced yet"
    refusal = f"{path}: http.token: not enforced yet"
    result = run_relay("check-config", "--config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout.splitlines()) == (1, [refusal])
    assert result.stderr.splitlines() == [warning]
    result = run_relay("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [warning, refusal]
    assert not (tmp_path / "var").exists()  # refused before touching the queue


def test_serve_logs_each_warning_once_and_runs(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    with relay:  # starts and waits for event=listening
        events = relay.events("config_warning")
    # RelayProcess sets [http] listen, which this release does not serve.
    assert [e["warning"] for e in events] == [f"{relay.config}: http.listen: not enforced yet"]


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
    assert caught.value.warnings == [f"{path}: http.listen: not enforced yet"]
