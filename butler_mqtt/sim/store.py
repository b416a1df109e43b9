"""The simulator's in-memory repository: tasks, tags, custom properties, executions.

Objects are rendered in QRS's own JSON shapes (qrs-api.md sections 2, 3 and 6): ISO-8601 UTC
dates with milliseconds, the ``1753-01-01T00:00:00.000Z`` "never" sentinel, the empty GUID for
"none", integer enums, ``privileges: null`` and a ``schemaPath`` on every full object.

Executions cost nothing while they run: an execution only records when it was triggered and
the times the scheduler (:mod:`.scheduler`) gave it then: when it starts, or is cancelled by
the queue timeout, and when each attempt ends. Its state (Triggered 1 -> [Queued 3 ->] Started
2 [-> Retry 10 -> Started 2 ...] -> FinishedSuccess 7 / FinishedFail 8, or Queued 3 -> Aborted
6), detail lines, result rows and the existence of its execution session are computed from the
clock whenever asked. There is no timer or thread per execution; the times of executions still
waiting are recomputed only when one is triggered or a scheduler setting changes.

Rendered objects are cached per entity and re-rendered only when something they show changed
(a new execution state, a task added or replaced), and filters keep what they found along
each property path, so a repeated query over 20,000 tasks is a scan of cached data.

Choices where the research is silent (qrs-api.md section 11 and elsewhere):

* ``/qrs/task/full`` items use the ``Task`` model (no ``app``, no type-specific fields) with
  ``schemaPath: "Task"``; ``taskType`` tells the kinds apart.
* A task that is still running (also while Queued) is never started a second time; see
  :meth:`Store.start`.
* Scheduler capacity, queue timeout, retries and scripted failures: see :mod:`.scheduler`
  (queue-timeout cancellations end Aborted; a retry keeps its slot; one result row per
  attempt, appearing when the attempt starts).
* Detail lines are listed in a stable but not chronological order (ordered by their ids), so
  a client that forgets to sort by ``detailCreatedDate`` (Butler sorts) shows it in tests.
* Detail lines are ``detailsType`` 2 (Information), except a failed attempt's error (the task's
  ``failure_message``, 0 Error) and a stop's lines (a Warning when asked, an Error when aborted).
* A stop (:meth:`Store.stop`) cuts the execution's timeline: AbortInitiated (4), Aborting (5),
  Aborted (6) (:func:`.scheduler.stopped`); retries still to come never happen.
* ``fileReferenceID`` is a GUID derived from the result id once the attempt has a log (empty
  while it has none, or always with ``file_references = False``); ``scriptLogSize`` is the size
  of the log the download sends (:mod:`.scriptlog`).
* ``/qrs/executionresult`` (condensed) lacks ``taskID``/``executionID``; filters can still use
  them, as on QRS. ``/qrs/executionresult/full`` has them.
* ``startTime`` stays at the sentinel while Triggered; ``duration`` is 0 until finished.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .filter import CompiledFilter, FilterSubject, compile_orderby
from .scheduler import (
    Decision,
    Fifo,
    Line,
    RunPlan,
    Stop,
    Timeline,
    Waiting,
    attempt_outcomes,
    occupancy,
    stopped,
    timeline,
)
from .scriptlog import DEFAULT_FAILURE_MESSAGE, ENCODINGS, LogSpec, log_length

EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
NEVER = "1753-01-01T00:00:00.000Z"
MODIFIED_BY = "INTERNAL\\sa_repository"
NODE_NAME = "sim-node1"
TASK_SESSION_TIMEOUT_MIN = 1440

#: Shortest Retry (10) pause between two attempts: the rows' startTimes then always differ.
MIN_RETRY_DELAY = 0.002

# Namespace for ids derived from names, so tags, definitions and apps keep their ids across
# restarts of the simulator (docs and scripts can cite them).
_ID_NAMESPACE = uuid.UUID("6f0c1d2e-5b3a-4c47-9e1f-2a8b7c6d5e40")
_NODE_ID = str(uuid.uuid5(_ID_NAMESPACE, "node:" + NODE_NAME))

COLLECTIONS = (
    "reloadtask",
    "externalprogramtask",
    "task",
    "tag",
    "custompropertydefinition",
    "executionresult",
    "executionsession",
)


def stable_id(*parts: str) -> str:
    """A GUID derived from ``parts``: the same parts always give the same id."""
    return str(uuid.uuid5(_ID_NAMESPACE, "\x1f".join(parts)))


def iso(timestamp: float) -> str:
    """QRS date format: ``2017-01-16T16:12:18.152Z``."""
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass
class SimTask:
    """A task as the simulator's user describes it.

    ``custom_properties`` holds ``(definition name, value)`` pairs; a definition may appear
    several times (QRS allows several values per property). ``task_type`` is 0 for a reload
    task and 1 for an external program task. ``app_name``/``app_id`` default to values
    derived from the task.

    Runs (see :mod:`.scheduler`): ``run_seconds`` is how long one attempt runs once started;
    ``outcome`` is ``"success"`` (ends FinishedSuccess, 7) or ``"fail"`` (every attempt ends
    FinishedFail, 8); ``fail_first`` makes the first that many runs of the task fail whatever
    the ``outcome`` (runs are counted over every attempt that ran, retries included);
    ``max_retries`` is QRS's ``maxRetries``: how many times the scheduler itself runs a failed
    attempt again within the same execution (shown in the task JSON).

    Failures and script logs (:mod:`.scriptlog`): ``failure_message`` is the Error detail line
    of a failed attempt and the error in its log; ``log_lines`` script lines per log,
    ``log_bytes`` pads each log to at least that size (generated lazily), ``log_encoding`` one
    of :data:`~butler_mqtt.sim.scriptlog.ENCODINGS`.
    """

    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    custom_properties: list[tuple[str, str]] = field(default_factory=list)
    enabled: bool = True
    task_type: int = 0
    app_name: str = ""
    app_id: str = ""
    run_seconds: float = 0.2
    outcome: str = "success"
    fail_first: int = 0
    max_retries: int = 0
    failure_message: str = DEFAULT_FAILURE_MESSAGE
    log_lines: int = 60
    log_bytes: int = 0
    log_encoding: str = "utf-8"


@dataclass(frozen=True)
class StartRecord:
    """One execution actually triggered (``at`` is the store clock, ``time.time()`` by default).

    A triggered execution may still wait in the scheduler queue, or be cancelled there.
    """

    task_id: str
    execution_id: str
    at: float


@dataclass(frozen=True)
class StartOutcome:
    """What :meth:`Store.start` did.

    ``execution_id`` is the execution session id, or None when the task is disabled;
    ``created`` is False when an already running execution was returned instead.
    """

    execution_id: str | None
    created: bool


class _Rendered:
    """One entity rendered for one model: the full object, its filter subject, JSON texts."""

    def __init__(self, key: object, doc: dict[str, Any], condensed_keys: tuple[str, ...]):
        self.key = key
        self.doc = doc
        self._condensed_keys = condensed_keys

    @cached_property
    def subject(self) -> FilterSubject:
        return FilterSubject(self.doc)

    @cached_property
    def full_json(self) -> str:
        return json.dumps(self.doc, ensure_ascii=False)

    @cached_property
    def condensed_json(self) -> str:
        return json.dumps({k: self.doc[k] for k in self._condensed_keys}, ensure_ascii=False)


class _Tag:
    def __init__(self, name: str, created: float) -> None:
        self.id = stable_id("tag", name)
        self.name = name
        self.created = created
        self.seq = 0

    def condensed(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "privileges": None}

    def render(self) -> _Rendered:
        doc = {
            "id": self.id,
            "createdDate": iso(self.created),
            "modifiedDate": iso(self.created),
            "modifiedByUserName": MODIFIED_BY,
            "name": self.name,
            "privileges": None,
            "impactSecurityAccess": False,
            "schemaPath": "Tag",
        }
        return _Rendered(None, doc, ("id", "name", "privileges"))


class _PropertyDefinition:
    def __init__(self, name: str, created: float) -> None:
        self.id = stable_id("customproperty", name)
        self.name = name
        self.created = created
        self.choice_values: list[str] = []
        self.object_types: list[str] = []
        self.seq = 0

    def note_use(self, value: str, object_type: str) -> None:
        if value not in self.choice_values:
            self.choice_values.append(value)
        if object_type not in self.object_types:
            self.object_types.append(object_type)

    def condensed(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "valueType": "Text",
            "choiceValues": list(self.choice_values),
            "privileges": None,
        }

    def render(self) -> _Rendered:
        doc = {
            "id": self.id,
            "createdDate": iso(self.created),
            "modifiedDate": iso(self.created),
            "modifiedByUserName": MODIFIED_BY,
            "name": self.name,
            "valueType": "Text",
            "choiceValues": list(self.choice_values),
            "objectTypes": list(self.object_types),
            "description": "",
            "privileges": None,
            "impactSecurityAccess": False,
            "schemaPath": "CustomPropertyDefinition",
        }
        return _Rendered(None, doc, ("id", "name", "valueType", "choiceValues", "privileges"))


class Execution:
    """One run of a task: an execution session while it runs, one result row per attempt.

    Its times come from :mod:`.scheduler` (:meth:`decide`); everything shown is read off them.
    """

    def __init__(
        self,
        entry: _TaskEntry,
        triggered_at: float,
        *,
        start_delay: float,
        retry_delay: float,
        runs_before: int,
    ) -> None:
        task = entry.task
        self.entry = entry
        self.task_id = task.id
        self.session_id = str(uuid.uuid4())
        self.triggered_at = triggered_at
        self.ready_at = triggered_at + max(0.0, start_delay)
        self.is_reload = task.task_type == 0
        outcomes = attempt_outcomes(
            always_fails=task.outcome == "fail",
            fail_first=task.fail_first,
            max_retries=task.max_retries,
            runs_before=runs_before,
        )
        self.plan = RunPlan(
            outcomes=outcomes,
            run_seconds=max(0.0, task.run_seconds),
            retry_pause=max(MIN_RETRY_DELAY, retry_delay),
            max_retries=task.max_retries,
            is_reload=self.is_reload,
            node=NODE_NAME,
            failure_message=task.failure_message,
        )
        self.runs_before = runs_before
        self.stop: Stop | None = None
        self.occupancy = occupancy(len(outcomes), self.plan.run_seconds, self.plan.retry_pause)
        self.rows = [_ResultRow(self, i) for i in range(len(outcomes))]
        self.seq = 0
        self.version = 0  # bumped whenever the timeline changes: render caches key on it
        self.decision: Decision | None = None
        self.timeline: Timeline
        self._cache: dict[str, _Rendered] = {}
        self.decide(Decision(self.ready_at), None)

    def decide(self, decision: Decision, queue_timeout: float | None) -> None:
        """Take the scheduler's start (or cancel) time; recompute the timeline if it changed."""
        if decision == self.decision:
            return
        self.decision = decision
        self.timeline = timeline(self.triggered_at, self.ready_at, decision, self.plan, queue_timeout)
        self.version += 1

    def apply_stop(self, stop: Stop) -> None:
        """A stop request: the timeline ends AbortInitiated -> Aborting -> Aborted from ``stop.at``."""
        self.stop = stop
        self.timeline = stopped(self.timeline, stop)
        self.version += 1

    @property
    def runs(self) -> int:
        """Attempts that run (0 when the queue timeout or a stop cancels the execution first)."""
        return sum(1 for row in self.timeline.rows if row.started_phase is not None)

    def waiting(self, now: float) -> bool:
        """Not yet started nor cancelled at ``now``: the scheduler may still move it."""
        if self.stop is not None:
            return False
        decision = self.decision
        assert decision is not None
        settled = decision.started_at if decision.started_at is not None else decision.cancelled_at
        return settled is None or now < settled

    @property
    def started_at(self) -> float | None:
        """When the first attempt starts (past or future); None if cancelled in the queue."""
        return self.decision.started_at if self.decision else None

    def holds_slot(self, now: float) -> bool:
        start = self.started_at
        if self.stop is not None and (start is None or start >= self.stop.at):
            return False  # stopped before it started: it never takes a slot
        return start is not None and start <= now < self.timeline.end

    def running(self, now: float) -> bool:
        """Triggered, Queued, Started or Retry: the execution session exists."""
        return now < self.timeline.end

    def phase(self, now: float) -> int:
        return self.timeline.phase_at(now)

    def status(self, now: float) -> int:
        return self.timeline.phases[self.phase(now)].status

    def current_row(self, now: float) -> _ResultRow:
        """The newest result row (the attempt running or last run)."""
        return self.rows[self.timeline.phases[self.phase(now)].row]

    def render_session(self, now: float) -> _Rendered:
        phase = self.phase(now)
        key = (self.version, phase)
        cached = self._cache.get("session")
        if cached is not None and cached.key == key:
            return cached
        row = self.rows[self.timeline.phases[phase].row]
        fields, changed = row.fields(now)
        task_doc = self.entry.condensed(now)
        doc: dict[str, Any] = {
            "id": self.session_id,
            "createdDate": iso(self.triggered_at),
            "modifiedDate": iso(changed),
            "modifiedByUserName": MODIFIED_BY,
            "executingNode": {"id": _NODE_ID, "privileges": None},
            "executionResult": fields,
            "abortAt": iso(self.triggered_at + TASK_SESSION_TIMEOUT_MIN * 60),
            "retries": row.index,
            "abortReason": 1 if self.stop is not None and now >= self.stop.at else 0,  # 1 Manual
            "app": self.entry.app_condensed() if self.is_reload else None,
            "user": None,
            "reloadTask": task_doc if self.is_reload else None,
            "userSyncTask": None,
            "externalProgramTask": None if self.is_reload else task_doc,
            "privileges": None,
            "schemaPath": "ExecutionSession",
        }
        rendered = _Rendered(key, doc, ("id", "privileges"))
        self._cache["session"] = rendered
        return rendered


