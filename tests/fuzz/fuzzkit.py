"""The fuzz suite's tools: a raw client that splits its writes anywhere, the oracle that checks
every reply and the relay's state, and strategies for hostile bytes.

The oracle knows three things about every message a fuzzing client sent: its marker (a unique
token on a body line), the recipients the relay accepted for it, and its fate as the client saw
it: `queued` (a `250 2.0.0 Ok: queued as ID` was read), `refused` (another reply to the final
dot), `unsent` (the client hung up before its final dot was complete) or `ambiguous` (the whole
final dot went out, the reply was never read). Once the relay is idle, every queued recipient is
at the sink exactly once, an ambiguous one at most once, and nothing else is at the sink at all.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import sqlite3
import ssl
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st
from queuefiles import partial_streams, stored_ids, stored_message
from relayproc import RelayProcess
from sink import Sink

TRUSTED = "127.0.0.2"      # the only address in trusted_networks
UNTRUSTED = "127.0.0.1"
USER = "alice"
PASSWORD = "fuzz-Pa55word"
HOSTNAME = "relay.test"
MAX_MESSAGE_SIZE = 1_500_000   # above the 1 MiB at which intake streams to the spool file
ERROR_SOFT_LIMIT = 15
ERROR_HARD_LIMIT = 25
LINE_LIMIT = 1001              # aiosmtpd's line_length_limit, the relay's command line limit
MARK = b"FUZZMARK"
IO_TIMEOUT = 10.0

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
REPLY_LINE = re.compile(r"^[2-5]\d\d([ -]|$)")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")
# Python exception names in a reply mean our text leaked into the protocol.
EXCEPTION_TEXT = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Warning)\b|Error: \(|Traceback"
                            r"|\bbinascii\b")
_BAD_ARGUMENT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_RECEIVED_ID = re.compile(rb"\AReceived: from .*?\bwith [A-Z0-9]+ id (\S+?)[;\r]", re.S)


class Closed(Exception):
    """The relay closed the connection (EOF or RST) while the client waited for a reply."""


class Violation(AssertionError):
    """An oracle check failed."""


@dataclass
class FuzzRelay:
    """What a fuzz test talks to: the relay, its sink, the TLS context and the oracle."""

    relay: RelayProcess
    sink: Sink
    tls_port: int
    client_tls: ssl.SSLContext
    oracle: Oracle
    ledger: Ledger

    @property
    def port(self) -> int:
        return self.relay.port


# --- the client -----------------------------------------------------------------------------

class Client:
    """Exact bytes out (split at chosen offsets into separate writes), whole replies back.

    Every line in and out goes into `transcript`, which failures print."""

    def __init__(self, port: int, source: str, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT,
                                        source_address=(source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = sock
        if tls is not None:
            self.sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.source = source
        self.buf = b""
        self.transcript: list[tuple[str, bytes]] = []
        self.closed = False

    def send(self, data: bytes, cuts: Iterable[int] = ()) -> bool:
        """Write `data` split at `cuts`; False when the relay had already closed."""
        self.transcript.append((">", data))
        bounds = sorted({c for c in cuts if 0 < c < len(data)} | {0, len(data)})
        try:
            for start, end in itertools.pairwise(bounds):
                self.sock.sendall(data[start:end])
        except OSError:
            return False
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as exc:
                raise Closed(f"reset: {exc}; pending {self.buf!r}") from None
            if not chunk:
                raise Closed(f"closed; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.transcript.append(("<", line))
        return line

    def reply(self) -> list[str]:
        """One whole reply (its lines); raises Closed, or socket.timeout when none comes."""
        lines = []
        while True:
            raw = self._line()
            if b"\n" in raw or b"\r" in raw:
                raise Violation(f"bare CR or LF inside a reply line: {raw!r}\n{self.dump()}")
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def wait_closed(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Read until the relay closes; what arrived before that. Violation if it never does."""
        self.sock.settimeout(timeout)
        got = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            pass
        except TimeoutError:
            raise Violation(f"relay kept the connection open for {timeout}s; got {got!r}\n"
                            f"{self.dump()}") from None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(IO_TIMEOUT)
        self.close()
        return got

    def starttls(self, context: ssl.SSLContext) -> None:
        if self.buf:
            raise Violation(f"bytes after the 220 to STARTTLS: {self.buf!r}\n{self.dump()}")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def half_close(self) -> None:
        """Send a FIN but keep reading (the relay must then hang up too)."""
        with contextlib.suppress(OSError):
            raw = self.sock
            if isinstance(raw, ssl.SSLSocket):
                self.sock = raw = socket.socket(fileno=raw.detach())  # no close_notify
            raw.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Close with a TCP RST rather than a FIN."""
        self.closed = True
        with contextlib.suppress(OSError):
            raw = self.sock
            if isinstance(raw, ssl.SSLSocket):
                raw = socket.socket(fileno=raw.detach())
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()

    def dump(self, last: int = 40) -> str:
        out = [f"--- transcript of a client from {self.source} (last {last} entries):"]
        for direction, data in self.transcript[-last:]:
            text = repr(data if len(data) <= 300 else data[:150] + b"..." + data[-100:])
            out.append(f"  {direction} {text}")
        return "\n".join(out)


# --- replies ------------------------------------------------------------------------------------

def check_reply(lines: Sequence[str], *, after_ehlo: bool, exempt_250: bool = False,
                client: Client | None = None) -> str:
    """Check one reply against the contract; return its code.

    Every line: a 2xx-5xx code, the same on every line. After EHLO, every line carries an
    enhanced status code except 334 and 354 (and the EHLO/HELO 250 lines: `exempt_250`).
    Never exception text, never our internal-error replies."""
    where = f"\n{client.dump()}" if client is not None else ""
    code = lines[0][:3]
    for line in lines:
        if not REPLY_LINE.match(line) or line[:3] != code:
            raise Violation(f"malformed reply {list(lines)!r}{where}")
        if EXCEPTION_TEXT.search(line):
            raise Violation(f"exception text in reply {line!r}{where}")
        if "Internal error" in line or "internal error" in line:
            raise Violation(f"the relay hit a bug of its own: {line!r}{where}")
        if after_ehlo and code not in ("334", "354") and not (exempt_250 and code == "250") \
                and not ENHANCED.match(line):
            raise Violation(f"reply without an enhanced status code: {line!r}{where}")
    return code


_ATOM = rb"[^<>\"\\\s@:,;()\[\]]+"
_PLAIN_PATH = re.compile(
    rb"\A(?:MAIL FROM|RCPT TO):<((?:" + _ATOM + rb"@" + _ATOM + rb")?)>(?: |\Z)", re.I)


def plain_path(line: bytes) -> str:
    """The address of `MAIL FROM:<a@b>`/`RCPT TO:<a@b>` as the relay stores it ("" for the
    null path), or "*" when the line is not that simple."""
    match = _PLAIN_PATH.match(line)
    if match is None:
        return "*"
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return "*"


def argument_is_bad(line: bytes) -> bool:
    """Whether the relay must refuse this command line's argument with 501 5.5.4."""
    arg = line.partition(b" ")[2].strip()
    return bool(arg) and bool(_BAD_ARGUMENT.search(arg.decode("utf-8", "surrogateescape")))


