"""`queue list --domain D` on a big queue: builds an index of N queued recipients (synthetic
rows through the Index API, no spool) and times the command.

    .venv/bin/python bench/queuelist.py [--recipients 1000000] [--domains 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

from relay.cli import main
from relay.queue.envelope import Envelope
from relay.queue.index import Index
from relay.queue.notices import Committed
from relay.queue.segments import Location


def build(root: Path, recipients: int, domains: int) -> None:
    index = Index(root / "index.sqlite")
    now = time.time()
    batch: list[Committed] = []
    for n in range(recipients):
        env = Envelope(id=f"{n:022X}", sender="app@sender.test",
                       recipients=(f"ap{n}@d{n % domains}.example",), received=now - n % 3600)
        batch.append(Committed(env, Location("seg-0001.seg", n * 300, 300)))
        if len(batch) == 10_000:
            index.add(batch, 5 * 86400)
            batch = []
    if batch:
        index.add(batch, 5 * 86400)
    index.close()


def timed(config: Path, *args: str) -> tuple[float, int]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        main(["--config", str(config), "queue", *args])
    return time.perf_counter() - start, out.getvalue().count("\n")


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=20)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "var").mkdir()
        config = root / "relay.toml"
        config.write_text('[queue]\npath = "var"\n')
        start = time.perf_counter()
        build(root / "var", opts.recipients, opts.domains)
        print(f"built {opts.recipients} queued recipients over {opts.domains} domains"
              f" in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for args in (["list", "--domain", "d7.example"],
                     ["list", "--domain", "d7.example", "--json"],
                     ["list", "--domain", "d7.example", "--limit", "100"],
                     ["list", "--domain", "nowhere.example"],
                     ["summary"]):
            seconds, lines = timed(config, *args)
            print(f"queue {' '.join(args)}: {seconds:.2f} s ({lines} lines)", file=sys.stderr)


if __name__ == "__main__":
    run()
