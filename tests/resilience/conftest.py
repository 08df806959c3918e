"""Fixtures of the resilience tests: a crashfs mount that never outlives its test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # mount.py, scenario.py, crashfs.py

from mount import CrashMount, require_fuse


@pytest.fixture
def crash_mount(tmp_path: Path) -> Iterator[CrashMount]:
    """A fresh crashfs mount at tmp_path/mnt; unmounted (lazily, even if busy) at the end."""
    require_fuse()
    mount = CrashMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "crashfs.log")
    try:
        mount.mount()
        yield mount
    finally:
        mount.close()
