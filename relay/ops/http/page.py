"""The status page at `/`: queue depth, the last hour's outcomes with a chart, the health of
each source address, and a search by queue id, Message-ID or X-Invoice-Id (`/?q=KEY`).

Server-rendered HTML from plain functions (no template engine, no JavaScript, no external
resource: the chart is inline SVG). Every value that comes from outside (replies, headers,
addresses, the query itself) goes through `esc` where it is put into the page. The queries
are the ones `queue summary` and `status KEY` run, in a thread; the overview is cached for a
few seconds so that a page left open on a big queue does not keep SQLite busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__, metrics
from relay.config import Config
from relay.ops import queuecmd
from relay.ops.http import api
from relay.queue import records
from relay.queue.index import INDEX_FILE
from relay.queue.records import OUTCOMES, RECORDS_FILE

CONFIG_KEY: web.AppKey[Callable[[], Config]] = web.AppKey("config", Callable[[], Config])
CACHE_KEY: web.AppKey[OverviewCache] = web.AppKey("overview_cache")
CACHE_SECONDS = 5.0  # the summary reads every pending recipient: at most once per 5 s
BUCKET = 300.0       # the chart's bars: 5 minutes each ...
BUCKETS = 12         # ... over the last hour
TOP_DOMAINS = 20
MAX_KEY = 998        # longer than any Message-ID a message can carry
SUSPENDED_METRIC = f"{metrics.PREFIX}_source_suspended"
COLOURS = {"delivered": "#2e7d32", "deferred": "#f9a825", "bounced": "#c62828"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a search key in the URL stays here
    "Cache-Control": "no-store",
}


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --- what the page shows, gathered off the loop ------------------------------------------------


@dataclass(frozen=True)
class SourceHealth:
    address: str
    state: str                  # suspended | cooling | ok
    counts: dict[str, int]      # records of the last hour by state
    suspended_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overview:
    taken: float
    summary: dict[str, Any]
    start: float                                   # the first bucket's start
    outcomes: list[tuple[int, str, str, int]]      # (bucket, domain, state, count)
    sources: list[SourceHealth] = field(default_factory=list)


def gather(root: Path, configured: tuple[str, ...]) -> Overview:
    """Everything but the search, from the index, the delivery records and the metrics.
    Blocking: runs in a thread."""
    now = time.time()
    start = (now // BUCKET) * BUCKET - (BUCKETS - 1) * BUCKET
    summary: dict[str, Any] = {"total": 0, "by_state": {}, "oldest_age_seconds": None,
                               "by_domain": []}
    index = root / INDEX_FILE
    if index.exists():
        with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True,
                                                timeout=30)) as conn:
            summary = queuecmd.summary(conn)
    outcomes: list[tuple[int, str, str, int]] = []
    seen: list[tuple[str, dict[str, int], str, float]] = []
    # No records file yet: nothing was attempted, the page shows empty hours.
    with contextlib.suppress(FileNotFoundError), \
            contextlib.closing(records.open_readonly(root / RECORDS_FILE)) as rec:
        outcomes = records.outcomes_since(rec, start, BUCKET)
        seen = records.sources_since(rec, now - BUCKETS * BUCKET)
    return Overview(now, summary, start, outcomes,
                    source_health(configured, seen, suspended_sources()))


def suspended_sources() -> dict[str, list[str]]:
    """source -> destinations it is suspended for, from the delivery process's
    `source_suspended{source,domain}` gauge (what /metrics shows)."""
    body, _ = metrics.render()
    found: dict[str, list[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name != SUSPENDED_METRIC:
            continue
        for sample in family.samples:
            if sample.value > 0:
                source = _bare(sample.labels.get("source", ""))
                found.setdefault(source, []).append(sample.labels.get("domain", ""))
    return found


def _bare(address: str) -> str:
    return address[1:-1] if address.startswith("[") and address.endswith("]") else address


def source_health(configured: Iterable[str],
                  seen: list[tuple[str, dict[str, int], str, float]],
                  suspended: dict[str, list[str]]) -> list[SourceHealth]:
    """suspended: the delivery process says so (metrics); cooling: its latest attempt in the
    last hour failed temporarily (deferred, or no reply after the data); ok: otherwise."""
    latest = {_bare(address): (counts, state) for address, counts, state, _ in seen}
    addresses = dict.fromkeys([*configured, *latest, *suspended])
    result = []
    for address in addresses:
        counts, last_state = latest.get(address, ({}, ""))
        if address in suspended:
            state = "suspended"
        elif last_state in ("deferred", "unknown"):
            state = "cooling"
        else:
            state = "ok"
        result.append(SourceHealth(address, state, counts,
                                   tuple(sorted(suspended.get(address, ())))))
    return result


class OverviewCache:
    """One gathering at a time, reused for CACHE_SECONDS: concurrent page loads share it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._value: Overview | None = None
        self._at = 0.0

    async def get(self, root: Path, configured: tuple[str, ...]) -> Overview:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > CACHE_SECONDS:
                self._value = await asyncio.to_thread(gather, root, configured)
                self._at = time.monotonic()
            return self._value


