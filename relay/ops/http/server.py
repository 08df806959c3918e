"""The HTTP process: an aiohttp app on the socket `serve` bound before the fork.

Routes: `/healthz` (always open), `/metrics` and `/api/*` (Bearer token when `[http] token` is
set), anything else (the status page at `/`) HTTP Basic with the token as the password, since
a browser cannot send a bearer token. The token is read from the live config at each request,
so a SIGHUP that changes it takes effect at once; it is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from relay import log, metrics
from relay.config import Config
from relay.ops.http import api, health, page
from relay.reload import Reloader
from relay.runtime import Live

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN_KEY: web.AppKey[Callable[[], str]] = web.AppKey("token", Callable[[], str])
HEALTH_KEY: web.AppKey[health.HealthSources] = web.AppKey("health", health.HealthSources)
BASIC_CHALLENGE = 'Basic realm="invoice-relay"'
SHUTDOWN_TIMEOUT = 2.0  # open requests are short reads: a stop does not wait for long


def make_app(root: Path, token: Callable[[], str], sources: health.HealthSources | None,
             config: Callable[[], Config] | None = None) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _auth])
    app[TOKEN_KEY] = token
    app[api.ROOT_KEY] = Path(root)
    if sources is not None:
        app[HEALTH_KEY] = sources
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/messages/{key}", api.message)
    app.router.add_get("/api/queue", api.queue)
    page.register(app, config)  # `/`: the status page (HTTP Basic when a token is set)
    return app


def _wants_bearer(path: str) -> bool:
    return path == "/metrics" or path == "/api" or path.startswith("/api/")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]()
    if not token or request.path == "/healthz":
        return await handler(request)
    given = request.headers.get("Authorization", "")
    if _wants_bearer(request.path):
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), token):
            return await handler(request)
        return web.json_response({"error": "wants Authorization: Bearer TOKEN ([http] token)"},
                                 status=401, headers={"WWW-Authenticate": "Bearer"})
    password = _basic_password(given)
    if password is not None and _same(password, token):
        return await handler(request)
    return web.Response(status=401, text="401: the [http] token is the password\n",
                        headers={"WWW-Authenticate": BASIC_CHALLENGE})


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _basic_password(header: str) -> str | None:
    """The password of an HTTP Basic header (any user name); None when there is none."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8: no password
        return None
    _user, sep, password = decoded.partition(":")
    return password if sep else None


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 as JSON, like every answer of the API."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


async def _healthz(request: web.Request) -> web.Response:
    sources = request.app.get(HEALTH_KEY)
    reason = await asyncio.to_thread(health.problem, sources) if sources else None
    if reason is not None:
        return web.Response(status=503, text=reason + "\n")
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = await asyncio.to_thread(metrics.render)  # reads every process's file
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # with its version and charset parameters
    return response


async def http_main(live: Live, sock: socket.socket, sources: health.HealthSources) -> int:
    """The http child process (relay/serve.py forks it): serve until SIGTERM."""
    stop = asyncio.Event()
    reloader = Reloader(live, "http")
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log.loop_exception)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    # The token is looked up per request: a reload (the Live swap) changes it.
    reloader.start(lambda _rt: None)
    app = make_app(live.config.queue.path, lambda: live.config.http.token, sources,
                   lambda: live.config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.event("listening", process="http", address=address, pid=os.getpid(),
              auth="token" if live.config.http.token else "none")
    await stop.wait()
    log.event("draining", process="http")
    await runner.cleanup()
    log.event("stopped", process="http")
    return 0
