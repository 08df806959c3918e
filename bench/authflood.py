"""Password guessing against the relay: how many wrong passwords get an answer per second from
one address over 8 parallel connections, and how long a trusted client waits meanwhile.

    python bench/authflood.py [--seconds 10] [--relay-cmd PATH]

Two runs: with the default `auth_failure_limit` ("30/h", a bucket 5 deep) and with the limit
off ("0"), where only the bounded password-hashing pool (one low-priority thread per intake
process, at most 16 checks waiting) stands between the flood and the other clients. Passwords
are hashed at the default cost (scrypt ln=15), as `hash-password` makes them.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
TRUSTED = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def start_relay(folder: Path, relay_cmd: list[str], limit: str
                ) -> tuple[subprocess.Popen, int, int]:  # type: ignore[type-arg]
    cert, key = self_signed(folder)
    users = folder / "users"
    hashed = subprocess.run([*relay_cmd, "hash-password"], input="right-password\n",
                            capture_output=True, text=True, check=True).stdout.strip()
    users.write_text(f"alice:{hashed}\n")
    port, tls_port, sink = free_port(), free_port(), free_port()
    (folder / "policies").mkdir()
    (folder / "policies" / "p.toml").write_text(
        f'[[destination]]\ndomain = "example.net"\nroutes = ["127.0.0.1:{sink}"]\n')
    (folder / "relay.toml").write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nlisten_tls = ["127.0.0.1:{tls_port}"]\n'
        f'hostname = "relay.test"\ntrusted_networks = ["{TRUSTED}/32"]\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nusers_file = "{users}"\n'
        f'auth_failure_limit = "{limit}"\nerror_hard_limit = 1000\nerror_soft_limit = 1000\n'
        '[queue]\npath = "var"\nmin_free_space = "0"\n[policies]\npath = "policies"\n')
    subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink}", "100"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = open(folder / "relay.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([*relay_cmd, "--config", str(folder / "relay.toml"), "serve"],
                            stdout=log, stderr=log, cwd=folder, start_new_session=True)
    deadline = time.monotonic() + 20
    while b"event=listening" not in (folder / "relay.log").read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit((folder / "relay.log").read_text())
        time.sleep(0.05)
    return proc, port, tls_port


class Line:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def reply(self) -> str:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if len(line) < 4 or line[3:4] != b"-":
                return line.decode(errors="replace")

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()


def guesser(tls_port: int, stop: float, counts: Counter[str], lock: threading.Lock) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    blob = base64.b64encode(b"\0alice\0wrong-password").decode()
    while time.monotonic() < stop:
        try:
            raw = socket.create_connection(("127.0.0.1", tls_port), timeout=30)
            conn = Line(context.wrap_socket(raw))
            conn.reply()
            conn.cmd("EHLO guesser.test")
            while time.monotonic() < stop:
                code = conn.cmd(f"AUTH PLAIN {blob}")[:3]
                with lock:
                    counts[code] += 1
                if code == "421":
                    break
            conn.sock.close()
        except (OSError, ConnectionError):
            time.sleep(0.01)


def trusted_client(port: int, stop: float, latencies: list[float]) -> None:
    body = b"From: a@b.test\r\nSubject: invoice\r\n\r\n" + b"x" * 4000 + b"\r\n.\r\n"
    while time.monotonic() < stop:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30,
                                       source_address=(TRUSTED, 0))
        conn = Line(raw)
        began = time.monotonic()
        conn.reply()
        for command in ("EHLO app.test", "MAIL FROM:<a@b.test>", "RCPT TO:<c@example.net>",
                        "DATA"):
            conn.cmd(command)
        raw.sendall(body)
        conn.reply()
        latencies.append(time.monotonic() - began)
        conn.cmd("QUIT")
        raw.close()
        time.sleep(0.1)


def run(relay_cmd: list[str], limit: str, seconds: float) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="authflood-"))
    proc, port, tls_port = start_relay(folder, relay_cmd, limit)
    try:
        baseline: list[float] = []
        trusted_client(port, time.monotonic() + 2, baseline)
        counts: Counter[str] = Counter()
        latencies: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=guesser, args=(tls_port, stop, counts, lock))
                   for _ in range(8)]
        threads.append(threading.Thread(target=trusted_client, args=(port, stop, latencies)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        failed_logged = (folder / "relay.log").read_text().count("event=auth_failed")
        return {"limit": limit, "seconds": seconds, "replies": dict(counts),
                "wrong_passwords_answered_per_s": round(counts["535"] / seconds, 1),
                "replies_per_s": round(sum(counts.values()) / seconds, 1),
                "auth_failed_lines": failed_logged,
                "trusted_ms_baseline_median": round(statistics.median(baseline) * 1000, 1),
                "trusted_ms_median": round(statistics.median(latencies) * 1000, 1),
                "trusted_ms_worst": round(max(latencies) * 1000, 1),
                "trusted_messages": len(latencies)}
    finally:
        os.killpg(proc.pid, 9)
        subprocess.run(["pkill", "-f", "smtp-sink -u nobody"], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--relay-cmd", default=str(Path(sys.executable).parent / "invoice-relay"))
    args = parser.parse_args()
    for limit in ("30/h", "0"):
        result = run([args.relay_cmd], limit, args.seconds)
        print(f"auth_failure_limit={limit!r}: {result['replies_per_s']} AUTH replies/s"
              f" {result['replies']}, wrong passwords answered (535) "
              f"{result['wrong_passwords_answered_per_s']}/s, {result['auth_failed_lines']}"
              f" auth_failed log lines; trusted client: median {result['trusted_ms_median']} ms"
              f" (idle {result['trusted_ms_baseline_median']} ms), worst"
              f" {result['trusted_ms_worst']} ms over {result['trusted_messages']} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
