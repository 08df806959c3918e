"""Prometheus metrics (prefix `invoice_relay_`), shared by every process of one relay.

`serve` calls `setup()` once, before it forks: from then on each process writes its samples to
its own memory-mapped file under `<queue.path>/metrics/` (prometheus-client's multiprocess
mode, with our own value class: relay/metricvalue.py), and `render()`, in whichever process
answers `/metrics`, adds them up. An update changes a float in memory under a lock; each
process writes its changed values to its file every half second (and before it exits), so a
scrape lags by up to half a second, and a process killed with SIGKILL loses up to half a
second of its counts.

Call sites reach a metric through this module at call time (`metrics.ACCEPTED.inc()`), never
by `from relay.metrics import ACCEPTED`: `setup()` rebuilds the objects so that they write to
the shared files. Outside `serve` (commands, unit tests) they count in memory and nobody reads
them.

What is not counted where it happens is read when scraped (`render`): the queue by state and
its oldest message from the index (read-only, cached a few seconds), and the spool's free
space. Every contract name is in every scrape: labelled series are created at zero for the
label values known at start (`declare`), and a name with no series yet (`redis_up` without
`[cluster] redis`, a certificate expiry without certificates) still has its HELP and TYPE.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from relay import metricvalue
from relay.queue.index import INDEX_FILE

if TYPE_CHECKING:
    from relay.config import Config

PREFIX = "invoice_relay"
DIRECTORY_NAME = "metrics"
QUEUE_CACHE_SECONDS = 5.0   # a scrape reads the index at most this often (0.1 s at 1M rows)

# Seconds to days: a delivery can wait through the whole retry schedule.
LATENCY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600,
                   86400, 2 * 86400, 5 * 86400, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))

# `deliveries_total{outcome}`, per recipient; `source_deliveries_total{outcome}`, per attempt.
OUTCOMES = ("delivered", "deferred", "bounced", "expired", "unknown")
# Recipient states as the contract spells them (`queue_recipients{state}`).
STATES = ("queued", "active", "deferred", "unknown", "hold",
          "delivered", "bounced", "expired", "deleted")
OTHER = "other"          # `domain` of a recipient domain no policy names (or only `*`)
DEFAULT_SOURCE = "default"   # `source` when the kernel picks the outbound address
# `messages_rejected_total{reason}`: see relay/smtp/rejections.py for which reply is which.
REJECT_REASONS = ("relay_denied", "sender_refused", "encryption_required", "too_big",
                  "too_many_recipients", "backpressure", "no_space", "queue_write_failed",
                  "tls_required", "content", "too_many_errors", "auth_limited", "syntax",
                  "shutting_down", "other")

_directory: Path | None = None

# Bound by _build(); declared here for readers and type checkers.
ACCEPTED: Counter
REJECTED: Counter
DELIVERIES: Counter
DELIVERY_LATENCY: Histogram
SOURCE_DELIVERIES: Counter
SOURCE_SUSPENDED: Gauge
COMMIT_BATCH: Histogram
AUTH_FAILURES: Counter
SMTP_CONNECTIONS: Gauge
WEBHOOK_PENDING: Gauge
WEBHOOK_DROPPED: Counter
CERTIFICATE_EXPIRY: Gauge
_redis_up: Gauge | None = None   # created on first use: only a node with [cluster] redis has it


def _build() -> None:
    """(Re)create every metric with the value class now in force."""
    global ACCEPTED, REJECTED, DELIVERIES, DELIVERY_LATENCY, SOURCE_DELIVERIES
    global SOURCE_SUSPENDED, COMMIT_BATCH, AUTH_FAILURES, SMTP_CONNECTIONS, WEBHOOK_PENDING
    global WEBHOOK_DROPPED, CERTIFICATE_EXPIRY, _redis_up
    kw: dict[str, Any] = {"namespace": PREFIX, "registry": None}
    ACCEPTED = Counter("messages_accepted", "Messages accepted (250 after the commit)", **kw)
    REJECTED = Counter("messages_rejected",
                       "Refusing SMTP replies (command, recipient or message), by reason",
                       ["reason"], **kw)
    DELIVERIES = Counter("deliveries", "Recipient outcomes by destination policy domain",
                         ["outcome", "domain"], **kw)
    DELIVERY_LATENCY = Histogram("delivery_latency_seconds", "From acceptance to the remote 250",
                                 buckets=LATENCY_BUCKETS, **kw)
    SOURCE_DELIVERIES = Counter("source_deliveries",
                                "Recipient attempts by source address and outcome",
                                ["source", "outcome"], **kw)
    SOURCE_SUSPENDED = Gauge("source_suspended",
                             "1 while a source address is out of rotation for a destination "
                             "(on_reply suspension, block or cool-down)",
                             ["source", "domain"], multiprocess_mode="mostrecent", **kw)
    COMMIT_BATCH = Histogram("commit_batch_messages", "Messages per durable group commit",
                             buckets=BATCH_BUCKETS, **kw)
    AUTH_FAILURES = Counter("auth_failures", "Failed SMTP AUTH attempts", **kw)
    SMTP_CONNECTIONS = Gauge("smtp_connections", "Open SMTP connections by listener",
                             ["listener"], multiprocess_mode="livesum", **kw)
    WEBHOOK_PENDING = Gauge("webhook_events_pending", "Webhook events not yet delivered",
                            multiprocess_mode="mostrecent", **kw)
    WEBHOOK_DROPPED = Counter("webhook_events_dropped", "Webhook events given up after 72 hours",
                              **kw)
    CERTIFICATE_EXPIRY = Gauge("certificate_expiry_timestamp_seconds",
                               "When a configured certificate expires (Unix time)",
                               ["kind", "name"], multiprocess_mode="mostrecent", **kw)
    _redis_up = None
    _children.clear()
    _adders.clear()


# (metric, label values) -> its child: `labels()` costs about 3 us (a lock, a tuple, str()
# of each value); a per-message call site asks `child()` instead (a dict lookup). Cleared by
# `_build`; bounded because every label's values are.
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Counter | Gauge, *values: str) -> Any:
    """`metric.labels(*values)`, cached."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