# --- DATA -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Body:
    """A message body as lines; `nostuff` marks lines a careless client does not dot-stuff."""

    lines: tuple[bytes, ...]
    nostuff: frozenset[int] = frozenset()

    def wire(self) -> bytes:
        """What goes after the 354: the lines with CRLF, dot-stuffed, then the final dot."""
        out = []
        for i, line in enumerate(self.lines):
            stuffed = b"." + line if line.startswith(b".") and i not in self.nostuff else line
            out.append(stuffed + b"\r\n")
        return b"".join(out) + b".\r\n"

    def must_refuse(self) -> bool:
        """NUL or a bare CR: the contract says 554 5.6.0, nothing queued."""
        wire = self.wire()[:-3]
        return b"\0" in wire or re.search(rb"\r(?!\n)", wire) is not None

    def expected(self) -> bytes | None:
        r"""The message as the relay must store it, or None when the relay must refuse it (NUL,
        bare CR). Bare LF line ends are stored as CRLF, then lines are un-stuffed (so "\n.\n",
        "\n.\r\n" and "\r\n.\n" are content); lines over 998 octets are kept."""
        wire = self.wire()[:-3]
        if self.must_refuse():
            return None
        wire = re.sub(rb"(?<!\r)\n", b"\r\n", wire)
        return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def repaired_on_delivery(message: bytes) -> bool:
    """Whether delivery may rewrite the message (relay/policy/content.py): 8-bit text gets a
    charset or encoded-words, a line over 998 octets a new transfer encoding."""
    return not message.isascii() or any(len(x) > 998 for x in message.split(b"\r\n"))


