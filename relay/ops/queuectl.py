"""`invoice-relay queue retry|hold|release|delete|bounce`: on a running relay or a stopped one.

Stopped (the queue lock is free): the command takes the lock, so no relay starts meanwhile,
and does the work itself through the delivery store (the same code the relay runs, DSN
included). Running: it asks the delivery process over `queue.path/control.sock`, which acts
at once (relay.delivery.control).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import socket
import sys
from pathlib import Path

from relay.config import Config
from relay.exitcodes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE
from relay.queue.index import INDEX_FILE
from relay.queue.operator import Change, Request, UnknownIds

REPLY_TIMEOUT = 60.0  # a bounce of many messages writes their DSNs first
DONE = {
    "retry": "due now",
    "hold": "held",
    "release": "released (due now)",
    "delete": "deleted",
    "bounce": "bounced (DSN queued for the sender)",
}


def control_command(config: Config, args: argparse.Namespace) -> int:
    req = _request(args)
    if req is None:
        return EXIT_USAGE
    root = config.queue.path
    with open(root / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _report(req, _ask_running(root, req))
        return _report(req, _run_stopped(config, req))


def _request(args: argparse.Namespace) -> Request | None:
    ids = tuple(args.ids)
    if args.queue_verb == "retry":
        chosen = sum((bool(ids), bool(args.all), bool(args.domain)))
        if chosen != 1:
            print("queue retry: give queue ids, --all or --domain D (one of them)",
                  file=sys.stderr)
            return None
        return Request("retry", ids, bool(args.all), args.domain.lower() if args.domain else None)
    return Request(args.queue_verb, ids)


def _run_stopped(config: Config, req: Request) -> dict[str, object]:
    from relay.delivery.control import execute
    from relay.delivery.store import DeliveryStore

    async def run() -> dict[str, object]:
        root = config.queue.path
        store = DeliveryStore(root, root / INDEX_FILE, hostname=config.server.hostname,
                              max_lifetime=config.queue.max_lifetime,
                              segment_size=config.queue.segment_size)
        await store.start()
        try:
            change: Change = await execute(store, req)
        except UnknownIds as exc:
            return {"error": "unknown", "ids": exc.ids}
        finally:
            await store.close()
        return change.to_dict()

    return asyncio.run(run())


def _ask_running(root: Path, req: Request) -> dict[str, object]:
    path = root / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REPLY_TIMEOUT)
            sock.connect(str(path))
            sock.sendall(req.to_json())
            with sock.makefile("rb") as reply:
                line = reply.readline()
    except OSError as exc:
        return {"error": f"{path}: the relay is running but does not answer ({exc});"
                         " is it starting or stopping? try again"}
    if not line:
        return {"error": f"{path}: the relay closed the connection without a reply"}
    return json.loads(line)


def _report(req: Request, reply: dict[str, object]) -> int:
    error = reply.get("error")
    if error == "unknown":
        ids = reply.get("ids") or []
        print(f"queue {req.verb}: no such queue id: {', '.join(map(str, ids))}"
              " (nothing changed)", file=sys.stderr)
        return EXIT_PROBLEM
    if error:
        print(f"queue {req.verb}: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    changed, messages, busy = reply.get("changed", 0), reply.get("messages", 0), reply.get("busy")
    print(f"{changed} recipient(s) of {messages} message(s) {DONE[req.verb]}")
    if busy:
        print(f"{busy} recipient(s) in a delivery attempt right now were left to finish it")
    return EXIT_OK
