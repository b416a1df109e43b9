"""The simulator's repository: QRS object shapes and the execution lifecycle on a fake clock."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from butler_mqtt.sim import SimTask
from butler_mqtt.sim.filter import compile_filter
from butler_mqtt.sim.store import EMPTY_GUID, NEVER, Store, iso
from tests.support.simclock import FakeClock as Clock

RELOAD = "5b1d0c0e-1111-4a4a-8b8b-000000000001"
FAILING = "5b1d0c0e-1111-4a4a-8b8b-000000000002"
DISABLED = "5b1d0c0e-1111-4a4a-8b8b-000000000003"
EXTERNAL = "5b1d0c0e-1111-4a4a-8b8b-000000000004"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Store:
    return Store(
        [
            SimTask(
                RELOAD,
                "Reload sales",
                tags=["daily", "finance"],
                custom_properties=[("taskGroup", "finance"), ("priority", "high")],
                run_seconds=10,
            ),
            SimTask(FAILING, "Reload broken", tags=["daily"], run_seconds=5, outcome="fail"),
            SimTask(DISABLED.upper(), "Reload off", enabled=False),
            SimTask(EXTERNAL, "Run script", task_type=1, custom_properties=[("taskGroup", "ops")]),
        ],
        clock=clock,
        start_delay=1.0,
    )


def get(store: Store, collection: str, object_id: str) -> dict[str, Any]:
    text = store.get(collection, object_id)
    assert text is not None
    result: dict[str, Any] = json.loads(text)
    return result


def query(
    store: Store,
    collection: str,
    expr: str | None = None,
    *,
    full: bool = False,
    orderby: str | None = None,
) -> list[Any]:
    flt = compile_filter(expr) if expr else None
    result: list[Any] = json.loads(store.query(collection, flt, orderby, full=full))
    return result


# --- shapes --------------------------------------------------------------------------------------


def test_reload_task_full_shape(store: Store) -> None:
    doc = get(store, "reloadtask", RELOAD)
    assert list(doc) == [
        "id",
        "createdDate",
        "modifiedDate",
        "modifiedByUserName",
        "customProperties",
        "app",
        "isManuallyTriggered",
        "operational",
        "name",
        "taskType",
        "enabled",
        "taskSessionTimeout",
        "maxRetries",
        "tags",
        "isPartialReload",
        "privileges",
        "schemaPath",
    ]
    assert doc["schemaPath"] == "ReloadTask" and doc["taskType"] == 0 and doc["privileges"] is None
    assert ISO.match(doc["createdDate"]) and doc["modifiedByUserName"] == "INTERNAL\\sa_repository"
    assert doc["taskSessionTimeout"] == 1440 and doc["maxRetries"] == 0
    assert [t["name"] for t in doc["tags"]] == ["daily", "finance"]
    assert set(doc["tags"][0]) == {"id", "name", "privileges"}
    value = doc["customProperties"][0]
    assert set(value) == {
        "id",
        "createdDate",
        "modifiedDate",
        "modifiedByUserName",
        "value",
        "definition",
        "privileges",
        "schemaPath",
    }
    assert value["schemaPath"] == "CustomPropertyValue" and value["value"] == "finance"
    assert value["definition"]["name"] == "taskGroup"
    assert set(value["definition"]) == {"id", "name", "valueType", "choiceValues", "privileges"}
    assert set(doc["app"]) == {
        "id",
        "name",
        "appId",
        "publishTime",
        "published",
        "stream",
        "savedInProductVersion",
        "migrationHash",
        "availabilityStatus",
        "privileges",
    }
    assert doc["app"]["publishTime"] == NEVER and doc["app"]["stream"] is None
    last = doc["operational"]["lastExecutionResult"]
    assert last["status"] == 0 and last["startTime"] == NEVER and last["stopTime"] == NEVER
    assert last["duration"] == 0 and last["details"] == [] and last["executingNodeName"] == ""
    assert last["fileReferenceID"] == EMPTY_GUID
    assert doc["operational"]["nextExecution"] == NEVER


def test_external_program_task_follows_the_sample(store: Store) -> None:
    doc = get(store, "externalprogramtask", EXTERNAL)
    assert list(doc) == [
        "id",
        "createdDate",
        "modifiedDate",
        "modifiedByUserName",
        "customProperties",
        "path",
        "parameters",
        "qlikUser",
        "operational",
        "name",
        "taskType",
        "enabled",
        "taskSessionTimeout",
        "maxRetries",
        "tags",
        "privileges",
        "schemaPath",
    ]
    assert doc["taskType"] == 1 and doc["schemaPath"] == "ExternalProgramTask"
    assert store.get("reloadtask", EXTERNAL) is None
    assert store.get("externalprogramtask", RELOAD) is None


def test_collections_and_condensed_forms(store: Store) -> None:
    assert [t["name"] for t in query(store, "reloadtask")] == [
        "Reload sales",
        "Reload broken",
        "Reload off",
    ]
    condensed = query(store, "reloadtask")[0]
    assert set(condensed) == {
        "id",
        "operational",
        "name",
        "app",
        "taskType",
        "enabled",
        "privileges",
    }
    everything = query(store, "task", full=True)
    assert [t["taskType"] for t in everything] == [0, 0, 0, 1]
    assert {t["schemaPath"] for t in everything} == {"Task"}
    assert "app" not in everything[0]
    # Filters see the full model even behind a condensed list.
    assert [t["name"] for t in query(store, "task", "tags.name eq 'finance'", full=False)] == [
        "Reload sales"
    ]
    assert store.count("reloadtask") == 3
    assert store.count("task", compile_filter("customProperties.value eq 'ops'")) == 1


def test_ids_are_normalised_and_looked_up_case_insensitively(store: Store) -> None:
    assert get(store, "reloadtask", DISABLED)["id"] == DISABLED
    assert get(store, "reloadtask", RELOAD.upper())["id"] == RELOAD


def test_tags_and_definitions_are_shared_entities(store: Store) -> None:
    tags = query(store, "tag", full=True)
    assert [t["name"] for t in tags] == ["daily", "finance"]
    assert tags[0]["schemaPath"] == "Tag" and tags[0]["impactSecurityAccess"] is False
    sales = get(store, "reloadtask", RELOAD)
    broken = get(store, "reloadtask", FAILING)
    assert sales["tags"][0]["id"] == broken["tags"][0]["id"] == tags[0]["id"]
    definitions = query(store, "custompropertydefinition", full=True)
    group = next(d for d in definitions if d["name"] == "taskGroup")
    assert group["choiceValues"] == ["finance", "ops"]
    assert group["objectTypes"] == ["ReloadTask", "ExternalProgramTask"]
    assert group["schemaPath"] == "CustomPropertyDefinition"
    assert query(store, "custompropertydefinition", "objectTypes eq 'ExternalProgramTask'") == [
        {
            "id": group["id"],
            "name": "taskGroup",
            "valueType": "Text",
            "choiceValues": ["finance", "ops"],
            "privileges": None,
        }
    ]


def test_orderby(store: Store) -> None:
    names = [t["name"] for t in query(store, "task", orderby="taskType desc, name")]
    assert names == ["Run script", "Reload broken", "Reload off", "Reload sales"]


def test_bad_tasks_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="not a GUID"):
        store.add_task(SimTask("nope", "x"))
    with pytest.raises(ValueError, match="duplicate"):
        store.add_task(SimTask(RELOAD.upper(), "again"))
    with pytest.raises(ValueError, match="outcome"):
        store.add_task(SimTask("5b1d0c0e-1111-4a4a-8b8b-00000000000f", "x", outcome="meh"))


# --- executions -----------------------------------------------------------------------------------


def test_execution_lifecycle(store: Store, clock: Clock) -> None:
    outcome = store.start(RELOAD)
    assert outcome.created and outcome.execution_id is not None
    session = outcome.execution_id

    def result() -> dict[str, Any]:
        found = query(store, "executionresult", f"executionID eq {session}", full=True)
        assert len(found) == 1
        return found[0]  # type: ignore[no-any-return]

    triggered = result()
    assert triggered["status"] == 1 and triggered["startTime"] == NEVER
    assert triggered["taskID"] == RELOAD and triggered["executionID"] == session
    assert len(triggered["details"]) == 2
    assert get(store, "executionsession", session)["executionResult"]["status"] == 1

    clock.now += 1.5
    running = result()
    assert running["status"] == 2 and ISO.match(running["startTime"])
    assert running["stopTime"] == NEVER and running["duration"] == 0
    assert len(running["details"]) == 3
    task = get(store, "reloadtask", RELOAD)
    assert task["operational"]["lastExecutionResult"]["status"] == 2
    assert [s["id"] for s in query(store, "executionsession")] == [session]

    clock.now += 10
    done = result()
    assert done["status"] == 7 and done["duration"] == 10_000
    assert done["scriptLogAvailable"] is True and done["scriptLogLocation"].endswith(".log")
    messages = sorted(done["details"], key=lambda d: d["detailCreatedDate"])
    assert [m["message"] for m in messages] == [
        "Changing task state to Triggered",
        "Trying to start task. Sending task to slave-node sim-node1",
        "Changing task state from Triggered to Started",
        "Reference to scriptlog added",
        "Changing task state from Started to FinishedSuccess",
    ]
    assert {d["detailsType"] for d in done["details"]} == {2}
    assert store.get("executionsession", session) is None  # deleted when finished
    assert query(store, "executionsession") == []
    last = get(store, "reloadtask", RELOAD)["operational"]["lastExecutionResult"]
    assert last["id"] == done["id"] and last["status"] == 7
    assert get(store, "executionresult", done["id"])["executionID"] == session


def test_failing_task_ends_finished_fail(store: Store, clock: Clock) -> None:
    session = store.start(FAILING).execution_id
    clock.now += 100
    (result,) = query(store, "executionresult", f"executionid eq {session}", full=True)
    assert result["status"] == 8
    assert "Changing task state from Started to FinishedFail" in [
        d["message"] for d in result["details"]
    ]


def test_disabled_task_does_not_run(store: Store) -> None:
    outcome = store.start(DISABLED)
    assert outcome.execution_id is None and not outcome.created
    assert store.starts == [] and query(store, "executionresult") == []


def test_running_task_is_not_started_twice(store: Store, clock: Clock) -> None:
    first = store.start(RELOAD)
    clock.now += 2
    second = store.start(RELOAD)
    assert second.execution_id == first.execution_id and not second.created
    assert [s.task_id for s in store.starts] == [RELOAD]
    clock.now += 20
    third = store.start(RELOAD)
    assert third.created and third.execution_id != first.execution_id
    assert [(s.task_id, s.execution_id) for s in store.starts] == [
        (RELOAD, first.execution_id),
        (RELOAD, third.execution_id),
    ]
    assert store.starts[1].at == clock.now
    assert len(query(store, "executionresult", f"taskID eq {RELOAD}")) == 2


def test_external_program_execution(store: Store, clock: Clock) -> None:
    session = store.start(EXTERNAL).execution_id
    assert session is not None
    running = get(store, "executionsession", session)
    assert running["schemaPath"] == "ExecutionSession"
    assert running["externalProgramTask"]["id"] == EXTERNAL and running["reloadTask"] is None
    clock.now += 60
    (result,) = query(store, "executionresult", f"executionID eq {session}", full=True)
    assert result["status"] == 7 and result["appID"] == EMPTY_GUID
    assert result["scriptLogAvailable"] is False


def test_many_finished_executions_stay_cheap(store: Store, clock: Clock) -> None:
    sessions = []
    for _ in range(2000):
        sessions.append(store.start(RELOAD).execution_id)
        clock.now += 20
    assert query(store, "executionsession") == []
    chunk = " or ".join(f"executionID eq {s}" for s in sessions[100:140])
    assert len(query(store, "executionresult", chunk)) == 40


def test_replace_task(store: Store) -> None:
    task = store.task(RELOAD)
    assert task is not None and task.enabled
    task.enabled = False
    assert store.task(RELOAD).enabled  # type: ignore[union-attr]  # a copy was returned
    store.replace_task(task)
    assert get(store, "reloadtask", RELOAD)["enabled"] is False
    assert store.start(RELOAD).execution_id is None


def test_task_id_by_name(store: Store) -> None:
    assert store.task_id_by_name("RELOAD SALES") == RELOAD
    assert store.task_id_by_name("nothing") is None


# --- the scheduler: capacity, queue timeout, scripted outcomes, retries -----------------------------

Q1, Q2, Q3, Q4 = (f"5b1d0c0e-2222-4a4a-8b8b-00000000000{i}" for i in range(1, 5))


@pytest.fixture
def busy(clock: Clock) -> Store:
    """Four tasks of 10, 4, 2 and 5 s on a scheduler with two slots; Triggered for 1 s."""
    tasks = [SimTask(t, f"Queue {i}", run_seconds=r) for i, (t, r) in enumerate(zip((Q1, Q2, Q3, Q4), (10, 4, 2, 5), strict=True))]
    return Store(tasks, clock=clock, start_delay=1.0, retry_delay=0.5, max_concurrent=2)


def results(store: Store, session: str | None) -> list[dict[str, Any]]:
    """Every execution result row of one execution session (several with retries)."""
    return query(store, "executionresult", f"executionID eq {session}", full=True)


def result(store: Store, session: str | None) -> dict[str, Any]:
    (row,) = results(store, session)
    return row


def last_status(store: Store, task_id: str) -> int:
    status: int = get(store, "reloadtask", task_id)["operational"]["lastExecutionResult"]["status"]
    return status


def iso_at(clock: Clock, offset: float) -> str:
    return iso(clock.start + offset)


def messages(row: dict[str, Any]) -> list[str]:
    return [d["message"] for d in sorted(row["details"], key=lambda d: d["detailCreatedDate"])]


def test_beyond_max_concurrent_executions_queue_and_start_in_trigger_order(busy: Store, clock: Clock) -> None:
    sessions = [busy.start(t).execution_id for t in (Q1, Q2, Q3, Q4)]
    assert len(busy.starts) == 4
    clock.at(0.5)
    assert [last_status(busy, t) for t in (Q1, Q2, Q3, Q4)] == [1, 1, 1, 1]
    clock.at(1.5)
    assert [last_status(busy, t) for t in (Q1, Q2, Q3, Q4)] == [2, 2, 3, 3]
    queued = result(busy, sessions[2])
    assert queued["status"] == 3 and queued["startTime"] == NEVER and queued["executingNodeName"] == ""
    assert messages(queued)[-1] == "Changing task state from Triggered to Queued"
    assert get(busy, "executionsession", sessions[3])["executionResult"]["status"] == 3
    assert len(query(busy, "executionsession")) == 4  # a queued execution has its session
    clock.at(5.5)  # Q2 (4 s) ended at 5: Q3 took its slot, Q4 still waits
    assert [last_status(busy, t) for t in (Q1, Q2, Q3, Q4)] == [2, 7, 2, 3]
    started = result(busy, sessions[2])
    assert started["startTime"] == iso_at(clock, 5.0)
    assert messages(started)[-1] == "Changing task state from Queued to Started"
    clock.at(7.5)  # Q3 (2 s) ended at 7, before Q1: Q4 took that slot
    assert [last_status(busy, t) for t in (Q1, Q2, Q3, Q4)] == [2, 7, 7, 2]
    assert result(busy, sessions[3])["startTime"] == iso_at(clock, 7.0)
    clock.at(12.5)
    assert [last_status(busy, t) for t in (Q1, Q2, Q3, Q4)] == [7, 7, 7, 7]
    assert result(busy, sessions[3])["duration"] == 5000  # queueing is not run time
    assert query(busy, "executionsession") == []


def test_queue_timeout_cancels_a_queued_execution_which_never_runs(busy: Store, clock: Clock) -> None:
    busy.max_concurrent = 1
    busy.queue_timeout = 3
    first = busy.start(Q1).execution_id  # runs 1-11
    second = busy.start(Q2).execution_id  # Queued from 1, cancelled at 4
    clock.at(3.9)
    assert last_status(busy, Q2) == 3
    clock.at(4.1)
    row = result(busy, second)
    assert row["status"] == 6 and row["startTime"] == NEVER and row["duration"] == 0
    assert row["stopTime"] == iso_at(clock, 4.0) and row["scriptLogAvailable"] is False
    assert messages(row)[-2:] == [
        "Task was cancelled: it waited in the scheduler queue longer than the queue timeout (3 seconds)",
        "Changing task state from Queued to Aborted",
    ]
    assert busy.get("executionsession", str(second)) is None
    assert last_status(busy, Q1) == 2 and last_status(busy, Q2) == 6
    # It held no slot: a new start waits for Q1, not for the cancelled one.
    busy.queue_timeout = None
    third = busy.start(Q2)
    assert third.created and third.execution_id != second
    clock.at(10.9)
    assert last_status(busy, Q2) == 3
    clock.at(11.1)
    assert last_status(busy, Q2) == 2 and result(busy, first)["status"] == 7


def test_a_queued_task_is_not_triggered_twice(busy: Store, clock: Clock) -> None:
    busy.max_concurrent = 1
    busy.start(Q1)
    queued = busy.start(Q2)
    clock.at(2)
    assert last_status(busy, Q2) == 3
    again = busy.start(Q2)
    assert again.execution_id == queued.execution_id and not again.created
    assert [s.task_id for s in busy.starts] == [Q1, Q2]
    assert len(query(busy, "executionresult", f"taskID eq {Q2}")) == 1


def test_raising_max_concurrent_starts_queued_executions_at_once(busy: Store, clock: Clock) -> None:
    busy.max_concurrent = 1
    sessions = [busy.start(t).execution_id for t in (Q1, Q2, Q3)]
    clock.at(2)
    assert [last_status(busy, t) for t in (Q1, Q2, Q3)] == [2, 3, 3]
    busy.max_concurrent = 0
    assert [last_status(busy, t) for t in (Q1, Q2, Q3)] == [2, 2, 2]
    assert result(busy, sessions[2])["startTime"] == iso_at(clock, 2)


def test_lowering_max_concurrent_queues_new_executions_until_enough_have_ended(busy: Store, clock: Clock) -> None:
    busy.max_concurrent = 0
    busy.start(Q1)  # runs 1-11
    busy.start(Q2)  # runs 1-5
    clock.at(2)
    busy.max_concurrent = 1  # two run already: a third waits for both to end
    session = busy.start(Q3).execution_id
    clock.at(6)
    assert last_status(busy, Q3) == 3
    clock.at(11.5)
    assert last_status(busy, Q3) == 2 and result(busy, session)["startTime"] == iso_at(clock, 11)


def test_shortening_the_queue_timeout_cancels_what_waited_longer(busy: Store, clock: Clock) -> None:
    busy.max_concurrent = 1
    busy.start(Q1)
    session = busy.start(Q2).execution_id
    clock.at(5)
    busy.queue_timeout = 2  # Q2 has been Queued since 1
    row = result(busy, session)
    assert row["status"] == 6 and row["stopTime"] == iso_at(clock, 5)


def test_scheduler_settings_are_checked(busy: Store) -> None:
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="max_concurrent"):
            busy.max_concurrent = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="queue_timeout"):
        busy.queue_timeout = -5
    busy.queue_timeout = 0
    assert busy.queue_timeout is None
    with pytest.raises(ValueError, match="fail_first"):
        busy.add_task(SimTask("5b1d0c0e-2222-4a4a-8b8b-0000000000ff", "x", fail_first=-1))
    with pytest.raises(ValueError, match="run_seconds"):
        busy.add_task(SimTask("5b1d0c0e-2222-4a4a-8b8b-0000000000ff", "x", run_seconds=-1))


def test_fail_first_fails_the_first_runs_then_follows_outcome(clock: Clock) -> None:
    store = Store([SimTask(Q1, "Flaky", run_seconds=1, fail_first=2)], clock=clock, start_delay=0)
    statuses = []
    for run in range(4):
        session = store.start(Q1).execution_id
        clock.at(10 * (run + 1))
        statuses.append(result(store, session)["status"])
    assert statuses == [8, 8, 7, 7]
    first = result(store, store.starts[0].execution_id)
    assert messages(first)[-1] == "Changing task state from Started to FinishedFail"
    assert get(store, "reloadtask", Q1)["maxRetries"] == 0  # no retries: one row per run


def test_a_run_cancelled_in_the_queue_does_not_count_as_a_run(busy: Store, clock: Clock) -> None:
    busy.replace_task(SimTask(Q2, "Queue 1", run_seconds=4, fail_first=1))
    busy.max_concurrent = 1
    busy.queue_timeout = 1
    busy.start(Q1)
    cancelled = busy.start(Q2).execution_id
    clock.at(20)
    assert result(busy, cancelled)["status"] == 6
    ran = busy.start(Q2).execution_id
    clock.at(40)
    assert result(busy, ran)["status"] == 8  # the first run that ran: still within fail_first


def test_max_retries_retries_a_failed_run_within_the_same_session(clock: Clock) -> None:
    store = Store(
        [SimTask(Q1, "Flaky", run_seconds=2, fail_first=2, max_retries=3)],
        clock=clock,
        start_delay=1.0,
        retry_delay=0.5,
    )
    assert get(store, "reloadtask", Q1)["maxRetries"] == 3
    session = store.start(Q1).execution_id
    clock.at(2)  # attempt 1 runs 1-3
    assert [r["status"] for r in results(store, session)] == [2]
    clock.at(3.2)  # Retry until 3.5
    (first,) = results(store, session)
    assert first["status"] == 10 and first["stopTime"] == NEVER
    assert messages(first)[-1] == "Changing task state from Started to Retry"
    assert get(store, "executionsession", str(session))["executionResult"]["status"] == 10
    assert last_status(store, Q1) == 10
    clock.at(4)  # attempt 2 runs 3.5-5.5
    first, second = results(store, session)
    assert (first["status"], second["status"]) == (8, 2)
    assert first["stopTime"] == iso_at(clock, 3) and first["duration"] == 2000
    assert second["startTime"] == iso_at(clock, 3.5) and second["executionID"] == session
    assert messages(first)[-1] == "Retry 1 of 3: the task was started again"
    assert messages(second) == ["Changing task state from Retry to Started"]
    live = get(store, "executionsession", str(session))
    assert live["retries"] == 1 and live["executionResult"]["id"] == second["id"]
    operational = get(store, "reloadtask", Q1)["operational"]["lastExecutionResult"]
    assert operational["id"] == second["id"] and operational["status"] == 2
    clock.at(9)  # attempt 3 runs 6-8 and succeeds (run 3 > fail_first)
    rows = results(store, session)
    assert [r["status"] for r in rows] == [8, 8, 7]
    assert len({r["id"] for r in rows}) == 3 and {r["executionID"] for r in rows} == {session}
    # The newest row by (startTime, modifiedDate), as a client picks it, is the last attempt.
    newest = max(rows, key=lambda r: (r["startTime"], r["modifiedDate"]))
    assert newest["id"] == rows[2]["id"] and newest["startTime"] == iso_at(clock, 6)
    assert store.get("executionsession", str(session)) is None
    assert last_status(store, Q1) == 7
    by_start = query(store, "executionresult", f"executionID eq {session}", full=True, orderby="startTime desc")
    assert by_start[0]["id"] == rows[2]["id"]


def test_retries_exhausted_end_finished_fail_and_hold_the_slot(clock: Clock) -> None:
    store = Store(
        [SimTask(Q1, "Broken", run_seconds=2, outcome="fail", max_retries=1), SimTask(Q2, "Next", run_seconds=1)],
        clock=clock,
        start_delay=0,
        retry_delay=0.5,
        max_concurrent=1,
    )
    session = store.start(Q1).execution_id  # attempts 0-2 and 2.5-4.5
    waiting = store.start(Q2).execution_id
    clock.at(2.2)
    assert last_status(store, Q1) == 10 and last_status(store, Q2) == 3  # Retry keeps the slot
    clock.at(5)
    assert [r["status"] for r in results(store, session)] == [8, 8]
    assert result(store, waiting)["startTime"] == iso_at(clock, 4.5)
