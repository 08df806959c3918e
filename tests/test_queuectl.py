"""Queue control on a running and a stopped relay (`queue retry|hold|release|delete|bounce`),
and `queue list` / `queue summary`: a real relay process, real sinks, the real command line."""

from __future__ import annotations

import json
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.cli import main
from tests.relayproc import RelayProcess
from tests.sink import Sink


class Gate:
    """A sink's RCPT answer: defers while closed; counts every attempt."""

    def __init__(self) -> None:
        self.open = False
        self.attempts: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, rcpt: str) -> str | None:
        with self.lock:
            self.attempts.append(time.monotonic())
        return None if self.open else "452 4.2.2 mailbox full"


def send(port: int, marker: str, rcpt: str = "ap@example.net") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("app.test")
        smtp.mail("app@sender.test")
        smtp.rcpt(rcpt)
        code, reply = smtp.data(f"From: <app@sender.test>\r\nTo: <{rcpt}>\r\n"
                                f"Message-ID: <{marker}@sender.test>\r\nSubject: {marker}\r\n"
                                f"\r\nbody of {marker}\r\n".encode())
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def queue(relay: RelayProcess, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--config", str(relay.config), "queue", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def wait_until(condition: Callable[[], object], timeout: float = 10) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def state(relay: RelayProcess, capsys: pytest.CaptureFixture[str], queue_id: str) -> str:
    for name in ("queued", "deferred", "hold", "delivered", "bounced", "deleted", "active"):
        _, out = queue(relay, capsys, "list", "--json", "--state", name)
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if any(r["queue_id"] == queue_id for r in rows):
            return name
    return "?"


@pytest.fixture
def sinks() -> tuple[Gate, Sink, Sink]:
    gate = Gate()
    with Sink(rcpt_reply=gate) as mx, Sink() as sender_mx:
        yield gate, mx, sender_mx


def relay_for(tmp_path: Path, mx: Sink, sender_mx: Sink, schedule: str) -> RelayProcess:
    return RelayProcess(tmp_path, routes={"example.net": [mx.address],
                                          "other.example": [mx.address],
                                          "sender.test": [sender_mx.address]},
                        queue={"retry_schedule": [schedule]})


def test_running_relay_retry_hold_release_delete_bounce(tmp_path: Path, sinks, capsys) -> None:
    gate, mx, sender_mx = sinks
    with relay_for(tmp_path, mx, sender_mx, "1h") as relay:
        ids = [send(relay.port, f"m{i}") for i in range(4)]
        relay.wait_for_log("event=deferred", count=4)
        code, out = queue(relay, capsys, "list")
        assert code == 0 and out.count("deferred") == 4 and "452 4.2.2 mailbox full" in out
        code, out = queue(relay, capsys, "summary", "--json")
        summary = json.loads(out)
        assert summary["total"] == 4 and summary["by_domain"]["example.net"]["deferred"] == 4

        assert queue(relay, capsys, "hold", ids[0])[0] == 0
        assert state(relay, capsys, ids[0]) == "hold"
        gate.open = True
        assert queue(relay, capsys, "retry", "--all")[1].startswith("3 recipient(s)")
        # retry: attempted (and delivered) within a second; the held one is not.
        took = wait_until(lambda: len(mx.messages) == 3, timeout=5)
        assert took < 1.0
        assert state(relay, capsys, ids[0]) == "hold"
        # release: due now
        assert queue(relay, capsys, "release", ids[0])[0] == 0
        assert wait_until(lambda: len(mx.messages) == 4, timeout=5) < 1.0

        gate.open = False
        more = [send(relay.port, f"n{i}") for i in range(2)]
        relay.wait_for_log("event=deferred", count=6)
        code, out = queue(relay, capsys, "delete", more[0])
        assert code == 0 and out.startswith("1 recipient(s) of 1 message(s) deleted")
        assert state(relay, capsys, more[0]) == "deleted"
        code, out = queue(relay, capsys, "bounce", more[1])
        assert code == 0
        wait_until(lambda: len(sender_mx.messages) == 1)
        dsn = sender_mx.messages[0]
        assert dsn.rcpt_tos == ["app@sender.test"] and more[1].encode() in dsn.data
        assert state(relay, capsys, more[1]) == "bounced"
        time.sleep(0.3)
        assert len(sender_mx.messages) == 1  # no DSN for the deleted one

        code, out = queue(relay, capsys, "hold", "NOSUCHID", ids[0])
        assert code == 1 and "no such queue id: NOSUCHID" in out
        assert state(relay, capsys, ids[0]) == "delivered"  # nothing changed
        code, out = queue(relay, capsys, "list")
        assert out.strip() == "queue is empty"


def test_hold_stops_attempts_even_with_a_short_schedule(tmp_path: Path, sinks, capsys) -> None:
    gate, mx, sender_mx = sinks
    with relay_for(tmp_path, mx, sender_mx, "1s") as relay:
        queue_id = send(relay.port, "held")
        wait_until(lambda: len(gate.attempts) >= 2)  # retried every second
        assert queue(relay, capsys, "hold", queue_id)[0] == 0
        held_at = time.monotonic()
        time.sleep(2.5)
        assert not [t for t in gate.attempts if t > held_at + 0.2]
        gate.open = True
        assert queue(relay, capsys, "release", queue_id)[0] == 0
        assert wait_until(lambda: len(mx.messages) == 1, timeout=5) < 1.0


def test_stopped_relay_verbs_are_honoured_at_the_next_start(tmp_path: Path, sinks,
                                                            capsys) -> None:
    gate, mx, sender_mx = sinks
    relay = relay_for(tmp_path, mx, sender_mx, "1h")
    with relay:
        ids = [send(relay.port, f"s{i}") for i in range(4)]
        relay.wait_for_log("event=deferred", count=4)
        relay.stop()
        assert queue(relay, capsys, "hold", ids[0])[0] == 0
        assert queue(relay, capsys, "delete", ids[1])[0] == 0
        assert queue(relay, capsys, "bounce", ids[2])[0] == 0
        assert queue(relay, capsys, "retry", ids[3])[0] == 0
        code, out = queue(relay, capsys, "list", "--state", "hold")
        assert ids[0] in out and ids[1] not in out
        code, out = queue(relay, capsys, "retry", "NOPE")
        assert code == 1 and "NOPE" in out
        gate.open = True
        relay.start()
        wait_until(lambda: len(mx.messages) == 1 and len(sender_mx.messages) == 1)
        assert b"Subject: s3" in mx.messages[0].data  # only the retried one went out
        assert ids[2].encode() in sender_mx.messages[0].data  # the DSN of the bounced one
        assert state(relay, capsys, ids[0]) == "hold"
        assert state(relay, capsys, ids[1]) == "deleted"


def test_list_filters_paging_and_bad_input(tmp_path: Path, sinks, capsys) -> None:
    _, mx, sender_mx = sinks
    with relay_for(tmp_path, mx, sender_mx, "1h") as relay:
        first = send(relay.port, "a")
        send(relay.port, "b", rcpt="x@other.example")
        relay.wait_for_log("event=deferred", count=2)
        code, out = queue(relay, capsys, "list", "--domain", "example.net", "--json")
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["queue_id"] for r in rows] == [first]
        assert rows[0]["state"] == "deferred" and rows[0]["attempts"] == 1
        assert rows[0]["last_response"].startswith("452 4.2.2")
        code, out = queue(relay, capsys, "list", "--json", "--limit", "1", "--offset", "1")
        assert len(out.splitlines()) == 1 and first not in out
        code, out = queue(relay, capsys, "summary")
        assert "2 recipients queued" in out and "example.net" in out
        with pytest.raises(SystemExit) as exc:
            queue(relay, capsys, "list", "--state", "waiting")
        assert exc.value.code == 2
        code, out = queue(relay, capsys, "retry", first, "--all")
        assert code == 2


