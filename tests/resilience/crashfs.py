"""CrashFS: a FUSE filesystem that forgets everything not synced when its process is killed.

In the spirit of LazyFS. Every write, create, rename and unlink happens in this process's
memory; only fsync/fdatasync of a file makes its data durable, and only fsync of a folder
makes that folder's entries (names, renames, removals) durable. "Durable" means written to a
backing folder on the real disk. Killing this process with SIGKILL is a power cut: what was
never synced is gone, exactly as the guarantees of POSIX allow and a real disk may do. A
relay that skips a file or folder sync loses acknowledged mail on it; a SIGKILL of the relay
alone cannot show that, because the kernel's page cache survives a killed process.

    python crashfs.py BACKING MOUNTPOINT     # foreground; fusermount3 -u to unmount

It unmounts itself when the process that started it dies (a test runner killed outright).

Backing layout: `tree.json` (the durable folder entries and node kinds) and `data/<ino>`
(each file's durable bytes).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mfusepy as fuse

ROOT = 1


@dataclass
class Node:
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)          # files, volatile
    entries: dict[str, int] = field(default_factory=dict)       # folders, volatile
    dirty: list[tuple[int, int]] = field(default_factory=list)  # file ranges not yet synced
    durable_size: int = 0
    mtime: int = field(default_factory=time.time_ns)  # ns: the class sets use_ns
    links: int = 0
    handles: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class CrashFS(fuse.Operations):
    use_ns = True

    def __init__(self, backing: Path) -> None:
        # Absolute: libfuse changes the daemon's working folder to / once it is mounted.
        self.backing = backing.resolve()
        (backing / "data").mkdir(parents=True, exist_ok=True)
        self._mutex = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self.durable_entries: dict[int, dict[str, int]] = {}
        self.next_ino = ROOT + 1
        self._load()

    # --- durable state -----------------------------------------------------------------------

    def _load(self) -> None:
        tree_file = self.backing / "tree.json"
        if not tree_file.exists():
            self.nodes[ROOT] = Node(ROOT, stat.S_IFDIR | 0o755, links=2)
            self.durable_entries[ROOT] = {}
            self._save_tree()
            return
        tree = json.loads(tree_file.read_text())
        self.next_ino = tree["next_ino"]
        modes = {int(k): v for k, v in tree["modes"].items()}
        self.durable_entries = {int(k): dict(v) for k, v in tree["entries"].items()}
        reachable = self._reachable(modes)
        for ino in reachable:
            node = Node(ino, modes[ino])
            if node.is_dir:
                node.entries = dict(self.durable_entries.get(ino, {}))
            else:
                path = self.backing / "data" / str(ino)
                node.data = bytearray(path.read_bytes()) if path.exists() else bytearray()
                node.durable_size = len(node.data)
            self.nodes[ino] = node
        for node in self.nodes.values():
            for child in node.entries.values():
                self.nodes[child].links += 1
        self.nodes[ROOT].links += 1
        # What no durable folder names any more is gone, as after fsck.
        for path in (self.backing / "data").iterdir():
            if int(path.name) not in self.nodes:
                path.unlink()

    def _reachable(self, modes: dict[int, int]) -> set[int]:
        seen, todo = set(), [ROOT]
        while todo:
            ino = todo.pop()
            if ino in seen or ino not in modes:
                continue
            seen.add(ino)
            todo.extend(self.durable_entries.get(ino, {}).values())
        return seen

    def _save_tree(self) -> None:
        referenced = {ROOT} | {i for e in self.durable_entries.values() for i in e.values()}
        modes = {ino: self.nodes[ino].mode for ino in referenced if ino in self.nodes}
        tree = {"next_ino": self.next_ino, "modes": modes,
                "entries": {ino: e for ino, e in self.durable_entries.items() if ino in modes}}
        tmp = self.backing / "tree.json.tmp"
        tmp.write_text(json.dumps(tree))
        os.replace(tmp, self.backing / "tree.json")

    def _sync_file(self, node: Node) -> None:
        path = self.backing / "data" / str(node.ino)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for start, end in node.dirty:
                end = min(end, len(node.data))
                if start < end:
                    os.pwrite(fd, bytes(node.data[start:end]), start)
            os.ftruncate(fd, len(node.data))
        finally:
            os.close(fd)
        node.dirty.clear()
        node.durable_size = len(node.data)

    # --- lookups -------------------------------------------------------------------------------

    def _lookup(self, path: str) -> Node:
        node = self.nodes[ROOT]
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir or part not in node.entries:
                raise fuse.FuseOSError(errno.ENOENT)
            node = self.nodes[node.entries[part]]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if not parent.is_dir:
            raise fuse.FuseOSError(errno.ENOTDIR)
        return parent, name

    def _node(self, path: str, fh: int | None) -> Node:
        if fh:
            node = self.nodes.get(fh)
            if node is not None:
                return node
        return self._lookup(path)

    def _new(self, parent: Node, name: str, mode: int) -> Node:
        if name in parent.entries:
            raise fuse.FuseOSError(errno.EEXIST)
        node = Node(self.next_ino, mode, links=2 if stat.S_ISDIR(mode) else 1)
        self.next_ino += 1
        self.nodes[node.ino] = node
        parent.entries[name] = node.ino
        parent.mtime = time.time_ns()
        if node.is_dir:
            parent.links += 1
        return node

    def _drop_link(self, ino: int) -> None:
        node = self.nodes[ino]
        node.links -= 1
        self._discard_if_gone(node)

    def _discard_if_gone(self, node: Node) -> None:
        """Forget a file nothing can reach again, even after a crash: no name, no open handle,
        no durable name. Its backing data goes too (a crash would orphan it anyway)."""
        if node.ino == ROOT or node.links > 0 or node.handles > 0:
            return
        if self._durably_named(node.ino):
            return
        del self.nodes[node.ino]
        (self.backing / "data" / str(node.ino)).unlink(missing_ok=True)

    def _durably_named(self, ino: int) -> bool:
        return any(ino in e.values() for e in self.durable_entries.values())

    # --- operations ----------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._mutex:
            node = self._node(path, fh)
            size = 4096 if node.is_dir else len(node.data)
            return {"st_mode": node.mode, "st_ino": node.ino, "st_nlink": max(node.links, 1),
                    "st_size": size, "st_blocks": (size + 511) // 512, "st_uid": os.getuid(),
                    "st_gid": os.getgid(), "st_atime": node.mtime, "st_mtime": node.mtime,
                    "st_ctime": node.mtime}

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._mutex:
            return [".", "..", *self._lookup(path).entries]

    def access(self, path: str, amode: int) -> int:
        with self._mutex:
            self._lookup(path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        blocks = 100 << 18  # 100 GiB of 4 KiB blocks: room for min_free_space
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": blocks,
                "f_bavail": blocks, "f_files": 1 << 20, "f_ffree": 1 << 20, "f_namemax": 255}

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            self._new(parent, name, stat.S_IFDIR | (mode & 0o7777))
        return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            node = self._lookup(path)
            if node.entries:
                raise fuse.FuseOSError(errno.ENOTEMPTY)
            del parent.entries[name]
            parent.links -= 1
            self._drop_link(node.ino)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777))
            node.handles += 1
            return node.ino

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            node = self._lookup(path)
            if flags & os.O_TRUNC:
                self._truncate(node, 0)
            node.handles += 1
            return node.ino

    def opendir(self, path: str) -> int:
        with self._mutex:
            return self._lookup(path).ino

    def release(self, path: str, fh: int) -> int:
        with self._mutex:
            node = self.nodes.get(fh)
            if node is not None:
                node.handles -= 1
                self._discard_if_gone(node)
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            return bytes(self._node(path, fh).data[offset:offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            node = self._node(path, fh)
            end = offset + len(data)
            if end > len(node.data):
                node.data.extend(b"\0" * (end - len(node.data)))
            node.data[offset:end] = data
            node.dirty.append((offset, end))
            node.mtime = time.time_ns()
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mutex:
            self._truncate(self._node(path, fh), length)
        return 0

    def _truncate(self, node: Node, length: int) -> None:
        if length < len(node.data):
            del node.data[length:]
        else:
            node.dirty.append((len(node.data), length))
            node.data.extend(b"\0" * (length - len(node.data)))
        node.mtime = time.time_ns()

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        with self._mutex:
            node = self._node(path, fh)
            if mode == 0 and offset + size > len(node.data):
                self._truncate(node, offset + size)
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            ino = parent.entries.pop(name, None)
            if ino is None:
                raise fuse.FuseOSError(errno.ENOENT)
            parent.mtime = time.time_ns()
            self._drop_link(ino)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            old_parent, old_name = self._parent(old)
            new_parent, new_name = self._parent(new)
            ino = old_parent.entries.get(old_name)
            if ino is None:
                raise fuse.FuseOSError(errno.ENOENT)
            replaced = new_parent.entries.get(new_name)
            del old_parent.entries[old_name]
            new_parent.entries[new_name] = ino
            if replaced is not None and replaced != ino:
                self._drop_link(replaced)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._mutex:
            node = self._lookup(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        with self._mutex:
            self._lookup(path).mtime = time.time_ns()
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() does not make anything durable

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._sync_file(self._node(path, fh))
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            node = self._node(path, fh)
            self.durable_entries[node.ino] = dict(node.entries)
            for ino in node.entries.values():
                child = self.nodes[ino]
                if child.is_dir:
                    self.durable_entries.setdefault(ino, {})
            self._save_tree()
            self._forget_unlinked()
        return 0

    def _forget_unlinked(self) -> None:
        """Files whose removal just became durable: otherwise every removed spool segment
        would stay in memory for good."""
        for node in [n for n in self.nodes.values() if n.links <= 0]:
            self._discard_if_gone(node)


def unmount_when_orphaned(mountpoint: str) -> None:
    """A test runner killed outright tears nothing down: then the mount goes with it."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    subprocess.run(["fusermount3", "-uz", mountpoint], check=False)
    os._exit(1)


def main() -> None:
    backing, mountpoint = Path(sys.argv[1]), sys.argv[2]
    threading.Thread(target=unmount_when_orphaned, args=(mountpoint,), daemon=True).start()
    fuse.FUSE(CrashFS(backing), mountpoint, foreground=True, nothreads=False,
              default_permissions=True, attr_timeout=0, entry_timeout=0,
              negative_timeout=0)


if __name__ == "__main__":
    main()
