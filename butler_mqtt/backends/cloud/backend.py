"""Qlik Cloud behind the Backend protocol (backends/base.py): the second implementation.

Words of the protocol, in Qlik Cloud's terms (contract section 9):

* a **task** is an app: `Task.id` = the app id (a GUID, never the item id), `Task.name` = the
  app's name, its tags (exact names) and its space's name. It is **running** while a reload of
  it is QUEUED, RELOADING or CANCELING, whoever started it (one tenant-wide listing per
  resolution, only when something was selected);
* an **execution** is a reload (`POST /api/v1/reloads`), its id opaque; `Execution.final` maps
  SUCCEEDED -> FinishedSuccess, FAILED -> FinishedFail, CANCELED -> Aborted, EXCEEDED_LIMIT ->
  Error, and `native_status` carries Qlik Cloud's own (`cloudStatus` in taskFinished);
* **stop** cancels the reload; **failure** is the reload's `errorMessage`, its short log and the
  tail of its script log (section 8's caps, `logtail`).

Starts are paced under `cloud.reloads_per_minute` by the client's one pacer (every thread of
the daemon), 429s are waited out within `cloud.timeout`, and a refused token is fetched again
once (client.py, auth.py). Errors are the Cloud* branch of errors.py, so `is_transient` and the
use case treat them as QRS's.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

from butler_mqtt.backends.base import Execution, Failure, StartOptions, StopAnswer, Task
from butler_mqtt.errors import CloudNotFound, QrsError
from butler_mqtt.model import StartRequest
from butler_mqtt.ops.backend_health import BackendHealth

from . import reloads
from .client import CloudClient, query
from .resolve import resolve
from .transport import redact_url


class CloudBackend:
    """The Backend of a Qlik Cloud tenant. Thread-safe (the client is)."""

    kind = "cloud"

    def __init__(self, client: CloudClient, *, space_names: bool = False, health: BackendHealth | None = None) -> None:
        self.client = client
        #: Fed by every call the client makes (runtime.backend chains it into the client's
        #: observer): /healthz, the status topic and waiting requests read it.
        self.health = health if health is not None else BackendHealth(f"Qlik Cloud at {client.settings.tenant}")
        #: Look up the space of every selected app (`allow.spaces` needs it; one call per space).
        self.space_names = space_names
        self._last_success = 0.0

    def _ok(self) -> None:
        self._last_success = time.monotonic()

    @property
    def last_success(self) -> float:
        return self._last_success

    def about(self) -> dict[str, Any]:
        self.client.json("GET", "/api/v1/spaces" + query(limit=1))
        self._ok()
        return {"tenant": redact_url(self.client.settings.tenant), "backend": "cloud"}

    def tasks(self, stage: StartRequest) -> list[Task]:
        selection = resolve(self.client, stage.appId, stage.tag, stage.space, with_space_names=self.space_names)
        active = reloads.active_reloads_by_app(self.client) if selection.selected else {}
        self._ok()
        out: list[Task] = []
        for s in selection.selected:
            running = active.get(s.app.app_id) or []
            # The newest active reload: what a start now would meet (its id is the execution).
            newest = max(running, key=lambda r: r.creation_time or "").id if running else None
            out.append(Task(id=s.app.app_id, name=s.app.name, tags=s.app.tag_names, app_id=s.app.app_id,
                            space=s.space_name, exact_names=True, running=bool(running), last_result_id=newest))
        return out

    def running_executions(self, tasks: Sequence[Task]) -> dict[str, str]:
        """Known from the resolution already (`last_result_id` is the active reload): no call."""
        return {t.id: t.last_result_id for t in tasks if t.running and t.last_result_id}

    def start(self, task_id: str, options: StartOptions | None = None) -> str:
        opts = options or StartOptions()
        reload = reloads.start_reload(self.client, task_id, partial=opts.partial, variables=opts.variables or None)
        self._ok()
        return reload.id

    def started_since(self, task_id: str, since: float) -> str | None:
        found = reloads.started_since(self.client, task_id, since)
        self._ok()
        return found.id if found is not None else None

    def executions(self, execution_ids: Collection[str]) -> dict[str, Execution]:
        out: dict[str, Execution] = {}
        for eid in execution_ids:
            try:
                r = reloads.get_reload(self.client, eid)
            except CloudNotFound:
                continue  # not known (yet): missing from the answer, as the protocol says
            out[eid] = Execution(eid, r.final_status, r.start_time, r.end_time, None, native_status=r.status)
        self._ok()
        return out

    def execution_exists(self, execution_id: str) -> bool:
        try:
            reloads.get_reload(self.client, execution_id)
        except CloudNotFound:
            return False
        self._ok()
        return True

    def stop(self, task_id: str, execution_id: str) -> StopAnswer:
        outcome = reloads.cancel_reload(self.client, execution_id)
        self._ok()
        return "stopping" if outcome in ("canceled", "canceling") else "notRunning"

    def failure(self, task_id: str, execution_id: str, log_lines: int) -> Failure | None:
        try:
            r = reloads.get_reload(self.client, execution_id)
        except CloudNotFound:
            return None
        tail: list[str] | None = None
        error: str | None = None
        if log_lines > 0:
            try:
                tail = reloads.script_log_tail(self.client, task_id, execution_id, log_lines)
            except QrsError as exc:  # the event still goes out at once, saying why
                error = self.client.settings.scrub(str(exc))
        out: Failure = reloads.failure(r, tail, error)  # type: ignore[assignment]  # the same keys
        return out

    def reload_tls(self) -> None:
        """Nothing to re-read: `cloud.ca` is loaded with the client (a change needs a restart)."""

    def close(self) -> None:
        self.client.close()
