"""The wire shape of every reply event, of the status message and of the alert message
(schema only, no logic).

The builders beside this module (`butler_mqtt.replies`) return these types; Pydantic turns them
into the JSON Schemas of the AsyncAPI document (`butler_mqtt.asyncapi`) and of the OpenAPI
document (`http/schemas.py`), and the integration tests validate every reply they receive.

The alert message (`AlertMessage`) is built by `butler_mqtt.ops.alerts`, which takes its alert
kinds, severities and keys from here (this module stays pure: ops/alerts does I/O).

Strict where the contract is closed (required keys, `additionalProperties: false`, enums),
so a new or renamed field cannot slip out unnoticed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, get_args

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from butler_mqtt.model import GUID_RE, MAX_REQUEST_ID_LENGTH, TaskStatus

_CLOSED = ConfigDict(extra="forbid")

Guid = Annotated[str, Field(pattern=GUID_RE.pattern)]
RequestId = Annotated[
    Annotated[str, Field(max_length=MAX_REQUEST_ID_LENGTH)] | None,
    Field(description="The request's `requestId`; null when it had none."),
]
TaskId = Annotated[Guid, Field(description="The reload task's ID in QRS.")]
TaskName = Annotated[str, Field(description="The reload task's name in QRS.")]
#: A Qlik Cloud reload id: opaque (24 hex digits today; qlik-cloud-api.md 3).
ReloadId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,100}$")]
ExecutionId = Annotated[
    Guid | ReloadId, Field(description="The QRS execution session of the reload (backend: cloud: the reload id).")
]
AppId = Annotated[Guid, Field(description="backend: cloud: the Qlik Cloud app's ID, in place of taskId.")]
AppName = Annotated[str, Field(description="backend: cloud: the Qlik Cloud app's name, in place of taskName.")]
Stage = Annotated[int, Field(ge=0, description="The stage of a `then` chain (0: the request itself).")]
Reason = Annotated[str, Field(description="Why (a sentence for people, not a code).")]
Position = Annotated[int, Field(ge=1, description="Place in butler-mqtt's queue (1 = next).")]
Attempt = Annotated[int, Field(ge=1, description="With `retry`: which start this is (1 = the first).")]
Millis = Annotated[int, Field(ge=0)]
Replayed = Annotated[
    Literal[True],
    Field(description="Present (true) when the reply is re-published from the journal for a repeated request "
                      "(the same requestId, or a redelivery): the earlier outcome, nothing was started again."),
]
#: The final states of a followed execution: QRS's own (model.FINAL_STATES) and `Unknown`.
FinalStatus = Literal["Aborted", "FinishedSuccess", "FinishedFail", "Skipped", "Error", "Reset", "Unknown"]
QrsTime = Annotated[str | None, Field(description="QRS's timestamp (ISO 8601, UTC); null when QRS has none.")]


_TASK_STATUS_DOC = (
    "started; notStarted (QRS accepted the start but did not start it, e.g. the task is disabled); denied "
    "(start_filter, allTaskIdsMustExist); failed (QRS error, see reason); wouldStart (dryRun); alreadyRunning "
    "(ifRunning attach: executionId is the running one); skipped (ifRunning skip); queued (waiting in "
    "butler-mqtt's queue, see position); expired (waited longer than policies.queue_timeout). A stop request's "
    "(contract section 8): stopping (the backend was asked to stop executionId), notRunning, denied, failed."
)

#: What the contract adds to `task` events: a started task has its execution, a queued one
#: its place in the queue (JSON Schema `if`/`then`).
_TASK_EVENT_RULES: dict[str, Any] = {
    "allOf": [
        {"if": {"properties": {"status": {"const": "started"}}}, "then": {"required": ["executionId"]}},
        {"if": {"properties": {"status": {"const": "queued"}}}, "then": {"required": ["position"]}},
        {"if": {"properties": {"status": {"const": "stopping"}}}, "then": {"required": ["executionId"]}},
    ]
}


@with_config(ConfigDict(extra="forbid", json_schema_extra=_TASK_EVENT_RULES))
class TaskEvent(TypedDict):
    """What happened to one selected task; one per task and stage, before the stage's summary.
    A task that was `queued` gets a second `task` event when it is started (or `expired`)."""

    event: Literal["task"]
    requestId: RequestId
    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Annotated[TaskStatus, Field(description=_TASK_STATUS_DOC)]
    executionId: NotRequired[ExecutionId]
    matchedBy: Annotated[
        list[Annotated[str, Field(pattern=r"^(taskId|tag|customProperty|appId|space):")]],
        Field(description="The criteria the task matched: `taskId:<id>`, `tag:<name>`, `customProperty:<name>=<value>`,"
                          " `appId:<id>`, `space:<name>`."),
    ]
    reason: NotRequired[Reason]
    position: NotRequired[Position]
    attempt: NotRequired[Attempt]
    stage: NotRequired[Stage]
    replayed: NotRequired[Replayed]


@with_config(_CLOSED)
class StartedTask(TypedDict):
    """A task listed under `tasksStarted`."""

    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Literal["started", "notStarted", "wouldStart"]
    reason: NotRequired[Reason]
    attempt: NotRequired[Attempt]


@with_config(_CLOSED)
class DeniedTask(TypedDict):
    """A task listed under `tasksDenied`."""

    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Literal["denied"]
    reason: NotRequired[Reason]


@with_config(_CLOSED)
class FailedTask(TypedDict):
    """A task listed under `tasksFailed` (`reason` says which error)."""

    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Literal["failed"]
    reason: NotRequired[Reason]
    attempt: NotRequired[Attempt]


@with_config(_CLOSED)
class RunningTask(TypedDict):
    """A task listed under `tasksRunning`: found running (`alreadyRunning` or `skipped`)."""

    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Literal["alreadyRunning", "skipped"]
    executionId: NotRequired[Annotated[Guid | ReloadId, Field(description="The execution found running.")]]
    reason: NotRequired[Reason]
    attempt: NotRequired[Attempt]


@with_config(_CLOSED)
class QueuedTask(TypedDict):
    """A task listed under `tasksQueued`: waiting in butler-mqtt's queue."""

    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    status: Literal["queued"]
    position: NotRequired[Position]
    reason: NotRequired[Reason]
    attempt: NotRequired[Attempt]


