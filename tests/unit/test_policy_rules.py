"""Pure run-policy rules (contract section 7): effective policy, decisions, retry delays."""

from __future__ import annotations

import pytest

from butler_mqtt.config import PoliciesConfig
from butler_mqtt.model import QrsTask, StartRequest, is_running_status
from butler_mqtt.policies import Policy, decide, effective, retries_left, retry_delay

T = "a8b4c123-def4-5678-9abc-def012345678"


def req(**kw: object) -> StartRequest:
    return StartRequest.model_validate({"taskId": T, **kw})


def test_effective_stage_then_root_then_config() -> None:
    cfg = PoliciesConfig(if_running="skip", max_running=3, retry={"attempts": 1, "delay": 10}, deadline=99)
    assert effective(cfg) == Policy("skip", 3, 3600, 1, 10.0, 99.0, 5)
    root = req(ifRunning="queue", priority=8, retry={"attempts": 2, "delay": 5})
    stage = req(ifRunning="attach", deadline=30)
    p = effective(cfg, root, stage)
    assert (p.if_running, p.priority, p.retry_attempts, p.retry_delay, p.deadline) == ("attach", 8, 2, 5.0, 30.0)
    assert effective(cfg, root, None).if_running == "queue"


@pytest.mark.parametrize(
    ("if_running", "max_running", "running", "waiting", "action"),
    [
        ("start", 0, True, False, "start"),  # Butler's behaviour: start anyway
        ("start", 0, True, True, "start"),  # a rerun others queued does not stop a plain start
        ("attach", 0, True, False, "attach"),
        ("attach", 0, False, False, "start"),
        ("skip", 0, True, True, "skip"),
        ("queue", 0, True, False, "rerun"),
        ("queue", 0, True, True, "join"),  # at most one rerun per task
        ("queue", 0, False, False, "start"),
        ("start", 2, False, False, "slot"),
        ("start", 2, True, False, "slot"),
        ("start", 2, False, True, "join"),
        ("queue", 2, True, False, "rerun"),
        ("attach", 2, True, True, "attach"),
    ],
)
def test_decide(if_running: str, max_running: int, running: bool, waiting: bool, action: str) -> None:
    policy = Policy(if_running=if_running, max_running=max_running)  # type: ignore[arg-type]
    assert decide(policy, running, waiting) == action


def test_retry_delay_doubles_and_caps() -> None:
    p = Policy(retry_attempts=3, retry_delay=1000)
    assert [retry_delay(p, k) for k in (1, 2, 3)] == [1000, 2000, 3600]
    assert [retries_left(p, k) for k in (1, 3, 4)] == [True, True, False]
    assert Policy(retry_delay=60).follows is False and Policy(deadline=5).follows is True


def test_running_state_from_last_execution_result() -> None:
    def task(status: object, rid: object = "17f49de9-dfc6-4c4c-aa04-bdf39d10bd87") -> QrsTask:
        return QrsTask.from_qrs({"id": T, "name": "x", "operational": {"lastExecutionResult": {"id": rid, "status": status}}})

    for running in (1, 2, 3, 4, 5, 10, 13, 14, "Started", "retry"):
        assert task(running).running, running
    for final in (0, 6, 7, 8, 9, 11, 12, "FinishedSuccess", None, True, "", 99):
        assert not task(final).running, final
    assert task(2).last_result_id == "17f49de9-dfc6-4c4c-aa04-bdf39d10bd87"
    assert task(2, rid="not-a-guid").last_result_id is None
    assert not QrsTask.from_qrs({"id": T, "operational": None}).running
    assert not is_running_status(False)
