"""The fuzz suite's hypothesis profiles and its relay (one real relay process per test module).

Profiles: "ci" (the default) is derandomized and sized for about a minute on two cores;
"long" is random, 5,000 state-machine runs (the better part of an hour), and keeps what it
finds in .hypothesis/ to replay it first next time. Choose with FUZZ_PROFILE:

    FUZZ_PROFILE=long .venv/bin/python -m pytest tests/fuzz -q
"""

from __future__ import annotations

import os
import ssl
from collections import Counter
from collections.abc import Iterator

import pytest
from certs import make_certs
from fuzzkit import (
    ERROR_HARD_LIMIT,
    ERROR_SOFT_LIMIT,
    HOSTNAME,
    MAX_MESSAGE_SIZE,
    PASSWORD,
    TRUSTED,
    USER,
    FuzzRelay,
    Ledger,
    Oracle,
)
from hypothesis import HealthCheck, settings
from relayproc import RelayProcess, free_port
from sink import Sink

from relay.smtp.auth import hash_password

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
         HealthCheck.large_base_example]
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=240,
    stateful_step_count=25, suppress_health_check=_SLOW, print_blob=True)
settings.register_profile(
    "long", derandomize=False, deadline=None, max_examples=5000, stateful_step_count=50,
    suppress_health_check=_SLOW, print_blob=True)
PROFILE = os.environ.get("FUZZ_PROFILE", "ci")
settings.load_profile(PROFILE)


@pytest.fixture(scope="module")
def fuzz_relay(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
               ) -> Iterator[FuzzRelay]:
    """One relay for the whole module: STARTTLS and implicit TLS, AUTH, trust for 127.0.0.2
    only, generous error limits without the error delay, everything routed to one sink."""
    root = tmp_path_factory.mktemp("fuzz")
    certs = make_certs(root / "pki")
    users = root / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, ln=4)}\n")
    tls_port = free_port()
    with Sink() as sink:
        relay = RelayProcess(
            root, routes={"example.net": [sink.address], "*": [sink.address]},
            server={"hostname": HOSTNAME, "trusted_networks": [f"{TRUSTED}/32"],
                    "tls_cert": str(certs.cert), "tls_key": str(certs.key),
                    "users_file": str(users), "listen_tls": [f"127.0.0.1:{tls_port}"],
                    "max_message_size": MAX_MESSAGE_SIZE,
                    "error_soft_limit": ERROR_SOFT_LIMIT, "error_hard_limit": ERROR_HARD_LIMIT,
                    "error_delay": "0", "auth_failure_limit": "100000/s",
                    "idle_timeout": "60s"},
            queue={"min_free_space": "0"})
        ledger = Ledger()
        oracle = Oracle(relay, sink, ledger, ports=(relay.port, tls_port))
        with relay:
            env = FuzzRelay(relay, sink, tls_port,
                            ssl.create_default_context(cafile=str(certs.ca_cert)), oracle, ledger)
            yield env
            # The module's last word: everything settled, and the relay stops cleanly.
            oracle.check()
            assert relay.stop() == 0, relay.log[-3000:]
            oracle.check_log()
            _report(request, oracle)


def _report(request: pytest.FixtureRequest, oracle: Oracle) -> None:
    fates = Counter(m.fate for m in oracle.ledger.messages)
    line = (f"fuzz ({PROFILE}) {request.module.__name__}: {oracle.examples} examples, "
            f"{oracle.sessions} SMTP sessions, {len(oracle.ledger.messages)} messages "
            f"({', '.join(f'{n} {fate}' for fate, n in sorted(fates.items()))}), "
            f"{len(oracle.sink.messages)} deliveries at the sink")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and oracle.examples:
        reporter.write_line(line)
        if oracle.tally:
            reporter.write_line("  " + ", ".join(f"{k} {v}" for k, v in
                                                 sorted(oracle.tally.items())))


def pytest_report_header(config: pytest.Config) -> str:
    return f"fuzz profile: {PROFILE}"
