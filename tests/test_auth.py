"""scrypt password hashes, the users file, and the hash-password command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from relay.smtp.auth import AuthBusy, Users, hash_password, load_users, verify_password

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def phc() -> str:
    # A cheap cost keeps the tests fast; verify reads the cost from the string.
    return hash_password(PASSWORD, ln=8)


def test_hash_has_phc_shape_and_default_cost() -> None:
    phc = hash_password(PASSWORD)
    assert verify_password(PASSWORD, phc)
    empty, scheme, params, salt, digest = phc.split("$")
    assert (empty, scheme, params) == ("", "scrypt", "ln=15,r=8,p=1")
    assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes, base64 without padding
    assert "=" not in salt + digest


def test_roundtrip_and_wrong_password(phc: str) -> None:
    assert verify_password(PASSWORD, phc)
    assert not verify_password(PASSWORD + " ", phc)


def test_salt_is_random() -> None:
    assert hash_password("x", ln=4) != hash_password("x", ln=4)


@pytest.mark.parametrize("bad", [
    "",
    "plain",
    "$2b$12$abcdefghijklmnopqrstuv",
    "$scrypt$ln=15,r=8$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=99,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=15,r=8,p=1$!!!$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0$",
])
def test_malformed_hash_never_matches(bad: str) -> None:
    assert verify_password(PASSWORD, bad) is False


def test_load_users_skips_comments_and_blanks(tmp_path: Path, phc: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"# accounts\n\nerp:{phc}\n  billing : {phc}  \n")
    assert load_users(path) == {"erp": phc, "billing": phc}


@pytest.mark.parametrize(("line", "expected"), [
    ("nocolon", "line 2: expected user:HASH"),
    (":{phc}", "line 2: empty user name"),
    ("erp:{phc}", "line 2: user 'erp' is already defined on line 1"),
    ("bad:{phc}TAIL!", "line 2: the hash for user 'bad' is not"),
    ("pw:hunter2", "line 2: the hash for user 'pw' is not"),
])
def test_load_users_errors_name_the_line_not_the_secret(
        tmp_path: Path, phc: str, line: str, expected: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"erp:{phc}\n{line.format(phc=phc)}\n")
    with pytest.raises(ValueError) as caught:
        load_users(path)
    message = str(caught.value)
    assert message.startswith(expected)
    assert phc not in message and "hunter2" not in message


async def test_users_check(phc: str) -> None:
    users = Users({"erp": phc})
    assert await users.check("erp", PASSWORD)
    assert not await users.check("erp", "wrong")
    assert not await users.check("nobody", PASSWORD)
    assert "erp" in users and len(users) == 1


def _hash_password(stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "hash-password"], input=stdin,
                          capture_output=True, text=True, timeout=30, check=False)


def test_hash_password_command_reads_one_line() -> None:
    result = _hash_password(" pass word \nignored\n")
    assert result.returncode == 0, result.stderr
    phc = result.stdout.strip()
    assert verify_password(" pass word ", phc)  # only the newline is stripped


def test_hash_password_command_refuses_empty() -> None:
    result = _hash_password("\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "empty password" in result.stderr


async def test_password_checks_are_bounded(phc: str) -> None:
    """A flood of checks queues at most `max_waiting`; the rest are told to come back."""
    slow = hash_password(PASSWORD, ln=14)
    users = Users({"erp": slow}, max_waiting=3)
    results = await asyncio.gather(*(users.check("erp", f"guess{i}") for i in range(8)),
                                   return_exceptions=True)
    busy = [r for r in results if isinstance(r, AuthBusy)]
    assert len(busy) == 5 and results[:3] == [False, False, False]


async def test_a_successful_login_is_remembered_briefly(phc: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    users = Users({"erp": phc})
    assert await users.check("erp", PASSWORD)
    calls: list[str] = []
    monkeypatch.setattr("relay.smtp.auth.verify_password",
                        lambda password, hashed: calls.append(password) or False)
    assert await users.check("erp", PASSWORD)          # from memory: no scrypt
    assert not await users.check("erp", "wrong")       # failures are never remembered
    assert calls == ["wrong"]
