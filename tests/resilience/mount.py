"""A crashfs mount for a test: mounted in its own process, cut like a power failure, remounted.

    mount = CrashMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "crashfs.log")
    mount.mount()
    ...                 # the relay's queue lives under mount.path
    mount.cut()         # SIGKILL crashfs (the relay is killed first), lazy unmount
    mount.mount()       # the reboot: a new crashfs process on the same backing folder
    mount.close()       # always: no mount and no crashfs process survives the test

What was never synced is gone after `cut()`, as after a power cut (see crashfs.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CRASHFS = Path(__file__).with_name("crashfs.py")
MOUNT_TIMEOUT = 15.0


def require_fuse() -> None:
    """Fail with what to install: these tests are part of CI, never silently skipped."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.fail("tests/resilience needs FUSE: /dev/fuse and fusermount3 (Debian: fuse3)")


def lazy_unmount(path: Path) -> None:
    """Detach the mount even while something still uses it, or after its daemon died."""
    subprocess.run(["fusermount3", "-uz", str(path)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class CrashMount:
    def __init__(self, backing: Path, path: Path, log_path: Path) -> None:
        self.backing = backing
        self.path = path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounts = 0
        backing.mkdir(parents=True, exist_ok=True)
        path.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        """Start crashfs on the backing folder and wait until the mount answers."""
        assert self.proc is None, "already mounted"
        # libfuse 3 always (mfusepy would take a libfuse 2 first, whose fusermount may be
        # missing): the Debian package fuse3 brings both the library and fusermount3.
        env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse3"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CRASHFS), str(self.backing), str(self.path)],
                stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"crashfs did not mount {self.path}:\n{self.log()}")
            time.sleep(0.02)
        self.mounts += 1

    def cut(self) -> None:
        """The power cut: crashfs dies with everything it was never asked to sync."""
        assert self.proc is not None, "not mounted"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        lazy_unmount(self.path)

    def close(self) -> None:
        if self.proc is not None:
            self.cut()
        # Even when not mounted as far as ismount can tell (a dead daemon's mount fails stat).
        lazy_unmount(self.path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
