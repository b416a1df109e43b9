"""Client-managed Qlik Sense behind the Backend protocol (backends/base.py), on the QRS client.

The QRS-specific knowledge the use case used to hold lives here: criteria as one filtered
`reloadtask/full` query (chunked only when the URL gets long), QRS's numeric execution states
and the several results QRS keeps per execution when it retries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, cast

from butler_mqtt.backends.base import (
    Execution,
    Failure,
    NotSupported,
    StartOptions,
    StopAnswer,
    Task,
)
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.failure import ScriptLogReader, failure_details
from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses
from butler_mqtt.errors import QrsNotFound
from butler_mqtt.model import FINAL_STATES, QrsTask, StartRequest

#: Failed executions' result rows kept from the poll for `failure` (saves it one call).
_KEPT_ROWS = 256


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

    def __init__(self, client: QrsClient, reader: ScriptLogReader | None = None) -> None:
        self.client = client
        self.health = client.health
        self.reader = reader
        self._max_filter = client.cfg.max_filter_length
        self._lock = threading.Lock()
        self._failed_rows: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def last_success(self) -> float:
        return self.client.last_success

    def about(self) -> dict[str, Any]:
        return self.client.about()

    def reload_tls(self) -> None:
        self.client.reload_tls()

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
        out = {eid: execution_of(eid, row) for eid, row in rows.items()}
        with self._lock:  # the failed ones' rows: `failure` reads them without another call
            for eid, ex in out.items():
                if ex.final is not None and ex.final != "FinishedSuccess":
                    self._failed_rows[eid] = rows[eid]
                    self._failed_rows.move_to_end(eid)
            while len(self._failed_rows) > _KEPT_ROWS:
                self._failed_rows.popitem(last=False)
        return out

    def execution_exists(self, execution_id: str) -> bool:
        return self.client.execution_session_exists(execution_id)

    def stop(self, task_id: str, execution_id: str) -> StopAnswer:
        """`POST /qrs/task/{id}/stop` (qrs-api.md 13.1). The caller found `execution_id`
        running in the answer it selected by (no extra call here); QRS stops the task's running
        execution, and answers 204 also for a task that no longer runs. An unknown task (404):
        `notRunning`."""
        try:
            self.client.stop_task(task_id)
        except QrsNotFound:
            return "notRunning"
        return "stopping"

    def failure(self, task_id: str, execution_id: str, log_lines: int) -> Failure | None:
        """The execution result of THAT execution (kept from the poll that saw it end, else one
        call), its texts and its script log's tail (qrs/failure.py; never raises once the
        result is read). None when it succeeded or QRS has no result for it."""
        eid = execution_id.lower()
        with self._lock:
            row = self._failed_rows.pop(eid, None)
        if row is None:
            row = latest_rows(self.client.execution_results([eid])).get(eid)
        if row is None:
            return None
        reader = self.reader if log_lines > 0 else None
        found = failure_details(reader, row, task_id=task_id, lines=log_lines)
        return cast("Failure | None", found)


    def close(self) -> None:
        self.client.close()
        if self.reader is not None:
            self.reader.close()
