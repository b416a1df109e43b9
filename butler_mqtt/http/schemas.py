"""What the OpenAPI document says about the REST API.

The start endpoint reads its body itself (two shapes, a size limit, Butler's lenient invalid
IDs), so FastAPI cannot infer the request schema; it is assembled here from the same pydantic
models that validate requests (`StartRequest`, `ButlerBody`). The summary's schema is the
`summary` reply's own (replies/types.py, which the tests hold to the reply builder); the other
response models below are documentation only: the handlers build plain dicts that match them,
and the tests check that through the document (schemathesis' response conformance).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import models_json_schema

from butler_mqtt.http.bodies import ButlerBody
from butler_mqtt.model import GUID_RE, MAX_CRITERIA, StartRequest, StopRequest
from butler_mqtt.replies.types import StopSummaryEvent, SummaryEvent

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every non-2xx answer of the API."""

    error: str = Field(examples=["Invalid task ID format"])
    details: str = Field(examples=["Task ID must be a valid GUID"])


def summary_schemas() -> dict[str, Any]:
    """`Summary`, the REST answer to a seed-shaped body: the wire schema of the `summary` reply
    (replies.types.SummaryEvent, the AsyncAPI document's) without its `event` key, and the schemas it
    refers to (StartedTask, DeniedTask, ...)."""
    summary = TypeAdapter(SummaryEvent).json_schema(ref_template=REF)
    defs: dict[str, Any] = summary.pop("$defs")
    del summary["properties"]["event"]
    summary["required"].remove("event")
    summary["title"] = "Summary"
    summary["description"] = "The `summary` reply without `event`: the answer to a body in this API's shape (an object)."
    defs["Summary"] = summary
    return defs


class ButlerTaskRef(BaseModel):
    taskId: str
    taskName: str


class ButlerInvalid(BaseModel):
    taskId: str


class ButlerTasksId(BaseModel):
    started: list[ButlerTaskRef]
    invalid: list[ButlerInvalid] = Field(description="Malformed task IDs and task IDs QRS does not know.")
    denied: list[ButlerTaskRef] = Field(description="Refused by start_filter, or held back by allTaskIdsMustExist.")


class ButlerTagDenied(ButlerTaskRef):
    tag: str


class ButlerCpDenied(ButlerTaskRef):
    name: str
    value: str


class ButlerNotStarted(ButlerTaskRef):
    status: Literal["notStarted", "failed", "alreadyRunning", "skipped", "queued"] = Field(
        description="notStarted/failed: QRS did not start it. alreadyRunning (with the running executionId), skipped,"
        " queued (with position; its later `started` goes to MQTT topics.reply): the run policies."
    )
    executionId: str | None = None
    position: int | None = None
    reason: str | None = None


