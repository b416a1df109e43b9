"""Pure rules of contract section 8: the restart and deadline-stop policies, the failure object's
caps, the stop request model and the stop summary."""

from __future__ import annotations

import pytest

from butler_mqtt import replies
from butler_mqtt.config import PoliciesConfig
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import StartRequest, TaskOutcome, validate_stop
from butler_mqtt.policies import (
    Policy,
    decide,
    effective,
    retried_after,
    stops_at_deadline,
    stops_running,
)

T = "a8b4c123-def4-4678-9abc-def012345678"
E = "5c6a1f4e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"


def test_restart_stops_a_running_task_and_later_requests_join():
    p = Policy(if_running="restart")
    assert decide(p, running=True, waiting=False) == "restart"
    assert decide(p, running=True, waiting=True) == "join"
    assert decide(p, running=False, waiting=False) == "start"
    assert stops_running(p, "restart", True) and stops_running(p, "join", True)
    assert not stops_running(p, "start", False) and not stops_running(Policy(if_running="queue"), "rerun", True)


def test_on_deadline_layers_and_a_deadline_stop_is_never_retried():
    cfg = PoliciesConfig(on_deadline="stop", deadline=60)
    assert stops_at_deadline(effective(cfg))
    req = StartRequest(taskId=[T], onDeadline="notify")
    assert not stops_at_deadline(effective(cfg, req))
    assert not stops_at_deadline(effective(PoliciesConfig(on_deadline="stop")))  # no deadline: nothing to stop at
    assert retried_after("Aborted", False) and not retried_after("Aborted", True)
    assert not retried_after("FinishedSuccess", False)


def test_the_failure_object_is_capped_and_valid_utf8():
    failure = {"message": "m" * 4999 + "\x00", "details": ["d" * 3000, 7], "scriptLogTail": ["x" * 2000] * 200 + ["\ud800last"],
               "scriptLogError": None, "secret": "never copied"}
    ev = replies.task_finished("r", T, "Task", E, "FinishedFail", None, failure=failure)
    out = ev["failure"]
    assert set(out) == {"message", "details", "scriptLogTail"}
    assert len(out["message"]) == 2000 and "\x00" not in replies.failure_info({"message": "a\x00b\nc"})["message"]
    assert [len(d) for d in out["details"]] == [1000, 1]
    assert all(len(line) <= 1000 for line in out["scriptLogTail"])
    assert sum(len(line.encode()) + 1 for line in out["scriptLogTail"]) <= 64 * 1024
    assert out["scriptLogTail"][-1] == "?last"  # the last lines are kept; a lone surrogate is replaced
    assert "failure" not in replies.task_finished("r", T, "Task", E, "FinishedSuccess", None, failure=failure)


@pytest.mark.parametrize("bad, details", [
    ({"tag": "x", "dryRun": True}, "unknown field 'dryRun'"),
    ({"tag": "x", "then": {"tag": "y"}}, "unknown field 'then'"),
    ({"taskId": "nope"}, "Task ID must be a valid GUID"),
    ({"requestId": "r"}, "at least one of taskId, tag, customProperty"),
    ({"tag": "x", "wait": "yes"}, "field 'wait'"),
    (["tag"], "JSON object"),
])
def test_a_stop_request_takes_selectors_request_id_and_wait_only(bad, details):
    with pytest.raises(RequestRejected) as err:
        validate_stop(bad)
    assert details in err.value.details


def test_the_stop_summary_lists_each_task_once():
    outcomes = [TaskOutcome(T, "A", "stopping", [], E), TaskOutcome(E, "B", "notRunning", []),
                TaskOutcome(T, "C", "denied", [], reason="not on the start_filter allow-list")]
    s = replies.stop_summary("r", outcomes, [{"tag": "none"}])
    assert s["tasksStopping"] == [{"taskId": T, "taskName": "A", "status": "stopping", "executionId": E}]
    assert [t["taskName"] for t in s["tasksNotRunning"]] == ["B"] and s["tasksDenied"][0]["taskName"] == "C"
    assert s["tasksNotFound"] == [{"tag": "none"}] and s["tasksFailed"] == []


@pytest.mark.parametrize("section, bad", [
    ("tracking", {"script_log_lines": -1}), ("tracking", {"script_log_lines": 1001}),
    ("tracking", {"script_log_deadline": 0}), ("tracking", {"script_log_deadline": 301}),
    ("policies", {"on_deadline": "kill"}), ("policies", {"if_running": "restart-now"}),
])
def test_section8_config_keys_are_validated_at_load(section, bad):
    from pydantic import ValidationError

    from butler_mqtt.config import Config

    with pytest.raises(ValidationError) as err:
        Config.model_validate({section: bad})
    assert f"{section}.{next(iter(bad))}" in str(err.value).replace("\n", ".")
    assert Config.model_validate({"tracking": {"script_log_lines": 0}}).tracking.script_log_lines == 0
