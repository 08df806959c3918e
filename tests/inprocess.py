"""The intake of one process on its own loop in a thread, without the delivery process."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path

from relay.addresses import HostPort
from relay.queue.committer import Committer
from relay.smtp.server import Intake, IntakeContext


class InProcessIntake:
    """Intake alone (no delivery process) on its own loop in a thread: nothing else writes to
    the disk, so a full disk is met exactly where the test wants it."""

    def __init__(self, root: Path, committer: type[Committer] = Committer, *,
                 segment_size: int = 64 << 10) -> None:
        self.root = root
        self.committer_class = committer
        self.segment_size = segment_size
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.committer = self.committer_class(self.root / "spool", 0,
                                              segment_size=self.segment_size)
        self.committer.start()
        ctx = IntakeContext(hostname="relay.test", trusted=[ipaddress.ip_network("127.0.0.0/8")],
                            max_message_size=10 << 20, committer=self.committer)
        self.intake = Intake(ctx, [HostPort("127.0.0.1", 0)], [])
        await self.intake.start()
        self.port = self.intake.bound()[0][1]

    def __enter__(self) -> InProcessIntake:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.intake.drain(1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.committer.stop()
