"""The packaged systemd unit and /etc/invoice-relay/relay.toml.

`systemd-analyze verify` checks the unit offline (systemd need not be PID 1). It
insists that the ExecStart binary exists, so the unit is copied into a temporary
folder with only the ExecStart executable replaced by a stub; everything else is
verified as shipped. verify exits non-zero only for hard errors and merely warns
about misspelled directives or unparsable values, so any diagnostic that names
the unit counts as a failure here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "invoice-relay.service"
PACKAGED_CONFIG = ROOT / "systemd" / "relay.toml"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

# Keys of the main config named by the user-facing contract (docs: interface.md),
# including those that arrive with later capabilities.
CONTRACT_KEYS = {
    "server": {
        "hostname", "listen", "listen_tls", "trusted_networks", "tls_cert", "tls_key",
        "users_file", "max_message_size", "max_connections", "max_connections_per_client",
    },
    "queue": {
        "path", "retry_schedule", "max_lifetime", "max_queued", "min_free_space",
        "dedupe_window", "retention",
    },
    "dns": {"nameservers"},
    # path_cooldown, path_cooldown_max: our additions (README "Path health"), safe to uncomment
    "delivery": {"port", "source_addresses", "fallback_relays", "tls_ca_file",
                 "path_cooldown", "path_cooldown_max"},
    "http": {"listen", "token"},
    "policies": {"path"},
    "cluster": {"redis"},
    "log": {"format"},
}


# --- helpers -------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file: {section: {key: [values in order]}}; repeated keys accumulate
    and an empty assignment resets the list, as systemd does."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        assert "=" in line, f"not an assignment: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def _service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def _one(key: str) -> str:
    values = _service().get(key)
    assert values, f"{UNIT.name}: [Service] {key}= is not set"
    assert len(values) == 1, f"{UNIT.name}: [Service] {key}= set {len(values)} times: {values}"
    return values[0]


def _exec_argv(value: str) -> list[str]:
    # ExecStart= may carry the prefixes "-", "@", ":", "+", "!" before the path.
    return shlex.split(value.lstrip("-@:+!"))


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or next(
        (p for p in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail("systemd-analyze not found: install it with `apt-get install systemd` "
                    "(.ci/run does); the unit cannot be verified without it")
    return found


def _require_exec_helpers(unit_text: str) -> None:
    """Exec*= commands other than ExecStart are verified as they are, on this machine:
    say clearly which package is missing rather than let verify fail obscurely."""
    for line in unit_text.splitlines():
        m = re.match(r"\s*Exec(?!Start=)\w+=\s*[-@:+!]*(/\S+)", line)
        if m and not os.access(m.group(1), os.X_OK):
            pytest.fail(f"{m.group(1)} (used by {line.strip()!r}) is missing on this machine: "
                        "`apt-get install procps` provides /bin/kill")


def verify_problems(unit_text: str, tmp_path: Path) -> list[str]:
    """Run `systemd-analyze verify` on unit_text (ExecStart binary swapped for a stub)
    and return its complaints about the unit; empty when the unit is clean."""
    analyze = _systemd_analyze()
    stub = tmp_path / "bin" / "invoice-relay"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    rewritten, count = re.subn(r"(?m)^(ExecStart=[-@:+!]*)/\S+", rf"\g<1>{stub}", unit_text)
    assert count == 1, "expected exactly one absolute ExecStart= line to rewrite"
    copy = tmp_path / "invoice-relay.service"
    copy.write_text(rewritten)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": ""},
    )
    output = (proc.stdout + proc.stderr).splitlines()
    problems = [line for line in output if copy.name in line or str(tmp_path) in line]
    if proc.returncode != 0:
        problems.insert(0, f"systemd-analyze verify exited {proc.returncode}")
        problems.extend(line for line in output if line not in problems)
    return problems


# --- the unit as shipped ---------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    _require_exec_helpers(text)
    problems = verify_problems(text, tmp_path)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("find", "replace"),
    [
        ("PrivateTmp=yes", "PrivateTemp=yes"),              # misspelled directive
        ("Restart=on-failure", "Restart=on-failur"),        # bad value
        ("KillMode=mixed", "KillMode=mixd"),                # bad value
        ("[Install]", "[Instal]"),                          # unknown section
        ("ExecReload=/bin/kill", "ExecReload=/nonexistent/kill"),  # missing binary
    ],
)
def test_verify_catches_broken_units(tmp_path: Path, find: str, replace: str) -> None:
    """The check above must be able to fail: each of these breakages is reported."""
    text = UNIT.read_text()
    assert find in text
    assert verify_problems(text.replace(find, replace), tmp_path), \
        f"verify did not report {replace!r}"


def test_unit_required_settings() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert _one("Type") == "notify"  # systemd 252 (Debian 12) has no notify-reload
    assert _one("NotifyAccess") == "main"
    assert _one("WatchdogSec").removesuffix("s").isdigit()
    assert _one("Restart") == "on-failure"
    assert "78" in _one("RestartPreventExitStatus").split()
    assert _one("StateDirectory") == "invoice-relay"
    assert _one("ConfigurationDirectory") == "invoice-relay"
    assert _one("ProtectSystem") == "strict"
    assert _one("PrivateTmp") == "yes"
    assert _one("NoNewPrivileges") == "yes"
    assert _one("ProtectHome") == "yes"
    assert _one("KillMode") == "mixed"
    assert _one("KillSignal") == "SIGTERM"
    # The relay drains for up to 30 s; systemd must not SIGKILL it before that.
    assert int(_one("TimeoutStopSec")) > 30
    assert _one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _one("DynamicUser") == "no"
    assert _one("User") == "invoice-relay"
    assert _one("Group") == "invoice-relay"
    # No capability unless a drop-in grants CAP_NET_BIND_SERVICE for a port below 1024.
    assert _service()["CapabilityBoundingSet"] == []
    assert "AmbientCapabilities" not in _service()
    assert all(int(hp.rsplit(":", 1)[1]) >= 1024 for hp in _packaged_config()["server"]["listen"])
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Unit"]["Wants"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def security_exposure(unit_text: str, tmp_path: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=true` gives the unit."""
    copy = Path(tempfile.mkdtemp(dir=tmp_path)) / "invoice-relay.service"
    copy.write_text(unit_text)
    proc = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--no-pager", copy.name],
        cwd=copy.parent, capture_output=True, text=True, timeout=120, check=False,
        stdin=subprocess.DEVNULL, env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})
    m = re.search(r"Overall exposure level for invoice-relay\.service: (\d+\.\d+)", proc.stdout)
    assert m, f"systemd-analyze security said:\n{proc.stdout}{proc.stderr}"
    return float(m.group(1))


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert security_exposure(text, tmp_path) <= 2.0
    # The check can fail: without the system call filter the unit is more exposed.
    weaker = re.sub(r"(?m)^SystemCallFilter=.*\n", "", text)
    assert security_exposure(weaker, tmp_path) > 2.0


