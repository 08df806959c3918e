"""Shared fixtures: a sink, a DNS server and the relay process, all on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnsserver import DnsServer
from relayproc import RelayProcess
from sink import Sink, shared_port


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture
def sinks() -> Iterator[Callable[..., Sink]]:
    """`sinks(host=..., port=..., **options)` starts a sink that is stopped after the test."""
    with contextlib.ExitStack() as stack:
        def make(**kwargs: object) -> Sink:
            return stack.enter_context(Sink(**kwargs))  # type: ignore[arg-type]
        yield make


@pytest.fixture
def mx_port() -> int:
    """A port free on 127.0.0.2-5, for MX hosts that all listen on the same port."""
    return shared_port()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[type]:
    started: list[RelayProcess] = []

    def make(**kwargs: object) -> RelayProcess:
        relay = RelayProcess(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield make  # type: ignore[misc]
    for relay in started:
        relay.__exit__()
