"""REST body conversions without a server: seed merge, Butler's array, Butler's response."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from butler_mqtt.errors import RequestRejected
from butler_mqtt.http.bodies import (
    ButlerPlan,
    butler_plan,
    butler_response,
    parse_flag,
    path_task_id,
    seed_request,
    summary_response,
)
from butler_mqtt.model import EMPTY_GUID, StartRequest
from butler_mqtt.service import KeyLocks

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"


def rejected(fn: Any, *args: Any) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        fn(*args)
    return info.value


def test_parse_flag():
    assert parse_flag([]) is None
    assert parse_flag(["true"]) is True and parse_flag(["false"]) is False
    for bad in (["True"], ["1"], [""], ["true", "true"]):
        assert "allTaskIdsMustExist" in rejected(parse_flag, bad).details


def test_path_task_id():
    assert path_task_id("-") is None and path_task_id(" - ") is None
    assert path_task_id(T1) == T1


def test_seed_merges_the_path_id_first():
    assert seed_request({}, T1.upper(), None).taskId == [T1]
    assert seed_request({"taskId": T2}, T1, None).taskId == [T1, T2]
    assert seed_request({"taskId": [T2], "tag": "x"}, T1, True).allTaskIdsMustExist is True
    assert seed_request({"tag": "x"}, None, False).taskId == []


def test_seed_rejections():
    assert rejected(seed_request, {}, "123", None).error == "Invalid task ID format"
    assert rejected(seed_request, {}, None, None).details.startswith("at least one of")
    assert "unknown field 'colour'" in rejected(seed_request, {"tag": "a", "colour": 1}, None, None).details
    assert "differs" in rejected(seed_request, {"tag": "a", "allTaskIdsMustExist": False}, None, True).details
    # a wrong type stays a type error, whatever the path holds
    assert "taskId" in rejected(seed_request, {"taskId": 5}, T1, None).details
    assert "allTaskIdsMustExist" in rejected(seed_request, {"tag": "a", "allTaskIdsMustExist": "yes"}, None, True).details


def item(kind: str, **payload: str) -> dict[str, Any]:
    return {"type": kind, "payload": payload}


def test_butler_plan_collects_criteria_and_invalid_ids():
    plan = butler_plan(
        [item("starttaskid", taskId=T2.upper()), item("starttaskid", taskId="nope"), item("starttasktag", tag="t"),
         item("starttaskcustomproperty", customPropertyName="n", customPropertyValue="v"), item("starttaskid", taskId="nope")],
        T1,
        None,
    )
    assert plan.request is not None
    assert plan.request.taskId == [T1, T2] and plan.request.tag == ["t"]
    assert [(c.name, c.value) for c in plan.request.customProperty] == [("n", "v")]
    assert plan.invalid == ["nope"] and plan.sentinel is None


def test_butler_plan_only_invalid_ids_needs_no_pipeline():
    plan = butler_plan([], "not-a-guid", True)
    assert plan.request is None and plan.invalid == ["not-a-guid"]


def test_butler_plan_all_must_exist_with_a_malformed_id_blocks_id_starts():
    plan = butler_plan([item("starttaskid", taskId="bad")], T1, True)
    assert plan.request is not None and plan.request.allTaskIdsMustExist
    assert plan.request.taskId == [T1, EMPTY_GUID] and plan.sentinel == EMPTY_GUID
    # without the flag, or with only tags, nothing is added
    assert butler_plan([item("starttaskid", taskId="bad")], T1, False).sentinel is None
    assert butler_plan([item("starttaskid", taskId="bad"), item("starttasktag", tag="t")], None, True).sentinel is None


@pytest.mark.parametrize(
    "items, error, fragment",
    [
        ([], "Invalid request", "nothing to start"),
        ([item("keyvaluestore", namespace="a", key="b", value="c")], "Not supported", "keyvaluestore"),
        ([{"type": "starttaskid"}], "Invalid request", "item 0 (starttaskid) payload"),
        ([item("starttasktag", tag="t"), {"type": "other", "payload": {}}], "Invalid request", "item 1"),
        ([item("starttaskid", taskid=T1)], "Invalid request", "payload.taskid: unknown field"),
        ([{"type": "starttasktag", "payload": {"tag": 1}}], "Invalid request", "payload.tag"),
        ([item("starttasktag", tag="")], "Invalid request", "tag must not be empty"),
        (["starttaskid"], "Invalid request", "item 0"),
    ],
)
def test_butler_plan_rejections(items, error, fragment):
    err = rejected(butler_plan, items, None, None)
    assert err.error == error and fragment in err.details


def task(tid: str, status: str, *matched: str, reason: str | None = None) -> dict[str, Any]:
    ev = {"event": "task", "requestId": None, "taskId": tid, "taskName": f"name-{tid[:1]}", "status": status, "matchedBy": list(matched)}
    if reason:
        ev["reason"] = reason
    return ev


def test_butler_response_sorts_events_into_sections():
    req = StartRequest(taskId=[T1, EMPTY_GUID], tag=["a", "b"], customProperty=[{"name": "n", "value": "v"}])  # type: ignore[list-item]
    plan = ButlerPlan(req, invalid=["bad"], sentinel=EMPTY_GUID)
    events = [
        task(T1, "started", f"taskId:{T1}", "tag:a", "customProperty:n=v"),
        task(T2, "denied", "tag:a", "tag:b", reason="not on the start_filter allow-list"),
        task("33333333-3333-4333-8333-333333333333", "notStarted", "tag:b", reason="disabled"),
        {"event": "summary", "tasksNotFound": [{"taskId": EMPTY_GUID}, {"customProperty": {"name": "x", "value": "y"}}]},
    ]
    res = butler_response(plan, events)
    ref1 = {"taskId": T1, "taskName": "name-1"}
    assert res["tasksId"] == {"started": [ref1], "invalid": [{"taskId": "bad"}], "denied": []}
    assert res["tasksTag"] == [ref1] and res["tasksCP"] == [ref1]
    assert res["tasksTagDenied"] == [{"tag": "a", "taskId": T2, "taskName": "name-2"}, {"tag": "b", "taskId": T2, "taskName": "name-2"}]
    assert res["tasksCPDenied"] == []
    assert res["tasksNotStarted"] == [
        {"taskId": "33333333-3333-4333-8333-333333333333", "taskName": "name-3", "status": "notStarted", "reason": "disabled"}
    ]
    assert res["tasksNotFound"] == [{"customProperty": {"name": "x", "value": "y"}}]


def test_butler_response_without_pipeline():
    assert butler_response(ButlerPlan(None, ["x"]), [])["tasksId"]["invalid"] == [{"taskId": "x"}]


def test_summary_response_drops_event():
    summary = {"event": "summary", "requestId": "r", "totalTasksStarted": 0}
    assert summary_response([{"event": "task"}, summary]) == {"requestId": "r", "totalTasksStarted": 0}
    with pytest.raises(LookupError):
        summary_response([])


def test_key_locks_serialise_the_same_key_only():
    locks = KeyLocks()
    order: list[str] = []

    def hold(key: str | None, name: str, pause: float) -> None:
        with locks.hold(key):
            order.append(f"{name}+")
            time.sleep(pause)
            order.append(f"{name}-")

    first = threading.Thread(target=hold, args=("k", "a", 0.1))
    first.start()
    time.sleep(0.02)
    second = threading.Thread(target=hold, args=("k", "b", 0))
    other = threading.Thread(target=hold, args=("j", "c", 0))
    second.start()
    other.start()
    for t in (first, second, other):
        t.join()
    assert order.index("a-") < order.index("b+")  # same key: one after the other
    assert order.index("c-") < order.index("a-")  # another key did not wait
    assert locks._locks == {}  # nothing left behind
