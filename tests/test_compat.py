"""aiosmtpd's internals that relay.smtp.compat relies on: fail loudly when an upgrade moves one.

The version pin (`aiosmtpd>=1.4.6,<1.5`) is the first guard; these checks are the second, so a
release within the pin that renames an internal breaks the build, not the relay."""

from __future__ import annotations

import asyncio
import socket

import aiosmtpd
import pytest

from relay.smtp import compat
from relay.smtp.server import IntakeContext
from relay.smtp.session import RelaySMTP


def test_installed_aiosmtpd_is_a_tested_version() -> None:
    assert compat.version_tested(), (
        f"aiosmtpd {aiosmtpd.__version__} is not in {compat.TESTED_VERSIONS}: review "
        "relay/smtp/compat.py against its source, then add the version")


@pytest.mark.parametrize(("owner", "name"), compat.INTERNALS,
                         ids=[name for _, name in compat.INTERNALS])
def test_internal_still_exists(owner: object, name: str) -> None:
    assert hasattr(owner, name), f"aiosmtpd no longer has {name}"


async def test_instance_internals_exist_after_connection() -> None:
    ctx = IntakeContext(hostname="relay.test", trusted=[], max_message_size=1000,
                        committer=None)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    session = RelaySMTP(ctx, implicit_tls=False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: session, ours)
    greeting = await asyncio.to_thread(theirs.recv, 100)
    assert greeting.startswith(b"220 relay.test ")
    for name in compat.INSTANCE_INTERNALS:
        assert hasattr(session, name), f"aiosmtpd's SMTP no longer sets {name}"
    assert isinstance(session._reader, asyncio.StreamReader)
    assert hasattr(session._reader, "_buffer")  # compat.unread pushes bytes back into it
    assert "STARTTLS" in compat.command_names(RelaySMTP)
    transport.close()
    theirs.close()


def test_patched_module_globals_are_ours() -> None:
    import aiosmtpd.smtp as smtp

    assert isinstance(smtp.inspect, compat._CachedInspect)
    assert smtp.dir is compat._dir
    assert smtp.sanitized_log is compat._sanitized_log
