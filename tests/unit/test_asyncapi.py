"""The AsyncAPI 3.0 document (issue 15): valid against the official JSON Schema, shipped
current as docs/asyncapi.yaml, and its payload schemas hold what replies.py builds, no less and
no more (the integration tests check every reply they receive, tests/support/asyncapi_check.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match

from butler_mqtt import asyncapi, replies
from butler_mqtt.config import MqttConfig
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import FINAL_STATES, StartRequest, TaskOutcome, TaskStatus, validate_request
from butler_mqtt.mqtt.listener import MqttListener
from butler_mqtt.ops import alerts
from butler_mqtt.replies import types as events
from tests.support import asyncapi_check

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_SCHEMA = REPO / "tests/data/asyncapi/asyncapi-3.0.0.schema.json"
SHIPPED = REPO / "docs/asyncapi.yaml"
T = "a8b4c123-def4-4678-9abc-def012345678"
E = "5c6a1f4e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"

CONFIGS = {
    "default": MqttConfig(),
    "mqtt311-shared-tls-user": MqttConfig(
        protocol="3.1.1", shared_group="butlers", username="butler", password="s3cret-pw", tls={"enabled": True},
        topics={"start": "sense/start", "start_plain": None, "reply": "sense/reply", "status": "sense/status"},
    ),
}


def json_clean(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc))


@pytest.fixture(scope="module")
def official() -> Draft7Validator:
    spec = json.loads(OFFICIAL_SCHEMA.read_text(encoding="utf-8"))
    assert spec["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    return Draft7Validator(spec, registry=asyncapi_check.registry({}))  # refs resolve within the file, no network


# ----------------------------------------------------------------------------- the document


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_document_is_valid_asyncapi_3(official: Draft7Validator, name: str) -> None:
    doc = json_clean(asyncapi.build_document(CONFIGS[name]))
    error = best_match(official.iter_errors(doc))
    assert error is None, f"{'/'.join(map(str, error.absolute_path))}: {error.message[:500]}"


def test_a_daemon_without_alerts_documents_no_alerts_channel(official: Draft7Validator) -> None:
    doc = json_clean(asyncapi.build_document(of_daemon=True))
    assert "alerts" not in doc["channels"] and "sendAlerts" not in doc["operations"]
    assert best_match(official.iter_errors(doc)) is None  # still a valid document, no dangling reference
    with_alerts = json_clean(asyncapi.build_document(alerts_topic="a/b", of_daemon=True))
    assert with_alerts["channels"]["alerts"]["address"] == "a/b" and "sendAlerts" in with_alerts["operations"]
    assert "alerts" in json_clean(asyncapi.build_document())["channels"]  # the shipped document shows the example


def test_the_official_schema_does_catch_mistakes(official: Draft7Validator) -> None:
    doc = json_clean(asyncapi.build_document())
    doc["operations"]["startTasks"]["bindings"]["mqtt"]["qos"] = 3
    assert not official.is_valid(doc)
    doc = json_clean(asyncapi.build_document())
    doc["channels"]["start"]["topic"] = "x"  # not an AsyncAPI 3.0 field
    assert not official.is_valid(doc)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_reference_resolves_and_operations_use_their_channels_messages(name: str) -> None:
    doc = json_clean(asyncapi.build_document(CONFIGS[name]))
    refs = _refs(doc)
    assert len(refs) > 40
    for ref in refs:
        _resolve(doc, ref)
    for op_name, op in doc["operations"].items():
        for part in [op, op.get("reply")] if op.get("reply") else [op]:
            channel = part["channel"]["$ref"]
            for m in part["messages"]:
                assert m["$ref"].startswith(channel + "/messages/"), (op_name, m)


def test_document_covers_the_interface() -> None:
    cfg = MqttConfig()
    doc = json_clean(asyncapi.build_document(cfg))
    addresses = {name: ch["address"] for name, ch in doc["channels"].items()}
    assert addresses == {
        "start": cfg.topics.start, "startPlain": cfg.topics.start_plain, "replies": cfg.topics.reply,
        "responseTopic": None, "status": cfg.topics.status, "alerts": asyncapi.ALERT_TOPIC_EXAMPLE,
    }
    names = ["task", "summary", "taskFinished", "taskOverdue", "requestFinished", "error"]
    assert list(doc["channels"]["replies"]["messages"]) == names
    start = doc["operations"]["startTasks"]
    assert start["action"] == "receive" and start["bindings"]["mqtt"]["qos"] == 1
    assert "messageExpiryInterval" in start["bindings"]["mqtt"]
    assert start["reply"]["channel"] == {"$ref": "#/channels/responseTopic"}
    request = doc["components"]["messages"]["startRequest"]["bindings"]["mqtt"]
    assert {"responseTopic", "correlationData"} <= set(request)
    assert "correlationData" in doc["components"]["messages"]["task"]["bindings"]["mqtt"]
    assert doc["operations"]["publishStatus"]["bindings"]["mqtt"]["retain"] is True
    send_alerts = doc["operations"]["sendAlerts"]
    assert send_alerts["action"] == "send" and send_alerts["bindings"]["mqtt"] == {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}
    assert "only when alerts.topic is set" in doc["channels"]["alerts"]["description"].lower()
    server = doc["servers"]["broker"]["bindings"]["mqtt"]
    assert server["lastWill"]["topic"] == cfg.topics.status and server["sessionExpiryInterval"] == cfg.session_expiry
    assert doc["components"]["messages"]["summary"]["summary"] == "The stage at a glance."  # replies.summary's docstring


def test_configured_topics_and_protocol_are_described() -> None:
    cfg = CONFIGS["mqtt311-shared-tls-user"]
    doc = json_clean(asyncapi.build_document(cfg))
    assert doc["channels"]["start"]["address"] == "sense/start"
    assert "startPlain" not in doc["channels"] and "startTaskPlain" not in doc["operations"]
    assert "responseTopic" not in doc["channels"]  # MQTT 3.1.1: replies on the reply topic only
    assert doc["operations"]["startTasks"]["reply"]["channel"] == {"$ref": "#/channels/replies"}
    assert doc["channels"]["status"]["address"] == "sense/status/{clientId}"
    server = doc["servers"]["broker"]
    assert (server["protocol"], server["protocolVersion"]) == ("secure-mqtt", "3.1.1")
    assert server["security"] == [{"$ref": "#/components/securitySchemes/userPassword"}]
    assert "s3cret-pw" not in json.dumps(doc)  # the scheme is named, never a credential


def test_the_alerts_channel_is_the_configured_topic() -> None:
    doc = json_clean(asyncapi.build_document(CONFIGS["mqtt311-shared-tls-user"], alerts_topic="sense/alerts"))
    assert doc["channels"]["alerts"]["address"] == "sense/alerts"
    assert asyncapi.ALERT_TOPIC_EXAMPLE not in json.dumps(doc["channels"]["alerts"])
    assert "bindings" not in doc["components"]["messages"]["alert"]  # MQTT 3.1.1: no content type property
    assert doc["components"]["messages"]["alert"]["examples"][0]["payload"]["instance"] == CONFIGS["mqtt311-shared-tls-user"].client_id
    v5 = json_clean(asyncapi.build_document())["components"]["messages"]["alert"]
    assert v5["bindings"]["mqtt"]["contentType"] == "application/json"


def test_shipped_document_is_current() -> None:
    shipped = SHIPPED.read_text(encoding="utf-8")
    assert shipped == asyncapi.document_yaml(), "docs/asyncapi.yaml is stale: regenerate it with scripts/asyncapi"
    assert yaml.safe_load(shipped) == json_clean(asyncapi.build_document())


def test_every_example_matches_its_payload_schema() -> None:
    doc = json_clean(asyncapi.build_document())
    reg = asyncapi_check.registry(doc)
    for name, msg in doc["components"]["messages"].items():
        validator = Draft7Validator({"$ref": asyncapi_check.DOC_URI + msg["payload"]["$ref"]}, registry=reg)
        assert msg["examples"], name
        for example in msg["examples"]:
            error = best_match(validator.iter_errors(example["payload"]))
            assert error is None, f"{name}: {error.message}"
    validate_request(asyncapi.REQUEST_EXAMPLE)


# ----------------------------------------------------------------------------- schemas vs builders


def test_schema_enums_are_the_models_own() -> None:
    assert set(get_args(events.FinalStatus)) == set(FINAL_STATES.values()) | {"Unknown"}
    schemas = asyncapi.component_schemas()
    assert schemas["TaskEvent"]["properties"]["status"]["enum"] == list(get_args(TaskStatus))
    listed = [s for k in ("StartedTask", "DeniedTask", "FailedTask", "RunningTask", "QueuedTask")
              for s in schemas[k]["properties"]["status"].get("enum", [schemas[k]["properties"]["status"].get("const")])]
    # Every status but `expired` (only ever a task event) appears under exactly one summary list.
    assert sorted(listed) == sorted(set(get_args(TaskStatus)) - {"expired"})
    assert [spec.name for spec in replies.REPLY_EVENTS] == [
        "task", "summary", "taskFinished", "taskOverdue", "requestFinished", "error"
    ]


def _outcome(status: str, **extra: Any) -> TaskOutcome:
    o = TaskOutcome(T, "Task", status, ["taskId:" + T, "tag:x", "customProperty:a=b"])  # type: ignore[arg-type]
    if status in ("started", "alreadyRunning", "skipped"):
        o.execution_id = E
    if status == "queued":
        o.position = 1
    for k, v in extra.items():
        setattr(o, k, v)
    return o


STATUSES = list(get_args(TaskStatus))


def built_events() -> list[replies.Event]:
    """Every shape replies.py makes: each status, each optional field, each stage form."""
    out: list[replies.Event] = []
    for status in STATUSES:
        for extra in ({}, {"reason": "why"}, {"attempt": 2}):
            o = _outcome(status, **extra)
            out += [replies.task(o, "r1"), replies.task(o, None, 1)]
    outcomes = [_outcome(s, reason="r") for s in STATUSES] + [_outcome("failed", attempt=3)]
    not_found = [{"taskId": T}, {"tag": "t"}, {"customProperty": {"name": "n", "value": "v"}}]
    out += [replies.summary("r1", outcomes, not_found), replies.summary(None, [], [], 2)]
    row = {"startTime": "2025-01-06T06:00:00.000Z", "stopTime": replies.QRS_NEVER, "duration": 0}
    for status in get_args(events.FinalStatus):
        out.append(replies.task_finished("r1", T, "Task", E, status, row))
    out += [
        replies.task_finished(None, T, "Task", E, "Unknown", None, "lost", 0),
        replies.task_finished("r1", T, "Task", E, "FinishedFail", row, attempt=1, retry_in=60.4),
        replies.task_finished("r1", T, "Task", E, "FinishedFail", row, attempt=2),
        replies.task_overdue("r1", T, "Task", E, 1_800_000),
        replies.task_overdue(None, T, "Task", E, 0, 3),
        replies.request_finished("r1", {"FinishedSuccess": 3, "Unknown": 1}, None, 81234, None),
        replies.request_finished(None, {}, 1, 0, "stage 1 failed"),
        replies.error(None, "Invalid JSON", "Expecting value at line 1 column 1"),
    ]
    return out


@pytest.mark.parametrize("event", built_events(), ids=lambda ev: ev["event"])
def test_every_event_the_builders_make_matches_its_schema(event: replies.Event) -> None:
    assert asyncapi_check.problem(json_clean(event)) is None


def _task() -> dict[str, Any]:
    return json_clean(replies.task(_outcome("started"), "r1"))


def _summary_with(status: str) -> dict[str, Any]:
    ev = json_clean(replies.summary("r1", [_outcome("started")], []))
    ev["tasksStarted"][0]["status"] = status
    return ev


#: A reply that is not what the document says -> what the check must name.
DRIFTS = {
    "extra field": (lambda: {**_task(), "startedBy": "x"}, "'startedBy' was unexpected"),
    "missing field": (lambda: {k: v for k, v in _task().items() if k != "matchedBy"}, "'matchedBy' is a required"),
    "unknown status": (lambda: {**_task(), "status": "running"}, "'running' is not one of"),
    "started without executionId": (
        lambda: {k: v for k, v in _task().items() if k != "executionId"}, "'executionId' is a required"),
    "queued without position": (
        lambda: json_clean(replies.task(_outcome("queued", position=None), "r1")), "'position' is a required"),
    "not a GUID": (lambda: {**_task(), "taskId": "123"}, "task at taskId: '123' does not match"),
    "denied listed as started": (lambda: _summary_with("denied"), "tasksStarted/0/status: 'denied'"),
    "retryIn without attempt": (
        lambda: {**json_clean(replies.task_finished("r1", T, "Task", E, "FinishedFail", None)), "retryIn": 60},
        "'attempt' is a dependency of 'retryIn'"),
    "QRS status number": (
        lambda: {**json_clean(replies.task_finished("r1", T, "Task", E, "Aborted", None)), "status": 6},
        "taskFinished at status: 6"),
    "unknown finished state": (
        lambda: json_clean(replies.request_finished("r1", {"Running": 1}, None, 1, None)), "finished: 'Running'"),
    "unknown event": (lambda: {"event": "taskStarted", "requestId": None}, "'taskStarted' is not in the AsyncAPI"),
    "error without details": (lambda: {"event": "error", "requestId": None, "error": "x"}, "'details' is a required"),
}


@pytest.mark.parametrize("name", sorted(DRIFTS))
def test_a_reply_that_drifts_from_the_document_is_caught(name: str) -> None:
    make, expected = DRIFTS[name]
    found = asyncapi_check.problem(make())
    assert found is not None and expected in found, found
    assert len(found) < 1500  # the offending message is quoted, shortened


def test_messages_that_are_not_the_daemons_are_ignored() -> None:
    for payload in ([1, 2], "text", {"taskId": T}, {"hello": "world"}, None):
        assert asyncapi_check.problem(payload) is None


def test_status_messages_match_the_schema() -> None:
    listener = MqttListener(MqttConfig(), on_job=lambda _job: None)
    listener.problems["qrs"] = "QRS refuses the client certificate"
    for state in ("online", "offline"):
        assert asyncapi_check.problem(json.loads(listener.status_payload(state))) is None
    bad = {**json.loads(listener.status_payload("online")), "status": "starting"}
    assert asyncapi_check.problem(bad) is not None


# ----------------------------------------------------------------------------- alerts vs ops/alerts.py


def test_the_alert_example_is_what_ops_alerts_builds() -> None:
    cfg = MqttConfig()
    now, _ = asyncapi.ALERT_EXAMPLE_TIME
    built = alerts.message("reloadFailed", cfg.client_id, asyncapi.ALERT_EXAMPLE_FIELDS, now=now)
    assert asyncapi.alert_example(cfg) == built and list(asyncapi.alert_example(cfg)) == list(built)  # key order too
    assert asyncapi_check.problem(json_clean(built)) is None


def test_alert_schema_enums_and_keys_are_ops_alerts_own() -> None:
    schema = asyncapi.component_schemas()["AlertMessage"]
    assert schema["properties"]["alert"]["enum"] == list(alerts.KINDS)
    assert set(schema["properties"]["severity"]["enum"]) == set(alerts.SEVERITY.values())
    assert set(schema["required"]) == set(schema["properties"]) == {*alerts.FIELDS, *events.ALERT_OWN_KEYS}
    assert set(alerts.FAILED_FINAL) < set(get_args(events.FinalStatus))
    message = alerts.message("overdue", "b1", {"qrs": "https://q:4242"}, now=0)
    assert list(message) == list(events.AlertMessage.__annotations__)  # every key, in the schema's order


def built_alerts() -> list[dict[str, Any]]:
    """Every alert ops/alerts.py raises: from each built reply event that raises one, and a QRS
    outage with its recovery."""
    out = [alerts.from_event(kind, ev, "butler-mqtt", "https://qlik:4242")
           for ev in built_events() if (kind := alerts.alert_kind(ev)) is not None]
    outage = alerts.QrsOutage(after_s=0)
    for status in (None, 200):
        change = outage.observe(status, "GET /qrs/about")
        assert change is not None
        out.append(alerts.message(change[0], "butler-mqtt", {**change[1], "qrs": "https://qlik:4242"}))
    return out


def test_every_alert_kind_is_built_and_matches_the_schema() -> None:
    built = built_alerts()
    assert {m["alert"] for m in built} == set(alerts.KINDS)
    for msg in built:
        assert asyncapi_check.problem(json_clean(msg)) is None, msg


def _alert() -> dict[str, Any]:
    return json_clean(asyncapi.alert_example(MqttConfig()))


#: An alert that is not what the document says -> what the check must name.
ALERT_DRIFTS = {
    "unknown key": (lambda: {**_alert(), "priority": 5}, "'priority' was unexpected"),
    "missing key": (lambda: {k: v for k, v in _alert().items() if k != "stage"}, "'stage' is a required"),
    "wrong type": (lambda: {**_alert(), "durationMs": "81234"}, "AlertMessage at durationMs: '81234'"),
    "unknown kind": (lambda: {**_alert(), "alert": "reloadSlow"}, "'reloadSlow' is not one of"),
    "severity of another kind": (lambda: {**_alert(), "severity": "info"}, "'error' was expected"),
    "no QRS": (lambda: {**_alert(), "qrs": None}, "AlertMessage at qrs: None"),
    "time without milliseconds": (lambda: {**_alert(), "time": "2025-01-06T06:01:21Z"}, "AlertMessage at time"),
}


@pytest.mark.parametrize("name", sorted(ALERT_DRIFTS))
def test_an_alert_that_drifts_from_the_document_is_caught(name: str) -> None:
    make, expected = ALERT_DRIFTS[name]
    found = asyncapi_check.problem(make())
    assert found is not None and expected in found, found


# ----------------------------------------------------------------------------- the request schema


def test_every_request_field_is_described() -> None:
    assert set(asyncapi.REQUEST_FIELDS) == set(StartRequest.model_fields)
    props = asyncapi.component_schemas()["StartRequest"]["properties"]
    assert all(props[name].get("description") for name in StartRequest.model_fields)


REQUESTS: list[Any] = [
    {"taskId": T},
    {"taskId": [T, T.upper()], "requestId": "r", "wait": True},
    {"tag": "daily"},
    {"customProperty": [{"name": "group", "value": "finance"}], "then": {"tag": ["next"], "then": {"taskId": T}}},
    {"tag": "x", "ifRunning": "queue", "retry": {"attempts": 2, "delay": 120}, "deadline": 1800, "priority": 9},
    {"tag": "x", "onFailure": "continue", "dryRun": True, "allTaskIdsMustExist": False},
    {},
    {"taskId": "123"},
    {"tag": ""},
    {"tag": "x", "colour": "red"},
    {"tag": "x", "priority": 10},
    {"tag": "x", "ifRunning": "later"},
    {"tag": "x", "retry": {"delay": 5}},
    {"customProperty": [{"name": "group"}]},
    {"requestId": "r" * 129, "tag": "x"},
    {"tag": "x", "then": {"wait": True}},
]


@pytest.mark.parametrize("payload", REQUESTS, ids=lambda p: json.dumps(p)[:60])
def test_request_schema_agrees_with_the_request_model(payload: Any) -> None:
    doc = json_clean(asyncapi.build_document())
    validator = Draft7Validator(
        {"$ref": asyncapi_check.DOC_URI + "#/components/schemas/StartRequest"}, registry=asyncapi_check.registry(doc)
    )
    try:
        validate_request(payload)
        accepted = True
    except RequestRejected:
        accepted = False
    assert validator.is_valid(payload) == accepted


def test_plain_topic_payload_is_one_task_id() -> None:
    pattern = re.compile(asyncapi.component_schemas()["TaskIdText"]["pattern"])
    assert pattern.match(f" {T}\n") and not pattern.match("123") and not pattern.match(f"{T},{T}")