#: A task as listed inside a summary (one of the five lists).
ListedTask = StartedTask | DeniedTask | FailedTask | RunningTask | QueuedTask


@with_config(_CLOSED)
class NotFoundTaskId(TypedDict):
    """A task ID that matched no task."""

    taskId: Guid


@with_config(_CLOSED)
class NotFoundTag(TypedDict):
    """A tag that matched no task."""

    tag: str


@with_config(_CLOSED)
class NotFoundAppId(TypedDict):
    """An app ID that matched no app (backend: cloud) or no reload task of that app (qrs)."""

    appId: Guid


@with_config(_CLOSED)
class NotFoundSpace(TypedDict):
    """A space (backend: cloud) that does not exist or holds no app."""

    space: str


@with_config(_CLOSED)
class CustomPropertyPair(TypedDict):
    """A custom property name/value pair."""

    name: str
    value: str


@with_config(_CLOSED)
class NotFoundCustomProperty(TypedDict):
    """A custom property pair that matched no task."""

    customProperty: CustomPropertyPair


@with_config(_CLOSED)
class SummaryEvent(TypedDict):
    """The stage at a glance, after its `task` events. Without `wait` (and `then`) the last reply."""

    event: Literal["summary"]
    requestId: RequestId
    tasksStarted: Annotated[list[StartedTask], Field(description="Every task QRS was asked to start, or would be (dryRun).")]
    tasksNotFound: Annotated[
        list[NotFoundTaskId | NotFoundTag | NotFoundCustomProperty | NotFoundAppId | NotFoundSpace],
        Field(description="Every criterion that matched no task."),
    ]
    tasksDenied: Annotated[list[DeniedTask], Field(description="Tasks the start_filter (or allTaskIdsMustExist) refused.")]
    tasksFailed: Annotated[list[FailedTask], Field(description="Tasks QRS did not start because of an error.")]
    tasksRunning: Annotated[list[RunningTask], Field(description="Tasks found running (ifRunning attach or skip).")]
    tasksQueued: Annotated[list[QueuedTask], Field(description="Tasks waiting in butler-mqtt's queue when the summary was sent.")]
    totalTasksStarted: Annotated[int, Field(ge=0, description="How many tasks QRS really started.")]
    stage: NotRequired[Stage]
    replayed: NotRequired[Replayed]


