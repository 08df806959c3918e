r"""Benchmark: invoice-relay against a private Postfix instance, same run, same load.

Driven by bench/run; see bench/README.md.  The harness is stdlib-only Python; the chart
(bench/chart.py) needs matplotlib (pip install -e '.[bench]'), and is skipped without it.

Topology (all on 127.0.0.1):

    smtp-source ----> invoice-relay --+--> smtp-sink      (to@example.net: accepts all, counts)
    smtp-source ----> postfix --------+--> bench/sink.py  (to@example.org: 5% 451 once, 2% 550;
    bench/probe.py -> (same system) --+                    and the DSNs to bench.test)
                                      +--> smtp-sink      (probe@probe.test: probe messages)
    smtp-source ----> the sink directly  (direct round: ceiling of load generator and sink)

The signed scenario (--signed): a second relay with an RSA-2048 `[[sender]] dkim` policy for
bench.test and a second Postfix with OpenDKIM as a milter on a unix socket, same key, next to
the unsigned relay, deliver to@signed.test into bench/sink.py accepting everything; the sink
counts DKIM-Signature fields and keeps a sample that the harness verifies with dkimpy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import json
import math
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZES = {"4k": 4096, "200k": 204800}
PUBLISHED_PNG = BENCH_DIR / "results.png"


STALL_KICK_S = 5.0  # no progress at the sink this long after a round's last message: kick

# The signed scenario: sender domain and selector both systems sign with, and the recipient
# domain routed to the signed sink
SIGN_DOMAIN, SIGN_SELECTOR, SIGNED_RCPT = "bench.test", "bench", "to@signed.test"
SAMPLES_PER_ROUND = 6
# systems in the order rounds alternate and tables list them; the signed ones run only in
# the signed cells
SYSTEMS = ("relay", "relay-signed", "postfix", "postfix-dkim", "direct")
SIGNED_SYSTEMS = ("relay-signed", "postfix-dkim")


class BenchError(Exception):
    pass


def write_results(out: Path, name: str, results: dict) -> Path:
    """The run's results as JSON in `out` (created if needed); the file written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def run_cli(main: Callable[[], int], prog: str) -> None:
    """Exit with main()'s status; a BenchError is one line on stderr and status 2."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp_banner(port: int, timeout: float, proc: subprocess.Popen | None = None,
                     what: str = "server") -> None:
    """Wait until 127.0.0.1:port answers with a 220 greeting."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before accepting "
                             f"connections on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last = f"greeting {data[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"{what} did not greet with 220 on 127.0.0.1:{port} within {timeout:.0f}s "
                     f"(last: {last})")


# --------------------------------------------------------------------------------------
# /proc helpers

def read_stat(pid: int) -> dict | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split at the last ')'
    lpar, rpar = raw.index("("), raw.rindex(")")
    comm = raw[lpar + 1:rpar]
    f = raw[rpar + 2:].split()
    # f[0] is field 3 (state); field n is f[n-3]
    return {
        "pid": pid, "comm": comm, "state": f[0], "ppid": int(f[1]), "pgid": int(f[2]),
        "utime": int(f[11]), "stime": int(f[12]), "cutime": int(f[13]), "cstime": int(f[14]),
    }


def all_stats() -> list[dict]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                out.append(st)
    return out


def tree(root_pids: list[int], pgids: list[int] = ()) -> list[dict]:
    """Stats of the root PIDs, all their descendants, and all members of the given groups."""
    stats = all_stats()
    by_parent: dict[int, list[dict]] = {}
    for st in stats:
        by_parent.setdefault(st["ppid"], []).append(st)
    seen: dict[int, dict] = {}
    todo = [st for st in stats if st["pid"] in root_pids or st["pgid"] in pgids]
    while todo:
        st = todo.pop()
        if st["pid"] in seen:
            continue
        seen[st["pid"]] = st
        todo.extend(by_parent.get(st["pid"], []))
    return sorted(seen.values(), key=lambda s: s["pid"])


def cpu_ticks(st: dict, with_children: bool = True) -> int:
    t = st["utime"] + st["stime"]
    if with_children:
        # CPU of children this process has already reaped (Postfix daemons exit after
        # max_use requests; their CPU ends up in master's cutime/cstime).
        t += st["cutime"] + st["cstime"]
    return t


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_cpu() -> tuple[int, int, int, int]:
    """(busy, steal, total, irq+softirq) jiffies over all CPUs, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    f += [0] * (8 - len(f))
    idle, steal, irq = f[3] + f[4], f[7], f[5] + f[6]
    total = sum(f[:8])
    return total - idle - steal, steal, total, irq


def kill_tree(name: str, root_pids: list[int], pgids: list[int], grace: float) -> None:
    """SIGTERM the groups and the process tree; SIGKILL whatever is left after `grace` s."""
    procs = tree(root_pids, pgids)
    if not procs:
        return
    groups = set(pgids) | {p["pgid"] for p in procs if p["pid"] in root_pids}
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        left = [p for p in tree(root_pids, list(groups)) if p["state"] != "Z"]
        if not left:
            return
        time.sleep(0.1)
    left = tree(root_pids, list(groups))
    log(f"{name}: still running after {grace:.0f}s, SIGKILL to "
        f"{', '.join(str(p['pid']) + ':' + p['comm'] for p in left)}")
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    for p in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p["pid"], signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-20000:].decode(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data[-lines:])


# --------------------------------------------------------------------------------------
# Destinations: smtp-sink (accepts everything, counts), bench/sink.py (refuses a share),
# and a second smtp-sink for the latency probe's messages

def open_connections(port: int) -> int:
    """Established (or half-closed) TCP connections to 127.0.0.1:port, from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                # 01 ESTABLISHED, 08 CLOSE_WAIT (client closed, sink not yet)
                if parts[1] == local and parts[3] in ("01", "08"):
                    n += 1
    except OSError:
        pass
    return n


class Sink:
    """smtp-sink: accepts every message; its running `mesg=N` counter is the round's clock."""
    kind = "all"
    title = "smtp-sink (accepts all)"

    def __init__(self, workdir: Path, smtp_sink: str, name: str = "smtp-sink"):
        self.name = name
        self.port = free_port()
        self.count = 0
        self.sessions = 0  # sessions ended, from the same counter line
        self.cond = threading.Condition()
        self.crossings: list[tuple[int, float]] = []  # (target, monotonic time reached)
        self.targets: list[int] = []
        self.errlog = workdir / f"{name}.stderr"
        # -c: running counters on stdout ("sess=N quit=N mesg=N\r"), updated when "." is
        # received. 1000: listen backlog.  -u postfix: required when started as root.
        with open(self.errlog, "wb") as errlog:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [smtp_sink, "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1000"],
                stdout=subprocess.PIPE, stderr=errlog, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_smtp_banner(self.port, 10, self.proc, name)
        # wait_smtp_banner opened one session without a message: mesg stays 0

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        buf = b""
        pat = re.compile(rb"mesg=(\d+)")
        sess_pat = re.compile(rb"sess=(\d+)")
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                return
            buf += chunk
            cut = buf.rfind(b"\r")  # each update ends with \r; keep the unfinished rest
            if cut < 0:
                continue
            done, buf = buf[:cut], buf[cut + 1:]
            start = done.rfind(b"\r") + 1
            m = pat.search(done, start)
            if m is None:
                continue
            value = int(m.group(1))
            ms = sess_pat.search(done, start)
            if ms:
                self.sessions = int(ms.group(1))
            with self.cond:
                if value > self.count:
                    self.count = value
                    for t in list(self.targets):
                        if value >= t:
                            self.crossings.append((t, now))
                            self.targets.remove(t)
                    self.cond.notify_all()

    def arm(self, target: int, what: str = "outcomes") -> None:
        with self.cond:
            if self.count >= target:
                self.crossings.append((target, time.monotonic()))
            else:
                self.targets.append(target)

    def wait(self, target: int, deadline: float, what: str = "outcomes") -> float | None:
        """Monotonic time at which the counter reached `target`, or None on timeout."""
        with self.cond:
            while True:
                for t, when in self.crossings:
                    if t == target:
                        return when
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.cond.wait(min(left, 0.5))

    def cpu_ticks(self) -> int:
        return sum(cpu_ticks(p) for p in tree([self.proc.pid], [self.proc.pid]))

    def open_connections(self) -> int:
        return open_connections(self.port)

    def current(self) -> int:
        with self.cond:
            return self.count

    def snapshot(self) -> dict:
        """Counters now (for per-round deltas)."""
        return {"count": self.current(), "sessions": self.sessions}

    def settle(self, quiet: float = 0.5, limit: float = 5.0) -> int:
        """Wait until the counter has not moved for `quiet` seconds; return it."""
        end = time.monotonic() + limit
        last, since = self.current(), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.05)
            c = self.current()
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self) -> None:
        kill_tree(self.name, [self.proc.pid], [self.proc.pid], 5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class RealisticSink:
    """bench/sink.py: 451 for a deterministic share on the first attempt, 550 for another share
    on every attempt, 250 for the rest and for DSNs (counted apart).  Its count is *outcomes*:
    messages accepted or refused with 550, each Message-Id once."""
    kind = "realistic"

    extra_args: tuple[str, ...] = ()

    def __init__(self, workdir: Path, python: str, temp_pct: float, perm_pct: float,
                 name: str = "bench-sink"):
        self.name = name
        self.title = f"bench/sink.py ({temp_pct:g}% 451 once, {perm_pct:g}% 550)"
        self.temp_pct, self.perm_pct = temp_pct, perm_pct
        self.errlog = workdir / f"{name}.stderr"
        with open(self.errlog, "wb") as errlog:
            self.proc = subprocess.Popen(
                [python, str(BENCH_DIR / "sink.py"), "--temp-pct", str(temp_pct),
                 "--perm-pct", str(perm_pct), "--dsn-domain", "bench.test",
                 *self.extra_args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog,
                start_new_session=True)
        self.cond = threading.Condition()
        self.wlock = threading.Lock()
        self.stats: dict = {}
        self.crossings: list[tuple[int, str, float]] = []
        self.port = 0
        self.loop = "?"
        self.shares: bool | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        with self.cond:
            self.cond.wait_for(lambda: self.port or self.proc.poll() is not None, 15)
        if not self.port:
            raise BenchError(f"bench/sink.py did not start\n--- {self.errlog} ---\n"
                             f"{tail(self.errlog)}")
        wait_smtp_banner(self.port, 10, self.proc, "bench/sink.py")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if "ready" in d:
                    self.port, self.loop = d["ready"], d.get("loop", "?")
                if "stats" in d:
                    self.stats = d["stats"]
                if "reached" in d:
                    self.crossings.append((d["reached"], d["what"], d["t"]))
                if "shares" in d:
                    self.shares = d["shares"]
                self._read_extra(d)
                self.cond.notify_all()

    def _read_extra(self, d: dict) -> None:
        """A subclass's own answers."""

    def _send(self, line: str) -> None:
        with self.wlock:
            try:
                self.proc.stdin.write((line + "\n").encode())
                self.proc.stdin.flush()
            except OSError as e:
                raise BenchError(f"bench/sink.py is gone ({e})\n{tail(self.errlog)}") from e

    @property
    def sessions(self) -> int:
        return self.stats.get("sessions", 0)

    def fresh_stats(self) -> dict:
        t = time.monotonic()
        self._send("stats")
        with self.cond:
            if not self.cond.wait_for(lambda: self.stats.get("t", 0) >= t, 5):
                raise BenchError("bench/sink.py does not answer `stats`")
            return dict(self.stats)

    def set_shares(self, on: bool) -> None:
        self._send(f"shares {'on' if on else 'off'}")
        with self.cond:
            if not self.cond.wait_for(lambda: self.shares is on, 5):
                raise BenchError("bench/sink.py does not answer `shares`")

    def arm(self, target: int, what: str = "outcomes") -> None:
        self._send(f"arm {target} {what}")

    def wait(self, target: int, deadline: float, what: str = "outcomes") -> float | None:
        with self.cond:
            while True:
                for t, w, when in self.crossings:
                    if t == target and w == what:
                        return when
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.cond.wait(min(left, 0.5))

    def current(self) -> int:
        with self.cond:
            return self.stats.get("outcomes", 0)

    def snapshot(self) -> dict:
        s = self.fresh_stats()
        s["count"] = s["outcomes"]
        return s

    def cpu_ticks(self) -> int:
        return sum(cpu_ticks(p) for p in tree([self.proc.pid], [self.proc.pid]))

    def open_connections(self) -> int:
        return open_connections(self.port)

    def settle(self, quiet: float = 0.5, limit: float = 5.0) -> int:
        """Wait until no counter (outcomes, DSNs, replies) has moved for `quiet` seconds."""
        def key():
            with self.cond:
                return (self.stats.get("outcomes"), self.stats.get("dsn"),
                        self.stats.get("replies"))
        end = time.monotonic() + limit
        last, since = key(), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.05)
            c = key()
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return self.current()

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: the sink prints its final stats and exits
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        kill_tree(self.name, [self.proc.pid], [self.proc.pid], 5)
        self.reader.join(2)


class SignedSink(RealisticSink):
    """bench/sink.py accepting every message, for the signed cells: counts the messages that
    carry a DKIM-Signature and keeps a sample of each round in full, which verify_samples()
    checks with dkimpy against the bench key."""
    kind = "signed"

    def __init__(self, workdir: Path, python: str, key: DkimKey):
        self.sample_dir = workdir / "signed-samples"
        self.sample_dir.mkdir()
        self.key = key
        self.sampling: list | None = None
        self.extra_args = ("--sample-dir", str(self.sample_dir))
        super().__init__(workdir, python, 0, 0, name="signed-sink")
        self.title = "bench/sink.py (accepts all, checks DKIM)"

    def _read_extra(self, d: dict) -> None:
        if "sampling" in d:
            self.sampling = d["sampling"]

    def start_sampling(self, n: int) -> None:
        """Keep SAMPLES_PER_ROUND messages spread over the next n."""
        for f in self.sample_dir.iterdir():
            f.unlink()
        every = max(1, n // SAMPLES_PER_ROUND)
        self._send(f"sample {every} {SAMPLES_PER_ROUND}")
        with self.cond:
            if not self.cond.wait_for(lambda: self.sampling == [every, SAMPLES_PER_ROUND], 5):
                raise BenchError("bench/sink.py does not answer `sample`")

    def check_round(self, before: dict, after: dict, n: int) -> dict:
        """How many of the round's n messages were signed, and the sample's verification."""
        self._send("sample 0 0")
        files = sorted(self.sample_dir.iterdir())
        return {"n": n, "signed": after["dkim_signed"] - before["dkim_signed"],
                **verify_samples(files, self.key)}


def unstuff(wire: bytes) -> bytes:
    """SMTP dot-unstuffing of message data as it was on the wire (RFC 5321 4.5.2)."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


def first_signature_tags(msg: bytes) -> dict[str, str]:
    """The tags of the message's first DKIM-Signature field (unfolded), {} without one."""
    head = msg.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^dkim-signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    if not m:
        return {}
    value = re.sub(rb"\s+", b"", m.group(1)).decode(errors="replace")
    return dict(t.split("=", 1) for t in value.split(";") if "=" in t)


def verify_samples(files: list[Path], key: DkimKey) -> dict:
    """Verify the first DKIM-Signature of each sampled message with stock dkimpy, its DNS
    lookup answered with the bench key's TXT record; count the passes."""
    try:
        import dkim  # dkimpy: a relay dependency, in the venv bench/run uses
    except ImportError as e:
        raise BenchError(f"the signed scenario verifies signatures with dkimpy ({e}): run "
                         f"bench/run with the relay's venv (PYTHON=.venv/bin/python)") from e
    record = f"{key.selector}._domainkey.{key.domain}.".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.txt.encode() if name == record else None

    out = {"sampled": len(files), "verified": 0, "failed": []}
    for f in files:
        msg = unstuff(f.read_bytes())
        ok = False
        with contextlib.suppress(dkim.DKIMException):
            ok = bool(dkim.verify(msg, dnsfunc=dnsfunc))
        if ok and first_signature_tags(msg).get("d", "").lower() == key.domain:
            out["verified"] += 1
        else:
            out["failed"].append(f.name)
    return out


class DkimKey:
    """The RSA-2048 key both signed systems use, made with openssl (the harness stays stdlib):
    the private key as PKCS#8 PEM and the TXT record to publish at SEL._domainkey.DOMAIN."""

    def __init__(self, workdir: Path, domain: str = SIGN_DOMAIN, selector: str = SIGN_SELECTOR):
        self.domain, self.selector = domain, selector
        self.dir = workdir / "dkim"
        self.dir.mkdir(mode=0o700)
        self.pem = self.dir / f"{domain}.{selector}.pem"
        openssl = shutil.which("openssl")
        if not openssl:
            raise BenchError("the signed scenario needs openssl: apt-get install openssl")
        subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        "rsa_keygen_bits:2048", "-out", str(self.pem)],
                       check=True, capture_output=True, timeout=60)
        self.pem.chmod(0o600)
        der = subprocess.run([openssl, "pkey", "-in", str(self.pem), "-pubout", "-outform",
                              "DER"], check=True, capture_output=True, timeout=30).stdout
        self.txt = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    def copy_to(self, path: Path, owner: str | None = None) -> Path:
        """A copy of the private key at `path` (mode 0600, owned by `owner`)."""
        shutil.copyfile(self.pem, path)
        path.chmod(0o600)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path