class _ResultRow:
    """The execution result of one attempt of an execution."""

    def __init__(self, execution: Execution, index: int) -> None:
        self.execution = execution
        self.index = index
        self.result_id = str(uuid.uuid4())
        #: The (deprecated) ``fileReferenceID`` of this attempt's log.
        self.file_reference_id = stable_id("filereference", self.result_id)
        self.seq = 0
        self._size: tuple[LogSpec, int] | None = None
        self._cache: _Rendered | None = None
        self._details: tuple[int, list[tuple[str, Line]]] | None = None

    def visible(self, now: float) -> bool:
        """Row 0 exists from the trigger on, a retry's row from the start of its attempt."""
        if self.index == 0:
            return True
        rows = self.execution.timeline.rows
        if self.index >= len(rows):
            return False  # an attempt a stop cancelled
        started = rows[self.index].started_phase
        return started is not None and self.execution.phase(now) >= started

    def _lines(self) -> list[tuple[str, Line]]:
        """This row's detail lines with stable ids, in a stable but non-chronological order."""
        execution = self.execution
        if self._details is None or self._details[0] != execution.version:
            lines = [line for line in execution.timeline.lines if line.row == self.index]
            with_ids = sorted((stable_id("detail", self.result_id, line.message), line) for line in lines)
            self._details = (execution.version, with_ids)
        return self._details[1]

    def fields(self, now: float) -> tuple[dict[str, Any], float]:
        """The ExecutionResultCondensed fields at ``now``, and when they last changed."""
        execution = self.execution
        phase_index = execution.phase(now)
        phase = execution.timeline.phases[phase_index]
        row = execution.timeline.rows[self.index]
        status = phase.status if phase.row == self.index else row.final_status
        started = row.started_phase is not None and phase_index >= row.started_phase
        final = phase_index >= row.final_phase
        visible = [(i, line) for i, line in self._lines() if line.phase <= phase_index]
        start = row.start if row.start is not None else execution.triggered_at
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(start))
        log = (
            f"{NODE_NAME}\\Script\\{execution.entry.app_id}.{stamp}.{int(start * 1000) % 1000:03d}"
            f"+0000.{self.result_id.replace('-', '').upper()[:20]}.log"
        )
        has_log = final and started and execution.is_reload
        spec = self.log_spec(now) if has_log else None
        store = execution.entry.store
        fields = {
            "id": self.result_id,
            "executingNodeName": NODE_NAME if started else "",
            "status": status,
            "startTime": iso(start) if started else NEVER,
            "stopTime": iso(row.stop) if final else NEVER,
            "duration": round((row.stop - start) * 1000) if final and started else 0,
            "fileReferenceID": self.file_reference_id if has_log and store.file_references else EMPTY_GUID,
            "scriptLogAvailable": has_log,
            "details": [
                {
                    "id": detail_id,
                    "detailsType": line.kind,
                    "message": line.message,
                    "detailCreatedDate": iso(line.at),
                    "privileges": None,
                }
                for detail_id, line in visible
            ],
            "scriptLogLocation": log if has_log else "",
            "scriptLogSize": self._log_size(spec) if spec is not None else 0,
            "privileges": None,
        }
        return fields, max(line.at for _, line in visible)

    def condensed(self, now: float) -> dict[str, Any]:
        return self.fields(now)[0]

    def _log_size(self, spec: LogSpec) -> int:
        """``log_length(spec)``, remembered: it is asked on every render of a finished row."""
        cached = self._size
        if cached is None or cached[0] != spec:
            self._size = cached = (spec, log_length(spec))
        return cached[1]

    def log_spec(self, now: float) -> LogSpec | None:
        """What this attempt's script log is made of; None while it has none (not ended, never
        started, or not a reload). The task's log knobs are read at download time."""
        execution = self.execution
        rows = execution.timeline.rows
        if not execution.is_reload or self.index >= len(rows):
            return None
        row = rows[self.index]
        phase_index = execution.phase(now)
        if row.started_phase is None or row.start is None or phase_index < row.final_phase:
            return None
        task = execution.entry.task
        return LogSpec(
            task_name=task.name,
            app_id=execution.entry.app_id,
            result_id=self.result_id,
            run=execution.runs_before + self.index + 1,
            start=row.start,
            stop=row.stop,
            status=row.final_status,
            failure_message=task.failure_message,
            lines=task.log_lines,
            min_bytes=task.log_bytes,
            encoding=task.log_encoding,
        )

    def _created(self) -> float:
        start = self.execution.timeline.rows[self.index].start
        return start if self.index > 0 and start is not None else self.execution.triggered_at

    def render(self, now: float) -> _Rendered:
        execution = self.execution
        key = (execution.version, execution.phase(now))
        cached = self._cache
        if cached is not None and cached.key == key:
            return cached
        fields, changed = self.fields(now)
        doc: dict[str, Any] = {
            "id": self.result_id,
            "createdDate": iso(self._created()),
            "modifiedDate": iso(changed),
            "modifiedByUserName": MODIFIED_BY,
            "taskID": execution.task_id,
            "executionID": execution.session_id,
            "appID": execution.entry.app_id if execution.is_reload else EMPTY_GUID,
            "executingNodeID": _NODE_ID,
        }
        doc.update((k, v) for k, v in fields.items() if k != "id")
        doc["schemaPath"] = "ExecutionResult"
        self._cache = rendered = _Rendered(key, doc, tuple(fields))
        return rendered


