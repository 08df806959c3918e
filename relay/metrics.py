"""Prometheus metrics (prefix `invoice_relay_`), shared by every process of one relay.

`serve` calls `setup()` once, before it forks: from then on each process writes its samples to
its own memory-mapped file under `<queue.path>/metrics/` (prometheus-client's multiprocess
mode), and `render()`, in whichever process answers `/metrics`, adds them up. An update costs a
lock and a write to a mapped page: no system call, nothing on the disk's hot path.

Call sites reach a metric through this module at call time (`metrics.ACCEPTED.inc()`), never
by `from relay.metrics import ACCEPTED`: `setup()` rebuilds the objects so that they write to
the shared files. Outside `serve` (commands, unit tests) they count in memory and nobody reads
them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "invoice_relay"
DIRECTORY_NAME = "metrics"

# Seconds to days: a delivery can wait through the whole retry schedule.
LATENCY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600,
                   86400, 2 * 86400, 5 * 86400, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))

_directory: Path | None = None

# Bound by _build(); declared here for readers and type checkers.
ACCEPTED: Counter
REJECTED: Counter
DELIVERIES: Counter
DELIVERY_LATENCY: Histogram
SOURCE_DELIVERIES: Counter
COMMIT_BATCH: Histogram
AUTH_FAILURES: Counter
SMTP_CONNECTIONS: Gauge
WEBHOOK_DROPPED: Counter
WEBHOOK_PENDING: Gauge


def _build() -> None:
    """(Re)create every metric with the value class now in force."""
    g = globals()
    g["ACCEPTED"] = Counter("messages_accepted", "Messages accepted (250 after the commit)",
                            namespace=PREFIX, registry=None)
    g["REJECTED"] = Counter("messages_rejected", "Messages or commands refused, by reason",
                            ["reason"], namespace=PREFIX, registry=None)
    g["DELIVERIES"] = Counter("deliveries", "Recipient outcomes by destination policy domain",
                              ["outcome", "domain"], namespace=PREFIX, registry=None)
    g["DELIVERY_LATENCY"] = Histogram("delivery_latency_seconds",
                                      "From acceptance to the remote 250",
                                      namespace=PREFIX, registry=None, buckets=LATENCY_BUCKETS)
    g["SOURCE_DELIVERIES"] = Counter("source_deliveries", "Attempts by source address",
                                     ["source", "outcome"], namespace=PREFIX, registry=None)
    g["COMMIT_BATCH"] = Histogram("commit_batch_messages", "Messages per durable group commit",
                                  namespace=PREFIX, registry=None, buckets=BATCH_BUCKETS)
    g["AUTH_FAILURES"] = Counter("auth_failures", "Failed SMTP AUTH attempts",
                                 namespace=PREFIX, registry=None)
    g["SMTP_CONNECTIONS"] = Gauge("smtp_connections", "Open SMTP connections by listener",
                                  ["listener"], namespace=PREFIX, registry=None,
                                  multiprocess_mode="livesum")
    g["WEBHOOK_DROPPED"] = Counter("webhook_events_dropped",
                                   "Webhook events given up after 72 hours",
                                   namespace=PREFIX, registry=None)
    g["WEBHOOK_PENDING"] = Gauge("webhook_events_pending", "Webhook events not yet accepted",
                                 namespace=PREFIX, registry=None, multiprocess_mode="mostrecent")


def setup(queue_root: Path) -> None:
    """Before the fork in `serve`: start from an empty metrics folder (a restart's counters
    begin at zero, as Prometheus expects of a new process) and switch to shared files."""
    global _directory
    directory = queue_root / DIRECTORY_NAME
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _values.ValueClass = _values.MultiProcessValue()
    _directory = directory
    _build()


def render() -> tuple[bytes, str]:
    """The text exposition of every process's samples, and its content type."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    if _directory is not None:
        MultiProcessCollector(registry, path=str(_directory))
    return generate_latest(registry), CONTENT_TYPE_LATEST


_build()
