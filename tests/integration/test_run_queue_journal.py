"""The run queue's journal operations on both backends (SQLite, PostgreSQL): joining, priority
order, the slot cap, expiry and takeover between instances."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from butler_mqtt.journal import Journal
from butler_mqtt.journal.runq import Waiter, Wanted
from butler_mqtt.model import Route


@pytest.fixture(params=["sqlite", "postgresql"])
def journals(request: pytest.FixtureRequest, tmp_path: Path):
    """Two instances (owners a, b) on one journal."""
    if request.param == "sqlite":
        made = [Journal(tmp_path / "j.sqlite3", owner=o, lease_s=0.5) for o in ("a", "b")]
    else:
        url = request.getfixturevalue("fresh_pg")
        made = [Journal(None, url=url, owner=o, lease_s=0.5) for o in ("a", "b")]
    yield made
    for j in made:
        j.close()


def want(key: str, task: str, priority: int = 5, after: str | None = None) -> Wanted:
    return Wanted(task, f"name {task}", priority, Waiter(key, key, task, None, Route("reply")), after)


def test_join_priority_and_cap(journals) -> None:
    a, b = journals
    placed = a.runq.enqueue([want("r1", "t1"), want("r1", "t2", priority=1)], 60, True)
    assert [(q.joined, q.position) for q in placed] == [(False, 1), (False, 2)]
    joined = b.runq.enqueue([want("r2", "t2", priority=9)], 60, True)[0]
    assert joined.joined and joined.entry_id == placed[1].entry_id and joined.position == 1  # raised to 9
    first = a.runq.claim(1)
    assert [e.task_id for e in first] == ["t2"]
    assert b.runq.claim(1) == []  # the one slot is taken while the start is being sent
    a.runq.started([(first[0], {"status": "started", "executionId": "e-t2"}, "r1")])
    assert b.runq.claim(1) == [] and a.runq.counts() == (1, 1, 1)
    assert [w.key for w in a.runq.waiters(first[0].id)] == ["r2"]  # r1 was told inline
    assert a.runq.ended(["e-t2"]) and [e.task_id for e in b.runq.claim(1)] == ["t1"]


def test_rerun_waits_for_its_execution(journals) -> None:
    a, _ = journals
    a.runq.enqueue([want("r1", "t1", after="e-run")], 60, False)
    assert a.runq.claim(0) == [] and a.runq.watched() == ["e-run"]
    assert a.runq.ended(["e-run"]) and [e.task_id for e in a.runq.claim(0)] == ["t1"]


def test_expiry_and_takeover(journals) -> None:
    a, b = journals
    a.runq.enqueue([want("r1", "t1")], 0.2, True)
    a.runq.enqueue([want("r2", "t2")], 60, True)
    e2 = a.runq.claim(5)
    assert {e.task_id for e in e2} == {"t1", "t2"}
    time.sleep(0.7)  # a's leases ran out: a is taken for dead
    taken = b.runq.take_over()
    assert {e.task_id for e in taken} == {e.task_id for e in e2}  # b checks with QRS whether they started
    assert b.runq.take_over() == []  # taken once
    b.runq.enqueue([want("r3", "t3")], 0.1, True)
    time.sleep(0.3)
    assert [e.task_id for e in b.runq.expire()] == ["t3"]
    expired = b.runq.unnotified()
    assert [o["status"] for o in b.runq.outcomes(expired).values()] == ["expired"]
