"""The HTTP process of a real relay (`serve`), over real HTTP on loopback: /healthz, the JSON
API after a real delivery to a sink, /metrics, token auth (Bearer and Basic), reload, and the
listener's start-up errors."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from relayproc import RelayProcess, free_port, live_children
from sink import Sink

from relay.config import ConfigError, load_config

TOKEN = "t0k-en"
SINK_REPLY = "250 2.0.0 Ok: queued as SINK42"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def get(port: int, path: str, auth: str | None = None) -> Reply:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


def bearer(token: str = TOKEN) -> str:
    return f"Bearer {token}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def child_named(parent: int, name: str) -> int:
    for pid, comm in live_children(parent).items():
        if comm == name:
            return pid
    raise AssertionError(f"no child process {name} of {parent}")


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, str]]:
    """One relay with a token, after one invoice was delivered to a sink: (relay, queue id)."""
    with Sink(data_reply=lambda _: SINK_REPLY) as sink:
        relay = RelayProcess(tmp_path_factory.mktemp("http"),
                             routes={"example.net": [sink.address]}, http={"token": TOKEN})
        with relay:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "b@invoices.test", "ap@example.net", "inv"
            msg["Message-ID"] = "<inv7@invoices.test>"
            msg["X-Invoice-Id"] = "INV-7"
            msg.set_content("invoice 7\n")
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.send_message(msg)
            queue_id = relay.events("received", at_least=1)[0]["id"]
            relay.wait_for_log(r"event=delivered ", timeout=10)
            relay.wait_for_log(r"event=listening process=http", timeout=10)
            yield relay, queue_id


@pytest.mark.parametrize("key", ["QUEUE_ID", "<inv7@invoices.test>", "inv7@invoices.test",
                                 "INV-7"])
def test_api_message_shows_the_remote_reply_by_each_key(delivered: tuple[RelayProcess, str],
                                                        key: str) -> None:
    relay, queue_id = delivered
    key = queue_id if key == "QUEUE_ID" else key
    reply = get(relay.http_port, f"/api/messages/{urllib.request.quote(key)}", bearer())
    assert reply.status == 200
    (message,) = reply.json()["messages"]
    assert (message["queue_id"], message["message_id"], message["invoice_id"]) == (
        queue_id, "<inv7@invoices.test>", "INV-7")
    (rcpt,) = message["recipients"]
    assert (rcpt["recipient"], rcpt["state"]) == ("ap@example.net", "delivered")
    assert rcpt["attempts"][-1]["reply"] == SINK_REPLY
    assert rcpt["attempts"][-1]["time"].endswith("Z")


def test_api_errors_are_json(delivered: tuple[RelayProcess, str]) -> None:
    port = delivered[0].http_port
    unknown = get(port, "/api/messages/nothing-like-it", bearer())
    assert unknown.status == 404 and "nothing-like-it" in unknown.json()["error"]
    for query, name in (("state=sleeping", "state"), ("limit=ten", "limit"),
                        ("limit=-1", "limit"), ("offset=-5", "offset"), ("limit=5000", "limit")):
        bad = get(port, f"/api/queue?{query}", bearer())
        assert bad.status == 400, query
        assert bad.json()["error"].startswith(f"{name}:"), bad.body
    assert get(port, "/api/nowhere", bearer()).json() == {"error": "Not Found"}


def test_api_queue_pages(delivered: tuple[RelayProcess, str]) -> None:
    port = delivered[0].http_port
    page = get(port, "/api/queue", bearer()).json()
    assert (page["limit"], page["offset"], page["rows"]) == (100, 0, [])  # nothing pending
    page = get(port, "/api/queue?state=delivered&domain=example.net&limit=1", bearer()).json()
    assert page["limit"] == 1 and len(page["rows"]) <= 1
    for row in page["rows"]:
        assert (row["state"], row["recipient"]) == ("delivered", "ap@example.net")


def test_token_guards_api_and_metrics_but_not_healthz(delivered: tuple[RelayProcess, str]
                                                      ) -> None:
    port = delivered[0].http_port
    for path in ("/api/queue", "/metrics", "/api/messages/x"):
        for auth in (None, bearer("wrong"), basic("u", TOKEN), "Bearer"):
            refused = get(port, path, auth)
            assert refused.status == 401, (path, auth)
            assert "error" in refused.json()
    metrics = get(port, "/metrics", bearer())
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain; version=")
    health = get(port, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    assert TOKEN not in delivered[0].log  # never logged


def test_page_paths_want_basic_with_the_token_as_password(delivered: tuple[RelayProcess, str]
                                                          ) -> None:
    port = delivered[0].http_port
    # Malformed Basic headers too (not base64, not ASCII, no colon): a 401, never a 500.
    malformed = ("Basic !!!", "Basic \xff\xfe", "Basic " + base64.b64encode(b"\xff:x").decode(),
                 "Basic " + base64.b64encode(TOKEN.encode()).decode())
    for auth in (None, basic("anyone", "wrong"), bearer(), *malformed):
        refused = get(port, "/", auth)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="invoice-relay"'
    # Past the check: the status page (tests/test_page.py).
    assert get(port, "/", basic("anyone", TOKEN)).status == 200


def test_healthz_503_while_delivery_is_stopped(delivered: tuple[RelayProcess, str]) -> None:
    relay = delivered[0]
    pid = child_named(relay.proc.pid, "relay-delivery")  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: get(relay.http_port, "/healthz").status == 503, 8, "503")
        body = get(relay.http_port, "/healthz").body.decode()
        assert "delivery" in body and body.count("\n") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: get(relay.http_port, "/healthz").status == 200, 8, "200 again")


def test_a_new_token_takes_effect_at_sighup(delivered: tuple[RelayProcess, str]) -> None:
    relay = delivered[0]
    text = relay.config.read_text()
    relay.config.write_text(text.replace(f'token = "{TOKEN}"', 'token = "next"'))
    try:
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(r"event=reloaded process=http ", timeout=10)
        assert get(relay.http_port, "/api/queue", bearer()).status == 401
        assert get(relay.http_port, "/api/queue", bearer("next")).status == 200
    finally:
        relay.config.write_text(text)


def test_empty_listen_turns_http_off(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, http={"listen": ""})
    with relay:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", relay.http_port)) != 0
        assert "process=http" not in relay.new_log()


def test_http_port_in_use_exits_1_saying_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = RelayProcess(tmp_path, http={"listen": f"127.0.0.1:{port}"}).start(wait=False)
        assert relay.proc is not None
        assert relay.proc.wait(20) == 1
    assert f"cannot listen on 127.0.0.1:{port} ([http] listen):" in relay.log
    assert "Traceback" not in relay.log


def test_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-a-file\n")
    path = tmp_path / "relay.toml"
    path.write_text('[http]\ntoken_file = "token"\n')
    config = load_config(path, strict=True)
    assert config.http.token == "from-a-file" and "from-a-file" not in repr(config)
    path.write_text(f'[http]\nlisten = "127.0.0.1:{free_port()}"\ntoken_file = "absent"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, strict=True)
    (line,) = caught.value.problems
    assert line.startswith(f"{path}: http.token_file: {tmp_path / 'absent'}: cannot read")