@with_config(_CLOSED)
class FailureInfo(TypedDict):
    """Why an execution did not succeed (contract section 8): the backend's own texts and the
    tail of THAT execution's script log. Texts are capped and valid UTF-8."""

    message: Annotated[str, Field(max_length=2000, description="The backend's error text (QRS: the execution result's last error detail).")]
    details: Annotated[
        list[Annotated[str, Field(max_length=1000)]],
        Field(description="The execution result's detail messages, oldest first."),
    ]
    scriptLogTail: NotRequired[
        Annotated[
            list[Annotated[str, Field(max_length=1000)]],
            Field(description="The last `tracking.script_log_lines` lines of that execution's script log (64 KiB in all at most)."),
        ]
    ]
    scriptLogError: NotRequired[Annotated[str, Field(max_length=2000, description="Why the script log could not be read.")]]


@with_config(_CLOSED)
class StoppingTask(TypedDict):
    """A task listed under `tasksStopping`: the backend was asked to stop its running execution."""

    taskId: TaskId
    taskName: TaskName
    status: Literal["stopping"]
    executionId: Annotated[Guid, Field(description="The execution asked to stop.")]
    reason: NotRequired[Reason]


@with_config(_CLOSED)
class NotRunningTask(TypedDict):
    """A task listed under `tasksNotRunning`: nothing of it was running, nothing was stopped."""

    taskId: TaskId
    taskName: TaskName
    status: Literal["notRunning"]
    reason: NotRequired[Reason]


@with_config(_CLOSED)
class StopSummaryEvent(TypedDict):
    """The answer to a stop request (contract section 8), after its `task` events; without
    `wait` the last reply. Over REST the 200 answer (without `event`)."""

    event: Literal["summary"]
    requestId: RequestId
    tasksStopping: Annotated[list[StoppingTask], Field(description="Running tasks the backend was asked to stop.")]
    tasksNotRunning: Annotated[list[NotRunningTask], Field(description="Selected tasks that were not running.")]
    tasksNotFound: Annotated[
        list[NotFoundTaskId | NotFoundTag | NotFoundCustomProperty],
        Field(description="Every criterion that matched no task."),
    ]
    tasksDenied: Annotated[list[DeniedTask], Field(description="Tasks the start_filter refused (nothing was stopped).")]
    tasksFailed: Annotated[list[FailedTask], Field(description="Tasks whose stop the backend refused (see reason).")]


@with_config(ConfigDict(extra="forbid", json_schema_extra={"dependencies": {"retryIn": ["attempt"]}}))
class TaskFinishedEvent(TypedDict):
    """A followed execution ended (only with `wait` or `then`). QRS's own retries are followed to
    the real end; with `retry`, a failed attempt's event carries `attempt` and `retryIn`."""

    event: Literal["taskFinished"]
    requestId: RequestId
    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    executionId: ExecutionId
    status: Annotated[FinalStatus, Field(description="QRS's final state, or Unknown when the execution could not be followed.")]
    cloudStatus: NotRequired[
        Annotated[str, Field(description="backend: cloud: Qlik Cloud's own end status (SUCCEEDED, FAILED, CANCELED, EXCEEDED_LIMIT).")]
    ]
    startTime: QrsTime
    stopTime: QrsTime
    durationMs: Annotated[Millis | None, Field(description="How long the reload ran; null when unknown.")]
    reason: NotRequired[Reason]
    attempt: NotRequired[Attempt]
    retryIn: NotRequired[
        Annotated[float, Field(ge=0, description="Seconds until the next attempt, may be fractional (absent on the last one).")]
    ]
    stage: NotRequired[Stage]
    replayed: NotRequired[Replayed]
    failure: NotRequired[
        Annotated[FailureInfo, Field(description="Why it did not succeed (any status but FinishedSuccess, when the backend has it).")]
    ]


