"""`appId` on client-managed Qlik Sense (contract section 9): every reload task of the app, through
the real broker and the QRS simulator; the Qlik Cloud-only fields are refused naming the backend."""

from __future__ import annotations

import pytest

from butler_mqtt.sim import SimTask

pytestmark = pytest.mark.integration

APP = "0a0b0c0d-1111-4222-8333-444455556666"
OTHER = "9a9b9c9d-1111-4222-8333-444455556666"
T1 = "11111111-aaaa-4bbb-8ccc-000000000001"
T2 = "11111111-aaaa-4bbb-8ccc-000000000002"
T3 = "11111111-aaaa-4bbb-8ccc-000000000003"
TASKS = [
    SimTask(T1, "Orders load", tags=["it's & #1"], app_id=APP, app_name="Orders"),
    SimTask(T2, "Orders publish", app_id=APP, app_name="Orders"),
    SimTask(T3, "Other app", app_id=OTHER, app_name="Other"),
]


def test_app_id_selects_the_reload_tasks_of_that_app(sim, cfg, start_daemon, requester):
    start_daemon(cfg)
    missing = "22222222-aaaa-4bbb-8ccc-000000000009"
    events = requester.request({"requestId": "q1", "appId": [APP.upper(), missing], "tag": "it's & #1", "dryRun": True})
    tasks = {e["taskId"]: e for e in events if e["event"] == "task"}
    assert set(tasks) == {T1, T2}
    assert tasks[T1]["matchedBy"] == [f"appId:{APP}", "tag:it's & #1"] and tasks[T2]["matchedBy"] == [f"appId:{APP}"]
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["tasksNotFound"] == [{"appId": missing}]
    events = requester.request({"requestId": "q2", "appId": [APP, missing], "allTaskIdsMustExist": True})
    assert {e["status"] for e in events if e["event"] == "task"} == {"denied"}
    assert sim.starts == []


@pytest.mark.parametrize(("field", "value"), [("space", "Finance"), ("partial", True), ("variables", {"a": "b"})])
def test_cloud_only_fields_are_refused_naming_the_backend(sim, cfg, start_daemon, requester, field, value):
    start_daemon(cfg)
    events = requester.request({"requestId": f"c-{field}", "appId": APP, field: value})
    assert [e["event"] for e in events] == ["error"] and "backend: cloud" in events[0]["details"], events
    assert sim.starts == []
