"""A raw SMTP client for tests: exact bytes out, whole (multi-line) replies back."""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import struct
import time

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")


class Raw:
    """A raw SMTP client: send exact bytes, read whole (multi-line) replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10,
                 source: str | None = None) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply_lines(self) -> list[str]:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def reply(self) -> str:
        """One reply; multi-line replies are joined with newlines."""
        return "\n".join(self.reply_lines())

    def cmd(self, line: str) -> str:
        self.send(line + "\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.test") -> list[str]:
        self.send(f"EHLO {name}\r\n")
        return self.reply_lines()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close with a TCP RST rather than a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def simple_message(subject: str = "test", body: bytes = b"hello\r\n") -> bytes:
    return (f"From: a@sender.test\r\nTo: b@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}.{time.monotonic_ns()}@sender.test>\r\n"
            f"\r\n").encode() + body


def send_raw(raw: Raw, message: bytes, rcpt: str = "b@example.net",
             sender: str = "a@sender.test") -> str:
    """One transaction on an open raw session; returns the reply to the final dot."""
    assert raw.cmd(f"MAIL FROM:<{sender}>").startswith("250 "), "MAIL refused"
    assert raw.cmd(f"RCPT TO:<{rcpt}>").startswith("250 ")
    assert raw.cmd("DATA").startswith("354")
    raw.send(message + b".\r\n")
    return raw.reply()


def plain(user: str, password: str, authzid: str = "") -> str:
    """An AUTH PLAIN initial response."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
