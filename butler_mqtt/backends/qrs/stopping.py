"""Stopping a QRS reload task (contract section 8, qrs-api.md 13.1).

``POST /qrs/task/{id}/stop`` answers 204 whether the task runs or not (the simulator does the
same; the real answer for an idle task is undocumented), so the answer cannot tell "stopping"
from "not running". :func:`stop_running` therefore reads the task's
``operational.lastExecutionResult`` first (or takes the full task object the selection already
holds) and sends the stop only for a task that is running (section 7's meaning: Triggered,
Started, Queued, AbortInitiated, Aborting, Retry, DistributionQueue/Running). A stop never
starts anything; a task that is already AbortInitiated/Aborting is asked again (harmless:
QRS's stop is idempotent) and reported ``stopping``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.errors import QrsNotFound
from butler_mqtt.model import is_guid, is_running_status


@dataclass(frozen=True)
class StopOutcome:
    """``status``: ``"stopping"`` (``execution_id`` the running execution session, or None
    when QRS would not name it), ``"notRunning"`` or ``"notFound"``."""

    task_id: str
    status: str
    execution_id: str | None = None


def stop_running(client: QrsClient, task_id: str, task: Mapping[str, Any] | None = None) -> StopOutcome:
    """Stop ``task_id`` if it is running; ``task``: its full ReloadTask object if already read
    (saves a GET). Costs 0-1 GET, then for a running task one POST and one GET (the execution id).
    QRS errors other than 404 are raised (QrsError; `errors.is_transient` tells which)."""
    if not is_guid(task_id):
        raise ValueError(task_id)
    task_id = task_id.lower()
    if task is None:
        try:
            task = client.get_json(f"/qrs/reloadtask/{task_id}")
        except QrsNotFound:
            return StopOutcome(task_id, "notFound")
    operational = task.get("operational") if isinstance(task, Mapping) else None
    last = operational.get("lastExecutionResult") if isinstance(operational, Mapping) else None
    if not isinstance(last, Mapping) or not is_running_status(last.get("status")):
        return StopOutcome(task_id, "notRunning")
    try:
        client.stop_task(task_id)
    except QrsNotFound:
        return StopOutcome(task_id, "notFound")
    result_id = last.get("id")
    execution_id = None
    if isinstance(result_id, str) and is_guid(result_id):
        execution_id = client.executions_of_results([result_id]).get(result_id.lower())
    return StopOutcome(task_id, "stopping", execution_id)