# (metric, label values) -> the `inc` of its value: a per-message counter or gauge update
# without prometheus-client's per-call checks (observability, sign, exemplar: four Python
# calls that cannot fail for our constant amounts). Cleared by `_build`, like _children.
_adders: dict[tuple[object, tuple[str, ...]], Callable[[float], None]] = {}


def add(metric: Counter | Gauge, *values: str, amount: float = 1.0) -> None:
    """`child(metric, *values).inc(amount)` on the hot path (a gauge may take -1)."""
    key = (metric, values)
    inc = _adders.get(key)
    if inc is None:
        inc = _adders[key] = (child(metric, *values) if values else metric)._value.inc
    inc(amount)


# Names (as in the exposition, without _total) and types of everything render() shows, for
# the HELP/TYPE of a name that has no series yet.
_SCRAPED = {
    "queue_recipients": "Recipients in the queue index by state",
    "queue_oldest_age_seconds": "Age of the oldest message with a recipient not final yet",
    "spool_free_bytes": "Free bytes on the queue's file system (for the relay's user)",
}
_REDIS_HELP = "1 when [cluster] redis is reachable, 0 when it is not (absent without it)"


def _declared() -> list[tuple[str, str, str]]:
    metrics = [ACCEPTED, REJECTED, DELIVERIES, DELIVERY_LATENCY, SOURCE_DELIVERIES,
               SOURCE_SUSPENDED, COMMIT_BATCH, AUTH_FAILURES, SMTP_CONNECTIONS,
               WEBHOOK_PENDING, WEBHOOK_DROPPED, CERTIFICATE_EXPIRY]
    out = [(m._name, m._documentation, m._type) for m in metrics]
    out.append((f"{PREFIX}_redis_up", _REDIS_HELP, "gauge"))
    out.extend((f"{PREFIX}_{n}", h, "gauge") for n, h in _SCRAPED.items())
    return out


