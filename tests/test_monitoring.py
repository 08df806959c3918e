"""monitoring/: the alert rules and the Grafana dashboard an operator loads as they are.

promtool (Debian's `prometheus` package) checks the rules, runs their unit tests and parses
every dashboard query as a recording rule; the names they use are the contract's, and a real
relay's /metrics exports each of them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import smtplib
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import make_certs
from redisserver import RedisServer
from relayproc import RelayProcess
from sink import Sink

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "tests" / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboard.json"

# shared/interface.md "Metrics", as exported: counters with `_total`, histograms as families.
CONTRACT_METRICS = {
    "invoice_relay_messages_accepted_total", "invoice_relay_messages_rejected_total",
    "invoice_relay_deliveries_total", "invoice_relay_queue_recipients",
    "invoice_relay_queue_oldest_age_seconds", "invoice_relay_delivery_latency_seconds",
    "invoice_relay_source_deliveries_total", "invoice_relay_source_suspended",
    "invoice_relay_spool_free_bytes", "invoice_relay_commit_batch_messages",
    "invoice_relay_auth_failures_total", "invoice_relay_smtp_connections",
    "invoice_relay_webhook_events_pending", "invoice_relay_webhook_events_dropped_total",
    "invoice_relay_certificate_expiry_timestamp_seconds", "invoice_relay_redis_up",
}
HISTOGRAMS = {"invoice_relay_delivery_latency_seconds", "invoice_relay_commit_batch_messages"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana fills these in at query time; any value of the right kind will do for parsing.
DASHBOARD_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
                       "$instance": ".*"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(apt-get install -y --no-install-recommends prometheus), as .ci/run does")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> dict[str, str]:
    """`panel_ID_REFID` -> the target's PromQL, Grafana's variables filled in."""
    exprs = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs[f"panel_{panel['id']}_{target['refId']}"] = expr
    return exprs


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\binvoice_relay_[a-z_]+\b", text))


def family(name: str) -> str:
    """The name /metrics declares for a name used in a query (`x_bucket` belongs to `x`)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def used_metric_names() -> set[str]:
    return metric_names(ALERTS.read_text()) | metric_names("\n".join(dashboard_exprs().values()))


# --- alert rules ----------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert "SUCCESS: 12 rules found" in output, output


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", str(ALERT_TESTS))


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = re.findall(r"^\s+- alert: (\w+)$", ALERTS.read_text(), re.MULTILINE)
    tests = ALERT_TESTS.read_text()
    fires = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    silent = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    assert len(alerts) == len(set(alerts)) == 12
    assert set(alerts) - fires == set(), "alerts never shown firing"
    assert set(alerts) - silent == set(), "alerts never shown silent"


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = ALERTS.read_text().split("      - alert: ")[1:]
    for rule in rules:
        name = rule.split("\n", 1)[0]
        assert re.search(r"^        for: \d+[smh]$", rule, re.MULTILINE), name
        assert re.search(r"^          severity: (warning|critical)$", rule, re.MULTILINE), name
        assert "summary: " in rule and "description: " in rule, name


# --- dashboard ------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["datasource"]["uid"] == "${DS_PROMETHEUS}"
                   for t in panel["targets"]), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    spots = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(spots) == len(set(spots)), "two panels at the same place"


def test_dashboard_queries_parse_as_recording_rules(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert not [e for e in exprs.values() if "$" in e], "a Grafana variable the test does not fill"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:{name}", "expr": expr} for name, expr in exprs.items()]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    output = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(exprs)} rules found" in output, output


def test_dashboard_shows_every_contract_metric() -> None:
    shown = {family(n) for n in metric_names("\n".join(dashboard_exprs().values()))}
    assert CONTRACT_METRICS - shown == set()


def test_rules_and_dashboard_use_only_contract_names() -> None:
    used = {family(n) for n in used_metric_names()}
    assert used - CONTRACT_METRICS == set()
    # a histogram is read through its series, never by its family name alone
    assert not [n for n in used_metric_names() if n in HISTOGRAMS]


# --- the relay exports them -----------------------------------------------------------------


def exported_names(text: str) -> set[str]:
    """Every series name /metrics declares or carries (histogram families with their series)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(name + s for s in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def scrape(listen: str) -> str:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        return response.read().decode()


def test_every_name_used_is_in_the_relays_metrics(
        tmp_path: Path, sinks: Callable[..., Sink]) -> None:
    """Labelled series exist once something happened: deliver one message, defer one through
    an on_reply suspension, refuse one, configure a certificate and a Redis (`redis_up` means
    something only with `[cluster] redis`); then scrape."""
    ok = sinks()
    refusing = sinks(data_reply=lambda _: "421 4.7.0 [TSS04] Messages temporarily deferred")
    certs = make_certs(tmp_path / "tls")
    policies = ('[[destination]]\ndomain = "blocked.example"\n'
                f'routes = ["{refusing.address}"]\n'
                'on_reply = [ { match = "TSS04", action = "suspend", duration = "1h" } ]\n')
    relay = RelayProcess(tmp_path, routes={"example.net": [ok.address]}, policies=policies,
                         server={"tls_cert": str(certs.cert), "tls_key": str(certs.key)})
    redis = RedisServer()
    with relay.config.open("a") as config:
        config.write(f'\n[cluster]\nredis = "{redis.url}"\n')
    listen = tomllib.loads(relay.config.read_text())["http"]["listen"]
    sender = "billing@invoices.test"
    with redis, relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail(sender, ["ap@example.net"], b"Subject: 1\r\n\r\nok\r\n")
            client.sendmail(sender, ["ap@blocked.example"], b"Subject: 2\r\n\r\nx\r\n")
            with pytest.raises(smtplib.SMTPDataError):  # 554: bare CR
                client.sendmail(sender, ["ap@example.net"], b"Subject: 3\r\n\r\nbare\rCR\r\n")
        ok.wait_for(1)
        relay.wait_for_log(" event=path_suspended ")
        wanted = used_metric_names()
        missing = wanted
        deadline = time.monotonic() + 10
        while missing and time.monotonic() < deadline:  # gauges are refreshed periodically
            with contextlib.suppress(OSError):  # the HTTP process may still be starting
                missing = wanted - exported_names(scrape(listen))
            time.sleep(0.2)
    assert missing == set(), f"used by monitoring/ but not in /metrics: {sorted(missing)}"
