"""Run the real relay (`python -m relay serve`) as a subprocess in its own process group.

    with RelayProcess(tmp_path, routes={"example.net": [sink.address]}) as relay:
        smtplib.SMTP("127.0.0.1", relay.port)...

The config is written as TOML from keyword arguments; stderr (the event log) is kept in a file
so tests can wait for and assert on events.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def proc_stats() -> Iterator[tuple[int, str, list[str], str]]:
    """(pid, comm, the fields after comm, the whole line) of /proc/PID/stat for each live
    (non-zombie) process; fields[1] is its parent, fields[2] its process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            yield int(entry), stat[stat.index("(") + 1:stat.rindex(")")], fields, stat


def live_children(parent: int) -> dict[int, str]:
    """pid -> process name (comm) of each live (non-zombie) child of `parent`, from /proc."""
    return {pid: comm for pid, comm, fields, _ in proc_stats() if int(fields[1]) == parent}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(directory: Path, sections: dict[str, dict[str, Any]],
                 policies: str = "") -> Path:
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in keys.items())
        lines.append("")
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "test.toml").write_text(policies)
    path = directory / "relay.toml"
    path.write_text("\n".join(lines))
    return path


class RelayProcess:
    """A relay on a free loopback port with a fast retry schedule, quiet unless asked."""

    def __init__(self, directory: Path, *, routes: dict[str, list[str]] | None = None,
                 server: dict[str, Any] | None = None, queue: dict[str, Any] | None = None,
                 delivery: dict[str, Any] | None = None, dns: dict[str, Any] | None = None,
                 policies: str = "", port: int | None = None,
                 http: dict[str, Any] | None = None,
                 launcher: Sequence[str] = ("-m", "relay")) -> None:
        self.dir = directory
        self.launcher = list(launcher)  # what follows the interpreter: a module, or -c CODE
        self.port = port or free_port()
        self.http_port = free_port()  # [http] listen, unless `http` sets it
        policy_text = policies
        for domain, hops in (routes or {}).items():
            policy_text += f'\n[[destination]]\ndomain = "{domain}"\nroutes = {_toml_value(hops)}\n'
        sections = {
            "server": {"listen": [f"127.0.0.1:{self.port}"], "hostname": "relay.test",
                       **(server or {})},
            # Small segments: every test relay preallocates a few (32 MiB each by default).
            "queue": {"path": "var", "retry_schedule": ["1s"], "segment_size": "1MiB",
                      **(queue or {})},
            "http": {"listen": f"127.0.0.1:{self.http_port}", **(http or {})},
            "policies": {"path": "policies"},
            # As short as the retry schedule: a path that failed rests 1 s, not a minute.
            "delivery": {"path_cooldown": "1s", **(delivery or {})},
        }
        if dns:
            sections["dns"] = dns
        self.config = write_config(directory, sections, policy_text)
        self.log_path = directory / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def queue_dir(self) -> Path:
        return self.dir / "var"

    def start(self, wait: bool = True) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, *self.launcher, "--config", str(self.config), "serve"],
            stdout=log, stderr=log, start_new_session=True, cwd=self.dir)
        log.close()
        if wait:
            # The intake's line (the http process logs `event=listening process=http` too).
            self.wait_for_log("event=listening addresses=", timeout=15)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def new_log(self) -> str:
        """Log lines written since the last start()."""
        return self.log_path.read_bytes()[self._log_offset:].decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = [line for line in self.new_log().splitlines() if regex.search(line)]
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {pattern!r} in time; log:\n{self.log}")
            time.sleep(0.02)

    def events(self, name: str, at_least: int = 0, timeout: float = 10) -> list[dict[str, str]]:
        """Parsed logfmt lines of one event kind (since the last start). A process writes its
        log lines at the end of an event-loop turn, so a client can see a reply before the line
        that records it: `at_least` waits for that many lines first."""
        if at_least:
            self.wait_for_log(f" event={name}( |$)", timeout=timeout, count=at_least)
        out = []
        for line in self.new_log().splitlines():
            if f" event={name} " in line + " ":
                out.append(dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)))
        return [{k: v.strip('"') for k, v in e.items()} for e in out]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or the OOM killer would."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        # no stray processes of the group may survive
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
