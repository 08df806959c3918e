"""SIGHUP in one process: load the config again, build a new Runtime, put it in force.

The main process reloads first and forwards SIGHUP to its children only when its own reload
succeeded, so an invalid config is refused once (`reload_refused`, one event per check-config
line) and every process keeps the old one. Each child then loads the files itself (forked
processes share no memory to hand a Config over); one that fails to (a file changed again in
between) logs `reload_refused` and keeps its old config.

Loading reads files, so it runs in a thread. Signals that arrive during a reload are folded into
one more reload after it (the files may have changed again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence

from relay import log, notify
from relay.config import ConfigError, load_config
from relay.runtime import BuildFailed, Live, Runtime, changes, keep_restart_keys

Apply = Callable[[Runtime], object]


class Reloader:
    def __init__(self, live: Live, process: str, children: Sequence[int] = ()) -> None:
        self.live = live
        self.process = process
        self.children = children      # forwarded to after a successful reload
        self.apply: Apply | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def start(self, apply: Apply) -> None:
        """Ready to reload: `apply` puts a new Runtime into this process's components. A
        SIGHUP that came while the process was starting is served now."""
        self.apply = apply
        if self._again:
            self.request()

    def request(self) -> None:
        """The SIGHUP handler (on the event loop)."""
        if self.apply is None or (self._task is not None and not self._task.done()):
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait(self) -> None:
        """Until the reload in progress (if any) is over; for tests and shutdown."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # The main process brackets the reload for systemd (its children follow on their own).
        if self.children:
            notify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self._again = True
        try:
            await self._reload_until_settled()
        finally:
            if self.children:  # refused or not, the relay serves (with the config in force)
                notify.notify("READY=1")

    async def _reload_until_settled(self) -> None:
        while self._again:
            self._again = False
            try:
                await self.reload_once()
            except Exception as exc:  # a bug in reloading must not stop the relay
                log.event("reload_refused", level=40, process=self.process,
                          problem=f"unexpected error: {type(exc).__name__}: {exc}")

    async def reload_once(self) -> bool:
        old = self.live.current
        loaded = await self._load(old)
        if loaded is None:
            return False
        runtime, waiting = loaded
        new_config = runtime.config
        assert self.apply is not None
        result = self.apply(runtime)
        if asyncio.iscoroutine(result):
            await result
        self.live.swap(runtime)
        if waiting:
            log.event("reload_needs_restart", level=30, process=self.process,
                      keys=",".join(waiting), note="old values stay in force until a restart")
        log.event("reloaded", process=self.process, pid=os.getpid(), epoch=runtime.epoch,
                  **changes(new_config, old.config))
        if self.children:  # the main process speaks for all: once, not once per process
            for line in new_config.warnings:
                log.event("config_warning", level=30, warning=line)
        self._forward()
        return True

    async def _load(self, old: Runtime) -> tuple[Runtime, list[str]] | None:
        """The new Runtime and the restart keys it left at their old values; None (logged)
        when the files are invalid or something cannot be built from them."""
        try:
            fresh = await asyncio.to_thread(load_config, old.config.source, strict=True)
            pinned, waiting = keep_restart_keys(fresh, old.config)
            runtime = await asyncio.to_thread(Runtime.build, pinned, old.epoch + 1)
        except (ConfigError, BuildFailed) as exc:
            for line in exc.problems:
                log.event("reload_refused", level=40, process=self.process, problem=line,
                          note="the running configuration stays in force")
            return None
        return runtime, waiting

    def _forward(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

