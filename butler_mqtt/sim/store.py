"""The simulator's in-memory repository: tasks, tags, custom properties, executions.

Objects are rendered in QRS's own JSON shapes (qrs-api.md sections 2, 3 and 6): ISO-8601 UTC
dates with milliseconds, the ``1753-01-01T00:00:00.000Z`` "never" sentinel, the empty GUID for
"none", integer enums, ``privileges: null`` and a ``schemaPath`` on every full object.

Executions cost nothing while they run: an execution only records when it was triggered, and
its state (Triggered 1 -> Started 2 -> FinishedSuccess 7 / FinishedFail 8), detail lines, times
and the existence of its execution session are computed from the clock whenever asked. There
is no timer or thread per execution.

Rendered objects are cached per entity and re-rendered only when something they show changed
(a new execution state, a task added or replaced), and filters keep what they found along
each property path, so a repeated query over 20,000 tasks is a scan of cached data.

Choices where the research is silent (qrs-api.md section 11 and elsewhere):

* ``/qrs/task/full`` items use the ``Task`` model (no ``app``, no type-specific fields) with
  ``schemaPath: "Task"``; ``taskType`` tells the kinds apart.
* A task that is still running is never started a second time; see :meth:`Store.start`.
* Detail lines are listed in a stable but not chronological order (ordered by their ids), so
  a client that forgets to sort by ``detailCreatedDate`` (Butler sorts) shows it in tests.
* Every detail line is ``detailsType`` 2 (Information), also for a failed run.
* ``/qrs/executionresult`` (condensed) lacks ``taskID``/``executionID``; filters can still use
  them, as on QRS. ``/qrs/executionresult/full`` has them.
* ``startTime`` stays at the sentinel while Triggered; ``duration`` is 0 until finished.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .filter import CompiledFilter, FilterSubject, compile_orderby

EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
NEVER = "1753-01-01T00:00:00.000Z"
MODIFIED_BY = "INTERNAL\\sa_repository"
NODE_NAME = "sim-node1"
TASK_SESSION_TIMEOUT_MIN = 1440

#: TaskExecutionStatus (qrs-api.md 6.4), index = wire value.
STATUS_NAMES = (
    "NeverStarted",
    "Triggered",
    "Started",
    "Queued",
    "AbortInitiated",
    "Aborting",
    "Aborted",
    "FinishedSuccess",
    "FinishedFail",
    "Skipped",
    "Retry",
    "Error",
    "Reset",
    "DistributionQueue",
    "DistributionRunning",
)
TRIGGERED, STARTED, FINISHED_SUCCESS, FINISHED_FAIL = 1, 2, 7, 8

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
    task and 1 for an external program task. ``run_seconds`` is how long an execution runs
    once started; ``outcome`` is ``"success"`` (ends FinishedSuccess, 7) or ``"fail"``
    (FinishedFail, 8). ``app_name``/``app_id`` default to values derived from the task.
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


@dataclass(frozen=True)
class StartRecord:
    """One execution actually started (``at`` is the store clock, ``time.time()`` by default)."""

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
    """One run of a task: an execution session while running, an execution result forever."""

    def __init__(self, entry: _TaskEntry, triggered_at: float, start_delay: float) -> None:
        self.entry = entry
        self.task_id = entry.task.id
        self.session_id = str(uuid.uuid4())
        self.result_id = str(uuid.uuid4())
        self.triggered_at = triggered_at
        self.started_at = triggered_at + start_delay
        self.finished_at = self.started_at + max(0.0, entry.task.run_seconds)
        self.final_status = FINISHED_FAIL if entry.task.outcome == "fail" else FINISHED_SUCCESS
        self.is_reload = entry.task.task_type == 0
        self.seq = 0
        final = STATUS_NAMES[self.final_status]
        # (status from which the line shows, its timestamp, text). Lines of one phase are 1 ms
        # apart so that sorting by detailCreatedDate gives the real order; visibility goes by
        # phase, not time, so a render cached per status is never stale.
        ms = 0.001
        lines = [
            (TRIGGERED, triggered_at, "Changing task state to Triggered"),
            (
                TRIGGERED,
                triggered_at + ms,
                f"Trying to start task. Sending task to slave-node {NODE_NAME}",
            ),
            (STARTED, self.started_at, "Changing task state from Triggered to Started"),
        ]
        if self.is_reload:
            lines.append((FINISHED_SUCCESS, self.finished_at, "Reference to scriptlog added"))
        lines.append(
            (
                FINISHED_SUCCESS,
                self.finished_at + ms,
                f"Changing task state from Started to {final}",
            )
        )
        # Stable but non-chronological order (by detail id): QRS gives no ordering guarantee.
        self._details = sorted((str(uuid.uuid4()), *line) for line in lines)
        self._cache: dict[str, _Rendered] = {}

    def status(self, now: float) -> int:
        if now < self.started_at:
            return TRIGGERED
        if now < self.finished_at:
            return STARTED
        return self.final_status

    def running(self, now: float) -> bool:
        return now < self.finished_at

    def _result_fields(self, now: float) -> tuple[dict[str, Any], float]:
        """The ExecutionResultCondensed fields, and when they last changed."""
        status = self.status(now)
        done = status >= FINISHED_SUCCESS
        visible = [d for d in self._details if status >= d[1]]
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started_at))
        millis = int(self.started_at * 1000) % 1000
        log = (
            f"{NODE_NAME}\\Script\\{self.entry.app_id}.{stamp}.{millis:03d}+0000."
            f"{self.result_id.replace('-', '').upper()[:20]}.log"
        )
        has_log = done and self.is_reload
        fields = {
            "id": self.result_id,
            "executingNodeName": NODE_NAME if status >= STARTED else "",
            "status": status,
            "startTime": iso(self.started_at) if status >= STARTED else NEVER,
            "stopTime": iso(self.finished_at) if done else NEVER,
            "duration": round((self.finished_at - self.started_at) * 1000) if done else 0,
            "fileReferenceID": EMPTY_GUID,
            "scriptLogAvailable": has_log,
            "details": [
                {
                    "id": detail_id,
                    "detailsType": 2,  # Information
                    "message": message,
                    "detailCreatedDate": iso(at),
                    "privileges": None,
                }
                for detail_id, _, at, message in visible
            ],
            "scriptLogLocation": log if has_log else "",
            "scriptLogSize": 4096 + int(self.result_id[:3], 16) if has_log else 0,
            "privileges": None,
        }
        return fields, max(detail[2] for detail in visible)

    def condensed_result(self, now: float) -> dict[str, Any]:
        return self._result_fields(now)[0]

    def render_result(self, now: float) -> _Rendered:
        status = self.status(now)
        cached = self._cache.get("result")
        if cached is not None and cached.key == status:
            return cached
        fields, changed = self._result_fields(now)
        doc: dict[str, Any] = {
            "id": self.result_id,
            "createdDate": iso(self.triggered_at),
            "modifiedDate": iso(changed),
            "modifiedByUserName": MODIFIED_BY,
            "taskID": self.task_id,
            "executionID": self.session_id,
            "appID": self.entry.app_id if self.is_reload else EMPTY_GUID,
            "executingNodeID": _NODE_ID,
        }
        doc.update((k, v) for k, v in fields.items() if k != "id")
        doc["schemaPath"] = "ExecutionResult"
        rendered = _Rendered(status, doc, tuple(fields))
        self._cache["result"] = rendered
        return rendered

    def render_session(self, now: float) -> _Rendered:
        status = self.status(now)
        cached = self._cache.get("session")
        if cached is not None and cached.key == status:
            return cached
        fields, changed = self._result_fields(now)
        task_doc = self.entry.condensed(now)
        doc: dict[str, Any] = {
            "id": self.session_id,
            "createdDate": iso(self.triggered_at),
            "modifiedDate": iso(changed),
            "modifiedByUserName": MODIFIED_BY,
            "executingNode": {"id": _NODE_ID, "privileges": None},
            "executionResult": fields,
            "abortAt": iso(self.triggered_at + TASK_SESSION_TIMEOUT_MIN * 60),
            "retries": 0,
            "abortReason": 0,
            "app": self.entry.app_condensed() if self.is_reload else None,
            "user": None,
            "reloadTask": task_doc if self.is_reload else None,
            "userSyncTask": None,
            "externalProgramTask": None if self.is_reload else task_doc,
            "privileges": None,
            "schemaPath": "ExecutionSession",
        }
        rendered = _Rendered(status, doc, ("id", "privileges"))
        self._cache["session"] = rendered
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
            last = self.latest.condensed_result(now)
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
        key = (self.store.generation, latest.status(now) if latest else 0, id(latest))
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
            maxRetries=0,
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
    one). ``start_delay`` is how long an execution stays Triggered before it is Started.
    """

    def __init__(
        self,
        tasks: Iterable[SimTask] = (),
        *,
        clock: Callable[[], float] = time.time,
        start_delay: float = 0.05,
    ) -> None:
        self.clock = clock
        self.start_delay = start_delay
        self.generation = 0  # bumped whenever rendered tasks/definitions may have changed
        self._lock = threading.RLock()
        self._seq = 0
        self._tasks: dict[str, _TaskEntry] = {}
        self._tags: dict[str, _Tag] = {}
        self._definitions: dict[str, _PropertyDefinition] = {}
        self._results: dict[str, Execution] = {}  # by result id, in start order
        self._by_session: dict[str, Execution] = {}
        self._active: dict[str, Execution] = {}  # sessions that may still be running
        self._starts: list[StartRecord] = []
        for task in tasks:
            self.add_task(task)

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
        """Start a task; raises KeyError for an unknown id.

        A disabled task does not run (``execution_id`` None). A task whose previous execution
        is still running is not started again: that execution is returned with
        ``created=False``, like the QMC scheduler that refuses parallel runs of one task.
        """
        with self._lock:
            entry = self._tasks[task_id.lower()]
            if not entry.task.enabled:
                return StartOutcome(None, False)
            now = self.clock()
            if entry.latest is not None and entry.latest.running(now):
                return StartOutcome(entry.latest.session_id, False)
            execution = Execution(entry, now, self.start_delay)
            execution.seq = self._next_seq()
            entry.latest = execution
            self._results[execution.result_id] = execution
            self._by_session[execution.session_id] = execution
            self._active[execution.session_id] = execution
            self._starts.append(StartRecord(entry.task.id, execution.session_id, now))
            return StartOutcome(execution.session_id, True)

    @property
    def starts(self) -> list[StartRecord]:
        """Every execution actually started, oldest first (a copy)."""
        with self._lock:
            return list(self._starts)

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
            return list(self._results.values())
        if collection == "executionsession":
            return self._running_sessions(now)
        raise KeyError(collection)

    def _indexed(
        self, collection: str, path: str, values: frozenset[str], now: float
    ) -> list[Any] | None:
        """Candidate rows for ``path eq <guid> or ...`` from an index, or None if none fits."""
        index: dict[str, Any]
        if path == "executionid" and collection == "executionresult":
            index = self._by_session
        elif path != "id":
            return None
        elif collection in ("reloadtask", "externalprogramtask", "task"):
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
        if collection == "reloadtask":
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
            return row.render_result(now)  # type: ignore[no-any-return]
        return row.render_session(now)  # type: ignore[no-any-return]


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
    return dataclasses.replace(
        task,
        id=canonical,
        app_id=app_id,
        tags=list(dict.fromkeys(task.tags)),
        custom_properties=[(str(n), str(v)) for n, v in task.custom_properties],
    )
