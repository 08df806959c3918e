"""`invoice-relay serve` as a service: drain on SIGTERM, SIGHUP, bad configs, defaults, one relay
per queue folder, and a delivery process that dies with its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from relayproc import RelayProcess, live_children
from sink import Sink

from relay.serve import INTAKE_PROCESSES

SHUTTING_DOWN = "421 4.3.2 Service shutting down"


def message(marker: str) -> bytes:
    return (f"From: <app@invoices.test>\r\nTo: <ap@example.net>\r\n"
            f"Message-ID: <{marker}@invoices.test>\r\nSubject: {marker}\r\n\r\n"
            f"body of {marker}\r\n").encode()


def send(port: int, marker: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        code, reply = smtp.ehlo("app.test")
        assert code == 250
        smtp.mail("app@invoices.test")
        smtp.rcpt("ap@example.net")
        code, reply = smtp.data(message(marker))
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def markers(sink: Sink) -> list[str]:
    return [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for m in list(sink.messages)]


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            banner = s.recv(100)
            return banner == b"" or banner.startswith(b"421")
    except OSError:
        return True


def wait_until(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def index_rows(relay: RelayProcess, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(relay.queue_dir / "index.sqlite", timeout=10)) as db:
        return db.execute(query).fetchall()


# the delivery process, the intake processes beyond the main one, and the http process
CHILDREN = INTAKE_PROCESSES + 1


def children(pid: int) -> list[int]:
    return list(live_children(pid))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --- SIGTERM ---------------------------------------------------------------------------------

def test_sigterm_drains_sessions_and_exits_0(relay_factory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    idle = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    idle.ehlo("idle.test")
    busy = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    busy.ehlo("busy.test")
    busy.mail("app@invoices.test")
    busy.rcpt("ap@example.net")
    code, _ = busy.docmd("DATA")
    assert code == 354
    body = message("mid-data")
    busy.send(body[:40])

    started = time.monotonic()
    relay.signal(signal.SIGTERM)
    # Every intake process (one per core, up to two) closes the listener at once.
    relay.wait_for_log("event=draining process=intake", count=min(2, os.cpu_count() or 1))
    assert refused(relay.port)
    # An idle session gets 421 at its next command.
    code, reply = idle.docmd("NOOP")
    assert f"{code} {reply.decode()}" == SHUTTING_DOWN
    idle.close()
    # The session in DATA may finish and gets its 250.
    busy.send(body[40:] + b".\r\n")
    code, reply = busy.getreply()
    assert code == 250, reply
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    busy.close()

    assert relay.proc.wait(10) == 0
    assert time.monotonic() - started < 8
    log = relay.new_log()
    assert "Traceback" not in log
    assert "event=stopped process=delivery" in log and "event=stopped process=intake" in log, log

    # Accepted while draining: durable, and delivered (once) when the relay runs again.
    relay.start()
    sink.wait_for(1)
    time.sleep(0.5)
    assert markers(sink) == ["mid-data"]
    assert relay.stop() == 0


def test_sigterm_lets_a_delivery_in_progress_finish(relay_factory) -> None:
    with Sink(accept_delay=2) as slow:
        relay = relay_factory(routes={"example.net": [slow.address]}).start()
        queue_id = send(relay.port, "in-progress")
        wait_until(lambda: slow.dots == 1)  # delivery now waits for the reply to its final dot
        assert not slow.messages
        relay.signal(signal.SIGTERM)
        assert relay.proc.wait(10) == 0
        assert markers(slow) == ["in-progress"]
        assert relay.events("delivered", at_least=1)[0]["id"] == queue_id
        conn = sqlite3.connect(relay.queue_dir / "index.sqlite")
        states = [s for (s,) in conn.execute("SELECT state FROM recipients")]
        conn.close()
        assert states == ["delivered"]
        # Recorded before the exit: a restart does not send it again.
        relay.start()
        time.sleep(1.5)
        assert markers(slow) == ["in-progress"]
        assert relay.stop() == 0


def test_sigint_stops_like_sigterm(relay_factory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    relay.signal(signal.SIGINT)
    assert relay.proc.wait(10) == 0
    assert "Traceback" not in relay.new_log()


def send_to(port: int, marker: str, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("app@invoices.test", rcpts, message(marker))


def stop_event(relay: RelayProcess) -> dict[str, str]:
    [stopped] = [e for e in relay.events("stopped") if e.get("process") == "delivery"]
    return stopped


def test_sigterm_releases_transactions_cut_off_before_the_dot(relay_factory) -> None:
    """The destination never answers RCPT. A stop gives those transactions up at once (it does
    not wait out the grace), sends no dot, counts no attempt, and the mail goes after restart."""
    with Sink(hang="rcpt") as stuck:
        relay = relay_factory(routes={"example.net": [stuck.address]}).start()
        for n in range(3):
            send(relay.port, f"cut-{n}")
        wait_until(lambda: stuck.hung == 3)
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        assert relay.proc.wait(10) == 0
        assert time.monotonic() - started < 8
        assert stuck.dots == 0
        log = relay.new_log()
        assert "Traceback" not in log and "event=delivery_error" not in log
        released = relay.events("released")
        assert len(released) == 3 and {e["rcpt"] for e in released} == {"ap@example.net"}
        assert all("not counted as an attempt" in e["note"] for e in released)
        stopped = stop_event(relay)
        assert (stopped["released"], stopped["unknown"], stopped["deferred"]) == ("3", "0", "0")
        assert index_rows(relay, "SELECT state, attempts FROM recipients") == [("queued", 0)] * 3
        assert index_rows(relay, "SELECT COUNT(*) FROM attempts") == [(0,)]

        stuck.hang = None  # the destination is healthy again
        relay.start()
        relay.wait_for_log("event=delivered", count=3)
        assert sorted(markers(stuck)) == ["cut-0", "cut-1", "cut-2"]
        assert all(e["attempt"] == "1" for e in relay.events("delivered"))
        assert relay.stop() == 0


def test_sigterm_records_unknown_for_a_dot_without_reply(relay_factory) -> None:
    """The destination took the final dot and says nothing. The stop waits for the reply (the
    sink drops the connections once the drain has begun, so the test need not wait out the
    30 s grace), records the recipients as unknown, counts them; the restart delivers each
    again, and the log says why that may be a duplicate. The end of the grace itself is
    tested in process (test_engine.py)."""
    with Sink(hang="dot") as silent:
        relay = relay_factory(routes={"example.net": [silent.address]}).start()
        for n in range(2):
            send_to(relay.port, f"silent-{n}", ["ap@example.net", "ar@example.net"])
        wait_until(lambda: silent.hung == 2)
        relay.signal(signal.SIGTERM)
        relay.wait_for_log("event=draining process=delivery")
        assert relay.proc.poll() is None  # waiting for the replies
        silent.drop_connections()
        assert relay.proc.wait(10) == 0
        unknown = relay.events("unknown")
        assert len(unknown) == 4
        assert all("possible duplicate" in e["note"] for e in unknown)
        stopped = stop_event(relay)
        assert (stopped["unknown"], stopped["delivered"], stopped["released"]) == ("4", "0", "0")
        assert index_rows(relay, "SELECT DISTINCT state FROM recipients") == [("unknown",)]
        queue_ids = {e["id"] for e in unknown}

        silent.hang = None
        relay.start()
        relay.wait_for_log("event=delivered", count=4)
        assert sorted(markers(silent)) == ["silent-0", "silent-1"]
        delivered = relay.events("delivered")
        assert {e["id"] for e in delivered} == queue_ids
        assert all(e["attempt"] == "2" for e in delivered)
        assert "Traceback" not in relay.log
        assert relay.stop() == 0


# --- SIGHUP ----------------------------------------------------------------------------------

def test_sighup_reloads_and_the_relay_keeps_serving(relay_factory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    relay.signal(signal.SIGHUP)
    relay.wait_for_log("event=reloaded process=intake")
    time.sleep(0.3)
    assert relay.proc.poll() is None
    send(relay.port, "after-hup")
    sink.wait_for(1)
    assert markers(sink) == ["after-hup"]
    # Both processes survive a SIGHUP to the whole group, as a terminal hang-up sends.
    os.killpg(relay.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    assert relay.proc.poll() is None
    assert len(children(relay.proc.pid)) == CHILDREN  # delivery, the other intake(s), http
    send(relay.port, "after-group-hup")
    sink.wait_for(2)
    assert relay.stop() == 0


def test_sighup_to_the_group_during_startup_stops_nothing(relay_factory, sink: Sink) -> None:
    # Right after `listening` the delivery process may still be importing: a signal arriving
    # before its handlers exist must wait for them, not kill it with the default action.
    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    os.killpg(relay.proc.pid, signal.SIGHUP)
    relay.wait_for_log("event=reloaded process=delivery", timeout=10)
    time.sleep(0.3)
    assert relay.proc.poll() is None
    assert "event=child_died" not in relay.new_log()
    send(relay.port, "after-early-hup")
    sink.wait_for(1)
    assert relay.stop() == 0


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("this is [ not toml\n", "relay.toml: line 1, column"),
    ("[server]\nbogus = 1\n", "relay.toml: server.bogus: "),
    ("[queue]\nmax_lifetime = \"soon\"\n", "relay.toml: queue.max_lifetime: "),
])
def test_bad_config_exits_78_without_traceback(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "relay.toml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "relay", "--config", "relay.toml", "serve"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "var").exists()  # nothing was started


def _serve_once(folder: Path, listen: str) -> subprocess.CompletedProcess[str]:
    (folder / "relay.toml").write_text(f'[server]\nlisten = ["{listen}"]\n'
                                       f'[queue]\npath = "{folder / "queue"}"\n')
    return subprocess.run([sys.executable, "-m", "relay", "--config", "relay.toml", "serve"],
                          cwd=folder, capture_output=True, text=True, timeout=30)


def test_a_port_in_use_exits_1_so_that_systemd_retries(tmp_path: Path) -> None:
    """The unit restarts on failure but not on 78 (a config error): a port still held by a
    process that is going away is not the config's fault."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve_once(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}")
    assert proc.returncode == 1, proc.stderr
    assert "event=listen_failed" in proc.stderr and "Traceback" not in proc.stderr


