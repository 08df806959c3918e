"""The operator's log: one logfmt line per event, whatever the values hold."""

from __future__ import annotations

import logging

import pytest

from relay import log


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
