r"""Throughput benchmark: invoice-relay against a private Postfix instance.

Driven by bench/run; stdlib only, so it runs under any Python >= 3.8.  See bench/README.md.

Topology (all on 127.0.0.1):

    smtp-source --> invoice-relay --\
    smtp-source --> postfix --------+--> smtp-sink (one, counting with -c)
    smtp-source --------------------/    (direct round: load-generator ceiling)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pwd
import resource
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZES = {"4k": 4096, "200k": 204800}


class BenchError(Exception):
    pass


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
        try:
            os.killpg(g, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            os.kill(p["pid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
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
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in left:
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-20000:].decode(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data[-lines:])


# --------------------------------------------------------------------------------------
# smtp-sink: the one destination, counting messages

class Sink:
    def __init__(self, workdir: Path, smtp_sink: str):
        self.port = free_port()
        self.count = 0
        self.sessions = 0  # sessions ended, from the same counter line
        self.cond = threading.Condition()
        self.crossings: list[tuple[int, float]] = []  # (target, monotonic time reached)
        self.targets: list[int] = []
        self.errlog = workdir / "smtp-sink.stderr"
        # -c: running counters on stdout ("sess=N quit=N mesg=N\r"), updated when "." is
        # received. 1000: listen backlog.  -u postfix: required when started as root.
        self.proc = subprocess.Popen(
            [smtp_sink, "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.PIPE, stderr=open(self.errlog, "wb"), stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_smtp_banner(self.port, 10, self.proc, "smtp-sink")
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

    def arm(self, target: int) -> None:
        with self.cond:
            if self.count >= target:
                self.crossings.append((target, time.monotonic()))
            else:
                self.targets.append(target)

    def wait(self, target: int, deadline: float) -> float | None:
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
        """Established (or half-closed) TCP connections to the sink, from /proc/net/tcp."""
        local = f"0100007F:{self.port:04X}"
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

    def current(self) -> int:
        with self.cond:
            return self.count

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
        kill_tree("smtp-sink", [self.proc.pid], [self.proc.pid], 5)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------------------
# Systems under test

class System:
    name = "?"
    port = 0

    def cpu_snapshot(self) -> dict:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Postfix(System):
    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, postfix_bin: str):
        self.dir = workdir / "postfix"
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
relayhost = [127.0.0.1]:{sink_port}
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
"""
        (etc / "main.cf").write_text(main_cf)
        self.logfile = self.dir / "postfix.log"
        env = dict(os.environ, MAIL_CONFIG=str(etc))
        self.proc = subprocess.Popen(
            [postfix_bin, "-c", str(etc), "start-fg"], stdout=open(self.logfile, "ab"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pgids = [self.proc.pid]
        try:
            wait_smtp_banner(self.port, 60, self.proc, "postfix")
        except BenchError as e:
            raise BenchError(f"{e}\n--- {self.logfile} (tail) ---\n{tail(self.logfile)}") from e
        # `master -s` makes itself a session leader: remember its group too
        for p in tree([self.proc.pid]):
            if p["comm"] == "master":
                self.pgids.append(p["pgid"])

    def procs(self) -> list[dict]:
        return tree([self.proc.pid], self.pgids)

    def cpu_snapshot(self) -> dict:
        procs = self.procs()
        # per-daemon split is not meaningful: smtpd/cleanup/smtp exit after max_use (100)
        # requests and their CPU moves into master's cutime/cstime; report the total only
        return {"total": sum(cpu_ticks(p) for p in procs), "processes": len(procs)}

    def peak_rss(self) -> dict:
        ps = [p for p in self.procs() if p["state"] != "Z"]
        return {"sum_kib": sum(vm_hwm_kib(p["pid"]) or 0 for p in ps), "processes": len(ps)}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_failure(self) -> str:
        return f"--- {self.logfile} (tail) ---\n{tail(self.logfile)}"

    def stop(self) -> None:
        kill_tree("postfix", [self.proc.pid], self.pgids, 30)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Relay(System):
    name = "relay"

    def __init__(self, workdir: Path, sink_port: int, relay_cmd: list[str]):
        self.dir = workdir / "relay"
        (self.dir / "policies").mkdir(parents=True)
        (self.dir / "var").mkdir()
        self.port = free_port()
        self.http_port = free_port()
        (self.dir / "relay.toml").write_text(f"""\
[server]
listen = ["127.0.0.1:{self.port}"]
[queue]
path = "var"
[http]
listen = "127.0.0.1:{self.http_port}"
[policies]
path = "policies"
""")
        (self.dir / "policies" / "bench.toml").write_text(f"""\
[[destination]]
domain = "example.net"
routes = ["127.0.0.1:{sink_port}"]
""")
        self.stdout_log = self.dir / "relay.stdout"
        self.stderr_log = self.dir / "relay.stderr"
        self.cmd = [*relay_cmd, "serve", "--config", str(self.dir / "relay.toml")]
        log(f"starting relay: {' '.join(self.cmd)} (cwd {self.dir})")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.dir, stdout=open(self.stdout_log, "ab"),
            stderr=open(self.stderr_log, "ab"), stdin=subprocess.DEVNULL,
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
                f"\n--- last 5 lines ---\n" + "\n".join(lines[-5:]) +
                f"\n--- {self.stdout_log} (tail) ---\n{tail(self.stdout_log, 20)}")

    def stop(self) -> None:
        kill_tree("relay", [self.proc.pid], self.pgids, 30)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------------------
# Rounds

def run_round(kind: str, system: System | None, sink: Sink, smtp_source: str, n: int,
              size: int, sessions: int, timeout: float, others: list[System]) -> dict:
    port = system.port if system else sink.port
    base = sink.current()
    sess0, open0 = sink.sessions, sink.open_connections()
    target = base + n
    sink.arm(target)
    snap_before = system.cpu_snapshot() if system else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink0 = sink.cpu_ticks()
    others_before = {o.name: o.cpu_snapshot()["total"] for o in others if o is not system}
    mbusy0, msteal0, mtot0, mirq0 = machine_cpu()
    cmd = [smtp_source, "-s", str(sessions), "-m", str(n), "-l", str(size),
           "-f", "from@bench.test", "-t", "to@example.net", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    try:
        src = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{kind}: smtp-source did not finish within {timeout:.0f}s; the sink "
                         f"has {sink.current() - base} of {n} messages") from e
    t_src = time.monotonic()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if src.returncode != 0 or src.stderr.strip():
        msg = (f"{kind}: smtp-source exited {src.returncode}: "
               f"{src.stderr.decode(errors='replace').strip()[:2000]}")
        if src.returncode != 0:
            raise BenchError(msg)
        log("warning: " + msg)
    while True:
        reached = sink.wait(target, min(t0 + timeout, time.monotonic() + 1.0))
        if reached is not None or time.monotonic() >= t0 + timeout:
            break
        if system and not system.alive():
            raise BenchError(f"{kind}: {system.name} exited (status {system.proc.returncode}) "
                             f"while its queue was draining: the sink has "
                             f"{sink.current() - base} of {n} messages")
    if reached is None:
        got = sink.current() - base
        raise BenchError(f"{kind}: timeout after {timeout:.0f}s: the sink received {got} of {n} "
                         f"messages (smtp-source finished in {t_src - t0:.2f}s)")
    # let the system finish post-delivery work (spool cleanup, index updates) before reading
    # the "after" counters, so that work is charged to this round
    sink.settle(quiet=0.3, limit=3)
    t_after = time.monotonic()
    mbusy1, msteal1, mtot1, mirq1 = machine_cpu()
    snap_after = system.cpu_snapshot() if system else None
    sink1 = sink.cpu_ticks()
    source_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    loadgen_s = source_s + (sink1 - sink0) / CLK_TCK
    sut_s = ((snap_after["total"] - snap_before["total"]) / CLK_TCK) if system else 0.0
    machine_s = (mbusy1 - mbusy0) / CLK_TCK
    irq_s = (mirq1 - mirq0) / CLK_TCK
    accepted_s, e2e_s = t_src - t0, reached - t0
    # connections opened to the sink during the round = sessions ended + still open - open
    # before (Postfix keeps delivery connections cached for a while after a burst)
    sink_sessions = sink.sessions - sess0 + sink.open_connections() - open0
    r = {"kind": kind, "system": system.name if system else "direct", "n": n, "size": size,
         "sessions": sessions, "accept_seconds": round(accepted_s, 4),
         "e2e_seconds": round(e2e_s, 4), "accepted_per_s": n / accepted_s,
         "e2e_per_s": n / e2e_s,
         "machine_cpu_busy_pct": round(100 * (mbusy1 - mbusy0) / max(1, mtot1 - mtot0), 1),
         # SMTP sessions that ended at the sink per message delivered: 1.0 = one connection per
         # message; Postfix reuses connections when a backlog builds
         "sink_sessions_per_msg": round(sink_sessions / n, 3),
         "machine_cpu_steal_pct": round(100 * (msteal1 - msteal0) / max(1, mtot1 - mtot0), 1),
         # smtp-source + smtp-sink; irq+softirq time (loopback TCP receive processing, not
         # charged to any process); and whatever else ran (neighbours, kernel threads such
         # as jbd2/kworker doing writeback)
         "loadgen_cpu_us_per_msg": round(loadgen_s * 1e6 / n, 1),
         "softirq_cpu_us_per_msg": round(irq_s * 1e6 / n, 1),
         "other_cpu_cores": round((machine_s - irq_s - sut_s - loadgen_s) / (t_after - t0), 2)}
    if system:
        us = 1e6 / CLK_TCK / n
        cpu = {k: (snap_after[k] - snap_before[k]) * us
               for k in ("intake", "delivery", "total") if k in snap_after}
        r["cpu_us_per_msg"] = {k: round(v, 1) for k, v in cpu.items()}
        # how busy each stage was over the round, in cores (1.0 = one core flat out; a single
        # Python process cannot go beyond ~1.0)
        r["cpu_cores"] = {k: round(v * n / 1e6 / (t_after - t0), 2) for k, v in cpu.items()}
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


def summarize(rounds: list[dict], sizes: list[tuple[str, int]]) -> dict:
    summary: dict = {}
    for label, size in sizes:
        s: dict = {}
        for system in ("relay", "postfix", "direct"):
            rs = [r for r in rounds if r["system"] == system and r["size"] == size
                  and r["kind"] in ("measure", "direct")]
            if not rs:
                continue
            entry = {"rounds": len(rs)}
            for key in ("accepted_per_s", "e2e_per_s"):
                vals = [r[key] for r in rs]
                entry[key] = {"median": statistics.median(vals), "min": min(vals),
                              "max": max(vals)}
            cpu_keys = sorted({k for r in rs for k in r.get("cpu_us_per_msg", {})})
            if cpu_keys:
                entry["cpu_cores_median"] = {
                    k: statistics.median(r["cpu_cores"].get(k, 0) for r in rs) for k in cpu_keys}
                entry["cpu_us_per_msg_median"] = {
                    k: statistics.median(r["cpu_us_per_msg"].get(k, 0) for r in rs)
                    for k in cpu_keys}
            entry["sink_sessions_per_msg_median"] = statistics.median(
                r["sink_sessions_per_msg"] for r in rs)
            entry["machine_cpu_busy_pct_median"] = statistics.median(
                r["machine_cpu_busy_pct"] for r in rs)
            entry["other_cpu_cores_median"] = statistics.median(
                r["other_cpu_cores"] or 0 for r in rs)
            entry["loadgen_cpu_us_per_msg_median"] = statistics.median(
                r["loadgen_cpu_us_per_msg"] for r in rs)
            entry["softirq_cpu_us_per_msg_median"] = statistics.median(
                r["softirq_cpu_us_per_msg"] for r in rs)
            s[system] = entry
        rel = [r for r in rounds if r["system"] == "relay" and r["size"] == size
               and r["kind"] == "measure"]
        pfx = [r for r in rounds if r["system"] == "postfix" and r["size"] == size
               and r["kind"] == "measure"]
        if rel and pfx:
            pairs = [a["e2e_per_s"] / b["e2e_per_s"] for a, b in zip(rel, pfx)]
            s["relay_postfix_e2e_ratio"] = {"median": statistics.median(pairs),
                                            "per_round": pairs}
            acc = [a["accepted_per_s"] / b["accepted_per_s"] for a, b in zip(rel, pfx)]
            s["relay_postfix_accepted_ratio"] = {"median": statistics.median(acc),
                                                 "per_round": acc}
        summary[label] = s
    return summary


def render_table(summary: dict, results: dict) -> str:
    lines = []
    hdr = (f"{'size':>5}  {'system':<8} {'rounds':>6}  {'accepted msg/s':>14} {'(min-max)':>15}"
           f"  {'end-to-end msg/s':>16} {'(min-max)':>15}  {'host CPU':>8}  {'CPU us/msg':>28}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for label, s in summary.items():
        for system in ("relay", "postfix", "direct"):
            e = s.get(system)
            if not e:
                continue
            a, b = e["accepted_per_s"], e["e2e_per_s"]
            cpu = e.get("cpu_us_per_msg_median", {})
            if system == "relay":
                cpu_s = (f"intake {cpu.get('intake', 0):,.0f} + deliv "
                         f"{cpu.get('delivery', 0):,.0f}")
            elif system == "postfix":
                cpu_s = f"total {cpu.get('total', 0):,.0f}"
            else:
                cpu_s = "(load-gen ceiling)"
            name = "sink" if system == "direct" else system
            lines.append(
                f"{label:>5}  {name:<8} {e['rounds']:>6}  {fmt_rate(a['median']):>14} "
                f"{'(' + fmt_rate(a['min']) + '-' + fmt_rate(a['max']) + ')':>15}  "
                f"{fmt_rate(b['median']):>16} "
                f"{'(' + fmt_rate(b['min']) + '-' + fmt_rate(b['max']) + ')':>15}  "
                f"{e['machine_cpu_busy_pct_median']:>7.0f}%  {cpu_s:>28}")
        if "relay_postfix_e2e_ratio" in s:
            r = s["relay_postfix_e2e_ratio"]
            ra = s["relay_postfix_accepted_ratio"]
            lines.append(
                f"{label:>5}  relay/postfix ratio, median of paired rounds: end-to-end "
                f"{r['median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['per_round'])}), "
                f"accepted {ra['median']:.2f}x")
        lines.append("")
    conn = [f"{label} {system} {e['sink_sessions_per_msg_median']:.2f}"
            for label, s in summary.items() for system, e in s.items()
            if system in ("relay", "postfix")]
    if conn:
        lines.append("delivery connections per message (sink sessions / messages, median): "
                     + ", ".join(conn))
    lines.append("CPU outside the system under test, medians: smtp-source+sink us/msg | "
                 "irq+softirq us/msg | anything else (neighbours, kernel threads) in cores")
    for label, s in summary.items():
        for system in ("relay", "postfix", "direct"):
            e = s.get(system)
            if e:
                lines.append(f"  {label:>5} {'sink' if system == 'direct' else system:<8} "
                             f"{e['loadgen_cpu_us_per_msg_median']:>8,.0f} | "
                             f"{e['softirq_cpu_us_per_msg_median']:>8,.0f} | "
                             f"{e['other_cpu_cores_median']:>5.2f}")
    rss = results.get("relay_peak_rss")
    if rss:
        parts = ", ".join(f"pid {pid} {v['vm_hwm_kib'] / 1024:.1f} MiB"
                          for pid, v in rss["processes"].items())
        lines.append(f"relay peak RSS (sum of VmHWM): {rss['sum_kib'] / 1024:.1f} MiB  [{parts}]")
    prss = results.get("postfix_peak_rss")
    if prss:
        lines.append(f"postfix: sum of VmHWM over its {prss['processes']} processes alive at the "
                     f"end: {prss['sum_kib'] / 1024:.1f} MiB (shared pages counted per process)")
    for label, s in summary.items():
        e, p = s.get("relay"), s.get("postfix")
        if e and "cpu_us_per_msg_median" in e:
            c = e["cpu_us_per_msg_median"]
            parts = c.get("intake", 0) + c.get("delivery", 0)
            if parts:
                line = (f"relay CPU at {label}: {c.get('total', 0):,.0f} us/msg; intake "
                        f"{c['intake']:,.0f} ({100 * c['intake'] / parts:.0f}%) + delivery "
                        f"{c['delivery']:,.0f} ({100 * c['delivery'] / parts:.0f}%)")
                cores = e.get("cpu_cores_median", {})
                if cores:
                    line += (f"; busy cores: intake {cores.get('intake', 0):.2f}, delivery "
                             f"{cores.get('delivery', 0):.2f}")
                ptot = (p or {}).get("cpu_us_per_msg_median", {}).get("total")
                if ptot:
                    line += (f"; postfix {ptot:,.0f} us/msg; relay/postfix "
                             f"{c.get('total', 0) / ptot:.2f}x")
                lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["relay", "postfix"], action="append",
                    help="benchmark only this system (repeatable); default: both")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    ap.add_argument("--n-small", type=int, default=int(os.environ.get("BENCH_N_SMALL", 4000)))
    ap.add_argument("--n-large", type=int, default=int(os.environ.get("BENCH_N_LARGE", 2000)))
    ap.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", "4k,200k"),
                    help="comma-separated subset of 4k,200k")
    ap.add_argument("--sessions", type=int, default=int(os.environ.get("BENCH_SESSIONS", 16)))
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 0)),
                    help="seconds per round (default: max(120, N/20))")
    ap.add_argument("--no-direct", action="store_true", help="skip the smtp-source->smtp-sink round")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    ap.add_argument("--relay-cmd", default=os.environ.get("RELAY_CMD", ""),
                    help="command that runs invoice-relay (default: set by bench/run)")
    ap.add_argument("--out", default=str(BENCH_DIR / "out"))
    args = ap.parse_args()

    systems_wanted = args.only or ["relay", "postfix"]
    sizes = []
    for s in args.sizes.split(","):
        s = s.strip().lower()
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
        sizes.append((s, SIZES[s]))
    n_for = {4096: args.n_small, 204800: args.n_large}

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

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="invoice-relay-bench-"))
    workdir.chmod(0o755)  # Postfix daemons (user postfix) must traverse it
    results: dict = {"started": stamp, "host": os.uname().nodename, "cpus": os.cpu_count(),
                     "settings": {"rounds": args.rounds, "sessions": args.sessions,
                                  "n": {label: n_for[size] for label, size in sizes},
                                  "systems": systems_wanted, "relay_cmd": relay_cmd},
                     "git": git_state(), "rounds": []}
    started: list = []
    sink = None
    status = 0
    stopping = {"flag": False}

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
        log(f"smtp-sink on 127.0.0.1:{sink.port}")
        systems: dict[str, System] = {}
        if "postfix" in systems_wanted:
            systems["postfix"] = Postfix(workdir, sink.port, tools["postfix"])
            started.append(systems["postfix"])
            log(f"postfix on 127.0.0.1:{systems['postfix'].port}")
        if "relay" in systems_wanted:
            systems["relay"] = Relay(workdir, sink.port, relay_cmd)
            started.append(systems["relay"])
            log(f"invoice-relay on 127.0.0.1:{systems['relay'].port} (pid {systems['relay'].proc.pid})")
        all_systems = list(systems.values())
        order = [s for s in ("relay", "postfix") if s in systems]

        def do(kind, system, n, size, label):
            timeout = args.timeout or max(120.0, n / 20)
            what = f"{system.name if system else 'direct'} {label} {kind}"
            if system and not system.alive():
                raise BenchError(f"{system.name} is no longer running before {what}\n"
                                 f"{system.describe_failure()}")
            try:
                r = run_round(kind, system, sink, tools["smtp-source"], n, size,
                              args.sessions, timeout, all_systems)
            except BenchError as e:
                extra = f"\n{system.describe_failure()}" if system else ""
                raise BenchError(f"{what}: {e}{extra}") from e
            r["label"] = label
            results["rounds"].append(r)
            cpu = r.get("cpu_us_per_msg", {})
            cpu_s = " ".join(f"{k}={v:,.0f}" for k, v in cpu.items())
            log(f"{what:<24} n={n:<5} accepted {r['accepted_per_s']:8,.0f}/s  end-to-end "
                f"{r['e2e_per_s']:8,.0f}/s  machine CPU {r['machine_cpu_busy_pct']:5.1f}% "
                f"(irq {r['softirq_cpu_us_per_msg']:,.0f} us/msg, other {r['other_cpu_cores']:.2f} cores)  "
                f"CPU us/msg {cpu_s}")
            # let stragglers (duplicates) show up and the queue settle before the next round
            sink.settle(quiet=0.3, limit=3)
            return r

        for label, size in sizes:
            n = n_for[size]
            if not args.no_direct:
                do("direct", None, n, size, label)
            for name in order:
                do("warmup", systems[name], max(200, n // 4), size, label)
            for i in range(args.rounds):
                for name in order:
                    do("measure", systems[name], n, size, label)

        expected = sum(r["n"] for r in results["rounds"])
        final = sink.settle(quiet=1.0, limit=5)
        results["sink_total"] = {"expected": expected, "received": final}
        if final != expected:
            log(f"WARNING: the sink received {final} messages, expected {expected} "
                f"({final - expected:+d})")
        if "relay" in systems:
            results["relay_peak_rss"] = systems["relay"].rss()
            results["relay_processes"] = {str(k): v for k, v in
                                          systems["relay"].seen_procs.items()}
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
        if sink:
            sink.stop()
        if args.keep or status == 1:
            log(f"kept {workdir} (logs, spools, configs); remove it when done")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if results["rounds"]:
        summary = summarize(results["rounds"], sizes)
        results["summary"] = summary
        table = render_table(summary, results)
        results["table"] = table
        print()
        g = results["git"]
        if results.get("host_busy_pct_before_start", 0) > 10:
            print(f"NOTE: the host was {results['host_busy_pct_before_start']:.0f}% busy before "
                  f"the run started (neighbours); see the 'anything else' column below.")
        print(f"invoice-relay vs Postfix, {args.sessions} sessions, one message per connection, "
              f"medians over {args.rounds} rounds; checkout {g['commit'][:10] or '?'}"
              + (" (dirty)" if g["dirty_files"] else "") + ("  [INCOMPLETE]" if status else ""))
        print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"results written to {path}")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
