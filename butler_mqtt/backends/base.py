"""The Backend protocol: what the use case needs from Qlik, whichever Qlik it is.

Client-managed Qlik Sense (QRS, `backends/qrs/`) is the first implementation; Qlik Cloud
(contract section 9) is the second. Only `runtime` (and each backend's own package) imports an
implementation; `service`, `admission`, `tracking` and the queue runner see this protocol.

Words, the same for both backends:

* a **task** is what a request selects and starts (QRS: a reload task; Qlik Cloud: an app,
  whose `Task.id` is the app id). `Task.running`/`last_result_id` carry the running state the
  resolution answer already had (contract section 7: no extra call);
* an **execution** is one run of a task (QRS: the execution session id; Qlik Cloud: the
  reload id), treated as an opaque string;
* `Execution.final` uses the contract's names (FinishedSuccess, FinishedFail, Aborted, Skipped,
  Error, Reset); a backend maps its own (Qlik Cloud: SUCCEEDED -> FinishedSuccess, ...).

Every call raises the tree of `errors.py` (QrsError and its transient branch today): the
caller decides with `errors.is_transient` whether to try again later.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from butler_mqtt.model import QrsTask, StartRequest
from butler_mqtt.ops.backend_health import BackendHealth

#: What a task is to the use case (QRS: a reload task; Qlik Cloud: an app).
Task = QrsTask


@dataclass(frozen=True)
class Execution:
    """What a backend reports about one followed execution.

    `final`: the contract's final status name, None while it runs. The times are as the
    backend gave them (ISO 8601 strings; `duration` in ms or "HH:MM:SS" as QRS writes it)."""

    execution_id: str
    final: str | None = None
    start_time: Any = None
    stop_time: Any = None
    duration: Any = None
    #: The backend's own status text (Qlik Cloud: `cloudStatus`), None when it has none.
    native_status: str | None = None

    def times(self) -> dict[str, Any]:
        """The fields `replies.task_finished` reads (startTime, stopTime, duration, and
        cloudStatus when the backend has its own status)."""
        times = {"startTime": self.start_time, "stopTime": self.stop_time, "duration": self.duration}
        return times | ({"cloudStatus": self.native_status} if self.native_status is not None else {})


class Failure(TypedDict, total=False):
    """Why an execution did not succeed (contract section 8), capped by the backend."""

    message: str
    details: list[str]
    scriptLogTail: list[str]
    scriptLogError: str


#: The answer to a stop: the backend asked the execution to stop, or it had already ended.
StopAnswer = Literal["stopping", "notRunning"]


@dataclass(frozen=True)
class StartOptions:
    """Per-start options a backend may support (Qlik Cloud: partial reload, variables).
    A backend that does not support an option set here refuses the start (QRS: any)."""

    partial: bool = False
    variables: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """What the use case needs from Qlik. Thread-safe: one instance serves every request."""

    #: `qrs` or `cloud` (the `backend` configuration key).
    kind: str
    #: Fed by every call the backend makes, whoever asked: /healthz, the status topic and the
    #: requests waiting for the backend read it (ops/backend_health.py).
    health: BackendHealth

    @property
    def last_success(self) -> float:
        """time.monotonic() of the last call the backend answered (any answer below 500)."""
        ...

    def about(self) -> dict[str, Any]:
        """Who the backend is (QRS: `/qrs/about`; Qlik Cloud: the tenant): one call, for
        `check` and `/healthz`."""
        ...

    def tasks(self, stage: StartRequest) -> list[Task]:
        """Resolve a stage's criteria to the tasks they match, with their running state, in
        as few calls as the backend allows (QRS: one filtered query, chunked only when long).
        The caller does the selection (union, de-duplication, matchedBy, not-found)."""
        ...

    def running_executions(self, tasks: Sequence[Task]) -> dict[str, str]:
        """Task id -> the id of its running execution, for these tasks that run (their
        `running` flag) and were not started by us (QRS: one call for all of them)."""
        ...

    def start(self, task_id: str, options: StartOptions | None = None) -> str:
        """Start one task; the new execution's id, or model.EMPTY_GUID when the backend
        accepted the start but did not start anything. Raises QrsUnreachable with
        `never_sent` false when the start may have arrived without an answer."""
        ...

    def started_since(self, task_id: str, since: float) -> str | None:
        """The execution of `task_id` created at or after `since` (our epoch seconds), None if
        none: "did my unanswered start arrive?" after a timeout or a crash."""
        ...

    def executions(self, execution_ids: Collection[str]) -> dict[str, Execution]:
        """The state of many executions at once (QRS: one query, chunked only when long).
        An id the backend does not know yet is missing from the answer."""
        ...

    def execution_exists(self, execution_id: str) -> bool:
        """Is the execution still known to the backend (QRS: its execution session)?"""
        ...

    def stop(self, task_id: str, execution_id: str) -> StopAnswer:
        """Ask the backend to stop this running execution of `task_id` (QRS: `POST
        /qrs/task/{id}/stop`; Qlik Cloud: cancel the reload). `notRunning`: it had ended."""
        ...

    def failure(self, task_id: str, execution_id: str, log_lines: int) -> Failure | None:
        """Why this execution did not succeed (contract section 8), None when the backend
        has nothing; the last `log_lines` lines of that execution's script log (0: none)."""
        ...

    def reload_tls(self) -> None:
        """Re-read the TLS files (client certificate, key, CA) at their configured paths
        (SIGHUP): new connections use them. Raises ConfigError naming the key of a file that
        does not load; the ones in use are then kept."""
        ...

    def close(self) -> None: ...


class NotSupported(NotImplementedError):
    """A Backend operation this backend (or this version) does not offer yet."""
