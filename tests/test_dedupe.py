"""Duplicate suppression ([queue] dedupe_window) on the real relay: an app that resubmits the
same invoice gets the first message's queue id, and the recipient gets it once; across both
intake processes, within one commit batch, and across a restart."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from rawsmtp import QUEUED, Raw, send_raw
from relayproc import RelayProcess
from sink import Sink

INVOICE = (b"From: billing@sender.test\r\nTo: ap@example.net\r\nSubject: invoice 4711\r\n"
           b"Message-ID: <inv-4711@sender.test>\r\n\r\nAmount due: 100 EUR\r\n")


def queued_id(reply: str) -> str:
    match = QUEUED.match(reply)
    assert match, reply
    return match.group(1)


def received(relay: RelayProcess) -> list[dict[str, str]]:
    return relay.events("received")


def test_resubmissions_on_many_connections_name_the_first(tmp_path: Path) -> None:
    with Sink() as sink, RelayProcess(tmp_path, routes={"example.net": [sink.address]}) as relay:
        # Open them all first, so that both intake processes accept some.
        conns = [Raw(relay.port) for _ in range(16)]
        try:
            for raw in conns:
                raw.ehlo()
            ids = [queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net")) for raw in conns]
        finally:
            for raw in conns:
                raw.close()
        first = ids[0]
        assert set(ids) == {first}
        sink.wait_for(1)
        duplicates = relay.wait_for_log("event=duplicate", count=15)
        assert all(f"first={first}" in line and "rcpt=ap@example.net" in line
                   for line in duplicates)
        assert len(received(relay)) == 1
        if (os.cpu_count() or 1) >= 2:
            # Across both intake processes. A queue id carries its intake process's pid (12
            # bits) after the time. Which process accepts a connection is the kernel's choice:
            # when one took all 16, resubmit on new connections until the other takes one.
            def pids() -> set[str]:
                return {e["id"][14:17] for e in relay.events("duplicate")} | {first[14:17]}

            extra = 0
            while len(pids()) < 2 and extra < 100:
                extra += 1
                with Raw(relay.port) as raw:
                    raw.ehlo()
                    assert queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net")) == first
                relay.wait_for_log("event=duplicate", count=15 + extra)
            assert len(pids()) == 2, pids()
        assert len(received(relay)) == 1
    assert len(sink.messages) == 1


def test_only_the_same_message_id_sender_recipient_and_body_is_suppressed(
        tmp_path: Path) -> None:
    with Sink() as sink, RelayProcess(tmp_path, routes={"example.net": [sink.address]}) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            first = queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net"))
            # Another recipient, sender or body, or no Message-ID: a message of its own.
            other = [queued_id(send_raw(raw, INVOICE, rcpt="cfo@example.net")),
                     queued_id(send_raw(raw, INVOICE, sender="x@sender.test",
                                        rcpt="ap@example.net")),
                     queued_id(send_raw(raw, INVOICE + b"corrected\r\n", rcpt="ap@example.net"))]
            no_id = INVOICE.replace(b"Message-ID: <inv-4711@sender.test>\r\n", b"")
            other += [queued_id(send_raw(raw, no_id)), queued_id(send_raw(raw, no_id))]
            assert len({first, *other}) == 6
            # Two recipients, one of them known: only the new one is queued.
            assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
            assert raw.cmd("RCPT TO:<ap@example.net>").startswith("250")
            assert raw.cmd("RCPT TO:<new@example.net>").startswith("250")
            assert raw.cmd("DATA").startswith("354")
            raw.send(INVOICE + b".\r\n")
            mixed = queued_id(raw.reply())
        assert mixed not in (first, *other)
        messages = sink.wait_for(7)
        assert [m.rcpt_tos for m in messages if b"Received" in m.data and
                f"id {mixed}".encode() in m.data] == [["new@example.net"]]
        [dup] = relay.events("duplicate", at_least=1)
        assert (dup["id"], dup["first"], dup["rcpt"]) == (mixed, first, "ap@example.net")


def test_two_identical_messages_in_one_batch_queue_one(tmp_path: Path) -> None:
    with Sink() as sink, RelayProcess(tmp_path, routes={"example.net": [sink.address]}) as relay:
        for round_ in range(5):
            message = INVOICE.replace(b"inv-4711", f"inv-{round_}".encode())
            conns = [Raw(relay.port) for _ in range(4)]
            for raw in conns:
                raw.ehlo()
                assert raw.cmd("MAIL FROM:<a@sender.test>").startswith("250")
                assert raw.cmd("RCPT TO:<ap@example.net>").startswith("250")
                assert raw.cmd("DATA").startswith("354")
                raw.send(message)
            replies: list[str] = []
            start = threading.Barrier(len(conns))

            def finish(raw: Raw, replies: list[str] = replies,
                       start: threading.Barrier = start) -> None:
                start.wait()
                raw.send(b".\r\n")
                replies.append(raw.reply())

            threads = [threading.Thread(target=finish, args=(raw,)) for raw in conns]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for raw in conns:
                raw.close()
            assert len({queued_id(r) for r in replies}) == 1, replies
        assert len(received(relay)) == 5
        sink.wait_for(5)


def test_a_restart_remembers_and_a_window_of_0_turns_it_off(tmp_path: Path) -> None:
    with Sink() as sink:
        relay = RelayProcess(tmp_path, routes={"example.net": [sink.address]})
        with relay, Raw(relay.port) as raw:
            raw.ehlo()
            first = queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net"))
            sink.wait_for(1)
        with relay, Raw(relay.port) as raw:  # the message is delivered and gone
            raw.ehlo()
            assert queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net")) == first
        off = RelayProcess(tmp_path, routes={"example.net": [sink.address]},
                           queue={"dedupe_window": "0"})
        with off, Raw(off.port) as raw:
            raw.ehlo()
            assert queued_id(send_raw(raw, INVOICE, rcpt="ap@example.net")) != first
            sink.wait_for(2)


def test_table_finds_keys_past_freed_slots_and_probes_little(tmp_path: Path) -> None:
    # Two keys that hash to the same start slot: the second is stored one slot further.
    from relay.queue.dedupe import DedupeTable

    table = DedupeTable(tmp_path / "dedupe.table", slots=8)
    first = (0).to_bytes(8, "little") + b"A" * 8
    second = (8).to_bytes(8, "little") + b"B" * 8  # 8 % 8 == 0: the same start slot
    claimed = table.claim([first], "ID1", 1000.0, 86400.0)
    assert claimed.firsts == [None]
    second_claimed = table.claim([second], "ID2", 1000.0, 86400.0)
    assert second_claimed.firsts == [None]
    assert [slot for slot, _ in claimed.held + second_claimed.held] == [0, 1]
    table.settle(second_claimed.held, "ID2", committed=True)
    table.settle(claimed.held, "ID1", committed=False)  # its commit failed: the slot is freed
    # The freed slot must not end the probe: the second key is still known...
    assert table.claim([second], "ID3", 1001.0, 86400.0).firsts == ["ID2"]
    # ...and a new key reuses the freed slot rather than a fresh one.
    assert table.claim([first], "ID4", 1001.0, 86400.0) == ([None], [(0, first)])


def test_claims_of_a_dead_relay_are_cleared_at_the_next_start(tmp_path: Path) -> None:
    """A relay killed between a claim and its commit's outcome left pending claims: the next
    start frees them (never queued), keeps final entries, and the same message can then be
    queued instead of waiting for an owner that is gone."""
    from relay.queue.dedupe import Busy, DedupeTable

    keys = [i.to_bytes(8, "little") + b"K" * 8 for i in range(1, 40)]
    table = DedupeTable(tmp_path / "dedupe.table", slots=64)
    done = table.claim(keys[:1], "DONE", 1000.0, 86400.0)
    table.settle(done.held, "DONE", committed=True)
    table.claim(keys[1:], "DEAD", 1000.0, 86400.0)  # the relay dies before settling
    with pytest.raises(Busy):  # a live claim: an identical message waits for its outcome
        table.claim(keys[1:2], "OTHER", 1001.0, 86400.0)
    table.close()
    table = DedupeTable(tmp_path / "dedupe.table", slots=64)
    assert table.claim(keys, "NEW", 1002.0, 86400.0).firsts == ["DONE"] + [None] * 38