@dataclass
class Sent:
    """One message a fuzzing client sent, as the oracle tracks it."""

    marker: str | None             # None only for the empty body (identified by queue id)
    sender: str                    # as the relay stores it; "*" when the client cannot tell
    rcpts: tuple[str, ...]         # the recipients the relay accepted ("*": as above)
    fate: str                      # queued | refused | unsent | ambiguous
    queue_id: str | None = None
    expected: bytes | None = None  # the exact message, when it is fully determined
    reply: str = ""


@dataclass
class Ledger:
    messages: list[Sent] = field(default_factory=list)
    counter: int = 0

    def marker(self, kind: str = "m") -> str:
        self.counter += 1
        return f"{kind}{self.counter:06d}x{int(time.time()) % 100000:05d}"

    def add(self, sent: Sent) -> None:
        self.messages.append(sent)


# --- the relay's state ---------------------------------------------------------------------

@dataclass
class QueueState:
    rows: list[tuple[str, int, str, str]]   # msg, idx, rcpt, state
    stored: set[str]                        # queue ids with an intact record in the spool
    partial: list[str]                      # large messages' segments still being streamed

    @property
    def active(self) -> list[tuple[str, int, str, str]]:
        return [r for r in self.rows if r[3] == "active"]

    @property
    def indexed_msgs(self) -> set[str]:
        return {r[0] for r in self.rows}

    @property
    def pending_msgs(self) -> set[str]:
        return {r[0] for r in self.rows if r[3] in ("queued", "deferred", "unknown", "active",
                                                    "hold")}

    @property
    def unindexed(self) -> set[str]:
        """Acknowledged messages (intact in a segment) the index does not know."""
        return self.stored - self.indexed_msgs

    @property
    def without_data(self) -> set[str]:
        """Pending messages whose record is not in the spool."""
        return self.pending_msgs - self.stored

    def agree(self) -> bool:
        return not (self.active or self.unindexed or self.without_data or self.partial)


def queue_state(queue_dir: Path) -> QueueState:
    db = queue_dir / "index.sqlite"
    rows: list[tuple[str, int, str, str]] = []
    # The index is read first: a message committed in between shows as a record the index
    # does not know yet, which settle() polls past.
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT msg, idx, rcpt, state FROM recipients").fetchall()
        finally:
            conn.close()
    return QueueState(rows, set(stored_ids(queue_dir)), partial_streams(queue_dir))


def primary_id(data: bytes) -> str | None:
    """The queue id in our own Received header (the first line of what the sink got)."""
    match = _RECEIVED_ID.search(data[:1024])
    return match.group(1).decode() if match else None


def primary_marker(data: bytes) -> str | None:
    match = re.search(re.escape(MARK) + rb" (\w+)", data)
    return match.group(1).decode() if match else None