@with_config(_CLOSED)
class TaskOverdueEvent(TypedDict):
    """Once per followed execution still running `deadline` seconds after its start; following goes on."""

    event: Literal["taskOverdue"]
    requestId: RequestId
    taskId: TaskId
    taskName: TaskName
    appId: NotRequired[AppId]
    appName: NotRequired[AppName]
    executionId: ExecutionId
    runningForMs: Annotated[Millis, Field(description="How long the execution has been running.")]
    action: NotRequired[
        Annotated[Literal["stopped"], Field(description="onDeadline stop: the execution was stopped (its taskFinished, Aborted, follows; not retried).")]
    ]
    stage: NotRequired[Stage]
    replayed: NotRequired[Replayed]


@with_config(_CLOSED)
class RequestFinishedEvent(TypedDict):
    """The last reply of a request with `wait` or `then`: every task of every stage ended."""

    event: Literal["requestFinished"]
    requestId: RequestId
    finished: Annotated[dict[FinalStatus, Annotated[int, Field(ge=0)]], Field(description="Final outcomes, counted by state.")]
    stoppedAtStage: Annotated[
        Annotated[int, Field(ge=0)] | None, Field(description="The stage the chain stopped at; null when it ran to its end.")
    ]
    durationMs: Annotated[Millis, Field(description="From the request to its last task's end.")]
    reason: NotRequired[Reason]
    replayed: NotRequired[Replayed]


@with_config(_CLOSED)
class ErrorEvent(TypedDict):
    """The request was not handled and nothing (more) was started: invalid payload, unknown
    field, bad task ID, oversize, expired, retained, QRS unreachable for good, ..."""

    event: Literal["error"]
    requestId: RequestId
    error: Annotated[str, Field(description="What went wrong, in a few words (e.g. `Invalid task ID format`).")]
    details: Annotated[str, Field(description="The specifics: which field, which limit, what to do.")]
    replayed: NotRequired[Replayed]


@with_config(_CLOSED)
class StatusTopics(TypedDict):
    """The daemon's topics (from its configuration)."""

    start: str
    startPlain: str | None
    reply: str


@with_config(_CLOSED)
class StatusMessage(TypedDict):
    """The daemon's retained status: `online` once connected (again after each change of
    `problems`), `offline` on shutdown and as the last will."""

    status: Annotated[Literal["online", "offline"], Field(description="`offline` also comes as the last will.")]
    problems: NotRequired[Annotated[dict[str, str], Field(description="Standing problems by name, only when online: `qrs` (QRS refusing for good, with the fix), `qrsUnreachable` (QRS not answering for 5 s or more; cleared at its next answer).")]]
    version: Annotated[str, Field(description="butler-mqtt's version.")]
    clientId: Annotated[str, Field(description="The daemon's MQTT client id.")]
    host: Annotated[str, Field(description="The host name the daemon runs on.")]
    pid: Annotated[int, Field(ge=1, description="The daemon's process id.")]
    instance: Annotated[str, Field(description="Tells this process's status from another's with the same client id.")]
    startedAt: Annotated[str, Field(description="When the daemon started (ISO 8601, UTC).")]
    topics: Annotated[StatusTopics, Field(description="The topics the daemon listens and replies on.")]


# ------------------------------------------------------------------------------ alerts

AlertKind = Literal["failedStart", "reloadFailed", "overdue", "queueExpired", "qrsOutage", "qrsRecovered"]
Severity = Literal["error", "warning", "info"]
#: The final states of a failed reload (`taskFinished` status -> `reloadFailed`).
FailedFinal = Literal["FinishedFail", "Aborted", "Error", "Reset"]

ALERT_KINDS: tuple[AlertKind, ...] = get_args(AlertKind)
FAILED_FINAL: tuple[FailedFinal, ...] = get_args(FailedFinal)
#: Every alert kind's severity (ops/alerts.py's `SEVERITY`).
ALERT_SEVERITY: dict[AlertKind, Severity] = {
    "failedStart": "error",
    "reloadFailed": "error",
    "qrsOutage": "error",
    "overdue": "warning",
    "queueExpired": "warning",
    "qrsRecovered": "info",
}
#: The alert keys that are not copied from a reply event or an outage (ops/alerts.message).
ALERT_OWN_KEYS = ("alert", "severity", "time", "instance", "text")

