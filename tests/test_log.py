"""relay.log: one logfmt line per event, whatever the values hold."""

from __future__ import annotations

import logging

import pytest

from relay import log


@pytest.mark.parametrize(("value", "shown"), [
    ("ap@example.net", "ap@example.net"),
    ("250 2.0.0 Ok", '"250 2.0.0 Ok"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("bo\rb@example.net", '"bo\\rb@example.net"'),  # shown, not silently dropped
    ("550-first\n550 second", '"550-first\\n550 second"'),
    ("nul\x00 esc\x1b del\x7f", '"nul\\x00 esc\\x1b del\\x7f"'),
    ("back\\slash", '"back\\\\slash"'),
])
def test_values_are_quoted_and_control_characters_escaped(value: str, shown: str) -> None:
    assert log._quote(value) == shown


def test_an_event_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="invoice-relay")
    log.event("bounced", id="Q1", rcpt="bo\rb@example.net", reply="553 5.1.3 x\r\ny", none=None)
    [record] = caplog.records
    line = record.getMessage()
    assert "\r" not in line and "\n" not in line
    assert line.endswith(' event=bounced id=Q1 rcpt="bo\\rb@example.net"'
                         ' reply="553 5.1.3 x\\r\\ny"')
