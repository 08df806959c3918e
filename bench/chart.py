"""The PNG chart of a bench run (matplotlib, headless Agg backend).

    python bench/chart.py bench/out/results-STAMP.json [-o out.png]

bench/bench.py calls render() at the end of a run; this command redraws a saved run.
Panels: end-to-end msg/s relay vs Postfix per size and session count (min-max whiskers,
paired-round ratio above each pair), one panel per destination (smtp-sink, realistic sink),
then the signed cells (relay unsigned, relay signed, Postfix + OpenDKIM, with the signed/unsigned
and signed/Postfix+OpenDKIM ratios), then accept latency (final dot -> 250) p99 bars with p50
marks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"relay": "#1f77b4", "postfix": "#ff7f0e", "relay-signed": "#2ca02c",
          "postfix-dkim": "#d62728"}
LABELS = {"relay-signed": "relay signed", "postfix-dkim": "postfix + opendkim"}
# per panel kind: the systems drawn, and the ratios written above each group (key, prefix)
UNSIGNED = (("relay", "postfix"), (("relay_postfix_e2e_ratio", ""),))
SIGNED = (("relay", "relay-signed", "postfix-dkim"),
          (("signed_unsigned_ratio", "signed/unsigned "),
           ("signed_postfix_dkim_ratio", "signed/pfx+dkim ")))
SIZE_NAMES = {"4k": "4 KiB", "200k": "200 KiB"}


def _groups(cells: list[dict], sink: str) -> list[dict]:
    return [c for c in cells if c["sink"] == sink and any(s in c for s in COLORS)]


def _throughput(ax, cells: list[dict], title: str, kind: tuple = UNSIGNED) -> None:
    systems, ratios = kind
    width = 0.76 / len(systems)
    xs = range(len(cells))
    top = 0.0
    for j, system in enumerate(systems):
        med, lo, hi, pos = [], [], [], []
        for i, c in enumerate(cells):
            e = c.get(system)
            if not e:
                continue
            v = e["e2e_per_s"]
            pos.append(i + (j - (len(systems) - 1) / 2) * width)
            med.append(v["median"])
            lo.append(v["median"] - v["min"])
            hi.append(v["max"] - v["median"])
            top = max(top, v["max"])
        if pos:
            ax.bar(pos, med, width, color=COLORS[system], label=LABELS.get(system, system),
                   yerr=[lo, hi], capsize=3, error_kw={"elinewidth": 1, "alpha": 0.7})
    for i, c in enumerate(cells):
        text = "\n".join(f"{prefix}{c[key]['median']:.2f}x" for key, prefix in ratios if key in c)
        if text:
            ax.annotate(text, (i, top * 1.04), ha="center", fontsize=9,
                        fontweight="bold", color="#333")
    # room for the ratios (one line each), and the legend above them
    ax.set_ylim(0, top * (1.45 + 0.45 * (len(ratios) - 1)) if top else 1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{SIZE_NAMES.get(c['size'], c['size'])}\n{c['sessions']} sess."
                        for c in cells])
    ax.set_ylabel("msg/s end to end")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=len(systems))


def _latency(ax, cells: list[dict], title: str) -> None:
    width = 0.38
    any_bar = False
    for j, system in enumerate(("relay", "postfix")):
        pos, p99, p50 = [], [], []
        for i, c in enumerate(cells):
            lat = (c.get(system) or {}).get("accept_latency_ms")
            if not lat:
                continue
            pos.append(i + (j - 0.5) * width)
            p99.append(lat["p99"])
            p50.append(lat["p50"])
        if pos:
            any_bar = True
            ax.bar(pos, p99, width, color=COLORS[system], label=f"{system} p99")
            ax.scatter(pos, p50, marker="_", s=300, color="black", zorder=3,
                       label="p50" if j == 0 else None)
            for x, v in zip(pos, p99, strict=True):
                ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (x, v), ha="center",
                            va="bottom", fontsize=7)
    if any_bar:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
        ax.legend(loc="upper left", fontsize=8, ncol=3)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{SIZE_NAMES.get(c['size'], c['size'])}\n{c['sessions']} sess."
                        for c in cells])
    ax.set_ylabel("ms, final dot -> 250")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)


def render(results: dict, path: Path) -> None:
    cells = results.get("summary") or []
    titles = results.get("sink_titles", {})
    panels = []
    for sink in ("all", "realistic", "signed"):
        g = _groups(cells, sink)
        if g:
            panels.append(("tp", sink, g))
    for sink in ("all", "realistic"):
        g = _groups(cells, sink)
        if g and any((c.get(s) or {}).get("accept_latency_ms") for c in g
                     for s in ("relay", "postfix")):
            panels.append(("lat", sink, g))
    if not panels:
        return
    width = max(10.0, 1.4 * max(len(p[2]) for p in panels) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
    for ax, (what, sink, g) in zip(axes[:, 0], panels, strict=True):
        name = titles.get(sink, sink)
        if what == "tp" and sink == "signed":
            _throughput(ax, g, f"Signed (DKIM RSA-2048), end-to-end msg/s, destination {name}\n"
                               "(bars: median, whiskers: min-max; above: relay signed / unsigned "
                               "and / Postfix+OpenDKIM, medians of paired rounds)", SIGNED)
        elif what == "tp":
            _throughput(ax, g, f"End-to-end msg/s, destination {name}\n(bars: median, "
                               "whiskers: min-max; above: relay/postfix, median of paired rounds)")
        else:
            _latency(ax, g, f"Accept latency, final dot -> 250 (latency probe), destination "
                            f"{name}\n(bars: p99, black marks: p50, pooled over the rounds)")
    s = results.get("settings", {})
    commit = (results.get("git", {}).get("commit") or "?")[:10]
    dirty = " (dirty)" if results.get("git", {}).get("dirty_files") else ""
    fig.suptitle(f"invoice-relay vs Postfix 3.7, bench/run on {results.get('cpus', '?')} CPUs: "
                 f"{s.get('rounds', '?')} alternating round(s) per cell, one message per "
                 f"connection\n{results.get('started', '')}, checkout {commit}{dirty}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(panels))))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="bench/out/results-STAMP.json")
    ap.add_argument("-o", "--output", help="PNG path (default: next to the JSON)")
    args = ap.parse_args()
    src = Path(args.results)
    results = json.loads(src.read_text())
    out = Path(args.output) if args.output else src.with_suffix(".png")
    render(results, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