class _TaskEntry:
    """A stored task with the ids and render caches QRS objects need."""

    def __init__(self, task: SimTask, created: float, store: Store) -> None:
        self.task = task
        self.created = iso(created)
        self.store = store
        self.seq = 0
        self.operational_id = stable_id("operational", task.id)
        self.never_result_id = stable_id("neverstarted", task.id)
        self.app_id = task.app_id or stable_id("app", task.id)
        self.app_name = task.app_name or task.name
        self.latest: Execution | None = None
        self.runs_before_latest = 0  # attempts run by the task's executions before `latest`
        self._cache: dict[str, _Rendered] = {}

    @property
    def schema(self) -> str:
        return "ReloadTask" if self.task.task_type == 0 else "ExternalProgramTask"

    def app_condensed(self) -> dict[str, Any]:
        return {
            "id": self.app_id,
            "name": self.app_name,
            "appId": "",
            "publishTime": NEVER,
            "published": False,
            "stream": None,
            "savedInProductVersion": "12.1306.4",
            "migrationHash": hashlib.sha1(self.app_id.encode()).hexdigest(),
            "availabilityStatus": 0,
            "privileges": None,
        }

    def _operational(self, now: float) -> dict[str, Any]:
        if self.latest is not None:
            last = self.latest.current_row(now).condensed(now)
        else:
            last = {
                "id": self.never_result_id,
                "executingNodeName": "",
                "status": 0,
                "startTime": NEVER,
                "stopTime": NEVER,
                "duration": 0,
                "fileReferenceID": EMPTY_GUID,
                "scriptLogAvailable": False,
                "details": [],
                "scriptLogLocation": "",
                "scriptLogSize": 0,
                "privileges": None,
            }
        return {
            "id": self.operational_id,
            "lastExecutionResult": last,
            "nextExecution": NEVER,
            "privileges": None,
        }

    def condensed(self, now: float) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.task.id, "operational": self._operational(now)}
        doc["name"] = self.task.name
        if self.task.task_type == 0:
            doc["app"] = self.app_condensed()
        doc.update(taskType=self.task.task_type, enabled=self.task.enabled, privileges=None)
        return doc

    def render(self, model: str, now: float) -> _Rendered:
        """Render as ``model``: "ReloadTask", "ExternalProgramTask" or "Task"."""
        latest = self.latest
        state = (id(latest), latest.version, latest.phase(now)) if latest else None
        key = (self.store.generation, state)
        cached = self._cache.get(model)
        if cached is not None and cached.key == key:
            return cached
        task = self.task
        doc: dict[str, Any] = {
            "id": task.id,
            "createdDate": self.created,
            "modifiedDate": self.created,
            "modifiedByUserName": MODIFIED_BY,
            "customProperties": [
                self._property_value(name, value) for name, value in task.custom_properties
            ],
        }
        if model == "ReloadTask":
            doc["app"] = self.app_condensed()
            doc["isManuallyTriggered"] = False
        elif model == "ExternalProgramTask":
            doc.update(path=f"C:\\Scripts\\{task.name}.cmd", parameters="", qlikUser=None)
        doc["operational"] = self._operational(now)
        doc.update(
            name=task.name,
            taskType=task.task_type,
            enabled=task.enabled,
            taskSessionTimeout=TASK_SESSION_TIMEOUT_MIN,
            maxRetries=task.max_retries,
            tags=[self.store.tag(name).condensed() for name in task.tags],
        )
        if model == "ReloadTask":
            doc["isPartialReload"] = False
        doc.update(privileges=None, schemaPath=model)
        if model == "ReloadTask":
            condensed_keys: tuple[str, ...] = (
                "id",
                "operational",
                "name",
                "app",
                "taskType",
                "enabled",
                "privileges",
            )
        else:
            condensed_keys = ("id", "operational", "name", "taskType", "enabled", "privileges")
        rendered = _Rendered(key, doc, condensed_keys)
        self._cache[model] = rendered
        return rendered

    def _property_value(self, name: str, value: str) -> dict[str, Any]:
        return {
            "id": stable_id("custompropertyvalue", self.task.id, name, value),
            "createdDate": self.created,
            "modifiedDate": self.created,
            "modifiedByUserName": MODIFIED_BY,
            "value": value,
            "definition": self.store.definition(name).condensed(),
            "privileges": None,
            "schemaPath": "CustomPropertyValue",
        }


