"""Client-managed Qlik Sense behind the Backend protocol (backends/base.py), on the QRS client.

The QRS-specific knowledge the use case used to hold lives here: criteria as one filtered
`reloadtask/full` query (chunked only when the URL gets long), QRS's numeric execution states
and the several results QRS keeps per execution when it retries.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from butler_mqtt.backends.base import (
    Execution,
    Failure,
    NotSupported,
    StartOptions,
    StopAnswer,
    Task,
)
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses
from butler_mqtt.model import FINAL_STATES, QrsTask, StartRequest


def latest_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """With retries QRS keeps several results per execution: keep the newest of each."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        eid = str(row.get("executionID") or row.get("executionId") or "").lower()
        if not eid:
            continue
        key = (str(row.get("startTime") or ""), str(row.get("modifiedDate") or ""))
        best = out.get(eid)
        if best is None or key >= (str(best.get("startTime") or ""), str(best.get("modifiedDate") or "")):
            out[eid] = row
    return out


def execution_of(eid: str, row: dict[str, Any]) -> Execution:
    status = row.get("status")
    final = FINAL_STATES.get(status) if isinstance(status, int) else None
    return Execution(eid, final, row.get("startTime"), row.get("stopTime"), row.get("duration"))


class QrsBackend:
    """The Backend of a client-managed Qlik Sense site. Thread-safe (the client is)."""

    kind = "qrs"

    def __init__(self, client: QrsClient) -> None:
        self.client = client
        self._max_filter = client.cfg.max_filter_length

    @property
    def last_success(self) -> float:
        return self.client.last_success

    def about(self) -> dict[str, Any]:
        return self.client.about()

    def tasks(self, stage: StartRequest) -> list[Task]:
        tasks: list[Task] = []
        for expr in chunk_or(criteria_clauses(stage), self._max_filter):
            tasks.extend(QrsTask.from_qrs(obj) for obj in self.client.reload_tasks(expr))
        return tasks

    def running_executions(self, tasks: Sequence[Task]) -> dict[str, str]:
        # `operational.lastExecutionResult` names the result, not the session: one call for all.
        by_result = {t.last_result_id: t.id for t in tasks if t.last_result_id}
        if not by_result:
            return {}
        found = self.client.executions_of_results(list(by_result))
        return {by_result[rid]: eid for rid, eid in found.items() if rid in by_result}

    def start(self, task_id: str, options: StartOptions | None = None) -> str:
        if options is not None and options != StartOptions():
            raise NotSupported("reload options (partial, variables) need backend: cloud")
        return self.client.start_synchronous(task_id)

    def started_since(self, task_id: str, since: float) -> str | None:
        return self.client.execution_since(task_id, since)

    def executions(self, execution_ids: Collection[str]) -> dict[str, Execution]:
        rows = latest_rows(self.client.execution_results(execution_ids))
        return {eid: execution_of(eid, row) for eid, row in rows.items()}

    def execution_exists(self, execution_id: str) -> bool:
        return self.client.execution_session_exists(execution_id)

    def stop(self, task_id: str, execution_id: str) -> StopAnswer:
        raise NotSupported("stopping a reload is not built yet (contract section 8)")

    def failure(self, task_id: str, execution_id: str, log_lines: int) -> Failure | None:
        raise NotSupported("failure details are not built yet (contract section 8)")

    def reload_tls(self) -> None:
        self.client.reload_tls()

    def close(self) -> None:
        self.client.close()
