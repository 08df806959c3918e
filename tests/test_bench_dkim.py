"""bench/run's signed scenario: the sink's DKIM count and samples, and their verification.

The bench compares the relay signing with Postfix + OpenDKIM signing; these tests make sure its
check at the sink tells signed from unsigned and tampered output (bench/sink.py over real SMTP,
the harness's own key and dkimpy verification).
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402  (bench/bench.py, not a package)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


class SinkProc:
    """bench/sink.py accepting everything, with a sample folder; JSON lines on stdout."""

    def __init__(self, sample_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "sink.py"), "--temp-pct", "0", "--perm-pct", "0",
             "--sample-dir", str(sample_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = self.answer("ready")

    def answer(self, key: str):
        while True:
            line = self.proc.stdout.readline()
            assert line, "bench/sink.py exited"
            d = json.loads(line)
            if key in d:
                return d[key]

    def command(self, line: str, key: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.answer(key)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProc]:
    (tmp_path / "samples").mkdir()
    s = SinkProc(tmp_path / "samples")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> bench.DkimKey:
    return bench.DkimKey(tmp_path_factory.mktemp("dkim"))


def message(n: int) -> bytes:
    # a body line starting with "." checks that samples are dot-unstuffed before verifying
    return (f"From: <from@bench.test>\r\nTo: <to@signed.test>\r\nSubject: invoice {n}\r\n"
            f"Message-Id: <{n}.bench@test>\r\n\r\n.starts with a dot\r\n"
            + "X" * 78 + "\r\n").encode()


def signed(msg: bytes, key: bench.DkimKey) -> bytes:
    sig = dkim.sign(msg, key.selector.encode(), key.domain.encode(), key.pem.read_bytes(),
                    canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"to"])
    return sig + msg


def send(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        for m in messages:
            smtp.sendmail("from@bench.test", ["to@signed.test"], m)


def test_sink_counts_signatures_and_samples_verify(sink: SinkProc, key: bench.DkimKey,
                                                   tmp_path: Path) -> None:
    assert sink.command("sample 1 3", "sampling") == [1, 3]
    send(sink.port, [signed(message(1), key), signed(message(2), key), message(3),
                     signed(message(4), key)])
    stats = sink.command("stats", "stats")
    assert stats["dkim_signed"] == 3
    assert stats["outcomes"] == 4
    files = sorted((tmp_path / "samples").iterdir())
    assert len(files) == 3  # at most 3, the first three messages
    result = bench.verify_samples(files, key)
    # the unsigned third message is the one that fails
    assert result == {"sampled": 3, "verified": 2, "failed": [files[2].name]}


def test_tampered_or_foreign_signature_fails(sink: SinkProc, key: bench.DkimKey,
                                             tmp_path: Path) -> None:
    sink.command("sample 1 2", "sampling")
    tampered = signed(message(5), key).replace(b".starts", b".Starts")  # the body
    (tmp_path / "other").mkdir()
    other = bench.DkimKey(tmp_path / "other", domain="other.test")
    send(sink.port, [tampered, signed(message(7), other)])
    files = sorted((tmp_path / "samples").iterdir())
    assert bench.verify_samples(files, key)["verified"] == 0


def test_signed_round_without_signatures_stops_the_bench() -> None:
    class Signed(bench.System):
        name = "relay-signed"

    d = {"n": 10, "signed": 9, "sampled": 6, "verified": 6, "failed": []}
    with pytest.raises(bench.BenchError, match="9 of 10 messages"):
        bench.check_signatures("measure", Signed(), d)
    ok = bench.check_signatures("measure", Signed(), {**d, "signed": 10})
    assert ok["expected"] is True
