"""Every reply event of the contract (section 4): its type, its builder and its readers.

The types (`replies.types`, TypedDicts) are the wire shapes and the schemas of the AsyncAPI and
OpenAPI documents; one function per event kind here turns plain data into that typed event
(a JSON-ready dict with `event` and `requestId` first); the readers below read replies back
(REST answers, the `request` command, metrics). The MQTT edge publishes these dicts, the
journal stores them: change a reply's shape here, and only here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast, get_args

from butler_mqtt.model import Match, TaskOutcome, TaskStatus, matches
from butler_mqtt.replies.types import (
    ErrorEvent,
    FailureInfo,
    ListedTask,
    ReplyEvent,
    RequestFinishedEvent,
    StopSummaryEvent,
    SummaryEvent,
    TaskEvent,
    TaskFinishedEvent,
    TaskOverdueEvent,
)

#: QRS's "never" timestamp (1753 sentinel): reported as null.
QRS_NEVER = "1753-01-01T00:00:00.000Z"

#: A reply as the edges carry it (built here as one of `ReplyEvent`, or read back from the journal).
Event = Mapping[str, Any]
#: A reply being built.
_Draft = dict[str, Any]

#: Task statuses listed under `tasksStarted` in a summary.
_LISTED_AS_STARTED = ("started", "notStarted", "wouldStart")
#: ... under `tasksRunning` (found running: run policies, contract section 7).
_LISTED_AS_RUNNING = ("alreadyRunning", "skipped")


def _staged(ev: _Draft, stage: int | None) -> _Draft:
    if stage is not None:
        ev["stage"] = stage
    return ev


def task(o: TaskOutcome, request_id: str | None, stage: int | None = None) -> TaskEvent:
    """`task`: what happened to one selected task."""
    ev: _Draft = {"event": "task", "requestId": request_id, "taskId": o.task_id, "taskName": o.task_name, "status": o.status}
    if o.execution_id is not None:
        ev["executionId"] = o.execution_id
    ev["matchedBy"] = [str(m) for m in o.matched_by]  # each Match's wire form
    if o.reason is not None:
        ev["reason"] = o.reason
    _policy_fields(ev, o)
    return cast("TaskEvent", _staged(ev, stage))


def _policy_fields(d: _Draft, o: TaskOutcome) -> None:
    if o.position is not None:
        d["position"] = o.position
    if o.attempt is not None:
        d["attempt"] = o.attempt


def brief(o: TaskOutcome) -> ListedTask:
    """A task as listed inside a summary."""
    d: _Draft = {"taskId": o.task_id, "taskName": o.task_name, "status": o.status}
    if o.status in _LISTED_AS_RUNNING and o.execution_id is not None:
        d["executionId"] = o.execution_id
    if o.reason is not None:
        d["reason"] = o.reason
    _policy_fields(d, o)
    return cast("ListedTask", d)


def summary(
    request_id: str | None, outcomes: list[TaskOutcome], not_found: list[dict[str, Any]], stage: int | None = None
) -> SummaryEvent:
    """`summary`: the stage at a glance.

    `tasksStarted` lists every task QRS was asked to start (status started or notStarted) or
    would start (dryRun); `totalTasksStarted` counts those QRS really started.
    """
    ev: _Draft = {
        "event": "summary",
        "requestId": request_id,
        "tasksStarted": [brief(o) for o in outcomes if o.status in _LISTED_AS_STARTED],
        "tasksNotFound": list(not_found),
        "tasksDenied": [brief(o) for o in outcomes if o.status == "denied"],
        "tasksFailed": [brief(o) for o in outcomes if o.status == "failed"],
        "tasksRunning": [brief(o) for o in outcomes if o.status in _LISTED_AS_RUNNING],
        "tasksQueued": [brief(o) for o in outcomes if o.status == "queued"],
        "totalTasksStarted": sum(1 for o in outcomes if o.status == "started"),
    }
    return cast("SummaryEvent", _staged(ev, stage))


def error(request_id: str | None, error: str, details: str) -> ErrorEvent:
    """`error`: the request was not handled (nothing more was started)."""
    return {"event": "error", "requestId": request_id, "error": error, "details": details}


def _qrs_time(value: Any) -> Any:
    return None if value in (None, QRS_NEVER) else value


def duration_ms(start: Any, stop: Any, reported: Any) -> int | None:
    """QRS's `duration` when it has one, else stop - start; None when neither is known."""
    if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
        return reported
    try:
        a = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = datetime.fromisoformat(str(stop).replace("Z", "+00:00"))
        return max(0, int((b - a).total_seconds() * 1000))
    except ValueError:
        return None


