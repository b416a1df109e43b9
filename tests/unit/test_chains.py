"""The chain rules (pure): when a `then` stage runs, and why a chain stops."""

from __future__ import annotations

from butler_mqtt.chains import Finished, NextStage, after_stage, finish_failure, start_failures
from butler_mqtt.model import StartRequest, TaskOutcome

T = "11111111-1111-4111-8111-111111111111"


def chain(**first: object) -> StartRequest:
    return StartRequest.model_validate({"tag": "a", "then": {"tag": "b"}, **first})


def test_a_successful_stage_runs_the_next():
    assert after_stage(chain(), 0, []) == NextStage(1)


def test_a_failed_stage_stops_the_chain_unless_continue():
    assert after_stage(chain(), 0, ["x: FinishedFail"]) == Finished(0, "x: FinishedFail")
    assert after_stage(chain(onFailure="continue"), 0, ["x: FinishedFail"]) == NextStage(1)


def test_the_last_stage_finishes_the_request_and_a_dry_run_never_chains():
    assert after_stage(StartRequest(tag=["a"]), 0, ["whatever"]) == Finished(None)
    assert after_stage(chain(dryRun=True), 0, []) == Finished(0, "dryRun: the chain is not run")


def test_stage_failures_from_starts_and_finishes():
    assert start_failures([]) == ["the stage selected no task"]
    ok = TaskOutcome(T, "Load", "started", execution_id="e")
    denied = TaskOutcome(T, "Load", "denied")
    assert start_failures([ok]) == [] and start_failures([ok, denied]) == [f"Load ({T}): denied"]
    assert finish_failure("Load", T, "FinishedSuccess") is None
    assert finish_failure("Load", T, "Aborted") == f"Load ({T}): Aborted"


def test_reasons_are_capped_at_ten():
    reason = after_stage(chain(), 0, [f"t{i}" for i in range(15)])
    assert isinstance(reason, Finished) and reason.reason is not None and reason.reason.count(";") == 9