class Store:
    """Thread-safe in-memory repository behind the simulated QRS endpoints.

    ``clock`` gives wall-clock seconds (``time.time`` by default; tests may inject a fake
    one). ``start_delay`` is how long an execution stays Triggered before it needs a slot;
    ``retry_delay`` how long it shows Retry (10) between two attempts (at least
    ``MIN_RETRY_DELAY``). Both apply to executions triggered after a change.

    The scheduler (:mod:`.scheduler`): ``max_concurrent`` slots (0 = unlimited, the default;
    QRS's own default is 4) and ``queue_timeout`` seconds (None or 0 = off, the default; QRS's
    is 30 minutes). Both may be changed at any time: executions still waiting (Triggered or
    Queued) are then scheduled again under the new settings, in trigger order, from that
    moment on; executions already started or cancelled keep their times. An execution's run
    plan (attempts, their run time and outcomes) is fixed when it is triggered, so changing a
    task (:meth:`replace_task`) affects its later executions only; disabling a task does not
    cancel an execution of it that is already queued.
    """

    def __init__(
        self,
        tasks: Iterable[SimTask] = (),
        *,
        clock: Callable[[], float] = time.time,
        start_delay: float = 0.05,
        retry_delay: float = 0.05,
        max_concurrent: int = 0,
        queue_timeout: float | None = None,
    ) -> None:
        self.clock = clock
        self.start_delay = start_delay
        self.retry_delay = retry_delay
        self.abort_initiated_seconds = 0.5
        self.aborting_seconds = 1.0
        self.file_references = True
        self.generation = 0  # bumped whenever rendered tasks/definitions may have changed
        self._lock = threading.RLock()
        self._seq = 0
        self._tasks: dict[str, _TaskEntry] = {}
        self._tags: dict[str, _Tag] = {}
        self._definitions: dict[str, _PropertyDefinition] = {}
        self._results: dict[str, _ResultRow] = {}  # by result id, in trigger order
        self._by_session: dict[str, Execution] = {}
        self._active: dict[str, Execution] = {}  # sessions that may still be running
        self._starts: list[StartRecord] = []
        self._stop_requests: list[StartRecord] = []
        self._by_file_reference: dict[str, _ResultRow] = {}
        self._max_concurrent = _checked_capacity(max_concurrent)
        self._queue_timeout = _checked_timeout(queue_timeout)
        self._fifo = Fifo(self._max_concurrent, self._queue_timeout)
        for task in tasks:
            self.add_task(task)

    # --- scheduler settings -------------------------------------------------------------------

    @property
    def max_concurrent(self) -> int:
        """Executions that may hold a slot at once; 0 = unlimited."""
        return self._max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        value = _checked_capacity(value)
        with self._lock:
            self._max_concurrent = value
            self._reschedule(self.clock())

    @property
    def queue_timeout(self) -> float | None:
        """Seconds an execution may stay Queued before it is cancelled; None = never."""
        return self._queue_timeout

    @queue_timeout.setter
    def queue_timeout(self, value: float | None) -> None:
        value = _checked_timeout(value)
        with self._lock:
            self._queue_timeout = value
            self._reschedule(self.clock())

    # --- tasks ------------------------------------------------------------------------------

    def add_task(self, task: SimTask) -> None:
        """Add a task (copied, so later changes to ``task`` do not leak in)."""
        task = _checked_copy(task)
        with self._lock:
            if task.id in self._tasks:
                raise ValueError(f"duplicate task id {task.id}")
            entry = _TaskEntry(task, self.clock(), self)
            entry.seq = self._next_seq()
            self._tasks[task.id] = entry
            self._register_names(entry)

    def replace_task(self, task: SimTask) -> None:
        """Replace the stored task with the same id (e.g. to disable it in a test).

        Tags and property values it drops stay defined, as they would in QRS.
        """
        task = _checked_copy(task)
        with self._lock:
            entry = self._tasks[task.id]
            entry.task = task
            entry.app_id = task.app_id or stable_id("app", task.id)
            entry.app_name = task.app_name or task.name
            self._register_names(entry)

    def task(self, task_id: str) -> SimTask | None:
        """A copy of the stored task, or None."""
        with self._lock:
            entry = self._tasks.get(task_id.lower())
            return _checked_copy(entry.task) if entry else None

    def task_id_by_name(self, name: str) -> str | None:
        """Id of the first task whose name equals ``name`` case-insensitively."""
        folded = name.casefold()
        with self._lock:
            for entry in self._tasks.values():
                if entry.task.name.casefold() == folded:
                    return entry.task.id
        return None

    def tag(self, name: str) -> _Tag:
        """The shared tag entity of that name (it exists once a task uses it)."""
        return self._tags[name]

    def definition(self, name: str) -> _PropertyDefinition:
        """The shared custom property definition of that name."""
        return self._definitions[name]

    def _register_names(self, entry: _TaskEntry) -> None:
        now = self.clock()
        for name in entry.task.tags:
            if name not in self._tags:
                self._tags[name] = tag = _Tag(name, now)
                tag.seq = self._next_seq()
        for name, value in entry.task.custom_properties:
            definition = self._definitions.get(name)
            if definition is None:
                self._definitions[name] = definition = _PropertyDefinition(name, now)
                definition.seq = self._next_seq()
            definition.note_use(value, entry.schema)
        self.generation += 1

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- executions ---------------------------------------------------------------------------

    def start(self, task_id: str) -> StartOutcome:
        """Trigger a task; raises KeyError for an unknown id.

        A disabled task does not run (``execution_id`` None). A task whose previous execution
        is still running (Triggered, Queued, Started or Retry) is not triggered again: that
        execution is returned with ``created=False``, like the QMC scheduler that refuses
        parallel runs of one task.
        """
        with self._lock:
            entry = self._tasks[task_id.lower()]
            if not entry.task.enabled:
                return StartOutcome(None, False)
            now = self.clock()
            previous = entry.latest
            if previous is not None and previous.running(now):
                return StartOutcome(previous.session_id, False)
            if previous is not None:
                entry.runs_before_latest += previous.runs
            execution = Execution(
                entry,
                now,
                start_delay=self.start_delay,
                retry_delay=self.retry_delay,
                runs_before=entry.runs_before_latest,
            )
            entry.latest = execution
            for row in execution.rows:
                row.seq = self._next_seq()
                self._results[row.result_id] = row
                self._by_file_reference[row.file_reference_id] = row
            execution.seq = execution.rows[0].seq
            self._place(execution, now)  # last in the queue: nothing placed earlier moves
            self._by_session[execution.session_id] = execution
            self._active[execution.session_id] = execution
            self._starts.append(StartRecord(entry.task.id, execution.session_id, now))
            return StartOutcome(execution.session_id, True)

    @property
    def starts(self) -> list[StartRecord]:
        """Every execution actually triggered, oldest first (a copy)."""
        with self._lock:
            return list(self._starts)

    def stop(self, task_id: str) -> str | None:
        """A stop request for a task; raises KeyError for an unknown id.

        The task's running execution (Triggered, Queued, Started or Retry) goes AbortInitiated
        (4) now, Aborting (5) after ``abort_initiated_seconds``, Aborted (6) after another
        ``aborting_seconds``; its session shows ``abortReason`` 1 (Manual); a slot it held frees
        at the end and queued executions move up. Returns that execution's session id, or
        None when nothing runs. A stop of an execution already stopping changes nothing.
        """
        with self._lock:
            entry = self._tasks[task_id.lower()]
            now = self.clock()
            self._stop_requests.append(StartRecord(entry.task.id, "", now))
            execution = entry.latest
            if execution is None or not execution.running(now):
                return None
            if execution.stop is None:
                execution.apply_stop(Stop(now, max(0.0, self.abort_initiated_seconds), max(0.0, self.aborting_seconds)))
                self._reschedule(now)
            return execution.session_id

    @property
    def stop_requests(self) -> list[StartRecord]:
        """Every stop request received (``execution_id`` empty), oldest first (a copy)."""
        with self._lock:
            return list(self._stop_requests)

    def log_of_result(self, task_id: str, result_id: str) -> LogSpec | None:
        """The script log of execution result ``result_id`` of task ``task_id``, if it has one."""
        with self._lock:
            row = self._results.get(result_id.lower())
            if row is None or row.execution.task_id != task_id.lower() or not row.visible(self.clock()):
                return None
            return row.log_spec(self.clock())

    def log_of_file_reference(self, task_id: str, file_reference_id: str) -> LogSpec | None:
        """The script log behind a (deprecated) ``fileReferenceID`` of task ``task_id``."""
        with self._lock:
            row = self._by_file_reference.get(file_reference_id.lower())
            if row is None or not self.file_references or row.execution.task_id != task_id.lower():
                return None
            return row.log_spec(self.clock())

    def _reschedule(self, now: float) -> None:
        """After a settings change: schedule again what still waits at ``now``, in trigger order."""
        running = self._running_sessions(now)
        waiting = sorted((e for e in running if e.waiting(now)), key=lambda e: e.seq)
        busy = [e.timeline.end for e in running if e.holds_slot(now)]
        self._fifo = Fifo(self._max_concurrent, self._queue_timeout, busy, now)
        for execution in waiting:
            self._place(execution, now)

    def _place(self, execution: Execution, now: float) -> None:
        decision = self._fifo.place(Waiting(execution.ready_at, execution.occupancy), now)
        execution.decide(decision, self._queue_timeout)

    def _running_sessions(self, now: float) -> list[Execution]:
        # Finished sessions are dropped here, lazily: that is QRS deleting the session row.
        for session_id in [s for s, e in self._active.items() if not e.running(now)]:
            del self._active[session_id]
        return list(self._active.values())

    # --- queries ------------------------------------------------------------------------------

    def query(
        self,
        collection: str,
        flt: CompiledFilter | None = None,
        orderby: str | None = None,
        *,
        full: bool,
    ) -> str:
        """The JSON array a list endpoint answers with.

        Filters always run on the full model, even for condensed lists (QRS lets a filter name
        properties the condensed form does not show). Raises FilterError on a bad ``orderby``.
        """
        sort_key = compile_orderby(orderby) if orderby else None
        with self._lock:
            rendered = self._select(collection, flt)
            if sort_key is not None:
                rendered.sort(key=lambda r: sort_key(r.subject))
            parts = [r.full_json if full else r.condensed_json for r in rendered]
        return "[" + ",".join(parts) + "]"

    def count(self, collection: str, flt: CompiledFilter | None = None) -> int:
        """Number of objects a list endpoint would return."""
        with self._lock:
            return len(self._select(collection, flt))

    def get(self, collection: str, object_id: str) -> str | None:
        """Full JSON of one object, or None when there is none with that id."""
        object_id = object_id.lower()
        with self._lock:
            now = self.clock()
            rows = self._indexed(collection, "id", frozenset({object_id}), now)
            return self._render(collection, rows[0], now).full_json if rows else None

    def _select(self, collection: str, flt: CompiledFilter | None) -> list[_Rendered]:
        now = self.clock()
        rows: list[Any] | None = None
        if flt is not None and flt.guid_lookup is not None:
            rows = self._indexed(collection, *flt.guid_lookup, now)
        if rows is None:
            rows = self._rows(collection, now)
        out = []
        for row in rows:
            rendered = self._render(collection, row, now)
            if flt is None or flt.matches(rendered.subject):
                out.append(rendered)
        return out

    def _rows(self, collection: str, now: float) -> list[Any]:
        if collection == "reloadtask":
            return [e for e in self._tasks.values() if e.task.task_type == 0]
        if collection == "externalprogramtask":
            return [e for e in self._tasks.values() if e.task.task_type == 1]
        if collection == "task":
            return list(self._tasks.values())
        if collection == "tag":
            return list(self._tags.values())
        if collection == "custompropertydefinition":
            return list(self._definitions.values())
        if collection == "executionresult":
            return [row for row in self._results.values() if row.visible(now)]
        if collection == "executionsession":
            return self._running_sessions(now)
        raise KeyError(collection)

    def _indexed(
        self, collection: str, path: str, values: frozenset[str], now: float
    ) -> list[Any] | None:
        """Candidate rows for ``path eq <guid> or ...`` from an index, or None if none fits."""
        index: dict[str, Any]
        if path == "executionid" and collection == "executionresult":
            executions = [self._by_session[v] for v in values if v in self._by_session]
            found = [row for e in executions for row in e.rows if row.visible(now)]
            return sorted(found, key=lambda row: row.seq)
        if path != "id":
            return None
        if collection in ("reloadtask", "externalprogramtask", "task"):
            index = self._tasks
        elif collection == "tag":
            index = {t.id: t for t in self._tags.values()}
        elif collection == "custompropertydefinition":
            index = {d.id: d for d in self._definitions.values()}
        elif collection == "executionresult":
            index = self._results
        else:
            index = {s.session_id: s for s in self._running_sessions(now)}
        rows: list[Any] = [index[v] for v in values if v in index]
        if collection == "executionresult":
            rows = [row for row in rows if row.visible(now)]
        elif collection == "reloadtask":
            rows = [e for e in rows if e.task.task_type == 0]
        elif collection == "externalprogramtask":
            rows = [e for e in rows if e.task.task_type == 1]
        return sorted(rows, key=lambda row: row.seq)

    def _render(self, collection: str, row: Any, now: float) -> _Rendered:
        if collection in ("reloadtask", "externalprogramtask"):
            return row.render(row.schema, now)  # type: ignore[no-any-return]
        if collection == "task":
            return row.render("Task", now)  # type: ignore[no-any-return]
        if collection in ("tag", "custompropertydefinition"):
            return row.render()  # type: ignore[no-any-return]  # few rows: not cached
        if collection == "executionresult":
            return row.render(now)  # type: ignore[no-any-return]
        return row.render_session(now)  # type: ignore[no-any-return]


