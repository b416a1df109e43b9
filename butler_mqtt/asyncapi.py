"""The AsyncAPI 3.0 document of the MQTT interface, built from the code that makes the messages.

The payload schemas come from `butler_mqtt.replies.types` (every reply event, the status message, the
alert message) and from `model.StartRequest` (the request); each reply's summary is its
builder's docstring in `butler_mqtt.replies`, and the examples are made by those builders (the
alert example is checked against `ops/alerts.message` by a unit test). So the document describes
what the daemon sends, not what someone remembered to write down.

The alerts channel is optional (only when `alerts.topic` is set): its address is the configured
topic, or the documented example `qliksense/task/alert` when there is none.

`docs/asyncapi.yaml` is the document for the default configuration (regenerate it with
`scripts/asyncapi`; a test fails when it is stale). The REST API serves the document of the
running configuration (its topics, alerts topic, broker and protocol) at `/asyncapi.json`.

Pure: builds dicts and text, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import TypeAdapter

from butler_mqtt import __version__, replies
from butler_mqtt.config import MqttConfig
from butler_mqtt.model import (
    GUID_RE,
    INVALID_GUID_DETAILS,
    INVALID_GUID_ERROR,
    MAX_NAME_LENGTH,
    Match,
    StartRequest,
    StopRequest,
    TaskOutcome,
)
from butler_mqtt.replies import REPLY_EVENTS, STOP_SUMMARY, EventSpec
from butler_mqtt.replies.types import ALERT_SEVERITY, AlertMessage, StatusMessage, StopSummaryEvent

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
SCHEMA_REF = "#/components/schemas/{model}"
QOS = 1  # every subscription and publication of the daemon
#: The alerts channel's address when `alerts.topic` is not set (the example of the docs).
ALERT_TOPIC_EXAMPLE = "qliksense/task/alert"

#: What each request field means (`model.StartRequest` holds the names, types and limits;
#: a unit test fails when a field has no entry here).
REQUEST_FIELDS = {
    "requestId": "Echoed in every reply; the idempotency key (the same requestId within 24 h is not started again: the earlier outcome is re-published).",
    "taskId": "Task IDs (GUIDs): a string or a list. A value that is not a GUID rejects the whole request.",
    "tag": "Tag names: a string or a list.",
    "customProperty": "Custom property name/value pairs; a task matches when it carries the pair.",
    "allTaskIdsMustExist": "When a listed task ID does not exist, no task selected by ID starts (tags and custom properties are unaffected).",
    "wait": "Follow every execution to its end: `taskFinished` per task, then `requestFinished`.",
    "dryRun": "Reply with what would start (status `wouldStart`); start nothing.",
    "then": "A follow-up request, started when every task of this stage finished with FinishedSuccess (implies `wait`).",
    "onFailure": "`continue`: start `then` even when this stage did not fully succeed.",
    "ifRunning": "For a task that is already running: `start` (anyway), `attach` (follow that execution), `skip`, `queue` (start once more when it ends), `restart` (stop it, start once it ended; later requests join). Default: policies.if_running.",
    "onDeadline": "`notify` (taskOverdue only) or `stop` (stop the execution at its deadline: taskOverdue with action stopped, then taskFinished Aborted; not retried). Default: policies.on_deadline.",
    "retry": "Extra starts after a failed reload: `attempts`, `delay` seconds (doubling, at most 3600). Default: policies.retry.",
    "deadline": "Seconds: a followed execution still running then gets one `taskOverdue` event. Default: policies.deadline.",
    "priority": "0-9 (default 5): higher starts first out of butler-mqtt's queue.",
    "appId": "App IDs (GUIDs): a string or a list. backend: cloud: each app is reloaded; backend: qrs: every reload task of the app. A value that is not a GUID rejects the whole request.",
    "space": "backend: cloud only: the apps in the space(s) of that exact name; a string or a list.",
    "partial": "backend: cloud only: a partial reload.",
    "variables": "backend: cloud only: script variables for the reload, {name: value}, at most 20, names and values at most 256 characters.",
}


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _untitled(schema: Any) -> Any:
    """Drop pydantic's generated property titles ("Taskid"), noise in a document for people, and
    the line breaks of docstring descriptions."""
    if isinstance(schema, dict):
        out: dict[str, Any] = {}
        for key, value in schema.items():
            out[key] = " ".join(value.split()) if key == "description" and isinstance(value, str) else _untitled(value)
        props = out.get("properties")
        for prop in props.values() if isinstance(props, dict) else ():
            if isinstance(prop, dict):
                prop.pop("title", None)
        return out
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


def _collect(into: dict[str, Any], schema: dict[str, Any]) -> None:
    """Add a generated schema and its definitions to the component schemas."""
    for name, sub in schema.pop("$defs", {}).items():
        into[name] = _untitled(sub)
    if "$ref" not in schema:
        into[schema["title"]] = _untitled(schema)


def _one_or_many(array: dict[str, Any], item_extra: dict[str, Any]) -> dict[str, Any]:
    """`taskId`/`tag` take a string or a list (model.StartRequest's `before` validator)."""
    array = dict(array)
    item = {**array["items"], **item_extra}
    array["items"] = item
    return {"anyOf": [item, array]}


def request_schemas() -> dict[str, Any]:
    """StartRequest and its parts, as pydantic generates them, plus what its validators check."""
    out: dict[str, Any] = {}
    _collect(out, StartRequest.model_json_schema(ref_template=SCHEMA_REF))
    req = out["StartRequest"]
    props = req["properties"]
    names = {"minLength": 1, "maxLength": MAX_NAME_LENGTH}
    props["taskId"] = _one_or_many(props["taskId"], {"pattern": GUID_RE.pattern})
    props["tag"] = _one_or_many(props["tag"], names)
    props["appId"] = _one_or_many(props["appId"], {"pattern": GUID_RE.pattern})
    props["space"] = _one_or_many(props["space"], names)
    for key in ("name", "value"):
        out["CustomPropertyCriterion"]["properties"][key].update(names)
    for name, text in REQUEST_FIELDS.items():
        if name in props:
            props[name]["description"] = text
    req["description"] = (
        "A start request. At least one of taskId, tag, customProperty, appId, space; every other field is optional."
    )
    req["anyOf"] = [{"required": [k]} for k in ("taskId", "tag", "customProperty", "appId", "space")]
    out["RetryRequest"]["description"] = "Extra starts after a reload that ended FinishedFail, Aborted, Error or Reset."
    return out


def stop_request_schemas() -> dict[str, Any]:
    """StopRequest (contract section 8): the selectors, requestId and wait of a start request."""
    out: dict[str, Any] = {}
    _collect(out, StopRequest.model_json_schema(ref_template=SCHEMA_REF))
    req = out["StopRequest"]
    props = req["properties"]
    props["taskId"] = _one_or_many(props["taskId"], {"pattern": GUID_RE.pattern})
    props["tag"] = _one_or_many(props["tag"], {"minLength": 1, "maxLength": MAX_NAME_LENGTH})
    for name in ("requestId", "taskId", "tag", "customProperty"):
        props[name]["description"] = REQUEST_FIELDS[name]
    props["wait"]["description"] = "Follow each stopped execution to its end: its `taskFinished` follows."
    req["description"] = ("A stop request. At least one of taskId, tag, customProperty; no other field. Each selected "
                          "task that is running is asked to stop; nothing is ever started.")
    req["anyOf"] = [{"required": [k]} for k in ("taskId", "tag", "customProperty")]
    return {"StopRequest": req}
def _task_or_app(schema: dict[str, Any]) -> None:
    """A task as QRS names it (`taskId`, `taskName`) or an app as Qlik Cloud does (`appId`,
    `appName`, backend: cloud): one pair is required, not both."""
    required = schema.get("required")
    if isinstance(required, list) and "taskId" in required and "appId" in schema.get("properties", {}):
        schema["required"] = [k for k in required if k not in ("taskId", "taskName")]
        schema["oneOf"] = [{"required": ["taskId", "taskName"]}, {"required": ["appId", "appName"]}]


def component_schemas() -> dict[str, Any]:
    """Every payload schema of the document, by name (referenced as #/components/schemas/<name>)."""
    out: dict[str, Any] = {}
    for spec in REPLY_EVENTS:
        _collect(out, TypeAdapter(spec.schema).json_schema(ref_template=SCHEMA_REF))
    _collect(out, TypeAdapter(StopSummaryEvent).json_schema(ref_template=SCHEMA_REF))
    for schema in out.values():
        _task_or_app(schema)
    _collect(out, TypeAdapter(StatusMessage).json_schema(ref_template=SCHEMA_REF))
    _collect(out, TypeAdapter(AlertMessage).json_schema(ref_template=SCHEMA_REF))
    out.update(request_schemas())
    out.update(stop_request_schemas())
    out["TaskIdText"] = {
        "type": "string",
        "pattern": r"^\s*" + GUID_RE.pattern.removeprefix("^").removesuffix("$") + r"\s*$",
        "description": "One task ID (GUID), surrounding whitespace ignored (Butler's plain topic).",
    }
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ examples

_T = "a8b4c123-def4-4678-9abc-def012345678"
_E = "5c6a1f4e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
_NAME = "Finance daily"


def reply_examples() -> dict[str, replies.Event]:
    """One example per reply event, made by the builders of butler_mqtt.replies."""
    started = TaskOutcome(_T, _NAME, "started", [Match("tag", "daily-refresh")], execution_id=_E)
    row = {"startTime": "2025-01-06T06:00:00.000Z", "stopTime": "2025-01-06T06:01:21.234Z", "duration": 81234}
    return {
        "task": replies.task(started, "r1"),
        "summary": replies.summary("r1", [started], [{"tag": "weekly-refresh"}]),
        "taskFinished": replies.task_finished("r1", _T, _NAME, _E, "FinishedSuccess", row),
        "taskOverdue": replies.task_overdue("r1", _T, _NAME, _E, 1_800_000),
        "requestFinished": replies.request_finished("r1", {"FinishedSuccess": 1}, None, 81_850, None),
        "error": replies.error("r1", INVALID_GUID_ERROR, INVALID_GUID_DETAILS),
    }


#: Contract section 8: a failed reload's taskFinished, with why and its script log's tail.
FAILURE_EXAMPLE = {
    "message": "Field 'Amount' not found",
    "details": ["Changing task state to Started", "Changing task state from Started to FinishedFail"],
    "scriptLogTail": ["2025-01-06 06:01:20 0045  LOAD Amount FROM [lib://erp/orders.qvd] (qvd)",
                      "2025-01-06 06:01:21      Error: Field 'Amount' not found",
                      "2025-01-06 06:01:21      Execution Failed", "2025-01-06 06:01:21      Execution finished."],
}
FAILED_EXAMPLE = replies.task_finished(
    "r1", _T, _NAME, _E, "FinishedFail",
    {"startTime": "2025-01-06T06:00:00.000Z", "stopTime": "2025-01-06T06:01:21.234Z", "duration": 81234},
    failure=FAILURE_EXAMPLE,
)


def status_example(cfg: MqttConfig) -> dict[str, Any]:
    return {
        "status": "online",
        "version": __version__,
        "clientId": cfg.client_id,
        "host": "sense-gw-01",
        "pid": 4242,
        "instance": "3f2a9c1b7d4e",
        "startedAt": "2025-01-06T05:59:00Z",
        "topics": {"start": cfg.topics.start, "startPlain": cfg.topics.start_plain, "reply": cfg.topics.reply},
    }


REQUEST_EXAMPLE = {"requestId": "r1", "tag": ["daily-refresh"], "wait": True}

#: The fields of the example alert: ops/alerts.message() makes alert_example()'s message from
#: them (a unit test holds the two together; this module is pure and cannot import ops/alerts).
ALERT_EXAMPLE_FIELDS: dict[str, Any] = {
    "requestId": "r1", "taskId": _T, "taskName": _NAME, "executionId": _E, "status": "FinishedFail",
    "durationMs": 81234, "qrs": "https://qlik.example.com:4242", "failure": FAILED_EXAMPLE["failure"],
}
ALERT_EXAMPLE_TIME = (1736143281.25, "2025-01-06T06:01:21.250Z")  # (time.time(), as the message has it)


def alert_example(cfg: MqttConfig) -> dict[str, Any]:
    """A `reloadFailed` alert of the daemon with `cfg` (the shape of ops/alerts.message)."""
    msg: dict[str, Any] = dict.fromkeys(AlertMessage.__annotations__)  # every key, in order; null
    msg.update(ALERT_EXAMPLE_FIELDS)
    msg.update({
        "alert": "reloadFailed", "severity": ALERT_SEVERITY["reloadFailed"], "time": ALERT_EXAMPLE_TIME[1],
        "instance": cfg.client_id, "text": f"Reload of '{_NAME}' ended FinishedFail (request r1)",
    })
    return msg


# ------------------------------------------------------------------------------ messages


def _summary(spec: EventSpec) -> str:
    """The first line of the builder's docstring, without its "`name`: " lead."""
    first = (spec.builder.__doc__ or spec.name).strip().splitlines()[0]
    text = first.removeprefix(f"`{spec.name}`:").strip()
    return text[:1].upper() + text[1:]


def _reply_message(spec: EventSpec, example: replies.Event, v5: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": spec.name,
        "title": f"{spec.name} event",
        "summary": _summary(spec),
        "contentType": "application/json",
        "payload": _ref(f"#/components/schemas/{spec.schema.__name__}"),
        "examples": [{"name": spec.name, "payload": example}],
    }
    if v5:
        msg["bindings"] = {"mqtt": {
            "contentType": "application/json",
            "correlationData": {"type": "string", "format": "binary",
                                "description": "The request's Correlation Data, copied unchanged (when it had one)."},
            "bindingVersion": MQTT_BINDING_VERSION,
        }}
    return msg


def _request_message(v5: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": "startRequest",
        "title": "Start request",
        "summary": "Start the reload tasks the criteria select (their union, each task once).",
        "description": "Invalid JSON, unknown fields, wrong types, a bad task ID, oversize or retained messages are "
                       "answered with an `error` event; nothing is started.",
        "contentType": "application/json",
        "payload": _ref("#/components/schemas/StartRequest"),
        "examples": [{"name": "waitForTag", "payload": REQUEST_EXAMPLE}],
    }
    if v5:
        msg["bindings"] = {"mqtt": {
            "responseTopic": {"type": "string", "description": "Optional: where the replies go (else the reply topic). "
                              "Wildcards, `$` topics and the daemon's own topics are refused."},
            "correlationData": {"type": "string", "format": "binary", "description": "Optional: copied onto every "
                                "reply; without a requestId it is the idempotency key."},
            "bindingVersion": MQTT_BINDING_VERSION,
        }}
    return msg


def _alert_message(cfg: MqttConfig, v5: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": "alert",
        "title": "Alert",
        "summary": "A failed start or reload, an overdue execution, an expired queue entry, a QRS outage or its end.",
        "description": "The same JSON is POSTed to `alerts.webhook.url` when one is set. Every key is always "
                       "present, null where it does not apply; `text` is one line for people.",
        "contentType": "application/json",
        "payload": _ref("#/components/schemas/AlertMessage"),
        "examples": [{"name": "reloadFailed", "payload": alert_example(cfg)}],
    }
    if v5:
        msg["bindings"] = {"mqtt": {"contentType": "application/json", "bindingVersion": MQTT_BINDING_VERSION}}
    return msg


def _messages(cfg: MqttConfig) -> dict[str, Any]:
    v5 = cfg.protocol == "5"
    examples = reply_examples()
    msgs: dict[str, Any] = {"startRequest": _request_message(v5)}
    if cfg.topics.start_plain:
        msgs["startTaskPlain"] = {
            "name": "startTaskPlain",
            "title": "Start one task (Butler's plain topic)",
            "summary": "The payload is one task ID; answered like a JSON request with that taskId.",
            "contentType": "text/plain",
            "payload": _ref("#/components/schemas/TaskIdText"),
            "examples": [{"name": "taskId", "payload": _T}],
        }
    for spec in REPLY_EVENTS:
        msgs[spec.name] = _reply_message(spec, examples[spec.name], v5)
    msgs["taskFinished"]["examples"].append({"name": "failedWithLogTail", "payload": FAILED_EXAMPLE})
    msgs.update(_stop_messages(cfg, v5))
    msgs["alert"] = _alert_message(cfg, v5)
    msgs["status"] = {
        "name": "status",
        "title": "Daemon status",
        "summary": "Retained: is the daemon online, which topics it serves, standing problems.",
        "contentType": "application/json",
        "payload": _ref("#/components/schemas/StatusMessage"),
        "examples": [{"name": "online", "payload": status_example(cfg)}],
    }
    return msgs


def _stop_messages(cfg: MqttConfig, v5: bool) -> dict[str, Any]:
    stopping = TaskOutcome(_T, _NAME, "stopping", [Match("tag", "daily-refresh")], execution_id=_E)
    summary = _reply_message(STOP_SUMMARY, replies.stop_summary("s1", [stopping], []), v5)
    summary["title"] = "summary event (of a stop request)"
    request = _request_message(v5)
    request.update({
        "name": "stopRequest", "title": "Stop request",
        "summary": "Stop the running executions of the tasks the criteria select (nothing is started).",
        "description": "Answered with one `task` event per selected task (`stopping` with the executionId, "
                       "`notRunning`, `denied`, `failed`), then this request's `summary`; with `wait`, each stopped "
                       "execution's `taskFinished` and `requestFinished`. Invalid payloads get an `error` event.",
        "payload": _ref("#/components/schemas/StopRequest"),
        "examples": [{"name": "stopByTag", "payload": {"requestId": "s1", "tag": ["daily-refresh"], "wait": True}}],
    })
    return {"stopRequest": request, "stopSummary": summary}


# ------------------------------------------------------------------------------ channels, operations


def _status_channel(cfg: MqttConfig) -> dict[str, Any]:
    ch: dict[str, Any] = {
        "address": cfg.topics.status,
        "title": "Daemon status",
        "description": "Retained, QoS 1: `online` when connected, `offline` on shutdown and as the last will.",
        "messages": {"status": _ref("#/components/messages/status")},
    }
    if cfg.shared_group:
        ch["address"] = cfg.topics.status + "/{clientId}"
        ch["description"] += " With a shared group every instance publishes its own status."
        ch["parameters"] = {"clientId": {"description": "The instance's MQTT client id."}}
    return ch


def _alerts_channel(topic: str | None) -> dict[str, Any]:
    where = "`alerts.topic`" if topic is not None else f"`alerts.topic` (`{ALERT_TOPIC_EXAMPLE}` is an example)"
    return {
        "address": topic if topic is not None else ALERT_TOPIC_EXAMPLE,
        "title": "Alerts (optional)",
        "description": f"Only when alerts.topic is set: one alert per failed start, failed reload (after its last "
                       f"retry), overdue execution, expired queue entry, QRS outage and recovery, on {where}. "
                       "QoS 1, not retained, over the daemon's own broker connection.",
        "messages": {"alert": _ref("#/components/messages/alert")},
    }


def _caller_channel(cfg: MqttConfig, levels: Sequence[str], group: str) -> dict[str, Any]:
    """`<topics.start>/{caller}` (contract section 10): a caller's own start topic."""
    param = {"enum": list(levels), "description": "The caller's topic level (callers[].topic): it names the caller. A "
                                                  "level no caller has is answered with the `error` event `Unknown caller`."}
    return {
        "address": cfg.topics.start + "/{caller}",
        "title": "A caller's start requests",
        "description": "With `callers` configured (contract section 10): the same JSON start requests as on the "
                       "start channel, from one caller, started only within its allow-list (`denied` outside it) "
                       "and its requests_per_minute (else the `error` event `Rate limited`). The broker's ACL should "
                       f"let only that caller's broker user publish here. Its stop requests go to `{cfg.topics.stop}/"
                       "{caller}`, judged by the same allow-list. With "
                       "callers_only, the bare start topics answer `Caller required` and start nothing." + group,
        "parameters": {"caller": param},
        "messages": {"startRequest": _ref("#/components/messages/startRequest")},
    }


def _channels(cfg: MqttConfig, alerts_topic: str | None, caller_levels: Sequence[str] = ()) -> dict[str, Any]:
    t = cfg.topics
    reply_msgs = {spec.name: _ref(f"#/components/messages/{spec.name}") for spec in REPLY_EVENTS}
    reply_msgs["stopSummary"] = _ref("#/components/messages/stopSummary")
    group = f" Several instances share it as `$share/{cfg.shared_group}/<topic>`." if cfg.shared_group else ""
    chans: dict[str, Any] = {
        "start": {
            "address": t.start,
            "title": "Start requests",
            "description": "JSON start requests (QoS 1, not retained)." + group,
            "messages": {"startRequest": _ref("#/components/messages/startRequest")},
        },
    }
    if t.start_plain:
        chans["startPlain"] = {
            "address": t.start_plain,
            "title": "Start one task (Butler-compatible)",
            "description": "The payload is one task ID, as with Butler." + group,
            "messages": {"startTaskPlain": _ref("#/components/messages/startTaskPlain")},
        }
    chans["stop"] = {
        "address": t.stop,
        "title": "Stop requests",
        "description": "JSON stop requests (QoS 1, not retained; contract section 8)." + group,
        "messages": {"stopRequest": _ref("#/components/messages/stopRequest")},
    }
    if caller_levels:
        chans["callerStart"] = _caller_channel(cfg, caller_levels, group)
    chans["replies"] = {
        "address": t.reply,
        "title": "Replies",
        "description": "Where replies go when the request named no MQTT 5 Response Topic (and always with MQTT 3.1.1, "
                       "where the requestId tells the requests apart).",
        "messages": reply_msgs,
    }
    if cfg.protocol == "5":
        chans["responseTopic"] = {
            "address": None,
            "title": "The request's Response Topic",
            "description": "Replies to a request that set the MQTT 5 Response Topic go there, with its Correlation Data.",
            "messages": reply_msgs,
        }
    chans["status"] = _status_channel(cfg)
    chans["alerts"] = _alerts_channel(alerts_topic)
    return chans


def _op_bindings(retain: bool, expiry: dict[str, Any] | None = None) -> dict[str, Any]:
    mqtt: dict[str, Any] = {"qos": QOS, "retain": retain}
    if expiry is not None:
        mqtt["messageExpiryInterval"] = expiry
    mqtt["bindingVersion"] = MQTT_BINDING_VERSION
    return {"mqtt": mqtt}


_REQUEST_EXPIRY = {
    "type": "integer",
    "minimum": 0,
    "description": "Optional (MQTT 5, set by the publisher): a request whose expiry passes before the daemon "
                   "handles it is answered with the `error` event `Request expired` and not started.",
}


def _start_operation(cfg: MqttConfig, channel: str, message: str, summary: str) -> dict[str, Any]:
    reply_channel = "responseTopic" if cfg.protocol == "5" else "replies"
    names = [spec.name for spec in REPLY_EVENTS]
    if channel == "stop":
        names = ["task", "stopSummary", "taskFinished", "requestFinished", "error"]
    return {
        "action": "receive",
        "channel": _ref(f"#/channels/{channel}"),
        "summary": summary,
        "description": "Every request is answered, in order: one `task` event per selected task, the `summary`; with "
                       "`wait` or `then` also `taskFinished` (and `taskOverdue`) per execution and `requestFinished` "
                       "last. A request that cannot be handled gets one `error` event.",
        "messages": [_ref(f"#/channels/{channel}/messages/{message}")],
        "bindings": _op_bindings(False, _REQUEST_EXPIRY if cfg.protocol == "5" else None),
        "reply": {
            "channel": _ref(f"#/channels/{reply_channel}"),
            "messages": [_ref(f"#/channels/{reply_channel}/messages/{n}") for n in names],
        },
    }


def _operations(cfg: MqttConfig, callers: bool = False) -> dict[str, Any]:
    ops: dict[str, Any] = {
        "startTasks": _start_operation(cfg, "start", "startRequest", "Start reload tasks selected by ID, tag or custom property."),
    }
    if cfg.topics.start_plain:
        ops["startTaskPlain"] = _start_operation(cfg, "startPlain", "startTaskPlain", "Start one reload task by its ID.")
    ops["stopTasks"] = _start_operation(cfg, "stop", "stopRequest", "Stop the running reloads of the selected tasks.")
    if callers:
        ops["startTasksAsCaller"] = _start_operation(
            cfg, "callerStart", "startRequest", "Start reload tasks as a caller (its allow-list applies)."
        )
    ops["sendReplies"] = {
        "action": "send",
        "channel": _ref("#/channels/replies"),
        "summary": "Replies of requests without a Response Topic.",
        "messages": [_ref(f"#/channels/replies/messages/{n}") for n in [*(spec.name for spec in REPLY_EVENTS), "stopSummary"]],
        "bindings": _op_bindings(False),
    }
    ops["publishStatus"] = {
        "action": "send",
        "channel": _ref("#/channels/status"),
        "summary": "The daemon's retained status.",
        "messages": [_ref("#/channels/status/messages/status")],
        "bindings": _op_bindings(True),
    }
    ops["sendAlerts"] = {
        "action": "send",
        "channel": _ref("#/channels/alerts"),
        "summary": "Alerts, only when alerts.topic is set (the same messages go to alerts.webhook.url when set).",
        "messages": [_ref("#/channels/alerts/messages/alert")],
        "bindings": _op_bindings(False),
    }
    return ops


def _server(cfg: MqttConfig) -> dict[str, Any]:
    v5 = cfg.protocol == "5"
    status_topic = cfg.topics.status + ("/{clientId}" if cfg.shared_group else "")
    binding: dict[str, Any] = {
        "clientId": cfg.client_id,
        "cleanSession": False,
        "keepAlive": cfg.keepalive,
        "lastWill": {"topic": status_topic, "qos": QOS, "retain": True,
                     "message": "the status message with \"status\": \"offline\""},
    }
    if v5:
        binding["sessionExpiryInterval"] = cfg.session_expiry
    binding["bindingVersion"] = MQTT_BINDING_VERSION
    server: dict[str, Any] = {
        "host": f"{cfg.host}:{cfg.port}",
        "protocol": "secure-mqtt" if cfg.tls.enabled else "mqtt",
        "protocolVersion": "5.0" if v5 else "3.1.1",
        "title": "The MQTT broker",
        "description": "The broker the daemon connects to (mqtt.host, mqtt.port), with a persistent session: "
                       "requests published while the daemon is away are delivered when it is back.",
        "bindings": {"mqtt": binding},
    }
    if cfg.username:
        server["security"] = [_ref("#/components/securitySchemes/userPassword")]
    return server


def build_document(
    cfg: MqttConfig | None = None, alerts_topic: str | None = None, caller_levels: Sequence[str] = (), *,
    of_daemon: bool = False,
) -> dict[str, Any]:
    """The AsyncAPI document for `cfg` (default: the default configuration's topics and broker),
    `alerts_topic` (config `alerts.topic`; None: the channel shows the example topic) and
    `caller_levels` (the configured callers' topic levels: with any, the caller channel
    `<topics.start>/{caller}` lists them; the default configuration has none). `of_daemon`: the
    document of one running daemon (GET /asyncapi.json), which lists the alerts channel only when
    it publishes alerts (the alert message stays: a webhook receives it)."""
    cfg = cfg if cfg is not None else MqttConfig()
    components: dict[str, Any] = {"schemas": component_schemas(), "messages": _messages(cfg)}
    channels = _channels(cfg, alerts_topic, caller_levels)
    if cfg.username:
        components["securitySchemes"] = {"userPassword": {"type": "userPassword", "description": "mqtt.username, mqtt.password"}}
    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "butler-mqtt",
            "version": __version__,
            "description": "Start Qlik Sense reload tasks from MQTT messages: every request is answered on a reply topic. "
                           "Optionally, alerts on an alerts topic.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {"broker": _server(cfg)},
        "channels": channels,
        "operations": _operations(cfg, "callerStart" in channels),
        "components": components,
    }
    if of_daemon and alerts_topic is None:
        del doc["channels"]["alerts"], doc["operations"]["sendAlerts"]
    return doc


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (&id001): every part of the document reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def document_yaml(doc: dict[str, Any] | None = None) -> str:
    """The document as YAML text (the form shipped as docs/asyncapi.yaml)."""
    body = yaml.dump(
        doc if doc is not None else build_document(), Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=110
    )
    return "# Generated from the code by scripts/asyncapi (butler_mqtt/asyncapi.py): do not edit by hand.\n" + body