def stop_summary(request_id: str | None, outcomes: list[TaskOutcome], not_found: list[dict[str, Any]]) -> StopSummaryEvent:
    """`summary` of a stop request (contract section 8): what became of each selected task."""
    def listed(o: TaskOutcome) -> dict[str, Any]:
        d: _Draft = {"taskId": o.task_id, "taskName": o.task_name, "status": o.status}
        if o.status == "stopping" and o.execution_id is not None:
            d["executionId"] = o.execution_id
        if o.reason is not None:
            d["reason"] = o.reason
        return d

    ev: _Draft = {
        "event": "summary",
        "requestId": request_id,
        "tasksStopping": [listed(o) for o in outcomes if o.status == "stopping"],
        "tasksNotRunning": [listed(o) for o in outcomes if o.status == "notRunning"],
        "tasksNotFound": list(not_found),
        "tasksDenied": [listed(o) for o in outcomes if o.status == "denied"],
        "tasksFailed": [listed(o) for o in outcomes if o.status == "failed"],
    }
    return cast("StopSummaryEvent", ev)


def task_finished(
    request_id: str | None,
    task_id: str,
    task_name: str,
    execution_id: str,
    status: str,
    row: Mapping[str, Any] | None,
    reason: str | None = None,
    stage: int | None = None,
    attempt: int | None = None,
    retry_in: float | None = None,
    failure: Mapping[str, Any] | None = None,
) -> TaskFinishedEvent:
    """`taskFinished`: a followed execution ended (`row`: QRS's ExecutionResult, if any).

    With `retry`: `attempt` (1 = the first start), and `retryIn` (seconds) when another start
    follows; the last attempt's event has no `retryIn`."""
    start = row.get("startTime") if row else None
    stop = row.get("stopTime") if row else None
    ev: _Draft = {
        "event": "taskFinished",
        "requestId": request_id,
        "taskId": task_id,
        "taskName": task_name,
        "executionId": execution_id,
        "status": status,
        "startTime": _qrs_time(start),
        "stopTime": _qrs_time(stop),
        "durationMs": duration_ms(start, stop, row.get("duration")) if row else None,
    }
    if row and isinstance(row.get("cloudStatus"), str):
        ev["cloudStatus"] = row["cloudStatus"]  # Qlik Cloud's own status (contract section 9)
    if reason is not None:
        ev["reason"] = reason
    if attempt is not None:
        ev["attempt"] = attempt
        if retry_in is not None:
            ev["retryIn"] = int(retry_in) if float(retry_in).is_integer() else round(retry_in, 3)
    ev = _staged(ev, stage)
    if failure is not None and status != "FinishedSuccess":
        ev["failure"] = failure_info(failure)
    return cast("TaskFinishedEvent", ev)


def failure_info(failure: Mapping[str, Any]) -> FailureInfo:
    """The `failure` object of a taskFinished (contract section 8) from what the backend said:
    only the contract's keys, texts capped again here (a backend's caps are not trusted)."""
    out: dict[str, Any] = {
        "message": _cap(failure.get("message"), FAILURE_MESSAGE_CHARS),
        "details": [_cap(d, FAILURE_LINE_CHARS) for d in _strings(failure.get("details"))],
    }
    tail = failure.get("scriptLogTail")
    if isinstance(tail, list):
        lines = [_cap(line, FAILURE_LINE_CHARS) for line in _strings(tail)]
        kept: list[str] = []
        size = 0
        for line in reversed(lines):  # the 64 KiB cap keeps the last lines
            size += len(line.encode("utf-8")) + 1
            if size > FAILURE_TAIL_BYTES:
                break
            kept.append(line)
        out["scriptLogTail"] = kept[::-1]
    if failure.get("scriptLogError") is not None:
        out["scriptLogError"] = _cap(failure.get("scriptLogError"), FAILURE_MESSAGE_CHARS)
    return cast("FailureInfo", out)


