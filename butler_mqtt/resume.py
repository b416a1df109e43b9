"""Pure: what to do with each task of a stage when a request is handled again after the daemon
stopped in the middle of it (crash, kill, lost lease), from what the journal recorded.

For each task QRS would be asked to start:
* `report`  -- its outcome was recorded: report that, start nothing;
* `recover` -- a start intent was recorded but no answer: ask QRS whether the start arrived
               (started then, or start it now), never start it blindly;
* `start`   -- nothing was recorded: start it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from butler_mqtt.model import TaskOutcome


def intent_key(task_id: str, stage: int | None, attempt: int | None = None) -> str:
    """Start intents are per stage (a chain may start the same task in two stages) and per
    attempt (a retry starts the task again: `#2`, `#3`, ...; the first start has no suffix)."""
    base = task_id if stage is None else f"{stage}/{task_id}"
    return base if attempt is None or attempt <= 1 else f"{base}#{attempt}"


@dataclass(frozen=True)
class Step:
    outcome: TaskOutcome
    action: Literal["report", "recover", "start"]
    recorded: Mapping[str, Any] | None = None  # report: the recorded task event
    since: float | None = None  # recover: when the start was sent (epoch seconds)


def plan_resume(
    candidates: list[TaskOutcome],
    recorded_event: Callable[[str, int | None], Mapping[str, Any] | None] | None,
    intents: Mapping[str, float],
    stage: int | None,
    attempt: int | None = None,
) -> list[Step]:
    """One step per candidate, in order. `recorded_event(task_id, stage)` looks up a recorded
    `task` event (of this `attempt`, for a retry); None (a new request) means every candidate
    is simply started."""
    steps: list[Step] = []
    for o in candidates:
        earlier = recorded_event(o.task_id, stage) if recorded_event is not None else None
        if earlier is not None:
            steps.append(Step(o, "report", recorded=earlier))
        elif recorded_event is not None and intent_key(o.task_id, stage, attempt) in intents:
            steps.append(Step(o, "recover", since=intents[intent_key(o.task_id, stage, attempt)]))
        else:
            steps.append(Step(o, "start"))
    return steps