class ButlerResponse(BaseModel):
    """Butler's response shape (answer to a Butler-shaped body), plus two sections Butler lacks."""

    tasksId: ButlerTasksId
    tasksTag: list[ButlerTaskRef]
    tasksTagDenied: list[ButlerTagDenied]
    tasksCP: list[ButlerTaskRef]
    tasksCPDenied: list[ButlerCpDenied]
    tasksNotStarted: list[ButlerNotStarted] = Field(
        description="Selected, but not started now: QRS did not start them (disabled task, QRS error), or the run"
        " policies did not (running: alreadyRunning, skipped; waiting in butler-mqtt's queue: queued)."
    )
    tasksNotFound: list[dict[str, Any]] = Field(description="Criteria that matched no task, as in the summary.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    mqtt: Literal["connected", "disconnected"]
    qrs: Literal["ok", "unreachable", "refused"]
    qrsLastAnswerSecondsAgo: float | None = Field(description="Since QRS last answered any call; null: never.")
    journal: Literal["ok", "unavailable"] = Field(description="unavailable: the journal file was deleted or replaced.")
    requestsWaiting: int = Field(description="Deliveries kept unacked for a retry (QRS or journal unavailable).")
    oldestWaitingSeconds: float | None = Field(
        description="How long the oldest of them has waited; over 60 s makes the status unavailable."
    )
    qrsProblem: str | None = Field(
        default=None, description="Present while QRS refuses requests for good (certificate, 401/403): the cause and fix."
    )
    version: str


class HistoryTask(BaseModel):
    """One task of a request in the history: its last `task` status and its final state."""

    taskId: str
    taskName: str | None = None
    status: str = Field(description="The last `task` status: started, notStarted, denied, failed, wouldStart, queued, ...")
    stage: int | None = Field(default=None, description="The chain stage (requests with `then`).")
    executionId: str | None = None
    reason: str | None = None
    matchedBy: list[str] | None = None
    position: int | None = None
    finalStatus: str | None = Field(default=None, description="From `taskFinished`: FinishedSuccess, FinishedFail, ... Unknown.")
    startTime: str | None = None
    stopTime: str | None = None
    durationMs: int | None = None
    attempt: int | None = None
    retryIn: float | None = None
    finalReason: str | None = None
    overdue: bool | None = Field(default=None, description="True once a `taskOverdue` event was sent.")
    failure: dict[str, Any] | None = Field(
        default=None, description="From `taskFinished` (not FinishedSuccess): message, details, scriptLogTail or "
                                  "scriptLogError (contract section 8).")


class HistoryRecord(BaseModel):
    """One request as the journal knows it."""

    requestId: str | None
    key: str = Field(description="The journal key: id:<requestId>, cd:... (MQTT 5 correlation data) or anon:...;"
                                 " caller:<name>:<that key> for a caller's request")
    received: str = Field(description="UTC, ISO 8601.")
    updated: str
    ingress: str = Field(description="mqtt, mqtt-plain or rest.")
    source: str | None = Field(description="The MQTT topic, or the REST client's address.")
    caller: str | None = Field(default=None, description="The caller (callers[].name, contract section 10) whose "
                               "request it was; null: the anonymous caller.")
    state: Literal["handling", "answered", "following", "finished"]
    criteria: dict[str, Any] | None = Field(description="taskId, tag, customProperty as requested (null: not recorded).")
    request: dict[str, Any] | None = Field(description="The request as received, defaults left out.")
    tasks: list[HistoryTask]
    counts: dict[str, int] = Field(description="Tasks by their last status.")
    notFound: list[dict[str, Any]]
    finished: dict[str, int] | None = Field(description="From requestFinished: final states and how many.")
    stoppedAtStage: int | None
    durationMs: int | None
    error: dict[str, Any] | None
    duplicates: int = Field(description="How often the request was seen again and answered from the journal.")
    lastDuplicate: str | None


class HistoryPage(BaseModel):
    requests: list[HistoryRecord] = Field(description="Oldest first; the newest `limit` of the window.")
    since: str | None = Field(description="The `since` asked for (UTC); null: the whole retention window.")
    retentionHours: float = Field(description="journal.retention_hours: the history reaches no further back.")


#: What each request field does (contract section 3), for readers of /docs.
FIELD_DOCS = {
    "requestId": "Echoed in the answer; the idempotency key: the same requestId within 24 h is not started again "
    "(the earlier outcome is answered), whichever ingress (REST or MQTT) brought it.",
    "taskId": "One task GUID or a list. A malformed GUID rejects the whole request (400).",
    "tag": "One tag name or a list; every task carrying one of them is selected.",
    "customProperty": "Custom property name/value pairs; a task matches when it carries exactly the pair.",
    "allTaskIdsMustExist": "When true and any listed task ID does not exist, no task selected by ID starts "
    "(tags and custom properties are unaffected).",
    "wait": "Follow every execution to its end. Over REST the answer is the summary, sent once the tasks "
    "were started; the later events (taskFinished, requestFinished) go to MQTT topics.reply.",
    "dryRun": "Answer with what would start (status wouldStart); start nothing.",
    "then": "A follow-up request started when every task of this stage finished successfully; implies wait.",
    "onFailure": "'continue' starts `then` whatever the outcome of this stage.",
    "ifRunning": "A selected task that is running already: start (send the start anyway), attach (follow the running"
    " execution), skip, queue (start it once more after it ended) or restart (stop it, start once it ended). Default: policies.if_running.",
    "retry": "Extra starts after a reload ended FinishedFail, Aborted, Error or Reset: attempts (0-10) after delay"
    " seconds, doubling, at most 3600. Default: policies.retry.",
    "deadline": "Seconds: a followed reload still running this long after its start gets one taskOverdue event.",
    "priority": "0-9 (default 5): higher first in butler-mqtt's queue (policies.max_running).",
    "appId": "One app GUID or a list. backend: cloud: each Qlik Cloud app is reloaded (answers carry appId and "
    "appName in place of taskId and taskName); backend: qrs: every reload task of the app.",
    "space": "backend: cloud only: one space name or a list (exact names); the apps in those spaces.",
    "partial": "backend: cloud only: a partial reload.",
    "variables": "backend: cloud only: script variables {name: value} (at most 20, at most 256 characters each).",
}


def _patch_start_request(defs: dict[str, Any]) -> None:
    """Say what the validators accept (one string or a list for taskId/tag, GUIDs for taskId)
    and what each field means."""
    props = defs["StartRequest"]["properties"]
    guid = {"type": "string", "pattern": GUID_RE.pattern}
    name = {"type": "string", "minLength": 1, "maxLength": 255}
    for key, item in (("taskId", guid), ("tag", name), ("appId", guid), ("space", name)):
        props[key] = {"anyOf": [item, {"type": "array", "items": item, "maxItems": MAX_CRITERIA}]}
    for key, text in FIELD_DOCS.items():
        if key in props:
            props[key]["description"] = text


def component_schemas() -> dict[str, Any]:
    """Every schema the document refers to, keyed by model name."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (StartRequest, "validation"),
        (ButlerBody, "validation"),
        (ErrorBody, "serialization"),
        (ButlerResponse, "serialization"),
        (Health, "serialization"),
        (HistoryPage, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=REF)
    defs: dict[str, Any] = top["$defs"]
    _patch_start_request(defs)
    return defs | summary_schemas() | stop_schemas()


def _ref(model: str) -> dict[str, str]:
    return {"$ref": REF.format(model=model)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("ErrorBody")}}}


START_DESCRIPTION = """\
Start reload tasks. `POST` and `PUT` are the same; a `POST` may carry
`X-HTTP-Method-Override: PUT` (Qlik's REST connector can only send GET and POST).

The path holds one task GUID, or `-` when every criterion is in the body (`/v4/reloadtask/start`,
without the segment, is the same as `-`). The body is either

* **this API's shape**: the MQTT start request object (`taskId`, `tag`, `customProperty`,
  `allTaskIdsMustExist`, `dryRun`, `requestId`, ...); `{}` or no body with a GUID in the path.
  Answered with the `summary`.
* **Butler's shape**: an array of `{"type": "starttaskid"|"starttasktag"|"starttaskcustomproperty",
  "payload": {...}}`. Answered in Butler's response shape. `keyvaluestore` items are refused (400).
"""


BODY_ONLY_DESCRIPTION = """\
The same as `/v4/reloadtask/-/start`: every criterion is in the body (a shorter form for webhooks
and callers that cannot put a `-` in the path: `POST /v4/reloadtask/start` with
`{"tag": [...], "customProperty": [...]}`). Both body shapes,
`X-HTTP-Method-Override` and every status code work exactly as there.
"""


def start_operation(token_required: bool, path_task_id: bool = True) -> dict[str, Any]:
    """The `openapi_extra` of a start operation: parameters, body and responses.

    `path_task_id`: the path has the `{taskId}` segment; without it (`/v4/reloadtask/start`)
    everything is in the body, as with `-`.
    """
    path_param = {
        "name": "taskId",
        "in": "path",
        "required": True,
        "description": "A task GUID, or `-` when the body holds every criterion.",
        "schema": {"anyOf": [{"type": "string", "pattern": GUID_RE.pattern}, {"type": "string", "enum": ["-"]}]},
    }
    op: dict[str, Any] = {
        "description": START_DESCRIPTION if path_task_id else BODY_ONLY_DESCRIPTION + "\n" + START_DESCRIPTION,
        "parameters": [
            *([path_param] if path_task_id else []),
            {"name": "allTaskIdsMustExist", "in": "query", "required": False,
             "description": "When true and any listed task ID does not exist, no task selected by ID starts.",
             "schema": {"type": "string", "enum": ["true", "false"]}},
        ],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {"anyOf": [_ref("StartRequest"), _ref("ButlerBody")]},
                    "examples": {
                        "object": {"summary": "this API's shape", "value": {"tag": ["daily-refresh"], "requestId": "r-1"}},
                        "butler": {
                            "summary": "Butler's shape",
                            "value": [
                                {"type": "starttasktag", "payload": {"tag": "daily-refresh"}},
                                {"type": "starttaskcustomproperty", "payload": {"customPropertyName": "taskGroup", "customPropertyValue": "finance"}},
                            ],
                        },
                    },
                }
            },
        },
        "responses": {
            "200": {
                "description": "Handled: the summary (this API's shape) or Butler's response (Butler's shape).",
                "content": {"application/json": {"schema": {"anyOf": [_ref("Summary"), _ref("ButlerResponse")]}}},
            },
            "400": _error("Invalid input: JSON, types, unknown fields, task ID format, keyvaluestore items."),
            "405": _error("Method not allowed (also an X-HTTP-Method-Override other than PUT or POST)."),
            "413": _error("Body larger than http.max_body_bytes."),
            "415": _error("Content-Type is not JSON."),
            "429": _error("The caller is over its requests_per_minute (nothing started; see Retry-After)."),
            "502": _error("QRS refused the request (nothing was started)."),
            "503": _error("QRS unreachable (nothing was started; retry later)."),
        },
    }
    if token_required:
        op["security"] = [{"bearerToken": []}]
        op["responses"]["401"] = _error("Missing or wrong bearer token.")
    return op


def health_operation() -> dict[str, Any]:
    body = {"application/json": {"schema": _ref("Health")}}
    return {
        "responses": {
            "200": {"description": "The broker is connected and QRS answered recently.", "content": body},
            "503": {"description": "The broker or QRS is down (see which).", "content": body},
        }
    }


HISTORY_DESCRIPTION = """\
The request history from the journal (also `butler-mqtt history`): one record per request of the
last `journal.retention_hours`, oldest first: when and how it came (ingress, source), the criteria,
what happened to each task's start, the final states, duplicates, the caller. Needs the bearer
token when `http.token` is set; with callers (contract section 10) a caller's token or client
certificate works too, and shows that caller's requests only.
"""


def history_operation(token_required: bool) -> dict[str, Any]:
    """The `openapi_extra` of `GET /v4/requests`."""

    def param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}

    op: dict[str, Any] = {
        "description": HISTORY_DESCRIPTION,
        "parameters": [
            param("since", "A duration back from now (30m, 2h, 1d, 1w, 45s) or an ISO 8601 date or date-time"
                  " (UTC without an offset). Default: the whole retention window.", {"type": "string"}),
            param("requestId", "Only this requestId.", {"type": "string", "minLength": 1, "maxLength": 128}),
            param("taskId", "Only requests that selected or named this task.", {"type": "string", "pattern": GUID_RE.pattern}),
            param("limit", "The newest this many (default 100).", {"type": "integer", "minimum": 1, "maximum": 1000}),
            param("caller", "Only this caller's requests (callers[].name). A caller identified by its token or "
                  "client certificate sees only its own requests.", {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}),
        ],
        "responses": {
            "200": {"description": "The matching requests.", "content": {"application/json": {"schema": _ref("HistoryPage")}}},
            "400": _error("A bad query parameter (named in details): a value out of range, a text no request can"
                          " hold (U+0000), a parameter given twice, or one this endpoint does not know (a misspelt"
                          " filter never returns every record)."),
            "503": _error("The journal cannot be read right now."),
        },
    }
    if token_required:
        op["security"] = [{"bearerToken": []}]
        op["responses"]["401"] = _error("Missing or wrong bearer token.")
    return op


def stop_operation(token_required: bool) -> dict[str, Any]:
    """The `openapi_extra` of the stop operation (contract section 8)."""
    op: dict[str, Any] = {
        "description": "Stop the running reloads of the selected tasks (nothing is ever started). `POST` and `PUT` "
                       "are the same. The path holds one task GUID, or `-` when the body holds every criterion. The "
                       "body: `requestId` (the idempotency key: the same requestId is not acted on twice), `taskId`, "
                       "`tag`, `customProperty`, `wait` (the stopped executions' taskFinished go to the MQTT reply "
                       "topic); no other field. The start_filter allow-list applies.",
        "parameters": [{
            "name": "taskId", "in": "path", "required": True,
            "description": "A task GUID, or `-` when the body holds every criterion.",
            "schema": {"anyOf": [{"type": "string", "pattern": GUID_RE.pattern}, {"type": "string", "enum": ["-"]}]},
        }],
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": _ref("StopRequest"),
            "examples": {"byTag": {"summary": "stop by tag", "value": {"tag": ["daily-refresh"], "requestId": "s-1"}}},
        }}},
        "responses": {
            "200": {"description": "Handled: the stop summary.",
                    "content": {"application/json": {"schema": _ref("StopSummary")}}},
            "400": _error("Invalid input: JSON, types, unknown fields, task ID format."),
            "413": _error("Body larger than http.max_body_bytes."),
            "415": _error("Content-Type is not JSON."),
            "502": _error("QRS refused the request (nothing was stopped)."),
            "503": _error("QRS or the journal unreachable (nothing was stopped; retry later)."),
        },
    }
    if token_required:
        op["security"] = [{"bearerToken": []}]
        op["responses"]["401"] = _error("Missing or wrong bearer token.")
    return op


def stop_schemas() -> dict[str, Any]:
    """`StopSummary` (the stop `summary` without `event`) and `StopRequest`."""
    summary = TypeAdapter(StopSummaryEvent).json_schema(ref_template=REF)
    defs: dict[str, Any] = summary.pop("$defs")
    del summary["properties"]["event"]
    summary["required"].remove("event")
    summary["title"] = "StopSummary"
    defs["StopSummary"] = summary
    _, top = models_json_schema([(StopRequest, "validation")], ref_template=REF)
    defs.update(top["$defs"])
    return defs


def finish_document(doc: dict[str, Any], token_required: bool) -> dict[str, Any]:
    """Add the shared component schemas (and the bearer scheme) to FastAPI's document."""
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(component_schemas())
    if token_required:
        components.setdefault("securitySchemes", {})["bearerToken"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "http.token from the configuration, or a caller's token (callers[].tokens_sha256 "
                           "lists its SHA-256).",
        }
    return doc
