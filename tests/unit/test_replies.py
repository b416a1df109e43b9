"""The readers of replies (replies.py): typed views that hold what the builders emit, and the
accessors the REST answers, the CLI, the requester and the OpenAPI document read replies with."""

from __future__ import annotations

from butler_mqtt import replies
from butler_mqtt.http import schemas
from butler_mqtt.model import TaskOutcome

FULL = TaskOutcome("t1", "Load", "notStarted", ["tag:a"], execution_id="e1", reason="disabled")


def keys(view: type) -> set[str]:
    return set(view.__required_keys__) | set(view.__optional_keys__)  # type: ignore[attr-defined]


def test_typed_views_name_every_key_the_builders_emit():
    task = replies.task(FULL, "r", stage=1)
    summary = replies.summary("r", [FULL, TaskOutcome("t2", "Other", "denied", reason="no")], [{"tag": "x"}], stage=0)
    assert set(task) == keys(replies.TaskEvent), "replies.task and replies.TaskEvent differ: update the view"
    assert set(summary) == keys(replies.SummaryEvent), "replies.summary and replies.SummaryEvent differ: update the view"
    assert set(summary["tasksStarted"][0]) == keys(replies.TaskBrief)
    assert keys(replies.SummaryEvent) - keys(replies.SummaryBody) == {"event"}


def test_openapi_summary_is_derived_from_the_typed_view():
    defs = schemas.component_schemas()
    assert set(defs["Summary"]["properties"]) == keys(replies.SummaryBody)
    assert defs["TaskBrief"]["properties"]["status"]["enum"] == list(replies.TASK_STATUSES)
    assert "stage" not in defs["Summary"]["required"] and "reason" not in defs["TaskBrief"]["required"]


def test_summary_of_is_the_first_stage_summary_and_summary_body_drops_event():
    later = replies.summary("r", [], [], stage=1)
    first = replies.summary("r", [FULL], [], stage=0)
    events = [replies.task(FULL, "r", 0), later, first]
    assert replies.summary_of(events) is first
    assert replies.summary_of([later]) is None and replies.summary_of([]) is None
    body = replies.summary_body(first)
    assert "event" not in body and body["stage"] == 0 and body["tasksStarted"] == first["tasksStarted"]


def test_first_stage_tasks_skip_later_stages_and_other_events():
    own, later = replies.task(FULL, "r"), replies.task(FULL, "r", stage=2)
    assert replies.first_stage_tasks([own, later, replies.error("r", "E", "D")]) == [own]


def test_ends_request_and_reload_failed():
    summary, error = replies.summary("r", [], []), replies.error("r", "E", "D")
    done = replies.request_finished("r", {}, None, 1, None)
    assert replies.ends_request(summary, waits=False) and not replies.ends_request(summary, waits=True)
    assert replies.ends_request(done, waits=True) and replies.ends_request(error, waits=True)
    ok = replies.task_finished("r", "t", "T", "e", "FinishedSuccess", None)
    bad = replies.task_finished("r", "t", "T", "e", "FinishedFail", None)
    assert not replies.reload_failed(ok) and replies.reload_failed(bad) and not replies.reload_failed(summary)
    assert replies.kind({"event": 3}) is None and replies.kind(error) == replies.ERROR