def test_retry_forgets_a_resting_path(tmp_path: Path, capsys) -> None:
    # "rate limited" takes the path out of rotation (a block); an operator's retry, as
    # Postfix's flush, must not be deferred again by that rest.
    gate = Gate()
    with Sink(rcpt_reply=lambda rcpt: gate(rcpt) and "450 4.7.1 You are rate limited") as mx, \
            RelayProcess(tmp_path, routes={"example.net": [mx.address]},
                         queue={"retry_schedule": ["1h"]},
                         delivery={"path_cooldown": "1h"}) as relay:
        send(relay.port, "rested")
        relay.wait_for_log("event=path_down")
        # The dashboard's "source suspended" panel sees it (each process writes its samples
        # out twice a second: poll).
        assert wait_until(lambda: suspended(relay) == 1.0, timeout=5) < 5
        gate.open = True
        assert queue(relay, capsys, "retry", "--domain", "example.net")[0] == 0
        assert wait_until(lambda: len(mx.messages) == 1, timeout=5) < 1.5
        relay.wait_for_log("event=health_reset")
        relay.wait_for_log('event=path_up .*note="queue retry"')
        assert wait_until(lambda: suspended(relay) == 0.0, timeout=5) < 5


def suspended(relay: RelayProcess) -> float | None:
    """`source_suspended` of the kernel-chosen source towards example.net, as scraped."""
    text = metrics.render(relay.queue_dir / metrics.DIRECTORY_NAME, relay.queue_dir)[0]
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "invoice_relay_source_suspended" and \
                    sample.labels == {"source": "default", "domain": "example.net"}:
                return sample.value
    return None