class OpenDkim:
    """Debian's opendkim as a signing milter on a unix socket, running as user postfix (whose
    smtpd connects to it), foreground, no syslog."""

    def __init__(self, home: Path, key: DkimKey):
        self.dir = home
        self.dir.mkdir(mode=0o700)
        pw = pwd.getpwnam("postfix")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
        if not os.access(binary, os.X_OK):
            raise BenchError("opendkim not found: apt-get install -y opendkim opendkim-tools "
                             "(see bench/README.md)")
        keyfile = key.copy_to(self.dir / "bench.private", owner="postfix")
        self.socket = self.dir / "opendkim.sock"
        conf = self.dir / "opendkim.conf"
        conf.write_text(f"""\
# sign only: mail from 127.0.0.1 (InternalHosts' default) with From: @{key.domain}
Mode                    s
Domain                  {key.domain}
Selector                {key.selector}
KeyFile                 {keyfile}
Socket                  local:{self.socket}
UserID                  postfix
UMask                   007
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
OversignHeaders         From
Syslog                  no
# the key is 0600 and owned by postfix, but it lives under /tmp (world-writable), and
# OpenDKIM refuses a key on such a path unless told not to check
RequireSafeKeys         no
""")
        self.log = self.dir / "opendkim.log"
        with open(self.log, "ab") as log_f:
            self.proc = subprocess.Popen([binary, "-f", "-x", str(conf)], stdout=log_f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"opendkim did not create {self.socket}\n--- {self.log} ---\n"
                                 f"{tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        kill_tree("opendkim", [self.proc.pid], [self.proc.pid], 10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class Probe:
    """bench/probe.py during one round: open-loop sessions, final dot -> 250 per message."""

    def __init__(self, python: str, port: int, size: int, interval: float):
        self.proc = subprocess.Popen(
            [python, str(BENCH_DIR / "probe.py"), "--port", str(port), "--size", str(size),
             "--interval", str(interval), "--to", "probe@probe.test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            self.proc.kill()
            raise BenchError(f"latency probe did not start: {self.proc.stderr.read()[-2000:]!r}")

    def stop(self) -> dict:
        st = read_stat(self.proc.pid)
        cpu_s = cpu_ticks(st) / CLK_TCK if st else 0.0
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired as e:
            kill_tree("probe", [self.proc.pid], [self.proc.pid], 2)
            raise BenchError("latency probe did not finish") from e
        try:
            d = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise BenchError(f"latency probe output unreadable: {out[-500:]!r} "
                             f"{err[-2000:]!r}") from e
        d["cpu_s"] = round(cpu_s, 3)
        return d


# --------------------------------------------------------------------------------------
# Systems under test

class System:
    name = "?"
    port = 0

    def cpu_snapshot(self) -> dict:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kick(self) -> bool:
        """Wake a queue that has stalled with messages in it; False if there is no such thing."""
        return False


class Postfix(System):
    name = "postfix"

    def __init__(self, workdir: Path, routes: dict[str, int], postfix_bin: str,
                 name: str = "postfix", dkim_key: DkimKey | None = None):
        """routes: recipient domain -> sink port; "example.net" is the relayhost (everything
        else), the others go through transport_maps.  dkim_key: sign through OpenDKIM."""
        self.name = name
        self.dir = workdir / name
        self.postfix_bin = postfix_bin
        self.opendkim = OpenDkim(workdir / f"{name}-opendkim", dkim_key) if dkim_key else None
        etc, spool, data = self.dir / "etc", self.dir / "spool", self.dir / "data"
        for d in (etc, spool, data):
            d.mkdir(parents=True)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        src = Path("/etc/postfix")
        for f in ("master.cf", "dynamicmaps.cf", "postfix-files"):
            shutil.copy(src / f, etc / f)
        for d in src.glob("*.d"):
            if d.is_dir():
                shutil.copytree(d, etc / d.name)
        self.port = free_port()
        out = []
        for line in (etc / "master.cf").read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # chroot column: the private spool has no chroot files
                line = " ".join(fields)
            out.append(line)
        (etc / "master.cf").write_text("\n".join(out) + "\n")
        transport = "inline:{ " + ", ".join(
            f"{dom}=smtp:[127.0.0.1]:{port}" for dom, port in routes.items()
            if dom != "example.net") + " }"
        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
meta_directory = {etc}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relayhost = [127.0.0.1]:{routes["example.net"]}
transport_maps = {transport}
disable_dns_lookups = yes
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = /dev/stdout
in_flow_delay = 0
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_destination_concurrency_limit = 20
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
# a short retry, as the relay's retry_schedule = ["1s"]: a realistic round ends when every
# message is delivered or bounced
minimal_backoff_time = 1s
maximal_backoff_time = 1s
queue_run_delay = 1s
"""
        if self.opendkim:
            # a unix socket: over TCP the milter conversation stalls on delayed ACKs (~176
            # msg/s on 2 cores), which would understate Postfix
            main_cf += (f"smtpd_milters = unix:{self.opendkim.socket}\n"
                        "milter_default_action = tempfail\n")
        (etc / "main.cf").write_text(main_cf)
        self.logfile = self.dir / "postfix.log"
        env = dict(os.environ, MAIL_CONFIG=str(etc))
        with open(self.logfile, "ab") as logfile:
            self.proc = subprocess.Popen(
                [postfix_bin, "-c", str(etc), "start-fg"], stdout=logfile,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        self.pgids = [self.proc.pid]
        try:
            wait_smtp_banner(self.port, 60, self.proc, "postfix")
        except BenchError as e:
            self.stop()
            raise BenchError(f"{e}\n{self.describe_failure()}") from e
        # `master -s` makes itself a session leader: remember its group too
        for p in tree([self.proc.pid]):
            if p["comm"] == "master":
                self.pgids.append(p["pgid"])

    def procs(self) -> list[dict]:
        return tree([self.proc.pid, *self.milter_pids()], self.pgids)

    def milter_pids(self) -> list[int]:
        return [self.opendkim.proc.pid] if self.opendkim else []

    def cpu_snapshot(self) -> dict:
        procs = self.procs()
        # per-daemon split is not meaningful: smtpd/cleanup/smtp exit after max_use (100)
        # requests and their CPU moves into master's cutime/cstime; report the total (with
        # OpenDKIM's, which is part of the cost of signing) and OpenDKIM's apart
        snap = {"total": sum(cpu_ticks(p) for p in procs), "processes": len(procs)}
        if self.opendkim:
            snap["opendkim"] = sum(cpu_ticks(p) for p in tree(self.milter_pids()))
        return snap

    def peak_rss(self) -> dict:
        ps = [p for p in self.procs() if p["state"] != "Z"]
        return {"sum_kib": sum(vm_hwm_kib(p["pid"]) or 0 for p in ps), "processes": len(ps)}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kick(self) -> bool:
        """`postqueue -f`: qmgr scans every queue ignoring next-delivery times. Needed because
        with 1 s backoffs qmgr sometimes finds a message it still has in memory ("skipped,
        still being delivered"), puts it back into `incoming` 60 s in the future, and scans
        `incoming` again only when new mail arrives: at the end of a round none does."""
        etc = self.dir / "etc"
        subprocess.run([str(Path(self.postfix_bin).with_name("postqueue")), "-c", str(etc),
                        "-f"], env=dict(os.environ, MAIL_CONFIG=str(etc)),
                       capture_output=True, timeout=30, check=False)
        return True

    def describe_failure(self) -> str:
        text = f"--- {self.logfile} (tail) ---\n{tail(self.logfile)}"
        if self.opendkim:
            text += f"\n--- {self.opendkim.log} (tail) ---\n{tail(self.opendkim.log)}"
        return text

    def stop(self) -> None:
        kill_tree(self.name, [self.proc.pid], self.pgids, 30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.opendkim:
            self.opendkim.stop()


class Relay(System):
    name = "relay"

    def __init__(self, workdir: Path, routes: dict[str, int], relay_cmd: list[str],
                 name: str = "relay", dkim_key: DkimKey | None = None,
                 extra_policy: str = ""):
        """dkim_key: sign mail from SIGN_DOMAIN with it (a [[sender]] dkim policy);
        extra_policy: one more policy file's text (bench/observe.py: a webhook)."""
        self.name = name
        self.dir = workdir / name
        (self.dir / "policies").mkdir(parents=True)
        (self.dir / "var").mkdir()
        self.port = free_port()
        self.http_port = free_port()
        (self.dir / "relay.toml").write_text(f"""\
[server]
listen = ["127.0.0.1:{self.port}"]
# no per-client connection cap (Postfix: smtpd_client_connection_count_limit = 0): all load
# comes from 127.0.0.1
max_connections_per_client = 1000
[queue]
path = "var"
# short retry, as Postfix's minimal/maximal_backoff_time = 1s in the same run
retry_schedule = ["1s"]
[http]
listen = "127.0.0.1:{self.http_port}"
[policies]
path = "policies"
""")
        (self.dir / "policies" / "bench.toml").write_text("".join(
            f'[[destination]]\ndomain = "{dom}"\nroutes = ["127.0.0.1:{port}"]\n'
            for dom, port in routes.items()))
        if dkim_key:
            (self.dir / "keys").mkdir(mode=0o700)
            pem = dkim_key.copy_to(self.dir / "keys" / dkim_key.pem.name)
            (self.dir / "policies" / "signing.toml").write_text(
                f'[[sender]]\ndomain = "{dkim_key.domain}"\n'
                f'dkim = [{{ selector = "{dkim_key.selector}", key = "{pem}" }}]\n')
        if extra_policy:
            (self.dir / "policies" / "extra.toml").write_text(extra_policy)
        self.stdout_log = self.dir / "relay.stdout"
        self.stderr_log = self.dir / "relay.stderr"
        self.cmd = [*relay_cmd, "serve", "--config", str(self.dir / "relay.toml")]
        log(f"starting {name}: {' '.join(self.cmd)} (cwd {self.dir})")
        with open(self.stdout_log, "ab") as out, open(self.stderr_log, "ab") as err:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.dir, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.pgids = [self.proc.pid]
        try:
            wait_smtp_banner(self.port, 60, self.proc, "invoice-relay")
        except BenchError as e:
            raise BenchError(f"{e}\n{self.describe_failure()}") from e
        self.seen_procs: dict[int, str] = {}

    def procs(self) -> list[dict]:
        ps = tree([self.proc.pid], self.pgids)
        for p in ps:
            self.seen_procs.setdefault(p["pid"], cmdline(p["pid"]) or p["comm"])
        return ps

    def cpu_snapshot(self) -> dict:
        procs = self.procs()
        main = next((p for p in procs if p["pid"] == self.proc.pid), None)
        # Processes name themselves relay-intake / relay-delivery (comm); the main process
        # is an intake process. Anything else (a reaped child's time) counts as delivery.
        intake = sum(cpu_ticks(p, with_children=False) for p in procs
                     if p["pid"] == self.proc.pid or p["comm"] == "relay-intake")
        delivery = sum(cpu_ticks(p) for p in procs
                       if p["pid"] != self.proc.pid and p["comm"] != "relay-intake")
        if main:
            delivery += main["cutime"] + main["cstime"]
        return {"intake": intake, "delivery": delivery, "total": intake + delivery,
                "by_pid": {str(p["pid"]): cpu_ticks(p) for p in procs}}

    def rss(self) -> dict:
        per = {}
        for p in self.procs():
            if p["state"] == "Z":
                continue
            hwm = vm_hwm_kib(p["pid"])
            if hwm is not None:
                per[str(p["pid"])] = {"vm_hwm_kib": hwm, "cmd": self.seen_procs.get(p["pid"], "")}
        return {"sum_kib": sum(v["vm_hwm_kib"] for v in per.values()), "processes": per}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_failure(self) -> str:
        st = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        try:
            lines = self.stderr_log.read_bytes().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        routine = re.compile(r"event=(received|delivered) ")
        notable = [ln for ln in lines if not routine.search(ln)]
        return (f"invoice-relay is {st}\n--- {self.stderr_log}: last 40 lines other than "
                f"received/delivered events ---\n" + "\n".join(notable[-40:]) +
                "\n--- last 5 lines ---\n" + "\n".join(lines[-5:]) +
                f"\n--- {self.stdout_log} (tail) ---\n{tail(self.stdout_log, 20)}")

    def stop(self) -> None:
        kill_tree(self.name, [self.proc.pid], self.pgids, 30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# --------------------------------------------------------------------------------------
# Rounds

def run_round(kind: str, system: System | None, sink, smtp_source: str, n: int, size: int,
              sessions: int, timeout: float, others: list[System], *, rcpt: str,
              probe: tuple[str, float] | None = None, probe_sink: Sink | None = None) -> dict:
    """One smtp-source run of n messages into `system` (None: straight into `sink`), timed
    until `sink` has the final outcome of all n.  probe = (python, interval): run the latency
    probe next to smtp-source, into the same port."""
    port = system.port if system else sink.port
    realistic = sink.kind == "realistic"
    signed = sink.kind == "signed"
    if signed:
        sink.start_sampling(n)
    snap0 = sink.snapshot()
    base = snap0["count"]
    sess0, open0 = snap0["sessions"], sink.open_connections()
    target = base + n
    sink.arm(target)
    snap_before = system.cpu_snapshot() if system else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink0 = sink.cpu_ticks()
    psink0 = probe_sink.cpu_ticks() if probe and probe_sink else 0
    others_before = {o.name: o.cpu_snapshot()["total"] for o in others if o is not system}
    mbusy0, msteal0, mtot0, mirq0 = machine_cpu()
    pr = Probe(probe[0], port, size, probe[1]) if probe else None
    cmd = [smtp_source, "-s", str(sessions), "-m", str(n), "-l", str(size),
           "-f", "from@bench.test", "-t", rcpt, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    try:
        src = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        if pr:
            pr.stop()
        raise BenchError(f"{kind}: smtp-source did not finish within {timeout:.0f}s; the sink "
                         f"has {sink.current() - base} of {n} messages") from e
    t_src = time.monotonic()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # smtp-source only: the probe is not
    probe_out = pr.stop() if pr else None              # reaped yet
    if src.returncode != 0 or src.stderr.strip():
        msg = (f"{kind}: smtp-source exited {src.returncode}: "
               f"{src.stderr.decode(errors='replace').strip()[:2000]}")
        if src.returncode != 0:
            raise BenchError(msg)
        log("warning: " + msg)
    kicks, progress = [], (sink.current(), time.monotonic())
    while True:
        reached = sink.wait(target, min(t0 + timeout, time.monotonic() + 1.0))
        if reached is not None or time.monotonic() >= t0 + timeout:
            break
        now, count = time.monotonic(), sink.current()
        if count != progress[0]:
            progress = (count, now)
        elif system and now - progress[1] >= STALL_KICK_S and system.kick():
            # counted in the round (e2e includes the stall) and reported
            kicks.append(round(now - t0, 2))
            log(f"warning: {kind}: {system.name} stalled {now - progress[1]:.0f}s with "
                f"{target - count} outcomes missing; kicked its queue")
            progress = (count, now)
        if system and not system.alive():
            raise BenchError(f"{kind}: {system.name} exited (status {system.proc.returncode}) "
                             f"while its queue was draining: the sink has "
                             f"{sink.current() - base} of {n} messages")
    if reached is None:
        got = sink.current() - base
        raise BenchError(f"{kind}: timeout after {timeout:.0f}s: the sink has the outcome of {got} "
                         f"of {n} messages (smtp-source finished in {t_src - t0:.2f}s)")
    dsn_done = None
    if realistic and system:
        # the round's 550s come back as DSNs to from@bench.test; wait for them (bounce work is
        # part of the round's cost) so that they do not spill into the next round
        while True:
            s = sink.fresh_stats()
            if s["dsn"] - snap0["dsn"] >= s["perm"] - snap0["perm"]:
                dsn_done = time.monotonic()
                break
            if time.monotonic() >= t0 + timeout:
                log(f"warning: {kind}: {s['dsn'] - snap0['dsn']} DSNs for "
                    f"{s['perm'] - snap0['perm']} refused messages after {timeout:.0f}s")
                break
            time.sleep(0.05)
    # let the system finish post-delivery work (spool cleanup, index updates) before reading
    # the "after" counters, so that work is charged to this round
    sink.settle(quiet=0.3, limit=3)
    t_after = time.monotonic()
    mbusy1, msteal1, mtot1, mirq1 = machine_cpu()
    snap_after = system.cpu_snapshot() if system else None
    sink1 = sink.cpu_ticks()
    psink1 = probe_sink.cpu_ticks() if probe and probe_sink else 0
    snap1 = sink.snapshot()
    source_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    sink_s = (sink1 - sink0) / CLK_TCK
    probe_s = (probe_out["cpu_s"] if probe_out else 0.0) + (psink1 - psink0) / CLK_TCK
    loadgen_s = source_s + sink_s + probe_s
    sut_s = ((snap_after["total"] - snap_before["total"]) / CLK_TCK) if system else 0.0
    machine_s = (mbusy1 - mbusy0) / CLK_TCK
    irq_s = (mirq1 - mirq0) / CLK_TCK
    accepted_s, e2e_s = t_src - t0, reached - t0
    # connections opened to the sink during the round = sessions ended + still open - open
    # before (Postfix keeps delivery connections cached for a while after a burst)
    sink_sessions = snap1["sessions"] - sess0 + sink.open_connections() - open0
    # messages the system took in this round: smtp-source's n plus the probe's
    handled = n + (probe_out["ok"] if probe_out else 0)
    r = {"kind": kind, "system": system.name if system else "direct", "sink": sink.kind,
         "n": n, "size": size, "sessions": sessions, "rcpt": rcpt,
         "accept_seconds": round(accepted_s, 4), "e2e_seconds": round(e2e_s, 4),
         "accepted_per_s": n / accepted_s, "e2e_per_s": n / e2e_s,
         "machine_cpu_busy_pct": round(100 * (mbusy1 - mbusy0) / max(1, mtot1 - mtot0), 1),
         # SMTP sessions that ended at the sink per message delivered: 1.0 = one connection per
         # message; Postfix reuses connections when a backlog builds
         "sink_sessions_per_msg": round(sink_sessions / n, 3),
         "machine_cpu_steal_pct": round(100 * (msteal1 - msteal0) / max(1, mtot1 - mtot0), 1),
         # smtp-source + sink + probe (+ its sink); irq+softirq time (loopback TCP receive
         # processing, not charged to any process); and whatever else ran (neighbours, kernel
         # threads such as jbd2/kworker doing writeback)
         "loadgen_cpu_us_per_msg": round(loadgen_s * 1e6 / handled, 1),
         "softirq_cpu_us_per_msg": round(irq_s * 1e6 / handled, 1),
         "other_cpu_cores": round((machine_s - irq_s - sut_s - loadgen_s) / (t_after - t0), 2),
         # single-process tools: near 1.0 core they are the bottleneck, not the system
         "smtp_source_cores": round(source_s / accepted_s, 2),
         "sink_cores": round(sink_s / (t_after - t0), 2),
         "messages_handled": handled}
    if kicks:
        r["queue_kicks_at_s"] = kicks
    near = []
    if r["smtp_source_cores"] >= 0.8:
        near.append(f"smtp-source {r['smtp_source_cores']:.2f} cores")
    if r["sink_cores"] >= 0.8:
        near.append(f"{sink.name} {r['sink_cores']:.2f} cores")
    if near:
        r["loadgen_near_ceiling"] = near
    if probe_out:
        lat = sorted(probe_out.pop("lat_us"))
        r["probe"] = probe_out
        r["accept_latency_us"] = lat
        if lat:
            r["accept_latency_ms"] = {"p50": percentile(lat, 50) / 1000,
                                      "p99": percentile(lat, 99) / 1000,
                                      "max": lat[-1] / 1000, "samples": len(lat)}
    if realistic:
        d = {k: snap1[k] - snap0[k] for k in ("accepted", "temp", "retried_ok", "perm",
                                              "perm_repeat", "dsn", "accepted_dup", "replies")}
        r["realistic"] = d
        # after smtp-source is done: how long until the last retry/bounce reached the sink
        r["drain_tail_seconds"] = round(e2e_s - accepted_s, 3)
        if dsn_done:
            r["dsn_done_seconds"] = round(dsn_done - t0, 3)
    if signed:
        r["dkim"] = check_signatures(kind, system, sink.check_round(snap0, snap1, n))
    if system:
        us = 1e6 / CLK_TCK / handled
        cpu = {k: (snap_after[k] - snap_before[k]) * us
               for k in ("intake", "delivery", "total", "opendkim") if k in snap_after}
        r["cpu_us_per_msg"] = {k: round(v, 1) for k, v in cpu.items()}
        # how busy each stage was over the round, in cores (1.0 = one core flat out; a single
        # Python process cannot go beyond ~1.0)
        r["cpu_cores"] = {k: round(v * handled / 1e6 / (t_after - t0), 2)
                          for k, v in cpu.items()}
        if "processes" in snap_after:
            r["processes_after"] = snap_after["processes"]
    idle = {}
    for o in others:
        if o is not system and o.name in others_before:
            idle[o.name] = round((o.cpu_snapshot()["total"] - others_before[o.name])
                                 / CLK_TCK, 3)
    if idle:
        r["idle_systems_cpu_s"] = idle
    return r


def check_signatures(kind: str, system: System | None, d: dict) -> dict:
    """A signed system's round must have every message signed and every sample verified:
    otherwise the bench would compare unsigned with signed output (a BenchError).  An unsigned
    round (the relay without the policy, a direct round) must have none."""
    d["expected"] = bool(system and system.name in SIGNED_SYSTEMS)
    who = f"{kind}: {system.name if system else 'direct'}"
    if d["expected"] and (d["signed"] < d["n"] or not d["sampled"]
                          or d["verified"] < d["sampled"]):
        raise BenchError(f"{kind}: {d['signed']} of {d['n']} messages reached the sink with a "
                         f"DKIM-Signature; {d['verified']} of {d['sampled']} sampled verified "
                         f"with dkimpy (failed: {', '.join(d['failed']) or '-'})")
    if not d["expected"] and d["signed"]:
        log(f"warning: {who}: {d['signed']} of {d['n']} messages carry a DKIM-Signature "
            f"although this system does not sign")
    return d


def percentile(sorted_vals: list, p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def git_state() -> dict:
    """Commit and dirtiness of the checkout the harness lives in (the relay under test, when
    it is installed from this checkout)."""
    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(BENCH_DIR.parent), *a], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "dirty_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


# default messages per round: (size label) -> {sessions: N}; a session count not listed takes
# the nearest listed one below it (or the smallest).  Chosen so that a round lasts about 3-6 s
# on a 2-core machine and the full matrix (2 sizes x 3 session counts x 2 sinks x 3 paired
# rounds) stays near 10 minutes.
N_FULL = {"4k": {1: 1000, 16: 2000, 64: 2000}, "200k": {1: 400, 16: 800, 64: 800}}
N_QUICK = {"4k": {1: 150, 16: 300, 64: 300}, "200k": {1: 60, 16: 120, 64: 120}}


def n_for(table: dict, label: str, sessions: int) -> int:
    row = table[label]
    below = [k for k in row if k <= sessions]
    return row[max(below)] if below else row[min(row)]


def cell_key(r: dict) -> tuple[str, str, int]:
    return (r["sink"], r["label"], r["sessions"])


# the signed cells' ratios (end to end, median of paired rounds): name -> (numerator,
# denominator), and the targets of issue 7 for signed / unsigned
SIGNED_RATIOS = {"signed_unsigned_ratio": ("relay-signed", "relay"),
                 "signed_postfix_dkim_ratio": ("relay-signed", "postfix-dkim")}
SIGNED_TARGETS = {"4k": 0.85, "200k": 0.80}
POSTFIX_DKIM_GOAL = 4.5


def summarize(rounds: list[dict]) -> list[dict]:
    keys: list[tuple[str, str, int]] = []
    for r in rounds:
        if r["kind"] in ("measure", "direct") and cell_key(r) not in keys:
            keys.append(cell_key(r))
    cells = []
    for key in keys:
        sink, label, sessions = key
        cell: dict = {"sink": sink, "size": label, "sessions": sessions}
        mine = [r for r in rounds if cell_key(r) == key]
        for system in SYSTEMS:
            rs = [r for r in mine if r["system"] == system and r["kind"] in ("measure", "direct")]
            if not rs:
                continue
            entry: dict = {"rounds": len(rs), "n": rs[0]["n"]}
            for k in ("accepted_per_s", "e2e_per_s"):
                vals = [r[k] for r in rs]
                entry[k] = {"median": statistics.median(vals), "min": min(vals),
                            "max": max(vals)}
            cpu_keys = sorted({k for r in rs for k in r.get("cpu_us_per_msg", {})})
            if cpu_keys:
                entry["cpu_cores_median"] = {
                    k: statistics.median(r["cpu_cores"].get(k, 0) for r in rs) for k in cpu_keys}
                entry["cpu_us_per_msg_median"] = {
                    k: statistics.median(r["cpu_us_per_msg"].get(k, 0) for r in rs)
                    for k in cpu_keys}
            for k in ("sink_sessions_per_msg", "machine_cpu_busy_pct", "other_cpu_cores",
                      "loadgen_cpu_us_per_msg", "softirq_cpu_us_per_msg", "smtp_source_cores",
                      "sink_cores"):
                entry[k + "_median"] = statistics.median(r.get(k) or 0 for r in rs)
            lat = sorted(x for r in rs for x in r.get("accept_latency_us", ()))
            if lat:
                # pooled over the measured rounds of this cell
                entry["accept_latency_ms"] = {
                    "p50": percentile(lat, 50) / 1000, "p99": percentile(lat, 99) / 1000,
                    "max": lat[-1] / 1000, "samples": len(lat)}
            perr = sum(r["probe"]["errors"] + r["probe"].get("unfinished", 0)
                       for r in rs if "probe" in r)
            if perr:
                entry["probe_errors"] = perr
            if sink == "realistic" and system != "direct":
                entry["drain_tail_seconds_median"] = statistics.median(
                    r["drain_tail_seconds"] for r in rs)
                entry["realistic_totals"] = {
                    k: sum(r["realistic"][k] for r in rs) for k in rs[0]["realistic"]}
            if any("dkim" in r for r in rs):
                entry["dkim"] = {k: sum(r["dkim"][k] for r in rs)
                                 for k in ("n", "signed", "sampled", "verified")}
            kicks = sum(len(r.get("queue_kicks_at_s", ())) for r in rs)
            if kicks:
                entry["queue_kicks"] = kicks
            near = [f"{r['kind']} {x}" for r in rs for x in r.get("loadgen_near_ceiling", ())]
            if near:
                entry["loadgen_near_ceiling"] = near
            cell[system] = entry
        rel = [r for r in mine if r["system"] == "relay" and r["kind"] == "measure"]
        pfx = [r for r in mine if r["system"] == "postfix" and r["kind"] == "measure"]
        if rel and pfx:
            pairs = [a["e2e_per_s"] / b["e2e_per_s"] for a, b in zip(rel, pfx, strict=False)]
            cell["relay_postfix_e2e_ratio"] = {"median": statistics.median(pairs),
                                               "per_round": pairs}
            acc = [a["accepted_per_s"] / b["accepted_per_s"]
                   for a, b in zip(rel, pfx, strict=False)]
            cell["relay_postfix_accepted_ratio"] = {"median": statistics.median(acc),
                                                    "per_round": acc}
        for name, (a, b) in SIGNED_RATIOS.items():
            ra = [r for r in mine if r["system"] == a and r["kind"] == "measure"]
            rb = [r for r in mine if r["system"] == b and r["kind"] == "measure"]
            if ra and rb:
                pairs = [x["e2e_per_s"] / y["e2e_per_s"] for x, y in zip(ra, rb, strict=False)]
                cell[name] = {"median": statistics.median(pairs), "per_round": pairs}
        if "direct" in cell:
            ceiling = cell["direct"]["accepted_per_s"]["median"]
            for system in SYSTEMS[:-1]:
                if system in cell:
                    cell[system]["share_of_loadgen_ceiling"] = (
                        cell[system]["accepted_per_s"]["median"] / ceiling)
        cells.append(cell)
    return cells


def _lat(e: dict | None) -> str:
    lat = (e or {}).get("accept_latency_ms")
    if not lat:
        return "-"
    return f"{lat['p50']:.1f} / {lat['p99']:.1f}"


def render_signed(cells: list[dict], title: str) -> list[str]:
    """The SIGNED section: the relay with a DKIM policy against itself unsigned and against
    Postfix signing through OpenDKIM, with the targets of issue 7 and the DKIM check."""
    lines = [f"SIGNED: DKIM RSA-2048, destination {title}; relay signed (a [[sender]] dkim "
             f"policy) vs the same relay unsigned and vs Postfix + OpenDKIM (milter, unix "
             f"socket)"]
    hdr = (f"{'size':>5} {'sess':>4}  {'relay':>7} {'signed':>7} {'pfx+dkim':>8}  "
           f"{'signed/unsigned (target)':>26}  {'signed/pfx+dkim (goal)':>23}  "
           f"{'signed p50/p99 ms':>17}  {'pfx+dkim p50/p99 ms':>19}  "
           f"{'DKIM at the sink: signed, verified':>34}")
    lines += [hdr, "-" * len(hdr)]
    for c in cells:
        rate = {s: fmt_rate(c[s]["e2e_per_s"]["median"]) if s in c else "-"
                for s in ("relay", "relay-signed", "postfix-dkim")}
        su = c.get("signed_unsigned_ratio", {}).get("median")
        target = SIGNED_TARGETS.get(c["size"])
        su_s = "-"
        if su is not None:
            verdict = "" if target is None else (" PASS" if su >= target else " FAIL")
            su_s = f"{su:.2f}x (>= {target}){verdict}" if target else f"{su:.2f}x"
        sp = c.get("signed_postfix_dkim_ratio", {}).get("median")
        sp_s = f"{sp:.2f}x ({POSTFIX_DKIM_GOAL}x)" if sp is not None else "-"
        checks = []
        for s in SIGNED_SYSTEMS:
            d = (c.get(s) or {}).get("dkim")
            if d:
                who = "relay" if s == "relay-signed" else "pfx"
                checks.append(f"{who} {d['signed']}/{d['n']}, {d['verified']}/{d['sampled']}")
        lines.append(f"{c['size']:>5} {c['sessions']:>4}  {rate['relay']:>7} "
                     f"{rate['relay-signed']:>7} {rate['postfix-dkim']:>8}  {su_s:>26}  "
                     f"{sp_s:>23}  {_lat(c.get('relay-signed')):>17}  "
                     f"{_lat(c.get('postfix-dkim')):>19}  {'; '.join(checks) or '-':>34}")
    lines += ["", "SIGNED: msg/s end to end, medians; ratios: medians of paired rounds (relay, "
              "relay signed, Postfix + OpenDKIM alternate); targets (issue 7): signed/unsigned "
              ">= 0.85 at 4k, >= 0.8 at 200k; the project's goal against Postfix + OpenDKIM is "
              f"{POSTFIX_DKIM_GOAL}x.  DKIM at the sink: messages that arrived with a "
              "DKIM-Signature / messages sent, and sampled messages whose signature stock "
              "dkimpy verified against the published key / sampled.", ""]
    return lines


def render_table(cells: list[dict], results: dict) -> str:
    lines: list[str] = []
    titles = results.get("sink_titles", {})
    sinks = [k for k in ("all", "realistic") if any(c["sink"] == k for c in cells)]
    # 1. the story: one line per size and session count
    for sink in sinks:
        mine = [c for c in cells if c["sink"] == sink]
        realistic = sink == "realistic"
        lines.append(("HEADLINE: " if sink == "all" else "REALISTIC: ") + titles.get(sink, sink)
                     + ("; end-to-end = until every message is delivered or refused with 550"
                        if realistic else ""))
        hdr = (f"{'size':>5} {'sess':>4}  {'relay':>7} {'postfix':>7}  {'ratio':>6} "
               f"{'(accepted)':>10}  {'relay p50/p99 ms':>17}  {'postfix p50/p99 ms':>18}  "
               f"{'ceiling':>8}")
        if realistic:
            hdr += f"  {'retry tail s relay/postfix':>26}"
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for c in mine:
            rel, pfx, dr = c.get("relay"), c.get("postfix"), c.get("direct")
            r = c.get("relay_postfix_e2e_ratio", {}).get("median")
            ra = c.get("relay_postfix_accepted_ratio", {}).get("median")
            line = (f"{c['size']:>5} {c['sessions']:>4}  "
                    f"{fmt_rate(rel['e2e_per_s']['median']) if rel else '-':>7} "
                    f"{fmt_rate(pfx['e2e_per_s']['median']) if pfx else '-':>7}  "
                    f"{f'{r:.2f}x' if r else '-':>6} {f'({ra:.2f}x)' if ra else '':>10}  "
                    f"{_lat(rel):>17}  {_lat(pfx):>18}  "
                    f"{fmt_rate(dr['accepted_per_s']['median']) if dr else '-':>8}")
            if realistic:
                tails = "/".join(f"{e['drain_tail_seconds_median']:.1f}" if e else "-"
                                 for e in (rel, pfx))
                line += f"  {tails:>26}"
            lines.append(line)
        lines.append("")
    lines.append("msg/s: end to end (smtp-source start -> the sink has every outcome), median of "
                 "the measured rounds; ratio: median of paired relay/postfix rounds (above 1 the "
                 "relay is faster), accepted = the same for smtp-source's own wall time; p50/p99: "
                 "final dot -> 250 from the latency probe, pooled over the rounds; ceiling: "
                 "smtp-source straight into that sink (msg/s).")
    lines.append("")
    signed = [c for c in cells if c["sink"] == "signed"]
    if signed:
        lines.extend(render_signed(signed, titles.get("signed", "signed")))
    # 2. details per cell
    hdr = (f"{'sink':<9} {'size':>5} {'sess':>4}  {'system':<12} {'rounds':>6}  "
           f"{'accepted msg/s':>14} {'(min-max)':>15}  {'end-to-end msg/s':>16} "
           f"{'(min-max)':>15}  {'host CPU':>8}  {'CPU us/msg':>28}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for c in cells:
        for system in SYSTEMS:
            e = c.get(system)
            if not e:
                continue
            a, b = e["accepted_per_s"], e["e2e_per_s"]
            cpu = e.get("cpu_us_per_msg_median", {})
            if system.startswith("relay"):
                cpu_s = (f"intake {cpu.get('intake', 0):,.0f} + deliv "
                         f"{cpu.get('delivery', 0):,.0f}")
            elif "opendkim" in cpu:
                cpu_s = (f"total {cpu.get('total', 0):,.0f} (opendkim "
                         f"{cpu['opendkim']:,.0f})")
            elif system.startswith("postfix"):
                cpu_s = f"total {cpu.get('total', 0):,.0f}"
            else:
                cpu_s = "(load-gen ceiling)"
            name = "sink" if system == "direct" else system
            lines.append(
                f"{c['sink']:<9} {c['size']:>5} {c['sessions']:>4}  {name:<12} {e['rounds']:>6}  "
                f"{fmt_rate(a['median']):>14} "
                f"{'(' + fmt_rate(a['min']) + '-' + fmt_rate(a['max']) + ')':>15}  "
                f"{fmt_rate(b['median']):>16} "
                f"{'(' + fmt_rate(b['min']) + '-' + fmt_rate(b['max']) + ')':>15}  "
                f"{e['machine_cpu_busy_pct_median']:>7.0f}%  {cpu_s:>28}")
        if "relay_postfix_e2e_ratio" in c:
            r = c["relay_postfix_e2e_ratio"]
            ra = c["relay_postfix_accepted_ratio"]
            lines.append(
                f"{c['sink']:<9} {c['size']:>5} {c['sessions']:>4}  relay/postfix ratio, median "
                f"of paired rounds: end-to-end {r['median']:.2f}x "
                f"({', '.join(f'{x:.2f}' for x in r['per_round'])}), accepted {ra['median']:.2f}x")
    lines.append("")
    # 3. the realistic destination: what happened to the refused shares
    for c in cells:
        if c["sink"] != "realistic":
            continue
        for system in ("relay", "postfix"):
            e = c.get(system)
            if not e or "realistic_totals" not in e:
                continue
            t = e["realistic_totals"]
            lines.append(
                f"realistic {c['size']:>5} {c['sessions']:>3} sessions {system:<8}: 451 once "
                f"{t['temp']:,} (retried and accepted {t['retried_ok']:,}), 550 {t['perm']:,} "
                f"(DSNs {t['dsn']:,}, refused again {t['perm_repeat']}), duplicates "
                f"{t['accepted_dup']}; retry tail after the last accept "
                f"{e['drain_tail_seconds_median']:.2f}s (median)"
                + (f"; queue stalled and kicked {e['queue_kicks']}x (see Postfix.kick)"
                   if e.get("queue_kicks") else ""))
    # 4. the rest, as before, per cell
    conn = [f"{c['sink']} {c['size']} s{c['sessions']} {system} "
            f"{c[system]['sink_sessions_per_msg_median']:.2f}"
            for c in cells for system in SYSTEMS[:-1] if system in c]
    if conn:
        lines.append("")
        lines.append("delivery connections per message (sink sessions / messages, median): "
                     + ", ".join(conn))
    lines.append("CPU outside the system under test, medians: load generators (smtp-source, "
                 "sink, probe) us/msg | irq+softirq us/msg | anything else (neighbours, kernel "
                 "threads) in cores | smtp-source, sink busy cores")
    for c in cells:
        for system in SYSTEMS:
            e = c.get(system)
            if e:
                lines.append(f"  {c['sink']:<9} {c['size']:>5} {c['sessions']:>4} "
                             f"{'sink' if system == 'direct' else system:<12} "
                             f"{e['loadgen_cpu_us_per_msg_median']:>8,.0f} | "
                             f"{e['softirq_cpu_us_per_msg_median']:>8,.0f} | "
                             f"{e['other_cpu_cores_median']:>5.2f} | "
                             f"{e['smtp_source_cores_median']:.2f}, {e['sink_cores_median']:.2f}")
    for name in ("relay", "relay-signed"):
        rss = results.get(f"{name.replace('-', '_')}_peak_rss")
        if rss:
            parts = ", ".join(f"pid {pid} {v['vm_hwm_kib'] / 1024:.1f} MiB"
                              for pid, v in rss["processes"].items())
            lines.append(f"{name} peak RSS (sum of VmHWM): {rss['sum_kib'] / 1024:.1f} MiB  "
                         f"[{parts}]")
    prss = results.get("postfix_peak_rss")
    if prss:
        lines.append(f"postfix: sum of VmHWM over its {prss['processes']} processes alive at the "
                     f"end: {prss['sum_kib'] / 1024:.1f} MiB (shared pages counted per process)")
    for c, relay, postfix in [(c, r, p) for c in cells
                              for r, p in (("relay", "postfix"), ("relay-signed", "postfix-dkim"))]:
        e, p = c.get(relay), c.get(postfix)
        if e and "cpu_us_per_msg_median" in e:
            cc = e["cpu_us_per_msg_median"]
            parts = cc.get("intake", 0) + cc.get("delivery", 0)
            if parts:
                line = (f"{relay} CPU {c['sink']} {c['size']} s{c['sessions']}: "
                        f"{cc.get('total', 0):,.0f} us/msg; intake "
                        f"{cc['intake']:,.0f} ({100 * cc['intake'] / parts:.0f}%) + delivery "
                        f"{cc['delivery']:,.0f} ({100 * cc['delivery'] / parts:.0f}%)")
                cores = e.get("cpu_cores_median", {})
                if cores:
                    line += (f"; busy cores: intake {cores.get('intake', 0):.2f}, delivery "
                             f"{cores.get('delivery', 0):.2f}")
                ptot = (p or {}).get("cpu_us_per_msg_median", {}).get("total")
                if ptot:
                    line += (f"; {postfix} {ptot:,.0f} us/msg; {relay}/{postfix} "
                             f"{cc.get('total', 0) / ptot:.2f}x")
                lines.append(line)
    warnings = list(results.get("warnings", []))
    for c in cells:
        where = f"{c['sink']} {c['size']} {c['sessions']} sessions"
        for system in SYSTEMS:
            e = c.get(system)
            if not e:
                continue
            for x in e.get("loadgen_near_ceiling", ()):
                warnings.append(f"{where} {system}: load generator near its ceiling ({x})")
            share = e.get("share_of_loadgen_ceiling")
            if share and share > 0.5:
                warnings.append(f"{where} {system}: accepted {100 * share:.0f}% of what "
                                f"smtp-source alone reaches into this sink: the load generator "
                                f"may cap the result")
            if e.get("probe_errors"):
                warnings.append(f"{where} {system}: {e['probe_errors']} latency probe messages "
                                f"failed or did not finish (see JSON)")
    if warnings:
        lines.append("")
        lines.extend("WARNING: " + w for w in warnings)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------

def main() -> int:
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["relay", "postfix"], action="append",
                    help="benchmark only this system (repeatable); default: both")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~1-2 min): 1 round, few messages, every size, session "
                         "count and sink; explicit options still win")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measured rounds per system and cell (default 3, --quick 1)")
    ap.add_argument("--n-small", type=int, default=int(env("BENCH_N_SMALL", 0)) or None,
                    help="messages per round at 4 KiB, for every session count (default: "
                         f"{N_FULL['4k']} by sessions; --quick {N_QUICK['4k']})")
    ap.add_argument("--n-large", type=int, default=int(env("BENCH_N_LARGE", 0)) or None,
                    help="messages per round at 200 KiB (default: "
                         f"{N_FULL['200k']}; --quick {N_QUICK['200k']})")
    ap.add_argument("--sizes", default=env("BENCH_SIZES", "4k,200k"),
                    help="comma-separated subset of 4k,200k")
    ap.add_argument("--sessions", default=env("BENCH_SESSIONS", "1,16,64"),
                    help="comma-separated session counts of smtp-source (-s); default 1,16,64")
    ap.add_argument("--sink", choices=["all", "realistic", "both"],
                    default=env("BENCH_SINK", "both"),
                    help="destination: smtp-sink accepting all, bench/sink.py refusing a share, "
                         "or both (default)")
    ap.add_argument("--temp-pct", type=float, default=float(env("BENCH_TEMP_PCT", 5)),
                    help="realistic sink: %% of messages answered 451 on the first attempt")
    ap.add_argument("--perm-pct", type=float, default=float(env("BENCH_PERM_PCT", 2)),
                    help="realistic sink: %% of messages always answered 550")
    ap.add_argument("--probe-interval", type=float,
                    default=float(env("BENCH_PROBE_INTERVAL", 0.04)),
                    help="seconds between latency probe messages (default 0.04); 0 = no probe")
    ap.add_argument("--timeout", type=float, default=float(env("BENCH_TIMEOUT", 0)),
                    help="seconds per round (default: max(120, N/20))")
    ap.add_argument("--signed", default=env("BENCH_SIGNED"),
                    help="sizes of the signed cells (relay with a DKIM policy vs Postfix with "
                         "OpenDKIM, all-accepting sink), comma-separated, or 'none'; default: "
                         "the --sizes")
    ap.add_argument("--no-signed", action="store_true", help="same as --signed none")
    ap.add_argument("--signed-sessions", type=int,
                    default=int(env("BENCH_SIGNED_SESSIONS", 16)),
                    help="smtp-source sessions in the signed cells (default 16)")
    ap.add_argument("--signed-only", action="store_true",
                    help="run only the signed cells (not the unsigned matrix)")
    ap.add_argument("--no-direct", action="store_true",
                    help="skip the smtp-source->sink rounds (the load generator's ceiling)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    ap.add_argument("--relay-cmd", default=env("RELAY_CMD", ""),
                    help="command that runs invoice-relay (default: set by bench/run)")
    ap.add_argument("--out", default=str(BENCH_DIR / "out"))
    ap.add_argument("--no-chart", action="store_true", help="don't draw the PNG chart")
    ap.add_argument("--publish", action="store_true",
                    help=f"also write the chart to {PUBLISHED_PNG.relative_to(BENCH_DIR.parent)} "
                         "(the one README shows); only a complete run publishes")
    args = ap.parse_args()

    if args.rounds is not None:
        rounds_n = args.rounds
    elif env("BENCH_ROUNDS"):
        rounds_n = int(env("BENCH_ROUNDS"))
    else:
        rounds_n = 1 if args.quick else 3
    table = N_QUICK if args.quick else N_FULL
    systems_wanted = args.only or ["relay", "postfix"]
    sizes = []
    for s in args.sizes.split(","):
        s = s.strip().lower()
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
        sizes.append((s, SIZES[s]))
    try:
        session_list = [int(x) for x in args.sessions.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sessions: comma-separated integers, not {args.sessions!r}")
    if not session_list or min(session_list) < 1:
        ap.error("--sessions: at least one count, each >= 1")
    sink_modes = ["all", "realistic"] if args.sink == "both" else [args.sink]
    signed_spec = "none" if args.no_signed else (args.signed or ",".join(lb for lb, _ in sizes))
    signed_sizes = []
    for x in signed_spec.split(","):
        x = x.strip().lower()
        if x in ("", "none"):
            continue
        if x not in SIZES:
            ap.error(f"--signed: unknown size {x!r} (choose from {', '.join(SIZES)}, or none)")
        signed_sizes.append((x, SIZES[x]))
    if args.signed_only and not signed_sizes:
        ap.error("--signed-only with no signed cells (--signed none)")
    if args.signed_sessions < 1:
        ap.error("--signed-sessions: at least 1")
    if args.signed_only:
        sink_modes = []
    override = {"4k": args.n_small, "200k": args.n_large}

    def n_of(label: str, sessions: int) -> int:
        return override[label] or n_for(table, label, sessions)

    # prerequisites
    if os.geteuid() != 0:
        raise BenchError("must run as root (a private Postfix master and smtp-sink -u need it)")
    tools = {}
    for t in ("smtp-source", "smtp-sink", "postfix"):
        p = shutil.which(t) or (f"/usr/sbin/{t}" if os.access(f"/usr/sbin/{t}", os.X_OK) else None)
        if not p:
            raise BenchError(f"{t} not found: apt-get install postfix (see bench/README.md)")
        tools[t] = p
    try:
        pwd.getpwnam("postfix")
    except KeyError as e:
        raise BenchError("user 'postfix' missing: apt-get install postfix") from e
    relay_cmd = args.relay_cmd.split() if args.relay_cmd else []
    # the relay runs with its temp dir as cwd: make relative paths in the command absolute
    relay_cmd = [str(Path(a).resolve()) if not a.startswith("-") and "/" in a and Path(a).exists()
                 else a for a in relay_cmd]
    if "relay" in systems_wanted and not relay_cmd:
        raise BenchError("no invoice-relay command: install the relay into the venv "
                         "(.venv/bin/pip install .) or set RELAY_CMD")
    chart = None
    if not args.no_chart:
        try:
            import chart  # bench/chart.py, needs matplotlib
        except ImportError as e:
            if args.publish:
                raise BenchError(f"--publish needs matplotlib ({e}): .venv/bin/pip install "
                                 "-e '.[bench]'") from e
            log(f"no chart: {e} (pip install -e '.[bench]' for matplotlib)")
            chart = None

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="invoice-relay-bench-"))
    workdir.chmod(0o755)  # Postfix daemons (user postfix) must traverse it
    probe_on = args.probe_interval > 0
    results: dict = {"started": stamp, "host": os.uname().nodename, "cpus": os.cpu_count(),
                     "settings": {"rounds": rounds_n, "sessions": session_list,
                                  "sizes": [label for label, _ in sizes], "sinks": sink_modes,
                                  "quick": args.quick,
                                  "n": {f"{label}/{s}": n_of(label, s)
                                        for label, _ in sizes for s in session_list},
                                  "signed": {"sizes": [label for label, _ in signed_sizes],
                                             "sessions": args.signed_sessions,
                                             "only": args.signed_only},
                                  "probe_interval_s": args.probe_interval,
                                  "realistic_shares_pct": {"451_once": args.temp_pct,
                                                           "550": args.perm_pct},
                                  "systems": systems_wanted, "relay_cmd": relay_cmd,
                                  "python": sys.executable},
                     "git": git_state(), "rounds": [], "warnings": []}
    started: list = []
    sinks: list = []
    status = 0
    stopping = {"flag": False}
    t_start = time.monotonic()

    def on_signal(signum, frame):
        if not stopping["flag"]:
            stopping["flag"] = True
            raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    try:
        log(f"work dir {workdir}")
        b0, _, t0_, _ = machine_cpu()
        time.sleep(2)
        b1, _, t1_, _ = machine_cpu()
        idle_busy = 100 * (b1 - b0) / max(1, t1_ - t0_)
        results["host_busy_pct_before_start"] = round(idle_busy, 1)
        log(f"host CPU busy before start: {idle_busy:.0f}% of {os.cpu_count()} CPUs"
            + ("  WARNING: something else is running; results will be noisy"
               if idle_busy > 10 else ""))
        sink = Sink(workdir, tools["smtp-sink"])
        sinks.append(sink)
        log(f"smtp-sink on 127.0.0.1:{sink.port} (example.net)")
        rsink = None
        if "realistic" in sink_modes:
            rsink = RealisticSink(workdir, sys.executable, args.temp_pct, args.perm_pct)
            sinks.append(rsink)
            log(f"bench/sink.py on 127.0.0.1:{rsink.port} (example.org, DSNs to bench.test; "
                f"{args.temp_pct:g}% 451 once, {args.perm_pct:g}% 550; {rsink.loop} loop)")
        ssink, key = None, None
        if signed_sizes:
            key = DkimKey(workdir)
            results["dkim"] = {"domain": key.domain, "selector": key.selector,
                               "txt": key.txt, "bits": 2048}
            ssink = SignedSink(workdir, sys.executable, key)
            sinks.append(ssink)
            log(f"bench/sink.py on 127.0.0.1:{ssink.port} (signed.test: accepts all, counts "
                f"DKIM signatures, verifies a sample; key {key.selector}._domainkey."
                f"{key.domain}, RSA-2048)")
        psink = None
        if probe_on:
            psink = Sink(workdir, tools["smtp-sink"], name="probe-sink")
            sinks.append(psink)
            log(f"probe smtp-sink on 127.0.0.1:{psink.port} (probe.test)")
        results["sink_titles"] = {"all": Sink.title}
        if rsink:
            results["sink_titles"]["realistic"] = rsink.title
        if ssink:
            results["sink_titles"]["signed"] = ssink.title
        # both systems route by recipient domain to the same sinks
        routes = {"example.net": sink.port,
                  "example.org": rsink.port if rsink else sink.port,
                  "bench.test": rsink.port if rsink else sink.port,
                  "probe.test": psink.port if psink else sink.port}
        if ssink:
            routes["signed.test"] = ssink.port
        systems: dict[str, System] = {}
        if "postfix" in systems_wanted and sink_modes:
            systems["postfix"] = Postfix(workdir, routes, tools["postfix"])
            started.append(systems["postfix"])
            log(f"postfix on 127.0.0.1:{systems['postfix'].port}")
        if "postfix" in systems_wanted and key:
            pd = Postfix(workdir, routes, tools["postfix"], name="postfix-dkim", dkim_key=key)
            systems["postfix-dkim"] = pd
            started.append(pd)
            log(f"postfix-dkim on 127.0.0.1:{pd.port} (OpenDKIM milter on unix:"
                f"{pd.opendkim.socket})")
        if "relay" in systems_wanted:
            systems["relay"] = Relay(workdir, routes, relay_cmd)
            started.append(systems["relay"])
            relay_sys = systems["relay"]
            log(f"invoice-relay on 127.0.0.1:{relay_sys.port} (pid {relay_sys.proc.pid})")
        if "relay" in systems_wanted and key:
            rs = Relay(workdir, routes, relay_cmd, name="relay-signed", dkim_key=key)
            systems["relay-signed"] = rs
            started.append(rs)
            log(f"invoice-relay with a DKIM policy for {key.domain} on 127.0.0.1:{rs.port} "
                f"(pid {rs.proc.pid})")
        all_systems = list(systems.values())
        unsigned_order = [s for s in ("relay", "postfix") if s in systems]
        signed_order = [s for s in ("relay", "relay-signed", "postfix-dkim") if s in systems]
        cells = [(mode, label, size, s) for mode in sink_modes for label, size in sizes
                 for s in session_list]
        cells += [("signed", label, size, args.signed_sessions) for label, size in signed_sizes]
        log(f"{len(cells)} cells (sink x size x sessions), {rounds_n} measured round(s) per "
            f"system each; N per round: " + ", ".join(
                f"{k}={v}" for k, v in results["settings"]["n"].items()))

        def do(kind, system, dest, n, size, label, sessions, rcpt, probe):
            timeout = args.timeout or max(120.0, n / 20)
            what = f"{system.name if system else 'direct'} {dest.kind} {label} s{sessions} {kind}"
            if system and not system.alive():
                raise BenchError(f"{system.name} is no longer running before {what}\n"
                                 f"{system.describe_failure()}")
            try:
                r = run_round(kind, system, dest, tools["smtp-source"], n, size, sessions,
                              timeout, all_systems, rcpt=rcpt,
                              probe=(sys.executable, args.probe_interval) if probe else None,
                              probe_sink=psink)
            except BenchError as e:
                extra = f"\n{system.describe_failure()}" if system else ""
                raise BenchError(f"{what}: {e}{extra}") from e
            r["label"] = label
            results["rounds"].append(r)
            cpu = r.get("cpu_us_per_msg", {})
            cpu_s = " ".join(f"{k}={v:,.0f}" for k, v in cpu.items())
            lat = r.get("accept_latency_ms")
            lat_s = f"  p50/p99 {lat['p50']:.1f}/{lat['p99']:.1f} ms" if lat else ""
            rea = r.get("realistic")
            rea_s = (f"  451 {rea['temp']} 550 {rea['perm']} dsn {rea['dsn']} tail "
                     f"{r['drain_tail_seconds']:.1f}s" if rea and system else "")
            log(f"{what:<34} n={n:<5} accepted {r['accepted_per_s']:7,.0f}/s  e2e "
                f"{r['e2e_per_s']:7,.0f}/s  host {r['machine_cpu_busy_pct']:3.0f}% "
                f"(other {r['other_cpu_cores']:.2f})  CPU us/msg {cpu_s}{lat_s}{rea_s}")
            for x in r.get("loadgen_near_ceiling", ()):
                log(f"warning: {what}: load generator near its ceiling: {x}")
            # let stragglers (duplicates) show up and the queue settle before the next round
            dest.settle(quiet=0.3, limit=3)
            return r

        dests = {"all": (sink, "to@example.net"), "realistic": (rsink, "to@example.org"),
                 "signed": (ssink, SIGNED_RCPT)}
        for mode, label, size, sessions in cells:
            dest, rcpt = dests[mode]
            order = signed_order if mode == "signed" else unsigned_order
            # warm-ups go to the all-accepting sink of the cell
            warm_dest, warm_rcpt = dests["signed" if mode == "signed" else "all"]
            n = n_of(label, sessions)
            if not args.no_direct:
                if mode == "realistic":
                    rsink.set_shares(False)  # smtp-source stops at the first refusal
                try:
                    do("direct", None, dest, n, size, label, sessions, rcpt, False)
                finally:
                    if mode == "realistic":
                        rsink.set_shares(True)
            # warm-up into the all-accepting sink (no retry tail): processes for this many
            # sessions exist, caches are warm
            for name in order:
                do("warmup", systems[name], warm_dest, max(50, n // 4), size, label, sessions,
                   warm_rcpt, False)
            for _ in range(rounds_n):
                for name in order:
                    do("measure", systems[name], dest, n, size, label, sessions, rcpt, probe_on)

        # end-of-run checks: every message arrived once, every refusal got its DSN
        final = sink.settle(quiet=1.0, limit=5)
        expected = sum(r["n"] for r in results["rounds"] if r["sink"] == "all")
        checks = {"smtp-sink": {"expected": expected, "received": final}}
        if final != expected:
            results["warnings"].append(f"smtp-sink received {final} messages, expected "
                                       f"{expected} ({final - expected:+d})")
        if rsink:
            rsink.settle(quiet=1.0, limit=5)
            st = rsink.fresh_stats()
            exp = sum(r["n"] for r in results["rounds"] if r["sink"] == "realistic")
            perm = sum(r["realistic"]["perm"] for r in results["rounds"]
                       if r["sink"] == "realistic" and r["system"] != "direct")
            checks["bench-sink"] = {"expected_outcomes": exp, **st}
            if st["outcomes"] != exp:
                results["warnings"].append(f"bench/sink.py has {st['outcomes']} outcomes, "
                                           f"expected {exp}")
            if st["dsn"] != perm:
                results["warnings"].append(f"bench/sink.py received {st['dsn']} DSNs for "
                                           f"{perm} refused messages")
            if st["accepted_dup"] or st["perm_repeat"]:
                results["warnings"].append(
                    f"bench/sink.py: {st['accepted_dup']} messages accepted twice, "
                    f"{st['perm_repeat']} refused messages tried again")
        if ssink:
            ssink.settle(quiet=1.0, limit=5)
            st = ssink.fresh_stats()
            exp = sum(r["n"] for r in results["rounds"] if r["sink"] == "signed")
            checks["signed-sink"] = {"expected_outcomes": exp, **st}
            if st["outcomes"] != exp or st["accepted_dup"]:
                results["warnings"].append(f"signed sink has {st['outcomes']} outcomes "
                                           f"({st['accepted_dup']} duplicates), expected {exp}")
        if psink:
            got = psink.settle(quiet=1.0, limit=10)
            exp = sum(r["probe"]["ok"] for r in results["rounds"] if "probe" in r)
            checks["probe-sink"] = {"expected": exp, "received": got}
            if got != exp:
                results["warnings"].append(f"probe sink received {got} messages, the systems "
                                           f"accepted {exp} from the probe")
        results["sink_checks"] = checks
        for w in results["warnings"]:
            log(f"WARNING: {w}")
        if "relay" in systems:
            results["relay_peak_rss"] = systems["relay"].rss()
            results["relay_processes"] = {str(k): v for k, v in
                                          systems["relay"].seen_procs.items()}
        if "relay-signed" in systems:
            results["relay_signed_peak_rss"] = systems["relay-signed"].rss()
        if "postfix" in systems:
            results["postfix_peak_rss"] = systems["postfix"].peak_rss()
    except BenchError as e:
        log(f"FAILED: {e}")
        results["error"] = str(e)
        status = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
        results["error"] = f"interrupted ({e})"
        status = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for s in reversed(started):
            try:
                log(f"stopping {s.name}")
                s.stop()
            except Exception as e:  # keep cleaning up
                log(f"error stopping {s.name}: {e}")
        for s in reversed(sinks):
            try:
                s.stop()
            except Exception as e:
                log(f"error stopping {s.name}: {e}")
        if args.keep or status == 1:
            log(f"kept {workdir} (logs, spools, configs); remove it when done")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results["wall_seconds"] = round(time.monotonic() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if results["rounds"]:
        cells_summary = summarize(results["rounds"])
        results["summary"] = cells_summary
        text = render_table(cells_summary, results)
        results["table"] = text
        print()
        g = results["git"]
        if results.get("host_busy_pct_before_start", 0) > 10:
            print(f"NOTE: the host was {results['host_busy_pct_before_start']:.0f}% busy before "
                  f"the run started (neighbours); see the 'anything else' column below.")
        print(f"invoice-relay vs Postfix, one message per connection, medians over {rounds_n} "
              f"round(s); checkout {g['commit'][:10] or '?'}"
              + (" (dirty)" if g["dirty_files"] else "")
              + f"; {os.cpu_count()} CPUs; wall time {results['wall_seconds']:.0f}s"
              + ("  [INCOMPLETE]" if status else ""))
        print(text)
        if chart:
            try:
                png = out / f"results-{stamp}.png"
                chart.render(results, png)
                log(f"chart written to {png}")
                if args.publish:
                    if status:
                        log("not publishing the chart of an incomplete run")
                    else:
                        shutil.copyfile(png, PUBLISHED_PNG)
                        log(f"chart published to {PUBLISHED_PNG}")
            except Exception as e:  # a chart problem must not lose the results
                log(f"chart failed: {type(e).__name__}: {e}")
    log(f"results written to {write_results(out, f'results-{stamp}.json', results)}")
    return status


if __name__ == "__main__":
    run_cli(main, "bench")
