"""The resume plan (pure): after a crash, report what was recorded, ask QRS about uncertain
starts, start only what never was sent."""

from __future__ import annotations

from butler_mqtt.model import TaskOutcome
from butler_mqtt.resume import intent_key, plan_resume

A, B, C = "a" * 8, "b" * 8, "c" * 8


def outcomes() -> list[TaskOutcome]:
    return [TaskOutcome(t, t.upper(), "started") for t in (A, B, C)]


def test_a_new_request_starts_everything():
    steps = plan_resume(outcomes(), None, {}, None)
    assert [s.action for s in steps] == ["start", "start", "start"]


def test_recorded_outcomes_are_reported_uncertain_starts_recovered_the_rest_started():
    recorded = {A: {"event": "task", "taskId": A, "status": "started", "executionId": "e1"}}
    steps = plan_resume(outcomes(), lambda t, _s: recorded.get(t), {intent_key(B, None): 100.0}, None)
    assert [(s.outcome.task_id, s.action) for s in steps] == [(A, "report"), (B, "recover"), (C, "start")]
    assert steps[0].recorded == recorded[A] and steps[1].since == 100.0


def test_intents_are_per_stage():
    # B was about to start in stage 0; in stage 1 nothing is known about it yet.
    intents = {intent_key(B, 0): 5.0}
    steps = plan_resume(outcomes(), lambda _t, _s: None, intents, 1)
    assert [s.action for s in steps] == ["start", "start", "start"]
    steps = plan_resume(outcomes(), lambda _t, _s: None, intents, 0)
    assert [s.action for s in steps] == ["start", "recover", "start"]
    assert intent_key(B, None) == B and intent_key(B, 2) == f"2/{B}"
