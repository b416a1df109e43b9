"""The readers of replies (replies.py): the accessors the REST answers, the CLI, the requester
and the metrics read replies with, and the REST summary schema taken from the reply's own
(replies/types.py, which tests/unit/test_asyncapi.py holds to the builders)."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from butler_mqtt import replies
from butler_mqtt.http import schemas
from butler_mqtt.model import TaskOutcome
from butler_mqtt.replies.types import SummaryEvent

FULL = TaskOutcome("t1", "Load", "notStarted", ["tag:a"], execution_id="e1", reason="disabled")


def test_openapi_summary_is_the_summary_reply_without_event():
    summary = schemas.component_schemas()["Summary"]
    wire = set(SummaryEvent.__required_keys__) | set(SummaryEvent.__optional_keys__)  # type: ignore[attr-defined]
    assert set(summary["properties"]) == wire - {"event"}
    assert "event" not in summary["required"] and "stage" not in summary["required"]
    # a repeated request's answer is the earlier one, marked replayed (issue 25)
    built = replies.without_event(replies.replayed(replies.summary("r", [FULL], [{"tag": "x"}], stage=0)))
    assert set(built) == set(summary["properties"])  # the REST answer is exactly what is documented


def test_summary_schemas_do_not_shadow_the_other_components():
    _, top = models_json_schema(
        [(schemas.ButlerResponse, "serialization"), (schemas.Health, "serialization"), (schemas.HistoryPage, "serialization")],
        ref_template=schemas.REF,
    )
    assert not set(top["$defs"]) & set(schemas.summary_schemas())


def test_summary_of_is_the_first_stage_summary_and_without_event_drops_event():
    later = replies.summary("r", [], [], stage=1)
    first = replies.summary("r", [FULL], [], stage=0)
    events = [replies.task(FULL, "r", 0), later, first]
    assert replies.summary_of(events) is first
    assert replies.summary_of([later]) is None and replies.summary_of([]) is None
    body = replies.without_event(first)
    assert "event" not in body and body["stage"] == 0 and body["tasksStarted"] == first["tasksStarted"]


def test_first_stage_tasks_skip_later_stages_and_other_events():
    own, later = replies.task(FULL, "r"), replies.task(FULL, "r", stage=2)
    assert replies.first_stage_tasks([own, later, replies.error("r", "E", "D")]) == [own]


def test_ends_request_still_queued_and_reload_failed():
    summary, error = replies.summary("r", [], []), replies.error("r", "E", "D")
    done = replies.request_finished("r", {}, None, 1, None)
    assert replies.ends_request(summary, waits=False) and not replies.ends_request(summary, waits=True)
    assert replies.ends_request(done, waits=True) and replies.ends_request(error, waits=True)
    queued = replies.task(TaskOutcome("t1", "Load", "queued", position=1), "r")
    started = replies.task(TaskOutcome("t1", "Load", "started", execution_id="e"), "r")
    assert replies.still_queued([queued, summary]) and not replies.still_queued([queued, summary, started])
    ok = replies.task_finished("r", "t", "T", "e", "FinishedSuccess", None)
    bad = replies.task_finished("r", "t", "T", "e", "FinishedFail", None)
    assert not replies.reload_failed(ok) and replies.reload_failed(bad) and not replies.reload_failed(summary)
    assert replies.kind({"event": 3}) is None and replies.kind(error) == replies.ERROR
    assert set(replies.TASK_STATUSES) >= {"started", "queued", "alreadyRunning", "expired"}
