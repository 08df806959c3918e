"""Queue commands run as root act as the queue folder's owner: no root-owned files left
behind that would stop the service (running as that owner) from opening its queue."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run commands as root")


@pytest.fixture
def queue_home() -> Iterator[Path]:
    # Not under pytest's tmp_path: its root-only parent would lock the queue owner out.
    folder = Path(tempfile.mkdtemp(prefix="relay-root-"))
    folder.chmod(0o755)
    (folder / "relay.toml").write_text('[queue]\npath = "var"\n')
    (folder / "var" / "spool").mkdir(parents=True)
    for path in (folder / "var", folder / "var" / "spool"):
        os.chown(path, NOBODY, NOBODY)
    yield folder
    shutil.rmtree(folder)


def _as_root(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "--config", "relay.toml", *args],
                          cwd=folder, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def test_root_commands_leave_only_files_of_the_queue_owner(queue_home: Path) -> None:
    rebuilt = _as_root(queue_home, "queue", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    listed = _as_root(queue_home, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    files = [p for p in (queue_home / "var").rglob("*")]
    assert any(p.name == "index.sqlite" for p in files)
    wrong = [(str(p), p.stat().st_uid) for p in files if p.stat().st_uid != NOBODY]
    assert not wrong, f"left behind with another owner: {wrong}"


def test_a_root_owned_queue_is_used_as_root(queue_home: Path) -> None:
    """A queue root owns itself (not the packaged setup): nothing to hand over."""
    for path in (queue_home / "var", queue_home / "var" / "spool"):
        os.chown(path, 0, 0)
    rebuilt = _as_root(queue_home, "queue", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (queue_home / "var" / "index.sqlite").stat().st_uid == 0


def test_root_becomes_the_queue_owner_before_the_command_runs(queue_home: Path) -> None:
    code = ("import os; from relay.ops.privileges import act_as_queue_owner;"
            " assert act_as_queue_owner('relay.toml') is None;"
            " print(os.getuid(), os.geteuid(), os.getgid(), os.getegid())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=queue_home, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(NOBODY)] * 4
