"""A relay started for the first time on a queue folder it creates itself, then a power cut."""

from __future__ import annotations

import smtplib
from pathlib import Path

from mount import CrashMount
from relayproc import RelayProcess
from sink import Sink
from test_crash import wait_until

MESSAGE = b"Subject: invoice 1\r\nMessage-ID: <first-start@invoices.test>\r\n\r\nhello\r\n"


def test_new_queue_folder_survives_a_power_cut(tmp_path: Path,
                                               crash_mount: CrashMount) -> None:
    """Regression: `serve` creates a missing queue folder (here with its parent), and nothing
    synced the folders holding them, so a power cut soon after the first start took the whole
    queue, acknowledged mail included. Startup recovery now syncs them."""
    queue = crash_mount.path / "var" / "queue"
    with Sink(greeting_code=421) as sink:  # down: the message waits in the queue
        relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]},
                             queue={"path": str(queue)})
        try:
            relay.start()
            with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
                smtp.sendmail("app@invoices.test", ["ap@example.net"], MESSAGE)
            relay.kill()
            crash_mount.cut()
            crash_mount.mount()
            sink.greeting_code = 220
            relay.start()
            wait_until(lambda: len(sink.messages) == 1, 15, "the acknowledged message")
            assert sink.messages[0].data.endswith(MESSAGE)
        finally:
            relay.__exit__()
