"""The operator's log: one logfmt line per event, whatever the values hold."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from relay import log
from tests.relayproc import RelayProcess


@pytest.mark.parametrize(("value", "shown"), [
    ("ok@example.net", "ok@example.net"),
    ("bo\rb@example.net", '"bo\\rb@example.net"'),   # a CR must not look like a clean address
    ("a\nevent=delivered", '"a\\nevent=delivered"'),  # no forged second line
    ('say "hi"', '"say \\"hi\\""'),
    ("b\udcf8b", '"b\\xf8b"'),                        # a byte that was not UTF-8
    ("nul\x00", '"nul\\x00"'),
    ("caf\u00e9", '"caf\u00e9"'),
    ("250 2.0.0 Ok", '"250 2.0.0 Ok"'),
    ("esc\x1b del\x7f", '"esc\\x1b del\\x7f"'),
    ("back\\slash", '"back\\\\slash"'),
])
def test_values_are_quoted_and_escaped(value: str, shown: str) -> None:
    assert log._quote(value) == shown


def test_library_errors_become_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup()
    try:
        raise ValueError("Separator is found, but chunk is longer than limit")
    except ValueError:
        logging.getLogger("mail.log").exception("SMTP session exception")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "event=library_error logger=mail.log" in err and "error=\"ValueError:" in err


def test_loop_errors_become_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup()
    log.loop_exception(None, {"message": "Fatal error on transport",
                              "exception": ConnectionResetError("peer reset")})
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'event=loop_error message="Fatal error on transport"' in err


def test_an_event_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    log.event("bounced", id="Q1", rcpt="bo\rb@example.net", reply="553 5.1.3 x\r\ny", none=None)
    [record] = caplog.records
    line = record.getMessage()
    assert "\r" not in line and "\n" not in line
    assert line.endswith(' event=bounced id=Q1 rcpt="bo\\rb@example.net"'
                         ' reply="553 5.1.3 x\\r\\ny"')


def test_json_lines_carry_the_same_keys(capsys: pytest.CaptureFixture[str]) -> None:
    fields = {"id": "Q1", "rcpt": "bo\rb@example.net", "reply": "250 2.0.0 Ok: queued as X",
              "attempts": 3, "tls": True, "path": Path("/var/lib/x"), "none": None}
    try:
        log.setup(fmt="json")
        log.event("delivered", **fields)
        log.event("sent\u00e9", rcpt="b\udcf8b@example.net")  # not UTF-8: still a valid line
    finally:
        log.setup()
    log.event("delivered", **fields)
    json_line, odd_line, logfmt_line = capsys.readouterr().err.splitlines()
    record = json.loads(json_line)
    assert list(record) == ["time", "event", "id", "rcpt", "reply", "attempts", "tls", "path"]
    assert record["event"] == "delivered" and record["rcpt"] == "bo\rb@example.net"
    assert (record["attempts"], record["tls"], record["path"]) == (3, True, "/var/lib/x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["time"])
    assert odd_line.isascii() and json.loads(odd_line)["event"] == "sent\u00e9"
    # logfmt names exactly the same keys, in the same order
    assert re.findall(r"(\w+)=", logfmt_line.replace('"bo\\rb', "")) [:len(record)] == \
        list(record)


def test_a_relay_configured_for_json_logs_json(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)  # writes its config
    relay.config.write_text(relay.config.read_text() + '\n[log]\nformat = "json"\n')
    relay.start(wait=False)
    try:
        relay.wait_for_log('"event":"listening"', timeout=15)
        assert relay.stop() == 0
        records = [json.loads(line) for line in relay.new_log().splitlines()]
        assert {"recovered", "listening", "draining", "stopped"} <= {r["event"] for r in records}
        assert not [r for r in records if "log.format" in r.get("warning", "")]  # enforced now
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill()
