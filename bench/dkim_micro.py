"""DKIM signing cost, in process: signatures per second, body hash time, and the prepare step's
cost per message (signed vs unsigned) at 4 KiB and 200 KiB, against stock dkimpy for scale.

    .venv/bin/python bench/dkim_micro.py [--seconds 1.0]

Prints one line per figure. One core, no relay process (see bench/dkim_cpu.py for that).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relay.config import Config, DkimKey, SenderPolicy
from relay.policy.dkim import Signer, body_hash
from relay.policy.prepare import prepare

WORDS = ["invoice", "amount", "due", "EUR", "1,200.00", "Zahlung", "发票", "payment", "account"]


def text_body(size: int, rng: random.Random) -> bytes:
    """Plain text, some double spaces and trailing blanks (what relaxed has to fix)."""
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12)))
        if rng.random() < 0.2:
            line += "  "
        data = line.encode() + b"\r\n"
        lines.append(data)
        total += len(data)
    return b"".join(lines)[:size - 2] + b"\r\n"


def base64_body(size: int) -> bytes:
    raw = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return raw[:size]


def message(body: bytes) -> bytes:
    return (b"From: Billing <billing@invoices.test>\r\nTo: ap@customer.test\r\n"
            b"Subject: Invoice 2026-001\r\nDate: Sun, 29 Nov 2026 20:00:00 +0000\r\n"
            b"Message-ID: <x@invoices.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n") + body


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per CPU second of this process (best of 5 runs of about seconds/5): CPU time,
    not wall time, so that other jobs on a shared machine disturb it less."""
    best = 0.0
    for _ in range(5):
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds / 5:
            fn()
            n += 1
        best = max(best, n / (time.process_time() - start))
    return best


def us(fn: Callable[[], object], seconds: float) -> str:
    return f"{1e6 / rate(fn, seconds):8.1f} us"


def signer_with(folder: Path, *keys: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> Signer:
    entries = []
    for i, key in enumerate(keys):
        path = folder / f"k{i}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        entries.append(DkimKey(f"s{i}", path))
    signer = Signer.from_config(Config(senders=(SenderPolicy("invoices.test",
                                                             dkim=tuple(entries)),)))
    assert signer is not None
    return signer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0)
    t = parser.parse_args().seconds
    rng = random.Random(1)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    small, large = message(text_body(4096, rng)), message(text_body(200 * 1024, rng))
    b64_large = message(base64_body(200 * 1024))
    # What bench/run sends (smtp-source -l): numbered lines of X, no white space at all.
    xs_large = message(b"".join(b"%dX" % i + b"X" * 76 + b"\r\n" for i in range(2560)))
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        only_rsa = signer_with(folder, rsa_key)
        only_ed = signer_with(folder, ed_key)
        both = signer_with(folder, rsa_key, ed_key)
    raw_rsa = rate(lambda: rsa_key.sign(b"x" * 600, padding.PKCS1v15(), hashes.SHA256()), t)
    raw_ed = rate(lambda: ed_key.sign(b"x" * 32), t)
    print(f"raw signatures/s: RSA-2048 {raw_rsa:.0f}, Ed25519 {raw_ed:.0f}")
    for name, data in (("4 KiB text", small), ("200 KiB text", large),
                       ("200 KiB base64", b64_large), ("200 KiB smtp-source", xs_large)):
        start = data.index(b"\r\n\r\n") + 4
        stock = us(lambda d=data: dkim.sign(d, b"s0", b"invoices.test", rsa_pem,
                                            include_headers=[b"from", b"to", b"subject"]), t)
        print(f"{name:20} body hash {us(lambda d=data, s=start: body_hash(d, s), t)}"
              f" | dkimpy sign (RSA) {stock}")
        cells = [f"{label} {us(lambda d=data, s=signer: prepare(d, sender='', signer=s), t)}"
                 for label, signer in (("unsigned", None), ("RSA", only_rsa),
                                       ("Ed25519", only_ed), ("RSA+Ed25519", both))]
        print(f"{name:20} prepare: " + " | ".join(cells))
    print(f"signed 4 KiB messages/s: RSA-2048 {rate(lambda: only_rsa.sign(small, ''), t):.0f},"
          f" Ed25519 {rate(lambda: only_ed.sign(small, ''), t):.0f}")


if __name__ == "__main__":
    main()
