"""Pure: the rules of `then` chains (contract section 3).

A stage is a success only when it selected at least one task and every task of it was started
and finished with FinishedSuccess. After a stage ends, the chain goes on to the next stage when
there is one and the stage succeeded (or `onFailure: "continue"`); otherwise the request is
finished, with the stage it stopped at and why. A dry run never runs a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from butler_mqtt.model import StartRequest, TaskOutcome

SUCCESS = "FinishedSuccess"


def start_failures(outcomes: list[TaskOutcome]) -> list[str]:
    """Why a stage cannot succeed, judged on its starts (before anything finished)."""
    failures = [] if outcomes else ["the stage selected no task"]
    failures += [f"{o.task_name} ({o.task_id}): {o.status}" for o in outcomes if not _may_succeed(o)]
    return failures


def _may_succeed(o: TaskOutcome) -> bool:
    """Started (or attached to a running execution: run policies), or waiting in butler-mqtt's
    queue: its end decides. Anything else (skipped, denied, failed...) already failed the stage."""
    return (o.status in ("started", "alreadyRunning") and o.execution_id is not None) or o.status == "queued"


def finish_failure(task_name: str, task_id: str, status: str) -> str | None:
    """Why a finished task makes its stage fail (None: it succeeded)."""
    return None if status == SUCCESS else f"{task_name} ({task_id}): {status}"


@dataclass(frozen=True)
class NextStage:
    index: int


@dataclass(frozen=True)
class Finished:
    stopped_at: int | None  # the stage the chain stopped at; None: it ran to its end
    reason: str | None = None


def after_stage(stage_req: StartRequest | None, index: int, failures: list[str]) -> NextStage | Finished:
    """What follows stage `index` once every task of it ended."""
    next_req = stage_req.then if stage_req is not None else None
    if next_req is None or stage_req is None:
        return Finished(None)
    if stage_req.dryRun:
        return Finished(index, "dryRun: the chain is not run")
    if failures and stage_req.onFailure != "continue":
        return Finished(index, "; ".join(failures[:10]))
    return NextStage(index + 1)