def setup(queue_root: Path) -> None:
    """Before the fork in `serve`: start from an empty metrics folder (a restart's counters
    begin at zero, as Prometheus expects of a new process) and switch to shared files."""
    global _directory
    if _directory is not None:
        metricvalue.close()  # an earlier folder's files (a second setup in one process)
    directory = queue_root / DIRECTORY_NAME
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    _values.ValueClass = metricvalue.BufferedValue
    _directory = directory
    _build()


def flush() -> None:
    """Write this process's changed values to its file now (before a process exits)."""
    if _directory is not None:
        metricvalue.flush()


# --- label values -------------------------------------------------------------------------

def domain_label(policy_domain: str | None) -> str:
    """The `domain` label of a recipient domain whose destination policy is `policy_domain`
    (None: no policy): the policy's `domain` as written, so that `*.example.org` stays one
    series; `*` and no policy are `other`. Cardinality: the policies' count plus one."""
    if policy_domain is None or policy_domain == "*":
        return OTHER
    return policy_domain


def source_label(source: str | None) -> str:
    return source or DEFAULT_SOURCE


def listener_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def declare(config: Config) -> None:
    """Create at zero the series a dashboard or alert expects before anything happened: each
    outcome for each policy domain and `other`, each reason, each source, each listener."""
    domains = {OTHER, *(domain_label(p.domain) for p in config.destinations)}
    sources = [str(s.address) for s in config.delivery.source_addresses] or [DEFAULT_SOURCE]
    for outcome in OUTCOMES:
        for domain in domains:
            DELIVERIES.labels(outcome, domain)
        for source in sources:
            SOURCE_DELIVERIES.labels(source, outcome)
    for reason in REJECT_REASONS:
        REJECTED.labels(reason)
    for source in sources:
        SOURCE_SUSPENDED.labels(source, OTHER).set(0)
    for hp in (*config.server.listen, *config.server.listen_tls):
        SMTP_CONNECTIONS.labels(listener_label(hp.host, hp.port))


def set_redis_up(up: bool) -> None:
    """`redis_up`: 1 when this node shares its limits through Redis now, 0 when [cluster]
    redis is set and unreachable. Never called without [cluster] redis: no series then."""
    global _redis_up
    if _redis_up is None:
        _redis_up = Gauge("redis_up", _REDIS_HELP, namespace=PREFIX, registry=None,
                          multiprocess_mode="mostrecent")
    _redis_up.set(1 if up else 0)


def set_certificates(config: Config) -> None:
    """`certificate_expiry_timestamp_seconds{kind,name}` of the config's certificates: kind
    `tls` for `[server] tls_cert` (name: its subject CN, else the file name), kind `smime`
    for each `[[recipient]]` certificate (name: the policy's `match`). Reads the files: call
    it before the loop runs or in a thread. At start and after each reload; a certificate
    removed by a reload keeps its last series until the next start."""
    for kind, name, not_after in _certificates(config):
        CERTIFICATE_EXPIRY.labels(kind, name).set(not_after)


def _certificates(config: Config) -> Iterator[tuple[str, str, float]]:
    from cryptography.x509.oid import NameOID

    from relay.config.certs import read_certificate

    wanted: list[tuple[str, str | None, Path]] = []
    if config.server.tls_cert:
        wanted.append(("tls", None, Path(config.server.tls_cert)))
    wanted.extend(("smime", r.match, r.smime_certificate) for r in config.recipients
                  if r.smime_certificate is not None)
    for kind, name, path in wanted:
        try:  # checked when the config was loaded: one gone since is skipped, not fatal
            cert = read_certificate(path)
        except (OSError, ValueError):
            continue
        if name is None:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = str(cns[0].value) if cns else path.name
        yield kind, name, cert.not_valid_after_utc.timestamp()


# --- the scrape -----------------------------------------------------------------------------

