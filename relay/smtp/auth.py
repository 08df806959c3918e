"""SMTP AUTH credentials: scrypt password hashes (PHC strings) and the `users_file`.

A hash looks like `$scrypt$ln=15,r=8,p=1$<salt>$<hash>` with salt and hash in base64
without padding, the format passlib and other PHC users write for scrypt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import getpass
import hashlib
import hmac
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LN, R, P = 15, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
# Bounds for parameters read from a hash: anything outside is treated as malformed, so a
# crafted users_file line cannot make one login burn gigabytes or minutes.
_MAX_LN, _MAX_R, _MAX_P = 20, 32, 16

# Verified against when the user is unknown, so that a wrong user name costs the same
# scrypt time as a wrong password (no user enumeration by timing). Its password is random
# and discarded; the result of that check is ignored anyway.
_DUMMY_HASH = (
    "$scrypt$ln=15,r=8,p=1$14HpYwHqtshYz3dW4JoS4Q$"
    "XzJkdfK621GpO046YOkeapEOzLUBn5/+n+e6NY73DJ4"
)


@dataclass(frozen=True, slots=True)
class _Phc:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    # hashlib's default maxmem (32 MiB) is just too small for ln=15, r=8 (128*r*n bytes).
    maxmem = 128 * r * n * (p + 1) + 16 * 1024 * 1024
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=maxmem, dklen=dklen)


def _parse_phc(phc: str) -> _Phc | None:
    """The parts of an scrypt PHC string, or None when it is not one we accept."""
    parts = phc.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return None
    params: dict[str, int] = {}
    for item in parts[2].split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or name in params:
            return None
        params[name] = int(value)
    if set(params) != {"ln", "r", "p"}:
        return None
    ln, r, p = params["ln"], params["r"], params["p"]
    if not (1 <= ln <= _MAX_LN and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return None
    try:
        salt, digest = _b64decode(parts[3]), _b64decode(parts[4])
    except (binascii.Error, ValueError):
        return None
    if not salt or len(digest) < 16:
        return None
    return _Phc(ln, r, p, salt, digest)


def hash_password(password: str, *, ln: int = LN) -> str:
    """A new PHC string for `password` with a fresh random salt.

    `ln` (log2 of the scrypt cost) is for tests that need cheap hashes; keep the default.
    """
    if not 1 <= ln <= _MAX_LN:
        raise ValueError(f"ln must be 1-{_MAX_LN}")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, ln, R, P, HASH_BYTES)
    return f"$scrypt$ln={ln},r={R},p={P}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: str, phc: str) -> bool:
    """True when `password` matches the PHC string; a malformed hash never matches."""
    parsed = _parse_phc(phc)
    if parsed is None:
        return False
    digest = _scrypt(password, parsed.salt, parsed.ln, parsed.r, parsed.p, len(parsed.digest))
    return hmac.compare_digest(digest, parsed.digest)


def load_users(path: Path) -> dict[str, str]:
    """Read a users file: one `user:HASH` a line, blank lines and `#` comments ignored.

    Raises ValueError("line N: ...") for a malformed line and OSError when unreadable.
    Messages name the line and the user, never the hash.
    """
    users: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, phc = line.partition(":")
        user, phc = user.strip(), phc.strip()
        if not sep:
            raise ValueError(f"line {number}: expected user:HASH")
        if not user or any(ch.isspace() for ch in user):
            raise ValueError(f"line {number}: empty user name or white space in it")
        if _parse_phc(phc) is None:
            raise ValueError(f"line {number}: the hash for user {user!r} is not a "
                             "$scrypt$ PHC string made by hash-password")
        if user in first_seen:
            raise ValueError(f"line {number}: user {user!r} is already defined "
                             f"on line {first_seen[user]}")
        first_seen[user] = number
        users[user] = phc
    return users


class AuthBusy(Exception):
    """Too many password checks are waiting: answer 454 rather than queue without bound."""


class Users:
    """The accounts allowed to AUTH, checked off the event loop on a small, bounded pool.

    scrypt costs tens of milliseconds and 32 MiB per check: one low-priority thread per
    process does them, with at most `max_waiting` queued, so a guessing flood can neither grow
    memory nor take the CPU from sessions that are sending mail. A login that succeeded is
    remembered for CACHE_SECONDS under a keyed fast hash of the password, so applications that
    authenticate on every connection cost one scrypt per few minutes, not one per message."""

    CACHE_SECONDS = 300.0
    CACHE_ENTRIES = 10_000

    def __init__(self, users: dict[str, str], *, max_waiting: int = 16) -> None:
        self._users = dict(users)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auth-hash",
                                        initializer=_lower_priority)
        self._waiting = 0
        self._max_waiting = max_waiting
        self._cache_key = os.urandom(32)  # per process: the cache means nothing outside it
        self._recent: dict[tuple[str, bytes], float] = {}

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, username: object) -> bool:
        return username in self._users

    async def check(self, username: str, password: str) -> bool:
        """True when the user exists and the password matches; AuthBusy when overloaded."""
        phc = self._users.get(username)
        remembered = (username, hashlib.blake2b(password.encode("utf-8", "surrogateescape"),
                                                key=self._cache_key).digest())
        now = time.monotonic()
        if phc is not None and self._recent.get(remembered, 0.0) > now:
            return True
        if self._waiting >= self._max_waiting:
            raise AuthBusy
        self._waiting += 1
        try:
            # An unknown user costs the same scrypt time as a wrong password (no enumeration).
            ok = await asyncio.get_running_loop().run_in_executor(
                self._pool, verify_password, password, phc or _DUMMY_HASH)
        finally:
            self._waiting -= 1
        if ok and phc is not None:
            if len(self._recent) >= self.CACHE_ENTRIES:
                self._recent.clear()
            self._recent[remembered] = now + self.CACHE_SECONDS
            return True
        return False


def _lower_priority() -> None:
    """Run password hashing at a low CPU priority (Linux: nice applies per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _read_password() -> str | None:
    """The password from a TTY prompt (asked twice) or the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            return None
        return first
    line = sys.stdin.readline()
    # Only the line ending goes: leading or trailing spaces are part of the password.
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


def hash_password_command() -> int:
    """`invoice-relay hash-password`: print the hash of the password read on stdin."""
    password = _read_password()
    if password is None:
        print("hash-password: the passwords do not match", file=sys.stderr)
        return 2
    if not password:
        print("hash-password: refusing an empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0
