"""Group commit (journal/groupcommit.py): transactions asked for at once run as one, a failure
stays with the operation that caused it, and each caller returns only after its COMMIT."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.journal.backends import Sqlite
from butler_mqtt.journal.groupcommit import GroupCommit


def _db(tmp_path: Path) -> Sqlite:
    db = Sqlite(tmp_path / "j.sqlite3")
    db.run("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    return db


def _queued(gc: GroupCommit, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(gc._queue) < n:
        assert time.monotonic() < deadline, f"only {len(gc._queue)} of {n} operations queued"
        time.sleep(0.001)


def _committed(path: Path) -> dict[str, int]:
    with sqlite3.connect(str(path)) as other:  # another connection sees only what was committed
        return dict(other.execute("SELECT k, v FROM t").fetchall())


def _in_threads(db: Sqlite, fns: list[Any]) -> list[Any]:
    """Each fn through db.transact in a thread of its own, all queued behind the held lock."""
    out: list[Any] = [None] * len(fns)

    def call(i: int) -> None:
        try:
            out[i] = db.transact(fns[i])
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            out[i] = exc

    with db._lock:  # as if a batch were running: every caller queues
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
        for t in threads:
            t.start()
        _queued(db.group, len(fns))
    for t in threads:
        t.join(10)
    return out


def test_operations_asked_for_at_once_share_one_transaction(tmp_path: Path) -> None:
    db = _db(tmp_path)
    before = db.group.batches

    def put(k: str) -> Any:
        return lambda c: c.run("INSERT INTO t(k, v) VALUES (?, 1) RETURNING k", (k,))[0][0]

    out = _in_threads(db, [put(f"k{i}") for i in range(5)])
    assert out == [f"k{i}" for i in range(5)]
    assert db.group.batches - before == 1 and db.group.grouped == 5
    assert _committed(db.path) == {f"k{i}": 1 for i in range(5)}


def test_a_failing_operation_fails_alone_and_undoes_nothing_of_the_others(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.run("INSERT INTO t(k, v) VALUES ('taken', 0)")

    def put(k: str) -> Any:
        def fn(c: Any) -> str:
            c.run("INSERT INTO t(k, v) VALUES (?, 1)", (k + "-first",))
            c.run("INSERT INTO t(k, v) VALUES (?, 1)", (k,))  # 'taken' violates the key
            return k
        return fn

    out = _in_threads(db, [put("a"), put("taken"), put("b")])
    assert out[0] == "a" and out[2] == "b"
    assert isinstance(out[1], sqlite3.IntegrityError)
    # the failing operation's first insert is rolled back with it; the others' writes stay
    assert _committed(db.path) == {"taken": 0, "a-first": 1, "a": 1, "b-first": 1, "b": 1}


def test_a_failed_commit_runs_each_operation_alone() -> None:
    log: list[str] = []
    fail_commits = [True]

    def commit() -> None:
        log.append("commit")
        if fail_commits and fail_commits.pop():
            raise OSError("disk I/O error")

    lock = threading.RLock()
    gc = GroupCommit(lock, lambda: log.append("begin"), commit, lambda: log.append("rollback"))
    out: list[Any] = [None] * 3

    def call(i: int) -> None:
        out[i] = gc.transact(lambda: log.append(f"op{i}") or i)

    with lock:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        _queued(gc, 3)
    for t in threads:
        t.join(10)
    assert out == [0, 1, 2]
    assert log[:6] == ["begin", "op0", "op1", "op2", "commit", "rollback"]
    assert log[6:] == ["begin", "op0", "commit", "begin", "op1", "commit", "begin", "op2", "commit"]


def test_an_error_at_commit_reaches_the_caller_alone() -> None:
    def commit() -> None:
        raise OSError("disk full")

    gc = GroupCommit(threading.RLock(), lambda: None, commit, lambda: None)
    with pytest.raises(OSError, match="disk full"):
        gc.transact(lambda: 1)
    assert gc.transact is not None and not gc._leading  # the lead was given back


def test_alone_a_caller_runs_at_once_and_the_lead_is_given_back(tmp_path: Path) -> None:
    db = _db(tmp_path)
    for i in range(3):
        assert db.transact(lambda c, i=i: c.run("INSERT INTO t(k, v) VALUES (?, ?) RETURNING v", (f"s{i}", i))[0][0]) == i
    assert db.group.grouped == 0 and not db.group._leading and not db.group._queue
    assert _committed(db.path) == {"s0": 0, "s1": 1, "s2": 2}


def test_many_threads_hammering_lose_nothing(tmp_path: Path) -> None:
    db = _db(tmp_path)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(100):
                db.transact(lambda c, k=f"w{w}-{i}": c.run("INSERT INTO t(k, v) VALUES (?, 1)", (k,)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(_committed(db.path)) == 800
    assert not db.group._leading and not db.group._queue
