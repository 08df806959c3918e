"""Queue commands run as root act as the queue folder's owner.

An operator types `sudo invoice-relay queue ...` out of habit. Run as root, SQLite would create
a root-owned `index.sqlite-wal`/`-shm` (even a read-only open can), and a rebuild a root-owned
index: the service user could then not open its own queue and the relay would not start. So
before any such command touches a file, root becomes the owner of `[queue] path`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pwd
import sys

from relay.config import ConfigError, find_config_file, load_config
from relay.exitcodes import EXIT_PROBLEM

PRELOAD = ("sqlite3", "json", "csv", "datetime", "relay.ops.queuecmd", "relay.ops.statuscmd",
           "relay.queue.recovery", "relay.queue.index")

def act_as_queue_owner(cli_config: str | None) -> int | None:
    """As root: become the owner (user, group) of the queue folder. None when the command may
    go on; an exit status after a message on stderr when it must not."""
    if os.geteuid() != 0:
        return None
    try:
        root = load_config(find_config_file(cli_config)).queue.path
    except ConfigError:
        return None  # the command itself loads the config again and reports the problem
    try:
        owner = root.stat()
    except FileNotFoundError:
        return None  # nothing to leave root-owned files in; the command says it is missing
    except OSError as exc:
        print(f"{root}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEM
    if owner.st_uid == 0:
        return None  # a queue root runs (not the packaged setup): nothing to hand over
    _preload()
    try:
        _become(owner.st_uid, owner.st_gid)
    except OSError as exc:
        print(f"{root}: cannot act as its owner (uid {owner.st_uid}): {exc.strerror or exc};"
              " run the command as that user", file=sys.stderr)
        return EXIT_PROBLEM
    return None


def _preload() -> None:
    """Import what the queue commands use while root can still read it: a Python installed
    under a root-only home (pyenv in /root) is unreadable to the queue owner."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a module a helper has not written yet
            importlib.import_module(name)


def _become(uid: int, gid: int) -> None:
    """Groups first (they need root), then the user; the owner's supplementary groups too,
    so that a config readable by its group (root:invoice-relay 0640) stays readable."""
    try:
        os.initgroups(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:  # a uid with no passwd entry
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