class _QueueCache:
    """Counts read from the index at most every QUEUE_CACHE_SECONDS (a scrape every second
    from several Prometheus servers must not turn into a scan each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at: dict[Path, tuple[float, dict[str, int], float | None]] = {}

    def get(self, index: Path) -> tuple[dict[str, int], float | None]:
        with self._lock:  # one reader at a time: two scrapes at once share one scan
            now = time.monotonic()
            cached = self._at.get(index)
            if cached is not None and now - cached[0] < QUEUE_CACHE_SECONDS:
                return cached[1], cached[2]
            counts, oldest = _read_queue(index)
            self._at[index] = (now, counts, oldest)
            return counts, oldest


def _read_queue(index: Path) -> tuple[dict[str, int], float | None]:
    """Recipients per state, and the `received` time of the oldest unfinished message."""
    counts = dict.fromkeys(STATES, 0)
    if not index.exists():
        return counts, None
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
    try:
        # Grouped by (domain, state), the order of the covering index recipients_domain: one
        # pass over the index, no sort (0.07 s for 1M rows; by state alone: a temp b-tree, 0.3 s).
        for state, n in conn.execute(
                "SELECT state, COUNT(*) FROM recipients GROUP BY domain, state"):
            counts[state] = counts.get(state, 0) + n
        # Messages are indexed about in arrival order: the oldest unfinished one is among the
        # first unfinished rows (a full MIN scan costs 0.1 s per 1M messages).
        row = conn.execute("SELECT MIN(received) FROM (SELECT received FROM messages"
                           " WHERE done IS NULL ORDER BY rowid LIMIT 1000)").fetchone()
    finally:
        conn.close()
    return counts, row[0] if row else None


_queue_cache = _QueueCache()


class _ScrapeCollector:
    """What is read at scrape time: the queue from the index, the spool's free space."""

    def __init__(self, queue_root: Path) -> None:
        self.root = queue_root

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(f"{PREFIX}_queue_recipients", _SCRAPED["queue_recipients"],
                                   labels=["state"])
        oldest_age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                       _SCRAPED["queue_oldest_age_seconds"])
        try:
            counts, oldest = _queue_cache.get(self.root / INDEX_FILE)
        except sqlite3.Error:  # busy or being rebuilt: no sample this time, not a 500
            counts, oldest = {}, None
        for state in STATES:
            if state in counts:
                states.add_metric([state], counts[state])
        if counts:
            oldest_age.add_metric([], max(0.0, time.time() - oldest) if oldest else 0.0)
        yield states
        yield oldest_age
        free = GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", _SCRAPED["spool_free_bytes"])
        try:
            st = os.statvfs(self.root)
            free.add_metric([], st.f_bavail * st.f_frsize)
        except OSError:
            pass
        yield free


class _Everything:
    """The processes' samples, the scrape-time values, and an empty family for any contract
    name that has no series yet (so that a rule or a dashboard never meets a missing name)."""

    def __init__(self, directory: Path | None, queue_root: Path | None) -> None:
        self.directory = directory
        self.queue_root = queue_root

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        sources: list[Iterable[Metric]] = []
        if self.directory is not None:
            sources.append(MultiProcessCollector(None, path=str(self.directory)).collect())
        if self.queue_root is not None:
            sources.append(_ScrapeCollector(self.queue_root).collect())
        for source in sources:
            for family in source:
                seen.add(family.name)
                yield family
        for name, documentation, kind in _declared():
            if name not in seen:
                yield Metric(name, documentation, kind)


def render(directory: Path | None = None, queue_root: Path | None = None
           ) -> tuple[bytes, str]:
    """The text exposition of every process's samples, and its content type.

    `directory`: the metrics folder (default: the one `setup` made); `queue_root`: the queue
    whose index and spool are read (default: the folder holding `directory`). Blocking (it
    may read the index): call it in a thread."""
    from prometheus_client import generate_latest

    directory = directory if directory is not None else _directory
    if queue_root is None and directory is not None:
        queue_root = directory.parent
    registry = CollectorRegistry()
    registry.register(_Everything(directory, queue_root))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST


_build()