# --- the handler ---------------------------------------------------------------------------------


def register(app: web.Application, config: Callable[[], Config] | None) -> None:
    if config is not None:
        app[CONFIG_KEY] = config
    app[CACHE_KEY] = OverviewCache()
    app.router.add_get("/", page)


async def page(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]() if CONFIG_KEY in request.app else None
    hostname = config.server.hostname if config is not None else socket.gethostname()
    configured = tuple(str(s.address) for s in config.delivery.source_addresses) \
        if config is not None else ()
    root = request.app[api.ROOT_KEY]
    key = request.query.get("q", "").strip()
    status, search = 200, ""
    try:
        overview = await request.app[CACHE_KEY].get(root, configured)
        if len(key) > MAX_KEY:
            status, search = 400, _notice(f"The search key is longer than {MAX_KEY} characters.")
        elif key:
            found = await asyncio.to_thread(api.find_messages, root, key)
            status = 200 if found else 404
            search = render_found(key, found) if found else _notice(
                f"Not found: no message with the queue id, Message-ID or X-Invoice-Id {key!r}"
                " (in the queue or the delivery records).")
    except sqlite3.Error as exc:
        body = render_page(hostname, key, _notice(f"Cannot read the queue: {exc}"), None)
        return _html(503, body)
    return _html(status, render_page(hostname, key, search, overview))


def _html(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8",
                        headers=HEADERS)


