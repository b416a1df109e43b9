"""The simulator's repository: QRS object shapes and the execution lifecycle on a fake clock."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from butler_mqtt.sim import SimTask
from butler_mqtt.sim.filter import compile_filter
from butler_mqtt.sim.store import EMPTY_GUID, NEVER, Store

RELOAD = "5b1d0c0e-1111-4a4a-8b8b-000000000001"
FAILING = "5b1d0c0e-1111-4a4a-8b8b-000000000002"
DISABLED = "5b1d0c0e-1111-4a4a-8b8b-000000000003"
EXTERNAL = "5b1d0c0e-1111-4a4a-8b8b-000000000004"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


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
