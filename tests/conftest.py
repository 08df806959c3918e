"""Shared fixtures: a sink, a DNS server and the relay process, all on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import DnsServer
from relayproc import RelayProcess
from sink import Sink


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


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