def after_received(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    n = 1
    while n < len(lines) and lines[n][:1] in (b" ", b"\t"):
        n += 1
    return b"\r\n".join(lines[n:])


class Oracle:
    """Checks a module's relay: alive, clean log, queue consistent, deliveries as promised."""

    def __init__(self, relay: RelayProcess, sink: Sink, ledger: Ledger,
                 ports: Sequence[int]) -> None:
        self.relay = relay
        self.ports = ports
        self.sink = sink
        self.ledger = ledger
        self.checked_log = 0
        self.examples = 0
        self.sessions = 0
        self.tally: Counter[str] = Counter()   # rules run and their outcomes, for the report

    def alive(self) -> None:
        assert self.relay.proc is not None
        if self.relay.proc.poll() is not None:
            raise Violation(f"relay exited with {self.relay.proc.returncode}:\n"
                            f"{self.relay.log[-5000:]}")

    def check_log(self) -> None:
        text = self.relay.log_path.read_bytes().decode("utf-8", "replace")
        bad = [line for line in text.splitlines()
               if "Traceback" in line or "internal error" in line or "level=ERROR" in line
               or "event=library_error" in line or "event=loop_error" in line
               or line.startswith(("  File ", "    "))]
        if bad:
            raise Violation("relay.log:\n" + "\n".join(bad[:20]))

    def open_sessions(self) -> list[str]:
        """The relay's SMTP connections still open (established or half closed by the client)."""
        ports = " or ".join(f"sport = :{p}" for p in self.ports)
        out = subprocess.run(["ss", "-Htn", "state", "established", "state", "close-wait",
                              f"( {ports} )"], capture_output=True, text=True, check=True).stdout
        return out.splitlines()

    def settle(self, timeout: float = 30.0) -> QueueState:
        """Wait until the relay is idle: what must arrive has arrived, nothing is active, every
        spool record is indexed, every pending message has its record, no stream is left."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            state = queue_state(self.relay.queue_dir)
            if state.agree() and not state.pending_msgs and not self._missing() and \
                    not self.open_sessions():
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def _missing(self) -> list[Sent]:
        """Queued messages not yet at the sink for every recipient the client can name."""
        got = self._deliveries()
        return [m for m in self.ledger.messages if m.fate == "queued" and (
            not got[id(m)] or {r for r in m.rcpts if r != "*"} - set(got[id(m)]))]

    def _match(self, data: bytes) -> Sent | None:
        """The message the client sent that this delivery is: by the queue id in our Received
        header when the client read its 250, else by the first marker in the body."""
        sent = self._by_id.get(primary_id(data) or "")
        if sent is None:
            sent = self._by_marker.get(primary_marker(data) or "")
        return sent

    @property
    def _by_id(self) -> dict[str, Sent]:
        return {m.queue_id: m for m in self.ledger.messages if m.queue_id}

    @property
    def _by_marker(self) -> dict[str, Sent]:
        return {m.marker: m for m in self.ledger.messages if m.marker}

    def _deliveries(self) -> dict[int, Counter[str]]:
        got: dict[int, Counter[str]] = {id(m): Counter() for m in self.ledger.messages}
        by_id, by_marker = self._by_id, self._by_marker
        for msg in list(self.sink.messages):
            sent = by_id.get(primary_id(msg.data) or "") or \
                by_marker.get(primary_marker(msg.data) or "")
            if sent is not None:
                got[id(sent)].update(msg.rcpt_tos)
        return got

    def check(self) -> None:
        """Everything, after waiting for the relay to settle."""
        state = self.settle()
        self.check_log()
        problems: list[str] = []
        lingering = self.open_sessions()
        if lingering:
            problems.append(f"the relay keeps {len(lingering)} SMTP connections open after "
                            f"their clients left: {lingering[:5]}")
        if state.active:
            problems.append(f"recipients still active once idle: {state.active[:10]}")
        if state.unindexed:
            orphans = sorted(state.unindexed)
            problems.append(f"spool records the index does not know: {orphans[:10]}")
            problems.extend(self.evidence(qid) for qid in orphans[:3])
        if state.without_data:
            missing = sorted(state.without_data)
            problems.append(f"pending index rows without a spool record: {missing[:10]}")
            problems.extend(self.evidence(qid) for qid in missing[:3])
        if state.partial:
            problems.append(f"partly streamed segments left behind: {state.partial[:10]}")
        stuck = [r for r in state.rows if r[3] != "delivered"]
        if stuck:
            problems.append(f"recipients not delivered in time (the sink takes everything): "
                            f"{stuck[:10]}")
        problems.extend(self._delivery_problems())
        if problems:
            raise Violation("\n".join(problems))

    def evidence(self, qid: str) -> str:
        """What the relay knows about one queue id: index rows, spool file, log lines."""
        out = [f"--- {qid}:"]
        db = self.relay.queue_dir / "index.sqlite"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            for table, key in (("messages", "id"), ("recipients", "msg"), ("attempts", "msg")):
                rows = conn.execute(f"SELECT * FROM {table} WHERE {key} = ?", (qid,)).fetchall()
                out.append(f"  {table}: {rows}")
        finally:
            conn.close()
        with contextlib.suppress(KeyError):
            raw = stored_message(self.relay.queue_dir, qid)
            out.append(f"  spool record ({len(raw)} bytes): {raw[:400]!r} ... {raw[-200:]!r}")
        out += [f"  log: {line}" for line in self.relay.log.splitlines() if qid in line][:10]
        sent = self._by_id.get(qid)
        out.append(f"  client's view: {sent!r}"[:600])
        return "\n".join(out)

    def _delivery_problems(self) -> list[str]:
        problems = []
        by_id, by_marker = self._by_id, self._by_marker
        got: dict[int, Counter[str]] = {id(m): Counter() for m in self.ledger.messages}
        for msg in list(self.sink.messages):
            qid = primary_id(msg.data)
            sent = by_id.get(qid or "")
            if sent is None:
                sent = by_marker.get(primary_marker(msg.data) or "")
                if sent is None or sent.fate not in ("ambiguous", "queued"):
                    fate = sent.fate if sent else "never sent as a message"
                    problems.append(f"delivered without a 250 ({fate}): queue id {qid}, "
                                    f"from {msg.mail_from!r} to {msg.rcpt_tos}: "
                                    f"{msg.data[:600]!r}")
                    continue
                if sent.fate == "queued":
                    problems.append(f"{sent.marker} was queued as {sent.queue_id} but arrived "
                                    f"as {qid}")
            if sent.sender != "*" and msg.mail_from not in (sent.sender, f"<{sent.sender}>"):
                problems.append(f"{qid}: sender {sent.sender!r} arrived as {msg.mail_from!r}")
            if sent.expected is not None and not repaired_on_delivery(sent.expected) and \
                    after_received(msg.data) != sent.expected:
                problems.append(f"{qid}: message changed on the way:\n  sent "
                                f"{sent.expected[:800]!r}\n  got  "
                                f"{after_received(msg.data)[:800]!r}")
            got[id(sent)].update(msg.rcpt_tos)
        for sent in self.ledger.messages:
            # Every distinct recipient the relay accepted, exactly once (a recipient given twice
            # is one recipient); "*" stands for one the client cannot name exactly.
            delivered = got[id(sent)]
            exact = {r for r in sent.rcpts if r != "*"}
            wild = sent.rcpts.count("*")
            what = f"{sent.queue_id or sent.marker} ({sent.fate}, accepted {sent.rcpts})"
            twice = {r: n for r, n in delivered.items() if n > 1}
            if twice:
                problems.append(f"{what}: delivered more than once: {twice}")
            if len(set(delivered) - exact) > wild:
                problems.append(f"{what}: delivered to {dict(delivered)}: not all accepted")
            if sent.fate == "queued" and (exact - set(delivered) or not delivered):
                problems.append(f"{what}: delivered only to {dict(delivered)}")
            if sent.fate in ("refused", "unsent") and delivered:
                problems.append(f"{what}: delivered to {dict(delivered)} without a 250")
        return problems


# --- strategies -----------------------------------------------------------------------------

CONTROL = [b"\x00", b"\r", b"\x01", b"\x07", b"\x08", b"\x1b", b"\x7f", b"\t", b"\x0b", b"\x0c",
           b"\xc2\x85", b"\xc2\x9b", b"\xc2\xa0"]
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3(", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
UTF8 = ["é".encode(), "ü".encode(), "发票".encode(), "\U0001f4e7".encode(), "\ufeff".encode(),
        "\u2028".encode(), "\u202e".encode(), "İ".encode()]
SYNTAX = [b"<", b">", b"@", b":", b";", b",", b'"', b"\\", b"(", b")", b"[", b"]", b" ", b"=",
          b"%", b"!", b"<>", b"..", b"*", b"\r\r", b"\r ", b"+"]


def no_newlines(data: bytes) -> bytes:
    """Lines stay single: a LF would end the command (a bare CR is fair game)."""
    return data.replace(b"\n", b"")


fragment = st.one_of(
    st.sampled_from(CONTROL + BAD_UTF8 + UTF8 + SYNTAX),
    st.from_regex(rb"\A[a-z0-9.-]{1,10}\Z"),
    st.binary(min_size=1, max_size=6),
    st.text(min_size=1, max_size=4).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
fuzz_bytes = st.lists(fragment, max_size=6).map(lambda parts: no_newlines(b"".join(parts)))
# Short runs of the characters and pieces that address parsers trip on: `"`, `@[`, `<@`, ...
ADDRESS_BITS = [b"a", b"b.c", b"@", b"<", b">", b"@[", b"[IPv6:", b"@[1.2.3.4]", b'""', b"<@",
                b"@a:", b"a@b", b"\\\""]
syntax_bytes = st.lists(st.sampled_from(SYNTAX + ADDRESS_BITS), min_size=1,
                        max_size=4).map(b"".join)
long_bytes = st.sampled_from([63, 64, 65, 255, 256, 257, 600, 990, 1200]).map(lambda n: b"x" * n)
arg_bytes = st.one_of(fuzz_bytes, fuzz_bytes, syntax_bytes, syntax_bytes, long_bytes)

LOCALS = [b"a", b"b.c", b"x+tag", b"l" * 64, b"l" * 65, b'"quoted local"', b'"a\\"b"', b"a..b",
          b".a", b"\xc3\xa9t\xc3\xa9", b"r\xc3\xa9", b"postmaster", b"%", b"a@b"]
DOMAINS = [b"example.net", b"sender.test", b"EXAMPLE.NET", b"b\xc3\xbccher.test", b"[127.0.0.1]",
           b"[IPv6:::1]", b"d" * 63 + b".net", b".".join([b"d" * 60] * 5), b"localhost",
           b"example.net.", b"-bad-.test"]
local_part = st.one_of(st.sampled_from(LOCALS), st.sampled_from(LOCALS), fuzz_bytes, syntax_bytes)
domain = st.one_of(st.sampled_from(DOMAINS), st.sampled_from(DOMAINS[:2]), fuzz_bytes,
                   syntax_bytes)


@st.composite
def path(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["angle", "angle", "angle", "bare", "null", "route", "fuzz",
                                  "open", "space"]))
    addr = draw(local_part) + b"@" + draw(domain)
    return {
        "angle": b"<" + addr + b">",
        "bare": addr,
        "null": b"<>",
        "route": b"<@route.test,@b.test:" + addr + b">",
        "fuzz": draw(st.one_of(fuzz_bytes, syntax_bytes)),
        "open": b"<" + addr,
        "space": b" <" + addr + b"> ",
    }[shape]


# MAIL and RCPT lines whose reply the fuzzer predicts exactly (test_session_fuzz._predict).
SANE_SENDERS = {b"<a@sender.test>", b"<>", b"<r\xc3\xa9@b\xc3\xbccher.test>",
                b"<billing@sender.test>"}
SANE_MAIL_PARAMS = {b"BODY=8BITMIME", b"SMTPUTF8", b"SIZE=1000"}
SANE_MAIL = re.compile(rb"\AMAIL FROM:(<[^<>]*>)((?: [A-Z0-9=]+)*)\Z")
SANE_RCPT = re.compile(
    rb"\ARCPT TO:<((?:b|ap|x\+1|invoices|r\xc3\xa9)@(?:example\.net|other\.test))>\Z")

MAIL_PARAMS = [b"BODY=8BITMIME", b"BODY=7BIT", b"body=8bitmime", b"BODY=BINARYMIME", b"SMTPUTF8",
               b"SMTPUTF8=yes", b"SIZE=100", b"SIZE=0", b"SIZE=1500001", b"SIZE=x", b"SIZE=",
               b"SIZE=99999999999999999999999", b"RET=FULL", b"ENVID=x", b"=", b"AUTH=<>",
               b"NOTIFY=NEVER"]
mail_param = st.one_of(st.sampled_from(MAIL_PARAMS), fuzz_bytes)
MAIL_KEYWORDS = [b"MAIL FROM:", b"mail from:", b"MAIL FROM: ", b"MAIL FROM :", b"MAIL TO:",
                 b"MAIL", b"MAIL FROM:<a@sender.test> MAIL FROM:"]
RCPT_KEYWORDS = [b"RCPT TO:", b"rcpt to:", b"RCPT TO: ", b"RCPT FROM:", b"RCPT"]


@st.composite
def mail_line(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # a sane one (SANE_SENDERS), so that transactions get somewhere
        sender = draw(st.sampled_from(sorted(SANE_SENDERS)))
        params = draw(st.lists(st.sampled_from(sorted(SANE_MAIL_PARAMS)), max_size=2,
                               unique=True))
        if b"\xc3" in sender and b"SMTPUTF8" not in params and draw(st.integers(0, 3)):
            params.append(b"SMTPUTF8")
        return b" ".join([b"MAIL FROM:" + sender, *params])
    keyword = draw(st.sampled_from(MAIL_KEYWORDS))
    params = draw(st.lists(mail_param, max_size=3))
    return no_newlines(b" ".join([keyword + draw(path()), *params]))


@st.composite
def rcpt_line(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # a sane one (SANE_RCPT)
        local = draw(st.sampled_from([b"b", b"ap", b"x+1", b"invoices", b"r\xc3\xa9"]))
        dom = draw(st.sampled_from([b"example.net", b"example.net", b"other.test"]))
        return b"RCPT TO:<" + local + b"@" + dom + b">"
    keyword = draw(st.sampled_from(RCPT_KEYWORDS))
    params = draw(st.lists(st.one_of(st.sampled_from([b"NOTIFY=NEVER", b"ORCPT=rfc822;x@y"]),
                                     fuzz_bytes), max_size=2))
    return no_newlines(b" ".join([keyword + draw(path()), *params]))


simple_verbs = st.sampled_from([b"NOOP", b"RSET", b"VRFY", b"HELP", b"EXPN", b"noop", b"NOOP ",
                                b"ETRN", b"BDAT", b"TURN", b"", b"DATA", b"QUIT"])


@st.composite
def simple_line(draw: st.DrawFn) -> bytes:
    verb = draw(simple_verbs)
    if verb in (b"QUIT", b"DATA"):   # no body follows here: only with an argument (refused)
        return verb + b" " + (draw(fuzz_bytes) or b"x")
    if draw(st.booleans()):
        return verb
    return no_newlines(verb + b" " + draw(arg_bytes))


garbage_line = st.one_of(
    fuzz_bytes,
    st.binary(max_size=40).map(no_newlines),
    st.sampled_from([b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1", b"\r", b"\r\r\r", b" ",
                     b"EHLO", b"MAIL FROM:<a@sender.test>\x00RCPT TO:<b@example.net>",
                     b"\x00" * 20, b"AUTH", b"STARTTLS x", b"x" * 1001, b"x" * 1002,
                     b"NOOP " + b"n" * 5000, b"X" * 9000]),
)

HEADER_LINES = [b"From: a@sender.test", b"To: b@example.net", b"Subject: fuzz",
                b"Subject: =?utf-8?q?Rechnung?=", "Subject: 发票 Grüße".encode(),
                b"Message-ID: <fuzz@sender.test>", b"Received: from x by y; now",
                b"X-Long: " + b"h" * 990, b"Content-Type: text/plain; charset=utf-8"]
BODY_ATOMS = [b"", b".", b"..", b"...", b".x", b"..x", b" .", b". ", b".\r", b"\r.", b"\n.",
              b".\n", b"\n.\n", b"\r.\r", b"\n.\r", b"\r.\n", b"x\n.\nQUIT", b"\x00",
              b"MAIL FROM:<evil@sender.test>", b"RCPT TO:<victim@example.net>", b"DATA",
              b"QUIT", b"RSET", b"EHLO evil", b"STARTTLS", b"AUTH PLAIN AGFsaWNlAHg=",
              b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"\x1b[31m", b"a" * 998, b"a" * 999,
              b"." + b"d" * 998, b"\t", b"\r\r", b"\n\n"]


def smuggle_block(token: str, sep: bytes) -> bytes:
    """A whole second transaction behind a fake end of data (`sep` is a bogus line end)."""
    return sep.join([b"x", b".", b"MAIL FROM:<evil@sender.test>", b"RCPT TO:<victim@example.net>",
                     b"DATA", MARK + b" " + token.encode(), b".", b""])


body_line = st.one_of(st.sampled_from(BODY_ATOMS), st.sampled_from(BODY_ATOMS),
                      st.binary(max_size=30), st.text(max_size=20).map(str.encode),
                      st.from_regex(rb"\A[ -~]{0,60}\Z"))


def _clean(line: bytes) -> bool:
    return not any(c in line for c in b"\r\n\0")


# Lines any server must take: no CR, LF or NUL inside, at most 998 octets.
clean_body_line = st.one_of(
    st.sampled_from([a for a in BODY_ATOMS if _clean(a) and len(a) <= 998]),
    st.sampled_from([b".", b"..", b".x", b"", b"MAIL FROM:<evil@sender.test>", b"DATA"]),
    st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"\r\n\0")),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")).filter(_clean),
    st.from_regex(rb"\A[ -~]{0,60}\Z"))


def clean_line(line: bytes) -> bytes:
    """No CRLF inside a body line: only the line ends we add may form one (and the final dot)."""
    while b"\r\n" in line:
        line = line.replace(b"\r\n", b"\r \n")
    return line


@st.composite
def bodies(draw: st.DrawFn, marker: str, smuggle_token: str) -> Body:
    """A body whose first FUZZMARK line is `marker`, with dot-stuffing traps, command-looking
    lines, bad line ends, and sometimes a smuggled transaction or a size near the limits."""
    lines: list[bytes] = []
    nostuff: set[int] = set()
    if draw(st.integers(0, 4)) == 0:  # leading lines before any header: the virtual CRLF
        lines += draw(st.lists(st.sampled_from([b".", b"..", b".x", b"", b"x"]), max_size=3))
    lines += draw(st.lists(st.sampled_from(HEADER_LINES), max_size=4))
    if draw(st.integers(0, 20)) == 0:
        lines += [b"Received: from hop%d.test by hop%d.test; now" % (i, i) for i in range(50)]
    lines += [b"", MARK + b" " + marker.encode()]
    hostile = draw(st.integers(0, 2)) == 0
    for line in draw(st.lists(body_line if hostile else clean_body_line, max_size=12)):
        lines.append(clean_line(line))
    if hostile and draw(st.integers(0, 2)) == 0:
        sep = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
        lines.append(clean_line(smuggle_block(smuggle_token, sep)))
    if draw(st.integers(0, 30)) == 0:  # large: streamed to the spool; some over the limit
        target = draw(st.sampled_from([1_100_000, MAX_MESSAGE_SIZE + 50_000]))
        lines += [b"f" * 998] * (target // 1000)
    for i, line in enumerate(lines):
        # A careless client leaves some leading dots alone; never a lone ".", which would end
        # DATA for real (a desync of the client's own making, not the relay's).
        if line.startswith(b".") and line != b"." and draw(st.integers(0, 3)) == 0:
            nostuff.add(i)
    return Body(tuple(lines), frozenset(nostuff))


def cut_points(draw: st.DrawFn, data: bytes, max_cuts: int = 6) -> list[int]:
    """Where to split a write: anywhere, inside a CRLF, inside the final dot."""
    n = len(data)
    special = [i + 1 for i in range(min(n, 4096)) if data[i:i + 1] == b"\r"][:50]
    special += [n - k for k in range(1, 6) if n - k > 0]
    choices = st.integers(0, n) if not special else st.one_of(st.integers(0, n),
                                                              st.sampled_from(special))
    return draw(st.lists(choices, max_size=max_cuts))