# --- HTML ----------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 .8em 2em;max-width:70em;
color:#1b1b1b;line-height:1.4}
header{border-bottom:2px solid #ccc;margin-bottom:1em}h1{font-size:1.4em;margin:.6em 0 .2em}
h2{font-size:1.15em;margin-top:1.6em}.muted{color:#555;font-size:.9em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;margin:.3em 0}th,td{border-bottom:1px solid #ddd;
padding:.25em .6em;text-align:left;vertical-align:top;white-space:nowrap}
td.n,th.n{text-align:right}td.reply{white-space:pre-wrap;font-family:monospace;min-width:16em}
form{display:flex;gap:.4em;flex-wrap:wrap;margin:.8em 0}
input[type=search]{flex:1 1 14em;font-size:1em;padding:.35em}
button{font-size:1em;padding:.35em .9em}
.notice{background:#fff3e0;border-left:4px solid #f9a825;padding:.5em .8em}
.suspended{color:#c62828;font-weight:bold}.cooling{color:#b26a00;font-weight:bold}
.ok{color:#2e7d32}.key{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 .8em}
svg{width:100%;height:auto;max-width:48em}code{word-break:break-all}
"""


def render_page(hostname: str, key: str, search: str, overview: Overview | None) -> str:
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(hostname)} · invoice-relay</title><style>{STYLE}</style></head><body>",
        f'<header><h1 id="hostname">{esc(hostname)}</h1>'
        f'<p class="muted">invoice-relay <span id="version">{esc(__version__)}</span>'
        f" · page generated {esc(now)}</p></header>",
        '<form method="get" action="/" role="search"><input type="search" name="q"'
        f' value="{esc(key)}" placeholder="queue id, Message-ID or invoice id"'
        ' aria-label="queue id, Message-ID or invoice id"><button type="submit">Search'
        "</button></form>",
        search,
    ]
    if overview is not None:
        parts += [render_queue(overview), render_outcomes(overview), render_sources(overview)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _notice(text: str) -> str:
    return f'<p class="notice" id="notice">{esc(text)}</p>'


def _table(head: list[str], rows: Iterable[list[str]], table_id: str,
           classes: list[str] | None = None) -> str:
    """A table in a horizontally scrolling box; cells are HTML already escaped. `classes`:
    one per column (default: the first is text, the others numbers)."""
    kinds = classes or ["", *["n"] * (len(head) - 1)]

    def cells(tag: str, row: list[str]) -> str:
        return "".join(f'<{tag} class="{k}">{c}</{tag}>' if k else f"<{tag}>{c}</{tag}>"
                       for k, c in zip(kinds, row, strict=True))
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>'
            f"{cells('th', [esc(h) for h in head])}</tr></thead><tbody>{body}</tbody></table>"
            "</div>")


def _top(ranked: list[tuple[str, dict[str, int]]]) -> list[tuple[str, dict[str, int]]]:
    """The first TOP_DOMAINS, then the rest added up as `other`."""
    if len(ranked) <= TOP_DOMAINS:
        return ranked
    other: dict[str, int] = {}
    for _, counts in ranked[TOP_DOMAINS:]:
        for state, n in counts.items():
            other[state] = other.get(state, 0) + n
    return [*ranked[:TOP_DOMAINS], (f"other ({len(ranked) - TOP_DOMAINS} domains)", other)]


def render_queue(overview: Overview) -> str:
    summary = overview.summary
    states = list(queuecmd.SUMMARY_STATES)
    taken = time.strftime("%H:%M:%S UTC", time.gmtime(overview.taken))
    head = (f"<h2>Queue</h2><p class=\"muted\">{summary['total']} recipients not final yet;"
            f" oldest message {esc(queuecmd.age_text(summary['oldest_age_seconds']))} old"
            f" (as of {esc(taken)}, refreshed every {CACHE_SECONDS:.0f} s)</p>")
    by_state = _table(["state", "recipients"],
                      [[esc(s), str(summary["by_state"].get(s, 0))] for s in states],
                      "queue-states")
    rows = [[esc(domain), str(sum(c.values())), *(str(c.get(s, 0)) for s in states)]
            for domain, c in _top(summary["by_domain"])]
    by_domain = _table(["domain", "total", *states], rows, "queue-domains") if rows else \
        '<p class="muted">No recipient is waiting.</p>'
    return head + by_state + "<h3>By destination domain</h3>" + by_domain


def render_outcomes(overview: Overview) -> str:
    per_bucket = [dict.fromkeys(OUTCOMES, 0) for _ in range(BUCKETS)]
    per_domain: dict[str, dict[str, int]] = {}
    for bucket, domain, state, n in overview.outcomes:
        if 0 <= bucket < BUCKETS:
            per_bucket[bucket][state] += n
        counts = per_domain.setdefault(domain, dict.fromkeys(OUTCOMES, 0))
        counts[state] += n
    ranked = sorted(per_domain.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    rows = [[esc(d), *(str(c.get(s, 0)) for s in OUTCOMES)] for d, c in _top(ranked)]
    since = time.strftime("%H:%M UTC", time.gmtime(overview.start))
    table = _table(["domain", *OUTCOMES], rows, "outcomes") if rows else \
        '<p class="muted">Nothing delivered, deferred or bounced in the last hour.</p>'
    return (f"<h2>Last hour</h2><p class=\"muted\">Outcomes per recipient domain since"
            f" {esc(since)}, from the delivery records; bars are 5 minutes.</p>"
            + chart(per_bucket, overview.start) + table)


def chart(per_bucket: list[dict[str, int]], start: float) -> str:
    """Stacked bars (delivered at the bottom, then deferred, bounced) as inline SVG."""
    width, height, gap = 600, 140, 6
    bar = width / len(per_bucket)
    peak = max([sum(b.values()) for b in per_bucket] + [1])
    shapes = []
    for i, counts in enumerate(per_bucket):
        y = float(height)
        label = time.strftime("%H:%M", time.gmtime(start + i * BUCKET))
        title = f"{label}: " + ", ".join(f"{counts[s]} {s}" for s in OUTCOMES)
        for state in OUTCOMES:
            h = counts[state] / peak * (height - 10)
            if h > 0:
                y -= h
                shapes.append(f'<rect x="{i * bar + gap / 2:.1f}" y="{y:.1f}"'
                              f' width="{bar - gap:.1f}" height="{h:.1f}"'
                              f' fill="{COLOURS[state]}"><title>{esc(title)}</title></rect>')
    first = time.strftime("%H:%M", time.gmtime(start))
    legend = "".join(f'<span class="key" style="background:{COLOURS[s]}"></span>{esc(s)}'
                     for s in OUTCOMES)
    return (f'<svg id="chart" viewBox="0 0 {width} {height + 16}" role="img"'
            f' aria-label="outcomes per 5 minutes, highest bar {peak}">'
            f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#999"/>'
            + "".join(shapes)
            + f'<text x="0" y="{height + 14}" font-size="11">{esc(first)}</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">now</text>'
            f'<text x="{width}" y="10" font-size="11" text-anchor="end">max {peak}</text>'
            f'</svg><p class="muted">{legend}</p>')


def render_sources(overview: Overview) -> str:
    rows = []
    for s in overview.sources:
        state = f'<span class="{s.state}">{esc(s.state)}</span>'
        if s.suspended_for:
            state += f" ({esc(', '.join(s.suspended_for))})"
        rows.append([esc(s.address), state, *(str(s.counts.get(o, 0)) for o in OUTCOMES)])
    table = _table(["source address", "health", *OUTCOMES], rows, "sources",
                   ["", "", "n", "n", "n"]) if rows else \
        '<p class="muted">No source address configured and none used in the last hour.</p>'
    return ("<h2>Source addresses</h2><p class=\"muted\">suspended: the delivery process"
            " reports it suspended for a destination (the <code>source_suspended</code>"
            " metric); cooling: its latest attempt in the last hour failed temporarily"
            " (delivery records); ok: otherwise. Counts: the last hour's records.</p>" + table)


def render_found(key: str, found: list[dict[str, Any]]) -> str:
    parts = [f'<h2 id="result">Messages for {esc(key)}</h2>']
    for msg in found:
        parts.append(
            f"<h3>Queue id <code>{esc(msg['queue_id'])}</code></h3><p>sender"
            f" &lt;{esc(msg['sender'] or '?')}&gt; · Message-ID"
            f" <code>{esc(msg['message_id'] or '-')}</code> · invoice id"
            f" <code>{esc(msg['invoice_id'] or '-')}</code></p>")
        for n, rcpt in enumerate(msg["recipients"]):
            parts.append(f"<p>&lt;{esc(rcpt['recipient'])}&gt;: <strong>{esc(rcpt['state'])}"
                         "</strong></p>")
            table_id = f"attempts-{esc(msg['queue_id'])}-{n}"
            parts.append(_attempts(rcpt["attempts"], table_id) if rcpt["attempts"] else
                         '<p class="muted">No attempt yet.</p>')
    return "".join(parts)


def _attempts(attempts: list[dict[str, Any]], table_id: str) -> str:
    rows = []
    for a in attempts:
        remote = f"{a['host'] or '-'} [{a['address'] or '-'}]" if a["attempted"] \
            else "(no connection)"
        tls = "no" if not a["tls"] else " ".join(filter(None, [
            a["tls"], a["tls_cipher"],
            None if a["tls_verified"] is None else
            ("verified" if a["tls_verified"] else "not verified")]))
        # The reply beside the state: it is the proof, and a phone shows the first columns.
        rows.append([esc(a["time"]), esc(a["state"]), esc(a["reply"] or "-"), esc(remote),
                     esc(a["source"] or "-"), esc(tls), esc(" ".join(a["dkim"]) or "-"),
                     f"<code>{esc(a['sha256'] or '-')}</code>"])
    return _table(["time", "state", "remote reply", "remote host [address]", "source", "TLS",
                   "DKIM", "SHA-256 of the bytes sent"], rows, table_id,
                  ["", "", "reply", "", "", "", "", ""])
