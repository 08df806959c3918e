"""The status page at `/` of a real relay (`serve`) after real deliveries to a sink: in Debian's
chromium driven by Selenium (one browser for the module), and over plain HTTP for escaping,
404 and the security headers."""

from __future__ import annotations

import base64
import os
import re
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from sink import Sink

import relay

TOKEN = "page-t0ken"
SINK_REPLY = "250 2.0.0 Ok: queued as PAGE77 <proof>"
HOSTILE_REPLY = "250 2.0.0 <script>alert('reply')</script> & done"
HOSTILE_MSGID = "<<script>alert('id')</script>@evil.test>"  # the relay keeps "<<script>"
HOSTILE_INVOICE = "<script>alert('inv')</script>"
DEFER_REPLY = "451 4.3.0 try again later"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def sink_reply(data: bytes) -> str:
    if b"DEFER-ME" in data:
        return DEFER_REPLY
    return HOSTILE_REPLY if b"evil.test" in data else SINK_REPLY


def send(relay_port: int, rcpt: str, msgid: str, invoice: str, body: str) -> None:
    # Raw bytes: the hostile Message-ID is what a broken or malicious app may send, and
    # Python's email package refuses to build it.
    data = (f"From: billing@invoices.test\r\nTo: {rcpt}\r\nSubject: invoice\r\n"
            f"Message-ID: {msgid}\r\nX-Invoice-Id: {invoice}\r\n\r\n{body}\r\n")
    with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as client:
        client.sendmail("billing@invoices.test", [rcpt], data.encode())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A relay with a token after: INV-2026-0042 delivered, a hostile message delivered with a
    hostile reply, and one recipient that the sink keeps deferring."""
    with Sink(data_reply=sink_reply) as sink:
        routes = {"example.net": [sink.address], "slow.example": [sink.address]}
        relay_ = RelayProcess(tmp_path_factory.mktemp("page"), routes=routes,
                              http={"token": TOKEN})
        with relay_:
            send(relay_.port, "ap@example.net", "<inv42@invoices.test>", "INV-2026-0042",
                 "invoice 42")
            send(relay_.port, "ap@example.net", HOSTILE_MSGID, HOSTILE_INVOICE, "evil.test")
            send(relay_.port, "ap@slow.example", "<inv43@invoices.test>", "INV-2026-0043",
                 "DEFER-ME")
            relay_.wait_for_log(r"event=delivered ", timeout=10, count=2)
            relay_.wait_for_log(r"event=deferred ", timeout=10)
            relay_.wait_for_log(r"event=listening process=http", timeout=10)
            yield relay_


def get(port: int, query: str = "", password: str | None = TOKEN
        ) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{query}")
    if password is not None:
        auth = base64.b64encode(f"ops:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {auth}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def search(port: int, key: str) -> tuple[int, dict[str, str], str]:
    return get(port, "?" + urllib.parse.urlencode({"q": key}))


def test_hostile_message_id_reply_and_invoice_id_are_escaped(served: RelayProcess) -> None:
    status, _, body = search(served.http_port, HOSTILE_INVOICE)
    assert status == 200
    assert "<script" not in body.lower()
    assert "<code>&lt;&lt;script&gt;</code>" in body  # the Message-ID
    assert "&lt;script&gt;alert(&#x27;reply&#x27;)&lt;/script&gt; &amp; done" in body
    assert "&lt;script&gt;alert(&#x27;inv&#x27;)&lt;/script&gt;" in body  # the invoice id
    # A hostile search key is escaped too, in the box and in the message.
    status, _, body = search(served.http_port, '"><script>x</script>')
    assert status == 404 and "<script" not in body.lower()


def test_unknown_key_is_a_404_page_saying_not_found(served: RelayProcess) -> None:
    status, headers, body = search(served.http_port, "INV-NEVER-SENT")
    assert status == 404
    assert headers["Content-Type"].startswith("text/html")
    assert "Not found" in body and "INV-NEVER-SENT" in body
    assert search(served.http_port, "x" * 2000)[0] == 400


def test_security_headers_and_no_external_resource(served: RelayProcess) -> None:
    status, headers, body = get(served.http_port)
    assert status == 200
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in body
    # Nothing fetched from anywhere: no src=, no stylesheet link, no script at all.
    assert not re.search(r"<script|<link|src=|url\(|@import", body, re.IGNORECASE)


def test_overview_shows_the_queue_the_last_hour_and_the_sources(served: RelayProcess) -> None:
    _, _, body = get(served.http_port)
    states = re.search(r'<table id="queue-states">.*?</table>', body, re.S)
    assert states and re.search(r"<td>deferred</td><td class=\"n\">1</td>", states.group())
    domains = re.search(r'<table id="queue-domains">.*?</table>', body, re.S)
    assert domains and "slow.example" in domains.group()
    outcomes = re.search(r'<table id="outcomes">.*?</table>', body, re.S)
    assert outcomes
    # example.net: two delivered, none deferred or bounced.
    assert re.search(r'<td>example.net</td><td class="n">2</td><td class="n">0</td>'
                     r'<td class="n">0</td>', outcomes.group())
    assert re.search(r'<td>slow.example</td><td class="n">0</td><td class="n">[1-9]',
                     outcomes.group())
    assert body.count('fill="#2e7d32"') >= 1  # a delivered bar in the chart
    sources = re.search(r'<table id="sources">.*?</table>', body, re.S)
    assert sources and "<td>127.0.0.1</td>" in sources.group()


def test_page_wants_the_token_as_basic_password(served: RelayProcess) -> None:
    assert get(served.http_port, password=None)[0] == 401
    status, headers, _ = get(served.http_port, password="wrong")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=412,915",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_loads_the_page_and_finds_the_invoice_s_remote_reply(
        served: RelayProcess, browser: object) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    port = served.http_port
    driver.get(f"http://127.0.0.1:{port}/")  # type: ignore[attr-defined]
    # Without credentials the browser gets the 401 (and, headless, shows no login prompt):
    # nothing of the page is shown.
    status = driver.execute_script(  # type: ignore[attr-defined]
        "return performance.getEntriesByType('navigation')[0].responseStatus")
    assert status == 401
    assert driver.find_elements(By.ID, "hostname") == []  # type: ignore[attr-defined]
    driver.get(f"http://ops:{TOKEN}@127.0.0.1:{port}/")  # type: ignore[attr-defined]
    assert driver.find_element(By.ID, "hostname").text == "relay.test"  # type: ignore[attr-defined]
    assert driver.find_element(By.ID, "version").text == relay.__version__  # type: ignore[attr-defined]
    table = driver.find_element(By.ID, "queue-states")  # type: ignore[attr-defined]
    assert "deferred" in table.text
    box = driver.find_element(By.NAME, "q")  # type: ignore[attr-defined]
    box.send_keys("INV-2026-0042")
    box.submit()
    result = driver.find_element(By.CSS_SELECTOR,  # type: ignore[attr-defined]
                                 "table[id^=attempts-]")
    assert SINK_REPLY in result.text
    assert "delivered" in result.text
    assert "q=INV-2026-0042" in driver.current_url  # type: ignore[attr-defined]