FAILURE_MESSAGE_CHARS = 2000
FAILURE_LINE_CHARS = 1000
FAILURE_TAIL_BYTES = 64 * 1024


def _strings(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _cap(value: Any, chars: int) -> str:
    """Valid UTF-8 (a lone surrogate -> '?'), no control character but tab (a NUL cannot be
    journaled in PostgreSQL; a line end would split a line), at most `chars` characters."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return _CONTROLS.sub("\ufffd", text.encode("utf-8", "replace").decode("utf-8"))[:chars]


def task_overdue(
    request_id: str | None, task_id: str, task_name: str, execution_id: str, running_for_ms: int, stage: int | None = None,
    action: str | None = None,
) -> TaskOverdueEvent:
    """`taskOverdue`: a followed execution still runs `deadline` seconds after its start (once);
    `action` "stopped" when onDeadline stop stopped it (contract section 8)."""
    ev: _Draft = {
        "event": "taskOverdue",
        "requestId": request_id,
        "taskId": task_id,
        "taskName": task_name,
        "executionId": execution_id,
        "runningForMs": running_for_ms,
    }
    if action is not None:
        ev["action"] = action
    return cast("TaskOverdueEvent", _staged(ev, stage))


def request_finished(
    request_id: str | None, finished: Mapping[str, int], stopped_at: int | None, duration_ms: int, reason: str | None
) -> RequestFinishedEvent:
    """`requestFinished`: the last event of a waited request."""
    ev: _Draft = {
        "event": "requestFinished",
        "requestId": request_id,
        "finished": dict(finished),
        "stoppedAtStage": stopped_at,
        "durationMs": duration_ms,
    }
    if reason is not None:
        ev["reason"] = reason
    return cast("RequestFinishedEvent", ev)


def task_events(events: Iterable[Event]) -> list[Event]:
    """The `task` events among `events` (for readers: metrics, REST answers, the journal)."""
    return [ev for ev in events if ev.get("event") == "task"]


# --------------------------------------------------------------------------- readers
#
# Replies are read back as well as built: the REST answers (http/bodies.py), the `request`
# command's exit code (cli.py), the requester (mqtt/requester.py) and the metrics. They read
# through the names below, so that the wire names live in this module only; the typed views
# they return are replies.types', the schemas of the AsyncAPI document.

#: The `event` of each reply.
TASK, SUMMARY, TASK_FINISHED, TASK_OVERDUE, REQUEST_FINISHED, ERROR = (
    "task",
    "summary",
    "taskFinished",
    "taskOverdue",
    "requestFinished",
    "error",
)
#: Every `task` status, as the request model defines them.
TASK_STATUSES: tuple[str, ...] = get_args(TaskStatus)
STARTED, DENIED, QUEUED = "started", "denied", "queued"
#: The QRS final state of a reload that succeeded (`taskFinished` status).
FINISHED_SUCCESS = "FinishedSuccess"


def kind(ev: Mapping[str, Any]) -> str | None:
    """The reply's `event` (None for anything that is not a reply of ours)."""
    value = ev.get("event")
    return value if isinstance(value, str) else None


def in_first_stage(ev: Mapping[str, Any]) -> bool:
    """The event belongs to the request itself, not to a later `then` stage."""
    return ev.get("stage") in (None, 0)


def first_stage_tasks(events: Iterable[Event]) -> list[TaskEvent]:
    """The `task` events of the request's first stage."""
    return [cast("TaskEvent", ev) for ev in task_events(events) if in_first_stage(ev)]


def summary_of(events: Iterable[Event]) -> SummaryEvent | None:
    """The first stage's `summary` among `events`, if there is one."""
    for ev in events:
        if kind(ev) == SUMMARY and in_first_stage(ev):
            return cast("SummaryEvent", ev)
    return None


def without_event(ev: Mapping[str, Any]) -> dict[str, Any]:
    """A reply without its `event` key (the REST answer is the summary so)."""
    return {k: v for k, v in ev.items() if k != "event"}


def replayed(ev: Mapping[str, Any]) -> Event:
    """A reply re-published from the journal for a repeated request (same requestId, or a
    redelivery): the same event, marked `"replayed": true`; nothing was started again."""
    return {**ev, "replayed": True}


def ends_request(ev: Mapping[str, Any], waits: bool) -> bool:
    """The reply after which no more come for the request: an error, else its summary, or
    requestFinished when the request waits (`wait` or `then`); see also `still_queued`."""
    k = kind(ev)
    return k == ERROR or k == (REQUEST_FINISHED if waits else SUMMARY)


def still_queued(events: Iterable[Mapping[str, Any]]) -> bool:
    """A task answered `queued` (run policies) gets a second `task` event when it is started or
    given up: without `wait`, the request is over once each queued task had it."""
    waiting: set[tuple[Any, Any]] = set()
    for ev in events:
        if kind(ev) == TASK:
            ident = (ev.get("taskId"), ev.get("stage"))
            if ev.get("status") == QUEUED:
                waiting.add(ident)
            else:
                waiting.discard(ident)
    return bool(waiting)


def reload_failed(ev: Mapping[str, Any]) -> bool:
    """A `taskFinished` for a reload that did not end with FinishedSuccess."""
    return kind(ev) == TASK_FINISHED and ev.get("status") != FINISHED_SUCCESS


def matched(ev: Mapping[str, Any]) -> list[Match]:
    """The criteria a `task` event's task matched, as data (its `matchedBy` read back)."""
    value = ev.get("matchedBy")
    return matches(m for m in value if isinstance(m, str)) if isinstance(value, list) else []


@dataclass(frozen=True)
class EventSpec:
    """One reply event: its `event` name, its wire schema and the function that builds it."""

    name: str
    schema: type
    builder: Callable[..., ReplyEvent]


#: Every reply event, in the contract's order (section 4).
REPLY_EVENTS: tuple[EventSpec, ...] = (
    EventSpec(TASK, TaskEvent, task),
    EventSpec(SUMMARY, SummaryEvent, summary),
    EventSpec(TASK_FINISHED, TaskFinishedEvent, task_finished),
    EventSpec(TASK_OVERDUE, TaskOverdueEvent, task_overdue),
    EventSpec(REQUEST_FINISHED, RequestFinishedEvent, request_finished),
    EventSpec(ERROR, ErrorEvent, error),
)
#: A stop request's summary (contract section 8): a `summary` event with its own lists.
STOP_SUMMARY = EventSpec(SUMMARY, StopSummaryEvent, stop_summary)


_APP_KEYS = {"taskId": "appId", "taskName": "appName"}
_SUMMARY_LISTS = ("tasksStarted", "tasksDenied", "tasksFailed", "tasksRunning", "tasksQueued", "tasksStopping", "tasksNotRunning")


def on_wire(ev: Event, backend: str) -> Event:
    """The event as it leaves the daemon (MQTT, REST). With `backend: cloud` a task is an app:
    `appId`/`appName` in place of `taskId`/`taskName` (contract section 9), in the event and in
    the summary's lists. Inside the daemon (journal, tracking, history) the names stay."""
    if backend != "cloud" or "event" not in ev:
        return ev
    out: dict[str, Any] = {_APP_KEYS.get(k, k): v for k, v in ev.items()}
    for key in _SUMMARY_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [{_APP_KEYS.get(k, k): v for k, v in t.items()} if isinstance(t, dict) else t for t in out[key]]
    return cast("Event", out)