def _checked_capacity(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_concurrent must be an integer of 0 (unlimited) or more, got {value!r}")
    return value


def _checked_timeout(value: float | None) -> float | None:
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"queue_timeout must be a number of seconds, 0 or None (off), got {value!r}")
    return float(value)


def _checked_copy(task: SimTask) -> SimTask:
    try:
        canonical = str(uuid.UUID(task.id))
    except ValueError:
        raise ValueError(f"task id {task.id!r} is not a GUID") from None
    try:
        app_id = str(uuid.UUID(task.app_id)) if task.app_id else ""
    except ValueError:
        raise ValueError(f"task {task.name!r}: app id {task.app_id!r} is not a GUID") from None
    if task.task_type not in (0, 1):
        raise ValueError(f"task {task.name!r}: taskType must be 0 (reload) or 1 (external)")
    if task.outcome not in ("success", "fail"):
        raise ValueError(f"task {task.name!r}: outcome must be 'success' or 'fail'")
    if task.log_encoding not in ENCODINGS:
        raise ValueError(f"task {task.name!r}: log_encoding must be one of {', '.join(ENCODINGS)}")
    if not isinstance(task.failure_message, str):
        raise ValueError(f"task {task.name!r}: failure_message must be a string")
    for name in ("fail_first", "max_retries", "log_lines", "log_bytes"):
        value = getattr(task, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"task {task.name!r}: {name} must be an integer of 0 or more")
    if not isinstance(task.run_seconds, int | float) or not 0 <= task.run_seconds < math.inf:
        raise ValueError(f"task {task.name!r}: run_seconds must be 0 or more")
    return dataclasses.replace(
        task,
        id=canonical,
        app_id=app_id,
        tags=list(dict.fromkeys(task.tags)),
        custom_properties=[(str(n), str(v)) for n, v in task.custom_properties],
    )
