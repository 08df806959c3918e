"""The per-destination job queue: high first, bulk never starves, deque behaviour otherwise."""

from __future__ import annotations

import pytest

from relay.delivery.attempt import Job
from relay.delivery.jobqueue import BULK_SHARE, JobQueue
from relay.queue.index import DueRecipient


def job(name: str, priority: str = "normal", recipients: int = 1) -> Job:
    return Job(name, [DueRecipient(name, i, f"r{i}@example.net", "example.net", 0,
                                   "ar@invoices.example.com", 0.0, 1.0, None, False,
                                   priority=priority) for i in range(recipients)])


def drain(queue: JobQueue[Job]) -> list[str]:
    out = []
    while queue:
        out.append(queue.popleft().msg)
    return out


def test_job_priority_is_its_messages() -> None:
    assert job("a", "high", recipients=3).priority == "high"
    assert job("b").priority == "normal"


def test_high_then_normal_then_bulk_each_first_in_first_out() -> None:
    queue: JobQueue[Job] = JobQueue()
    for name, priority in [("n1", "normal"), ("b1", "bulk"), ("h1", "high"), ("n2", "normal"),
                           ("h2", "high"), ("b2", "bulk")]:
        queue.append(job(name, priority))
    assert len(queue) == 6 and queue.counts() == {"high": 2, "normal": 2, "bulk": 2}
    assert [j.msg for j in queue] == ["h1", "h2", "n1", "n2", "b1", "b2"]
    assert drain(queue) == ["h1", "h2", "n1", "n2", "b1", "b2"]
    assert not queue and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_high_overtakes_waiting_bulk() -> None:
    queue: JobQueue[Job] = JobQueue()
    for i in range(50):
        queue.append(job(f"bulk{i}", "bulk"))
    assert queue.popleft().msg == "bulk0"
    queue.append(job("urgent", "high"))
    assert queue.popleft().msg == "urgent"  # ahead of the 49 bulk jobs that waited longer


@pytest.mark.parametrize("other", ["high", "normal"])
def test_bulk_gets_at_least_a_tenth_while_it_waits(other: str) -> None:
    queue: JobQueue[Job] = JobQueue()
    for i in range(20):
        queue.append(job(f"bulk{i}", "bulk"))
    popped = []
    for i in range(200):  # a steady stream: one new urgent job per pop keeps its lane full
        queue.append(job(f"{other}{i}", other))
        popped.append(queue.popleft().priority)
    # every window of BULK_SHARE pops has a bulk one while bulk jobs wait: never starved
    for start in range(len(popped) - BULK_SHARE + 1):
        assert "bulk" in popped[start:start + BULK_SHARE], start
    assert popped.count("bulk") == 20  # all of them out within the 200 pops
    # and no more than its share: bulk does not take turns from urgent mail
    assert popped[:2 * BULK_SHARE].count("bulk") == 2


def test_bulk_alone_or_late_goes_out_at_once() -> None:
    queue: JobQueue[Job] = JobQueue()
    for i in range(30):
        queue.append(job(f"h{i}", "high"))
    for _ in range(25):
        queue.popleft()  # no bulk waited: nothing owed to bulk
    queue.append(job("late", "bulk"))
    assert [queue.popleft().priority for _ in range(5)] == ["high"] * 5
    assert queue.popleft().msg == "late"


def test_handed_back_jobs_keep_their_place_and_turn() -> None:
    queue: JobQueue[Job] = JobQueue()
    for i in range(3):
        queue.append(job(f"h{i}", "high"))
    queue.append(job("b0", "bulk"))
    queue.append(job("b1", "bulk"))
    first = queue.popleft()
    queue.appendleft(first)  # e.g. the destination was throttled: not sent, back in front
    assert queue.popleft() is first
    # bulk's turn: after BULK_SHARE - 1 other pops; a bulk job handed back keeps it
    queue = JobQueue()
    for i in range(20):
        queue.append(job(f"h{i}", "high"))
    queue.append(job("b0", "bulk"))
    queue.append(job("b1", "bulk"))
    pops = [queue.popleft() for _ in range(BULK_SHARE)]
    assert [p.priority for p in pops].index("bulk") == BULK_SHARE - 1
    queue.appendleft(pops[-1])
    assert queue.popleft().msg == "b0"


def test_clear_and_unknown_priority() -> None:
    queue: JobQueue[Job] = JobQueue()
    queue.append(job("odd", "whatever"))  # never written by intake; treated as normal
    queue.append(job("h", "high"))
    assert drain(queue) == ["h", "odd"]
    queue.append(job("b", "bulk"))
    queue.clear()
    assert not queue and list(queue) == []