def test_an_address_the_machine_does_not_have_exits_78(tmp_path: Path) -> None:
    proc = _serve_once(tmp_path, "192.0.2.1:2525")  # TEST-NET-1: never a local address
    assert proc.returncode == 78, proc.stderr
    assert "event=listen_failed" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_found_by_environment_or_missing_exits_78(tmp_path: Path) -> None:
    (tmp_path / "env.toml").write_text("[server]\nlisten = [\"127.0.0.1:99999\"]\n")
    env = {**os.environ, "INVOICE_RELAY_CONFIG": str(tmp_path / "env.toml")}
    proc = subprocess.run([sys.executable, "-m", "relay", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert f"{tmp_path / 'env.toml'}: server.listen" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = tmp_path / "missing.toml"
    proc = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(missing)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    # A queue folder that cannot be created is a configuration problem too.
    (tmp_path / "file").write_text("")
    (tmp_path / "q.toml").write_text('[queue]\npath = "file/var"\n')
    proc = subprocess.run([sys.executable, "-m", "relay", "--config", "q.toml", "serve"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert "file/var" in proc.stderr and "Traceback" not in proc.stderr


def test_no_config_runs_on_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INVOICE_RELAY_CONFIG"}
    log_path = tmp_path.parent / f"{tmp_path.name}-defaults.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "serve"], cwd=tmp_path,
                                env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = log_path.read_text()
            if "event=listening addresses=" in text or proc.poll() is not None:
                break
            time.sleep(0.05)
        text = log_path.read_text()
        assert "Traceback" not in text
        if "event=listening addresses=" in text:
            assert "addresses=127.0.0.1:2525" in text
            assert "hostname=" + socket.gethostname() in text
            with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
                assert smtp.ehlo()[0] == 250
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        else:
            # Port 2525 (or HTTP's 8025) is taken on this machine: the relay must say so.
            assert proc.wait(15) != 0
            assert ("2525" in text or "8025" in text) and "event=listen_failed" in text, text
        # Spools under ./var of the working directory.
        assert (tmp_path / "var" / "spool").is_dir()
        assert (tmp_path / "var" / "index.sqlite").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- one relay per queue -----------------------------------------------------------------------

def test_second_relay_on_the_same_queue_refuses(tmp_path: Path, sink: Sink) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = RelayProcess(tmp_path / "one", routes={"example.net": [sink.address]}).start()
    second = RelayProcess(tmp_path / "two", routes={"example.net": [sink.address]},
                          queue={"path": str(first.queue_dir)})
    try:
        second.start(wait=False)
        code = second.proc.wait(15)
        assert code != 0
        log = second.new_log()
        assert "another invoice-relay is using" in log and str(first.queue_dir) in log, log
        assert "Traceback" not in log
        assert "event=recovered" not in log  # it did not touch the queue
        # The first one is unharmed.
        assert first.proc.poll() is None
        send(first.port, "still-serving")
        sink.wait_for(1)
        assert first.stop() == 0
    finally:
        first.__exit__()
        second.__exit__()


# --- the delivery process dies with its parent ---------------------------------------------

def test_delivery_process_dies_with_the_main_process(relay_factory, sink: Sink) -> None:
    relay = relay_factory(routes={"example.net": [sink.address]}).start()
    main = relay.proc.pid
    deadline = time.monotonic() + 5
    while len(kids := children(main)) < CHILDREN and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kids) == CHILDREN, kids
    os.kill(main, signal.SIGKILL)  # the main process only, not the group
    relay.proc.wait(5)
    deadline = time.monotonic() + 1
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(k) for k in kids), "a child process outlived the main process"
    # Nothing stays locked: a new relay starts on the same queue.
    relay.start()
    send(relay.port, "after-restart")
    sink.wait_for(1)
    assert relay.stop() == 0


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", "--version"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("invoice-relay 0."), proc
