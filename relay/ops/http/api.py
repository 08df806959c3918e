"""The JSON API: `GET /api/messages/{key}` (what `status KEY` shows) and `GET /api/queue`
(what `queue list` shows, paged). Read-only SQLite, each query in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.ops import queuecmd, statuscmd
from relay.queue import records
from relay.queue.envelope import State
from relay.queue.index import INDEX_FILE
from relay.queue.records import RECORDS_FILE

ROOT_KEY: web.AppKey[Path] = web.AppKey("queue_root", Path)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
STATES = tuple(s.value for s in State)


def error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def message(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    root = request.app[ROOT_KEY]
    try:
        found = await asyncio.to_thread(find_messages, root, key)
    except sqlite3.Error as exc:
        return error(503, f"cannot read the delivery records: {exc}")
    if not found:
        return error(404, f"{key}: no message with this queue id, Message-ID or X-Invoice-Id")
    return web.json_response({"key": key, "messages": found})


def find_messages(root: Path, key: str) -> list[dict[str, Any]]:
    try:
        conn: sqlite3.Connection | None = records.open_readonly(root / RECORDS_FILE)
    except FileNotFoundError:  # nothing attempted yet: the index may still know the key
        conn = None
    try:
        return [statuscmd.as_json(s) for s in statuscmd.lookup(conn, root / INDEX_FILE, key)]
    finally:
        if conn is not None:
            conn.close()


async def queue(request: web.Request) -> web.Response:
    query = request.query
    state = query.get("state") or None
    if state is not None and state not in STATES:
        return error(400, f"state: {state!r} is not one of {' | '.join(STATES)}")
    domain = query.get("domain") or None
    try:
        limit = _count(query, "limit", DEFAULT_LIMIT)
        offset = _count(query, "offset", 0)
    except ValueError as exc:
        return error(400, str(exc))
    if limit > MAX_LIMIT:
        return error(400, f"limit: at most {MAX_LIMIT}")
    try:
        rows = await asyncio.to_thread(_rows, request.app[ROOT_KEY], state, domain, limit,
                                       offset)
    except sqlite3.Error as exc:
        return error(503, f"cannot read the queue index: {exc}")
    return web.json_response({"state": state, "domain": domain, "limit": limit,
                              "offset": offset, "rows": rows})


def _count(query: Any, name: str, default: int) -> int:
    text = query.get(name, "")
    if text == "":
        return default
    if not text.isdigit():  # also refuses "-1" and "+1"
        raise ValueError(f"{name}: {text!r} is not a non-negative integer")
    return int(text)


def _rows(root: Path, state: str | None, domain: str | None, limit: int,
          offset: int) -> list[dict[str, object]]:
    index = root / INDEX_FILE
    if not index.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True,
                                            timeout=30)) as conn:
        return list(queuecmd.list_rows(conn, state, domain, limit, offset))
