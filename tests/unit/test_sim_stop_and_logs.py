"""The simulator's stop (AbortInitiated -> Aborting -> Aborted) and its script logs, on a fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from butler_mqtt.sim import SimTask
from butler_mqtt.sim.filter import compile_filter
from butler_mqtt.sim.scriptlog import INVALID_UTF8, LogSpec, log_bytes, log_chunks, log_length
from butler_mqtt.sim.store import EMPTY_GUID, NEVER, Store
from tests.support.simclock import FakeClock as Clock

A = "5b1d0c0e-3333-4a4a-8b8b-000000000001"
B = "5b1d0c0e-3333-4a4a-8b8b-000000000002"
C = "5b1d0c0e-3333-4a4a-8b8b-000000000003"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kw: Any) -> Store:
    store = Store(
        [
            SimTask(A, "Long", run_seconds=10),
            SimTask(B, "Second", run_seconds=4, outcome="fail", failure_message="Table 'X' not found"),
            SimTask(C, "Retried", run_seconds=2, outcome="fail", max_retries=3),
        ],
        clock=clock,
        start_delay=1.0,
        retry_delay=0.5,
        **kw,
    )
    store.abort_initiated_seconds = 2.0
    store.aborting_seconds = 3.0
    return store


def rows(store: Store, session: str | None) -> list[dict[str, Any]]:
    text = store.query("executionresult", compile_filter(f"executionID eq {session}"), full=True)
    found: list[dict[str, Any]] = json.loads(text)
    return found


def session_doc(store: Store, session: str | None) -> dict[str, Any] | None:
    assert session is not None
    text = store.get("executionsession", session)
    return None if text is None else dict(json.loads(text))


def messages(row: dict[str, Any]) -> list[str]:
    return [d["message"] for d in sorted(row["details"], key=lambda d: d["detailCreatedDate"])]


def test_a_running_execution_goes_abort_initiated_aborting_aborted(clock: Clock) -> None:
    store = make(clock)
    session = store.start(A).execution_id
    clock.at(3)
    assert rows(store, session)[0]["status"] == 2
    assert store.stop(A) == session
    assert rows(store, session)[0]["status"] == 4
    doc = session_doc(store, session)
    assert doc is not None and doc["abortReason"] == 1  # Manual
    clock.at(4.9)
    assert rows(store, session)[0]["status"] == 4
    clock.at(5.1)
    assert rows(store, session)[0]["status"] == 5
    clock.at(8.1)
    (row,) = rows(store, session)
    assert row["status"] == 6 and row["duration"] == 7000  # started at 1, aborted at 8
    assert session_doc(store, session) is None  # the session ended with the abort, not at 11
    assert messages(row)[-5:] == [
        "Abort requested by user (manual stop)",
        "Changing task state from Started to AbortInitiated",
        "Changing task state from AbortInitiated to Aborting",
        "Task was aborted by a user",
        "Changing task state from Aborting to Aborted",
    ]
    assert {d["detailsType"] for d in row["details"] if d["message"] == "Task was aborted by a user"} == {0}
    assert store.stop_requests[0].task_id == A


def test_stopping_an_idle_task_changes_nothing(clock: Clock) -> None:
    store = make(clock)
    assert store.stop(A) is None  # never ran
    session = store.start(A).execution_id
    clock.at(20)
    assert store.stop(A) is None  # finished
    assert rows(store, session)[0]["status"] == 7
    with pytest.raises(KeyError):
        store.stop("5b1d0c0e-3333-4a4a-8b8b-0000000000ff")


def test_a_second_stop_does_not_restart_the_abort(clock: Clock) -> None:
    store = make(clock)
    session = store.start(A).execution_id
    clock.at(3)
    store.stop(A)
    clock.at(4)
    assert store.stop(A) == session
    clock.at(8.1)
    assert rows(store, session)[0]["status"] == 6


def test_a_stop_cancels_the_retries_still_to_come(clock: Clock) -> None:
    store = make(clock)
    session = store.start(C).execution_id
    clock.at(3.2)  # attempt 1 failed at 3, Retry until 3.5
    store.stop(C)
    clock.at(30)
    found = rows(store, session)
    assert [r["status"] for r in found] == [6]  # the retried row ends Aborted, no second row
    assert store.start(C).created  # and the task can run again


def test_a_queued_execution_stopped_never_starts_and_frees_the_queue(clock: Clock) -> None:
    store = make(clock, max_concurrent=1)
    first = store.start(A).execution_id
    queued = store.start(B).execution_id
    clock.at(2)
    assert rows(store, queued)[0]["status"] == 3
    store.stop(B)
    clock.at(10)
    (row,) = rows(store, queued)
    assert row["status"] == 6 and row["startTime"] == NEVER and row["scriptLogAvailable"] is False
    assert "Changing task state from Queued to AbortInitiated" in messages(row)
    assert rows(store, first)[0]["status"] == 2  # the running one is untouched


def test_stopping_the_running_one_lets_the_queued_one_start_early(clock: Clock) -> None:
    store = make(clock, max_concurrent=1)
    store.start(A)
    queued = store.start(B).execution_id
    clock.at(2)
    store.stop(A)  # aborted at 2 + 2 + 3 = 7 instead of finishing at 11
    clock.at(7.5)
    assert rows(store, queued)[0]["status"] == 2


def test_failed_attempts_carry_an_error_detail_with_the_task_message(clock: Clock) -> None:
    store = make(clock)
    session = store.start(B).execution_id
    clock.at(10)
    (row,) = rows(store, session)
    errors = [d["message"] for d in row["details"] if d["detailsType"] == 0]
    assert errors == ["Table 'X' not found"]
    assert messages(row)[-1] == "Changing task state from Started to FinishedFail"
    assert row["fileReferenceID"] != EMPTY_GUID and row["scriptLogAvailable"] is True


def test_each_execution_has_its_own_log_naming_it(clock: Clock) -> None:
    store = make(clock)
    logs = []
    for n in range(2):
        session = store.start(B).execution_id
        clock.at(10 * (n + 1))
        (row,) = rows(store, session)
        spec = store.log_of_result(B, row["id"])
        assert spec is not None and store.log_of_file_reference(B, row["fileReferenceID"]) == spec
        assert row["scriptLogSize"] == log_length(spec)
        logs.append(log_bytes(spec))
    assert logs[0] != logs[1]
    assert logs[0].startswith(b"\xef\xbb\xbf") and logs[0].endswith(b"Execution finished.\r\n")
    assert b"run 1" in logs[0].splitlines()[-2] and b"run 2" in logs[1].splitlines()[-2]
    assert store.log_of_result(A, rows(store, session)[0]["id"]) is None  # another task's result


def test_no_log_while_running_and_none_without_file_references(clock: Clock) -> None:
    store = make(clock)
    session = store.start(B).execution_id
    clock.at(2)
    (row,) = rows(store, session)
    assert store.log_of_result(B, row["id"]) is None and row["fileReferenceID"] == EMPTY_GUID
    clock.at(10)
    store.file_references = False
    (row,) = rows(store, session)
    assert store.log_of_file_reference(B, row["fileReferenceID"]) is None


def spec(**kw: Any) -> LogSpec:
    base: dict[str, Any] = {
        "task_name": "t", "app_id": "a", "result_id": "r-1", "run": 1, "start": 0.0, "stop": 1.0,
        "status": 8, "failure_message": "boom", "lines": 10, "min_bytes": 0, "encoding": "utf-8",
    }
    return LogSpec(**{**base, **kw})


def test_a_huge_log_is_sized_without_being_made_and_streamed_in_blocks() -> None:
    huge = spec(min_bytes=200 * 1024 * 1024)
    size = log_length(huge)
    assert size >= 200 * 1024 * 1024
    largest = 0
    total = 0
    for chunk in log_chunks(huge):
        largest = max(largest, len(chunk))
        total += len(chunk)
    assert total == size and largest <= 64 * 1024


@pytest.mark.parametrize(
    ("encoding", "bom", "codec"),
    [("utf-16-le", b"\xff\xfe", "utf-16-le"), ("utf-16-be", b"\xfe\xff", "utf-16-be"), ("utf-8-nobom", b"", "utf-8")],
)
def test_log_encodings(encoding: str, bom: bytes, codec: str) -> None:
    data = log_bytes(spec(encoding=encoding))
    assert data.startswith(bom) and not data[len(bom):].startswith(b"\xef\xbb\xbf")
    assert data[len(bom):].decode(codec).endswith("Execution finished.\r\n")


def test_invalid_utf8_log_has_invalid_bytes_in_its_last_lines() -> None:
    data = log_bytes(spec(encoding="invalid-utf-8"))
    assert INVALID_UTF8 in data.splitlines()[-2]
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")


def test_bad_log_knobs_are_refused(clock: Clock) -> None:
    with pytest.raises(ValueError, match="log_encoding"):
        Store([SimTask(A, "x", log_encoding="latin-1")], clock=clock)
    with pytest.raises(ValueError, match="log_bytes"):
        Store([SimTask(A, "x", log_bytes=-1)], clock=clock)