#: Each kind has its one severity (JSON Schema `if`/`then`, from ALERT_SEVERITY).
_ALERT_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"alert": {"enum": [k for k, v in ALERT_SEVERITY.items() if v == severity]}}},
            "then": {"properties": {"severity": {"const": severity}}},
        }
        for severity in get_args(Severity)
    ]
}

IsoMillis = Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")]


@with_config(ConfigDict(extra="forbid", json_schema_extra=_ALERT_RULES))
class AlertMessage(TypedDict):
    """One alert, on `alerts.topic` (QoS 1, not retained) and as the body POSTed to
    `alerts.webhook.url`. Every key is always present, null where it does not apply."""

    alert: Annotated[
        AlertKind,
        Field(description="failedStart (`task` status failed), reloadFailed (`taskFinished` FinishedFail, Aborted, "
                          "Error or Reset after the last retry), overdue (`taskOverdue`), queueExpired (`task` "
                          "status expired), qrsOutage (QRS stopped answering), qrsRecovered (it answers again)."),
    ]
    severity: Annotated[Severity, Field(description="error (failedStart, reloadFailed, qrsOutage), warning (overdue, "
                                                    "queueExpired), info (qrsRecovered).")]
    time: Annotated[IsoMillis, Field(description="When the alert was raised (ISO 8601, UTC, milliseconds).")]
    instance: Annotated[str, Field(description="The daemon that raised it (its MQTT client id).")]
    requestId: Annotated[
        Annotated[str, Field(max_length=MAX_REQUEST_ID_LENGTH)] | None,
        Field(description="The request the event belonged to; null when it had none, and for QRS outages."),
    ]
    caller: Annotated[
        Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")] | None,
        Field(description="The caller (callers[].name, contract section 10) whose request it was; null for the "
                          "anonymous caller, when unknown, and for QRS outages."),
    ]
    taskId: Annotated[
        Guid | None, Field(description="The reload task's ID in QRS (backend: cloud: the app's ID); null for QRS outages.")
    ]
    taskName: Annotated[str | None, Field(description="The reload task's name in QRS; null when unknown.")]
    executionId: Annotated[
        Guid | ReloadId | None, Field(description="The QRS execution session (backend: cloud: the reload id); null when none.")
    ]
    status: Annotated[
        Literal["failed", "expired"] | FailedFinal | None,
        Field(description="The reply event's status (`task`: failed, expired; `taskFinished`: the final state); "
                          "null for overdue and QRS outages."),
    ]
    reason: Annotated[str | None, Field(description="Why (a sentence for people), when known.")]
    stage: Annotated[Annotated[int, Field(ge=0)] | None, Field(description="The stage of a `then` chain, when in one.")]
    attempt: Annotated[Annotated[int, Field(ge=1)] | None, Field(description="With `retry`: which start it was.")]
    runningForMs: Annotated[Millis | None, Field(description="overdue: how long the execution has been running.")]
    durationMs: Annotated[Millis | None, Field(description="reloadFailed: how long the reload ran, when known.")]
    failure: Annotated[
        FailureInfo | None, Field(description="reloadFailed: why it failed, with its script log's tail, when known.")
    ]
    qrs: Annotated[str, Field(description="The QRS the daemon talks to (qrs.base_url).")]
    since: Annotated[IsoMillis | None, Field(description="QRS outages: the first failed call (ISO 8601, UTC).")]
    downForMs: Annotated[Millis | None, Field(description="qrsRecovered: how long QRS was not answering.")]
    text: Annotated[str, Field(description="One line for people (a Slack or Teams incoming webhook shows it).")]


#: The alert keys taken from the reply event or outage, in the message's order.
ALERT_FIELDS: tuple[str, ...] = tuple(k for k in AlertMessage.__annotations__ if k not in ALERT_OWN_KEYS)

#: Any reply event.
ReplyEvent = TaskEvent | SummaryEvent | StopSummaryEvent | TaskFinishedEvent | TaskOverdueEvent | RequestFinishedEvent | ErrorEvent