def test_unit_execstart_is_absolute_and_names_the_packaged_config() -> None:
    argv = _exec_argv(_one("ExecStart"))
    assert argv[0].startswith("/"), f"ExecStart binary must be an absolute path: {argv[0]}"
    assert argv[0].endswith("/invoice-relay")
    assert argv[1:] == ["--config", "/etc/invoice-relay/relay.toml", "serve"]
    for key in ("WorkingDirectory",):
        for value in _service().get(key, []):
            assert value.lstrip("-").startswith("/"), f"{key}= must be absolute: {value}"


# --- the packaged /etc/invoice-relay/relay.toml -----------------------------------

def _packaged_config() -> dict:
    with PACKAGED_CONFIG.open("rb") as f:
        return tomllib.load(f)


def test_packaged_config_uses_absolute_paths_matching_the_unit() -> None:
    config = _packaged_config()
    state_dir = "/var/lib/" + _one("StateDirectory")
    assert config["queue"]["path"] == state_dir
    assert config["policies"]["path"] == "/etc/" + _one("ConfigurationDirectory") + "/policies"


def test_packaged_config_listens_on_loopback_by_default() -> None:
    config = _packaged_config()
    assert config["server"]["listen"] == ["127.0.0.1:2525"]
    # [http] is not enforced yet: commented out, on loopback when uncommented.
    assert config.get("http", {}).get("listen", "127.0.0.1:8025") == "127.0.0.1:8025"
    assert re.search(r'(?m)^# listen = "127\.0\.0\.1:8025"$', PACKAGED_CONFIG.read_text())
    # The LAN example is there, commented out.
    assert re.search(r'(?m)^# listen = \["127\.0\.0\.1:2525", ', PACKAGED_CONFIG.read_text())


def test_packaged_config_has_only_contract_keys() -> None:
    config = _packaged_config()
    for section, table in config.items():
        assert section in CONTRACT_KEYS, f"unknown section [{section}]"
        assert isinstance(table, dict)
        unknown = set(table) - CONTRACT_KEYS[section]
        assert not unknown, f"[{section}] has keys outside the contract: {sorted(unknown)}"
    # Commented examples must name contract keys too, so uncommenting them is safe.
    section = None
    for line in PACKAGED_CONFIG.read_text().splitlines():
        if m := re.match(r"^#?\s*\[(\w+)\]\s*$", line):
            section = m.group(1)
        elif m := re.match(r"^#\s*(\w+)\s*=", line):
            assert section in CONTRACT_KEYS and m.group(1) in CONTRACT_KEYS[section], line


def test_packaged_config_paths_are_absolute() -> None:
    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{where}.{k}" if where else k)
        elif isinstance(value, str) and where.endswith(("path", "_file", "tls_cert", "tls_key")):
            yield where, value

    for where, value in walk(_packaged_config(), ""):
        assert value == "" or value.startswith("/"), f"{where} = {value!r} is not absolute"


# --- README and CI agree with the unit ----------------------------------------

def test_readme_install_matches_unit_execstart() -> None:
    binary = _exec_argv(_one("ExecStart"))[0]
    venv = binary.removesuffix("/bin/invoice-relay")
    assert venv in README.read_text(), f"README.md does not mention {venv}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = README.read_text()
    m = re.search(r"(?m)^\s*python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[test\]'"
                  r" && (?P<cmd>.+?)\s*$", readme)
    assert m, "README.md lost its one-line test command"
    test_command = m.group("cmd")
    ci_lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run does not run {test_command!r}"
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
