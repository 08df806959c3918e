"""systemd's notify protocol, spoken to a socket the test provides (no PID 1 needed)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import notify
from relay.notify import Heartbeats
from tests.relayproc import RelayProcess


class NotifySocket:
    """What systemd would receive: one datagram per sd_notify call."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float) -> list[str] | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    def wait_for(self, state: str, timeout: float = 15) -> list[str]:
        """Datagrams up to and including the first that carries `state`."""
        seen: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                seen.append(message)
                if state in message:
                    return [line for m in seen for line in m]
        raise AssertionError(f"no {state} within {timeout}s; got {seen}")

    def drain(self, seconds: float) -> list[str]:
        """Everything that arrives during `seconds`."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.extend(message)
        return got


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    sink = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sink
    sink.sock.close()


def test_notify_reaches_a_path_socket(notify_socket: NotifySocket) -> None:
    assert notify.notify("READY=1", "STATUS=up")
    assert notify_socket.receive(1) == ["READY=1", "STATUS=up"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"invoice-relay-test-{os.getpid()}"
    sink = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("WATCHDOG=1")
        assert sink.receive(1) == ["WATCHDOG=1"]
    finally:
        sink.sock.close()


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify.notify("READY=1")  # no error either: the relay runs on


def test_watchdog_interval_is_half_the_timeout_and_only_for_us(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for off in ("0", "", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", off)
        assert notify.watchdog_interval() is None


def test_a_child_that_stops_beating_goes_stale() -> None:
    beats = Heartbeats(2, interval=0.05)
    assert beats.stale() == []
    time.sleep(0.06)
    beats.beat(1)
    assert beats.stale() == [0]


def _child(parent: int, name: str) -> int:
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return int(pid)
    raise AssertionError(f"no {name} child of {parent}")


def test_ready_watchdog_reload_and_stopping(tmp_path: Path, notify_socket: NotifySocket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole life under a watchdog of 1 s (a ping every 0.5 s): READY once listening,
    pings that stop while the delivery process is frozen and resume after, RELOADING then
    READY around SIGHUP, STOPPING on drain."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    with RelayProcess(tmp_path) as relay:
        assert relay.proc is not None
        ready = notify_socket.wait_for("READY=1")
        assert f"MAINPID={relay.proc.pid}" in ready
        assert "event=listening" in relay.log  # READY only once it listens
        notify_socket.wait_for("WATCHDOG=1", timeout=3)
        assert notify_socket.drain(1.6).count("WATCHDOG=1") >= 2

        delivery = _child(relay.proc.pid, "relay-delivery")
        os.kill(delivery, signal.SIGSTOP)
        try:
            notify_socket.drain(1.2)  # pings already on their way, and the stale limit
            assert "WATCHDOG=1" not in notify_socket.drain(1.5)
            relay.wait_for_log(f"event=watchdog_withheld pids={delivery}", timeout=3)
        finally:
            os.kill(delivery, signal.SIGCONT)
        notify_socket.wait_for("WATCHDOG=1", timeout=3)

        relay.signal(signal.SIGHUP)
        states = notify_socket.wait_for("READY=1", timeout=10)
        assert "RELOADING=1" in states
        assert states.index("RELOADING=1") < len(states) - 1
        assert any(s.startswith("MONOTONIC_USEC=") for s in states)
        relay.wait_for_log("event=reloaded")

        assert relay.stop() == 0
        notify_socket.wait_for("STOPPING=1", timeout=1)


def test_without_a_watchdog_no_pings(tmp_path: Path, notify_socket: NotifySocket,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with RelayProcess(tmp_path) as relay:
        notify_socket.wait_for("READY=1")
        assert "WATCHDOG=1" not in notify_socket.drain(0.5)
        assert relay.stop() == 0
