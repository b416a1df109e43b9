"""The REST API through real HTTP: uvicorn on a free port inside an in-process daemon, the QRS
simulator over mTLS, a real Mosquitto (contract section 5, issue 4)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.sim import started_ids

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T3 = "33333333-3333-4333-8333-333333333333"
T4 = "44444444-4444-4444-8444-444444444444"
T5 = "55555555-5555-4555-8555-555555555555"
MISSING = "99999999-9999-4999-8999-999999999999"
GUID_ERROR = {"error": "Invalid task ID format", "details": "Task ID must be a valid GUID"}

TASKS = [
    SimTask(T1, "Finance daily", tags=["financial-reports", "daily-refresh"], custom_properties=[("taskGroup", "finance")]),
    SimTask(T2, "Sales daily", tags=["daily-refresh"], custom_properties=[("taskGroup", "sales"), ("priority", "finance")]),
    SimTask(T3, "Disabled daily", tags=["daily-refresh"], enabled=False),
    SimTask(T4, "Weekly", tags=["weekly"], custom_properties=[("taskGroup", "finance")]),
    SimTask(T5, "Instant", tags=["instant"]),
]
MAX_BODY = 4096


@pytest.fixture
def cfg(qrs_certs, sim, broker, tmp_path):
    return make_config(
        qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0, "max_body_bytes": MAX_BODY}
    )


class Api:
    """A tiny client for the daemon's REST API."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(
        self,
        task_id: str = "-",
        body: Any = None,
        *,
        method: str = "POST",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        path: str | None = None,
    ) -> requests.Response:
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        h.update(headers or {})
        url = self.base + (path or f"/v4/reloadtask/{task_id}/start")
        if raw is not None:
            h.setdefault("Content-Type", "application/json")
            return requests.request(method, url, data=raw, headers=h, params=params, timeout=30)
        if body is None:
            return requests.request(method, url, headers=h, params=params, timeout=30)
        return requests.request(method, url, json=body, headers=h, params=params, timeout=30)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.base + path, timeout=30, **kw)


@pytest.fixture
def api(cfg, start_daemon) -> Api:
    d = start_daemon(cfg)
    return Api(d.daemon.http_server.port)


def ok(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    return resp.json()


def error(resp: requests.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error", "details"} and body["error"] and body["details"]
    return body


def ids(items: list[dict[str, Any]]) -> list[str]:
    return sorted(i["taskId"] for i in items)


# ----------------------------------------------------------------------------- seed shape


def test_seed_body_post_and_put(api, sim):
    summary = ok(api.call(body={"requestId": "s-1", "taskId": [T1]}))
    assert "event" not in summary
    assert summary["requestId"] == "s-1" and summary["totalTasksStarted"] == 1
    assert summary["tasksStarted"] == [{"taskId": T1, "taskName": "Finance daily", "status": "started"}]
    assert summary["tasksNotFound"] == [] and summary["tasksDenied"] == [] and summary["tasksFailed"] == []
    summary = ok(api.call(body={"tag": "weekly"}, method="PUT"))
    assert summary["requestId"] is None and ids(summary["tasksStarted"]) == [T4]
    assert started_ids(sim) == [T1, T4]


def test_path_id_with_empty_object_no_body_and_merged_body(api, sim):
    assert ids(ok(api.call(T1, {}))["tasksStarted"]) == [T1]
    assert ids(ok(api.call(T2))["tasksStarted"]) == [T2]  # no body at all
    assert ids(ok(api.call(T4.upper(), raw=b"  \n"))["tasksStarted"]) == [T4]  # blank body, any case
    merged = ok(api.call(T1, {"taskId": T2, "customProperty": [{"name": "taskGroup", "value": "finance"}]}, method="PUT"))
    assert ids(merged["tasksStarted"]) == [T1, T2, T4]
    # A task still running is not started twice (QRS answers with the running execution).
    assert set(started_ids(sim)) == {T1, T2, T4}


def test_method_override(api, sim):
    put = ok(api.call(T1, {}, headers={"X-HTTP-Method-Override": "PUT"}))
    assert put["totalTasksStarted"] == 1
    for override in ("DELETE", "GET", "patch", "bogus"):
        body = error(api.call(T1, {}, headers={"X-HTTP-Method-Override": override}), 405)
        assert "POST or PUT" in body["details"]
    resp = api.call(T1, {}, method="DELETE")
    error(resp, 405)
    assert resp.headers["allow"] == "POST, PUT"
    error(api.call(T1, method="GET"), 405)
    assert started_ids(sim) == [T1]


def test_all_task_ids_must_exist_from_query(api, sim):
    summary = ok(api.call(body={"taskId": [T2, MISSING]}, params={"allTaskIdsMustExist": "true"}))
    assert summary["tasksDenied"][0]["taskId"] == T2 and MISSING in summary["tasksDenied"][0]["reason"]
    assert summary["tasksNotFound"] == [{"taskId": MISSING}]
    assert sim.starts == []
    summary = ok(api.call(body={"taskId": [T2, MISSING]}, params={"allTaskIdsMustExist": "false"}))
    assert summary["totalTasksStarted"] == 1
    for bad in ("yes", "1", "TRUE", ""):
        body = error(api.call(body={"taskId": [T2]}, params={"allTaskIdsMustExist": bad}), 400)
        assert "allTaskIdsMustExist" in body["details"]
    body = error(api.call(body={"taskId": [T2], "allTaskIdsMustExist": True}, params={"allTaskIdsMustExist": "false"}), 400)
    assert "differs" in body["details"]
    assert started_ids(sim) == [T2]


def test_dry_run_starts_nothing(api, sim):
    summary = ok(api.call(body={"tag": "daily-refresh", "dryRun": True}))
    assert {t["status"] for t in summary["tasksStarted"]} == {"wouldStart"}
    assert ids(summary["tasksStarted"]) == [T1, T2, T3]
    assert summary["totalTasksStarted"] == 0
    assert sim.starts == []


def test_request_id_is_the_idempotency_key_shared_with_mqtt(api, cfg, sim):
    rid = f"idem-{uuid.uuid4().hex}"
    first = ok(api.call(body={"requestId": rid, "tag": "financial-reports"}))
    assert "replayed" not in first
    # the earlier answer, marked replayed (issue 25)
    assert ok(api.call(body={"requestId": rid, "tag": "financial-reports"})) == {**first, "replayed": True}
    with Requester(cfg.mqtt) as r:
        events = r.request({"requestId": rid, "tag": "financial-reports"})
    assert {k: v for k, v in events[-1].items() if k != "event"} == {**first, "replayed": True}  # same journal, replayed
    assert all(e["replayed"] is True for e in events)
    assert started_ids(sim) == [T1]


def test_concurrent_retries_with_one_request_id_start_once(api, sim):
    sim.latency_ms = 150  # the first call is still running when the retries arrive
    rid = f"race-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: ok(api.call(body={"requestId": rid, "tag": "instant"})), range(4)))
    # one answer is the request's own, the others its replay (issue 25: marked replayed)
    fresh = [a for a in answers if "replayed" not in a]
    assert len(fresh) == 1 and fresh[0]["totalTasksStarted"] == 1
    assert all(a == {**fresh[0], "replayed": True} for a in answers if a is not fresh[0])
    # QRS was asked to start it once (the simulator would fold a second start into the first).
    assert [r.path for r in sim.request_log if r.method == "POST"] == [f"/qrs/task/{T5}/start/synchronous"]


@pytest.mark.parametrize(
    "task_id, raw, expected",
    [
        ("-", b"{not json", "Invalid JSON"),
        ("-", b"\xff\xfe\x00", "Invalid payload"),
        ("-", b'{"tag": "a", "colour": "red"}', "Invalid request"),
        ("-", b'{"tag": 42}', "Invalid request"),
        ("-", b'{"tag": "a", "dryRun": "yes"}', "Invalid request"),
        ("-", b'"just a string"', "Invalid request"),
        ("-", b"null", "Invalid request"),
        ("-", b"{}", "Invalid request"),  # no criteria at all
        ("-", b'{"taskId": ["123"], "tag": "daily-refresh"}', "Invalid task ID format"),
        ("not-a-guid", b"{}", "Invalid task ID format"),  # a seed request's path ID
        ("not-a-guid", b"", "Invalid task ID format"),
        (T1, b'{"taskId": 7}', "Invalid request"),
        ("-", b"[]", "Invalid request"),  # Butler's shape with nothing in it
        ("-", b'[{"type": "starttaskid"}]', "Invalid request"),  # Butler: missing payload (500 in Butler)
        ("-", b'[{"type": "startall", "payload": {}}]', "Invalid request"),
        ("-", b'[{"type": "starttasktag", "payload": {"tag": 5}}]', "Invalid request"),
        ("-", b'[{"type": "starttaskid", "payload": {"taskid": "x"}}]', "Invalid request"),
        ("-", b"[1, 2]", "Invalid request"),
    ],
)
def test_bad_input_is_a_400_and_starts_nothing(api, sim, task_id, raw, expected):
    body = error(api.call(task_id, raw=raw), 400)
    assert body["error"] == expected
    if expected == "Invalid task ID format":
        assert body == GUID_ERROR
    assert sim.starts == []


def test_non_json_content_type_is_415(api, sim):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        body = error(api.call(T1, raw=b"{}", headers={"Content-Type": ctype}), 415)
        assert "application/json" in body["details"]
    ok(api.call(T1, raw=b"{}", headers={"Content-Type": "application/json; charset=utf-8"}))
    assert started_ids(sim) == [T1]


def test_body_over_the_limit_is_413(api, sim):
    big = b'{"tag": "' + b"x" * MAX_BODY + b'"}'
    body = error(api.call(raw=big), 413)
    assert str(MAX_BODY) in body["details"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is what counts
        yield b'{"tag": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}'

    error(api.call(raw=chunks()), 413)  # type: ignore[arg-type]
    assert sim.starts == []
    ok(api.call(T1))  # still serving


def test_qrs_unreachable_is_503_and_unhealthy(api, sim):
    sim.stop()
    resp = api.call(T1, {})
    assert error(resp, 503)["error"] == "QRS unreachable"
    assert resp.headers["retry-after"] == "30"
    health = api.get("/healthz")
    assert health.status_code == 503 and health.headers["content-type"] == "application/json"
    assert health.json()["qrs"] == "unreachable" and health.json()["mqtt"] == "connected"
    assert health.json()["status"] == "unavailable"


def test_qrs_server_error_is_503(api, sim):
    sim.fault = "error500"
    body = error(api.call(body={"tag": "weekly"}), 503)
    assert body["error"] == "QRS unreachable"
    sim.fault = None
    assert ok(api.call(body={"tag": "weekly"}))["totalTasksStarted"] == 1


def test_unknown_paths_are_json_404(api):
    for path in ("/nope", "/v4/reloadtask/-/start/", "/v4/reloadtask/a/b/start"):
        error(api.call(path=path), 404)
    error(api.get("/v4/reloadtask"), 404)


def test_wait_and_then_over_rest_are_followed_like_mqtt(api, cfg, sim, listen):
    """The answer is the first stage's summary; the tracker follows the executions, starts the
    next stage and publishes the later events on MQTT topics.reply."""
    replies = listen(cfg.mqtt.topics.reply)
    rid = f"chain-{uuid.uuid4().hex}"
    summary = ok(api.call(T1, {"requestId": rid, "then": {"tag": "weekly"}}))
    assert summary["stage"] == 0 and ids(summary["tasksStarted"]) == [T1]
    done = replies.wait_for(lambda m: m.get("requestId") == rid and m["event"] == "requestFinished")
    assert done["finished"] == {"FinishedSuccess": 2} and done["stoppedAtStage"] is None
    finished = [m for m in replies.messages if m.get("requestId") == rid and m["event"] == "taskFinished"]
    assert [(m["taskId"], m["stage"]) for m in finished] == [(T1, 0), (T4, 1)]
    assert started_ids(sim) == [T1, T4]
    # without requestId the request is still followed (under an anonymous key)
    ok(api.call(T2, {"wait": True}))
    replies.wait_for(lambda m: m["event"] == "taskFinished" and m["taskId"] == T2 and m["requestId"] is None)


# ----------------------------------------------------------------------------- token


def test_token_required_when_configured(cfg, sim, start_daemon):
    cfg.http.token = "s3cret-token"  # type: ignore[assignment]
    d = start_daemon(cfg)
    anon = Api(d.daemon.http_server.port)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LXRva2Vu"}, {"Authorization": "Bearer"}):
        resp = anon.call(T1, {}, headers=headers)
        assert error(resp, 401)["error"] == "Unauthorized"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert sim.starts == []
    good = Api(d.daemon.http_server.port, token="s3cret-token")
    assert ok(good.call(T1, {}))["totalTasksStarted"] == 1
    assert ok(anon.call(T2, {}, headers={"authorization": "bearer s3cret-token"}))["totalTasksStarted"] == 1
    assert anon.get("/healthz").status_code == 200  # health and metrics stay open
    assert anon.get("/metrics").status_code == 200
    doc = anon.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    assert "401" in doc["paths"]["/v4/reloadtask/{taskId}/start"]["post"]["responses"]


def test_no_token_configured_means_no_401(api, sim):
    assert ok(api.call(T1, {}, headers={"Authorization": "Bearer anything"}))["totalTasksStarted"] == 1


# ----------------------------------------------------------------------------- Butler shape


def test_butler_shape(api, sim):
    body = [
        {"type": "starttaskid", "payload": {"taskId": T1}},
        {"type": "starttasktag", "payload": {"tag": "daily-refresh"}},
        {"type": "starttaskcustomproperty", "payload": {"customPropertyName": "taskGroup", "customPropertyValue": "finance"}},
    ]
    res = ok(api.call("-", body, method="PUT"))
    assert res["tasksId"] == {"started": [{"taskId": T1, "taskName": "Finance daily"}], "invalid": [], "denied": []}
    assert ids(res["tasksTag"]) == [T1, T2]  # T3 is disabled: QRS did not start it
    assert ids(res["tasksCP"]) == [T1, T4]
    assert res["tasksTagDenied"] == [] and res["tasksCPDenied"] == []
    assert res["tasksNotStarted"] == [
        {"taskId": T3, "taskName": "Disabled daily", "status": "notStarted", "reason": res["tasksNotStarted"][0]["reason"]}
    ]
    assert res["tasksNotFound"] == []
    assert started_ids(sim) == [T1, T2, T4]  # each once, though T1 matched three criteria


def test_butler_shape_path_id_with_empty_array_and_override(api, sim):
    res = ok(api.call(T2, [], headers={"X-HTTP-Method-Override": "PUT"}))
    assert res["tasksId"]["started"] == [{"taskId": T2, "taskName": "Sales daily"}]
    assert started_ids(sim) == [T2]


def test_butler_invalid_ids_answer_200_like_butler(api, sim):
    res = ok(api.call("not-a-guid", []))
    assert res["tasksId"] == {"started": [], "invalid": [{"taskId": "not-a-guid"}], "denied": []}
    body = [{"type": "starttaskid", "payload": {"taskId": t}} for t in ("123", MISSING, T1)]
    res = ok(api.call("-", body))
    assert res["tasksId"]["started"] == [{"taskId": T1, "taskName": "Finance daily"}]
    assert res["tasksId"]["invalid"] == [{"taskId": "123"}, {"taskId": MISSING}]
    assert res["tasksNotFound"] == [{"taskId": MISSING}]
    assert started_ids(sim) == [T1]


def test_butler_all_task_ids_must_exist(api, sim):
    body = [{"type": "starttaskid", "payload": {"taskId": T1}}, {"type": "starttaskid", "payload": {"taskId": "bad"}},
            {"type": "starttasktag", "payload": {"tag": "weekly"}}]
    res = ok(api.call("-", body, params={"allTaskIdsMustExist": "true"}))
    assert res["tasksId"] == {"started": [], "invalid": [{"taskId": "bad"}], "denied": [{"taskId": T1, "taskName": "Finance daily"}]}
    assert ids(res["tasksTag"]) == [T4]  # tags are not affected
    assert res["tasksNotFound"] == []  # the stand-in for the malformed ID never shows
    body[1] = {"type": "starttaskid", "payload": {"taskId": MISSING}}
    res = ok(api.call("-", body, params={"allTaskIdsMustExist": "true"}))
    assert res["tasksId"]["denied"] == [{"taskId": T1, "taskName": "Finance daily"}]
    assert res["tasksId"]["invalid"] == [{"taskId": MISSING}]
    res = ok(api.call("-", body, params={"allTaskIdsMustExist": "false"}))
    assert res["tasksId"]["started"] == [{"taskId": T1, "taskName": "Finance daily"}]
    assert set(started_ids(sim)) == {T1, T4}  # T4 twice, or once if still running


def test_butler_keyvaluestore_is_refused(api, sim):
    body = [{"type": "starttaskid", "payload": {"taskId": T1}},
            {"type": "keyvaluestore", "payload": {"namespace": "ns", "key": "k", "value": "v"}}]
    err = error(api.call("-", body), 400)
    assert err["error"] == "Not supported" and "keyvaluestore" in err["details"]
    assert sim.starts == []


def test_butler_start_filter_denials(cfg, sim, start_daemon):
    cfg.start_filter.enabled = True
    cfg.start_filter.allow.tags = ["financial-reports"]
    api = Api(start_daemon(cfg).daemon.http_server.port)
    body = [{"type": "starttaskid", "payload": {"taskId": T2}}, {"type": "starttasktag", "payload": {"tag": "daily-refresh"}}]
    res = ok(api.call("-", body))
    assert res["tasksId"]["denied"] == [{"taskId": T2, "taskName": "Sales daily"}]
    assert ids(res["tasksTag"]) == [T1]
    assert sorted((d["tag"], d["taskId"]) for d in res["tasksTagDenied"]) == [("daily-refresh", T2), ("daily-refresh", T3)]
    assert started_ids(sim) == [T1]


# ----------------------------------------------------------------------------- one pipeline


@pytest.mark.parametrize(
    "criteria",
    [
        {"tag": ["daily-refresh"]},
        {"customProperty": [{"name": "taskGroup", "value": "finance"}], "taskId": [MISSING]},
        {"taskId": [T1, T2], "tag": "weekly", "dryRun": True},
    ],
)
def test_same_selection_from_rest_and_mqtt(api, cfg, sim, criteria):
    def shape(summary: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in summary.items() if k not in ("event", "requestId")}

    rest = ok(api.call(body=criteria))
    with Requester(cfg.mqtt) as r:
        mqtt = r.request(criteria)[-1]
    assert mqtt["event"] == "summary"
    assert shape(rest) == shape(mqtt)


# ----------------------------------------------------------------------------- health, metrics, docs


def test_healthz_ok(api):
    resp = api.get("/healthz")
    body = ok(resp)
    assert body["status"] == "ok" and body["mqtt"] == "connected" and body["qrs"] == "ok"
    assert body["qrsLastAnswerSecondsAgo"] is not None  # the probe answered


def test_healthz_503_when_qrs_was_never_reached(cfg, sim, start_daemon):
    sim.stop()
    api = Api(start_daemon(cfg).daemon.http_server.port)
    resp = api.get("/healthz")
    assert resp.status_code == 503
    assert resp.json() | {"version": None} == {
        "status": "unavailable", "mqtt": "connected", "qrs": "unreachable", "qrsLastAnswerSecondsAgo": None, "version": None,
        "journal": "ok", "requestsWaiting": 0, "oldestWaitingSeconds": None,
    }


def test_metrics(api, sim):
    ok(api.call(T1, {}))
    error(api.call("-", {}), 400)
    resp = api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'butler_mqtt_requests_total{ingress="rest",outcome="ok"} 1.0' in text
    assert 'butler_mqtt_requests_total{ingress="rest",outcome="rejected"} 1.0' in text
    assert 'butler_mqtt_tasks_total{status="started"} 1.0' in text
    assert "butler_mqtt_mqtt_connected 1.0" in text
    assert 'butler_mqtt_qrs_call_seconds_count{method="GET",route="/qrs/reloadtask/full",status="200"} 1.0' in text


def test_metrics_only_mode(qrs_certs, sim, broker, tmp_path, start_daemon):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", metrics={"port": 0})
    assert not cfg.http.enabled
    server = start_daemon(cfg).daemon.http_server
    assert server.host == "127.0.0.1" and server.port > 0
    api = Api(server.port)
    assert "butler_mqtt_mqtt_connected 1.0" in api.get("/metrics").text
    assert ok(api.get("/healthz"))["status"] == "ok"
    error(api.call(T1, {}), 404)
    error(api.get("/openapi.json"), 404)
    error(api.get("/asyncapi.json"), 404)
    assert sim.starts == []


def test_openapi_document_and_docs(api):
    doc = ok(api.get("/openapi.json"))
    op = doc["paths"]["/v4/reloadtask/{taskId}/start"]
    assert set(op) == {"post", "put"}
    body = op["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"anyOf": [{"$ref": "#/components/schemas/StartRequest"}, {"$ref": "#/components/schemas/ButlerBody"}]}
    schemas = doc["components"]["schemas"]
    assert {"StartRequest", "ButlerBody", "Summary", "ButlerResponse", "ErrorBody", "Health"} <= set(schemas)
    assert {"400", "405", "413", "415", "503"} <= set(op["put"]["responses"])
    assert "security" not in op["post"]
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_asyncapi_document_of_this_daemon_is_served_like_the_openapi_one(cfg, broker, start_daemon):
    """GET /asyncapi.json: the MQTT interface of the running configuration (issue 15), open
    like /openapi.json even with a token, and listed in the OpenAPI document."""
    import json

    from butler_mqtt.asyncapi import build_document

    cfg.http.token = "s3cret-token"  # type: ignore[assignment]
    cfg.alerts.topic = "test/asyncapi/alerts"
    anon = Api(start_daemon(cfg).daemon.http_server.port)
    resp = anon.get("/asyncapi.json")
    doc = ok(resp)
    assert resp.headers["content-type"].startswith("application/json")
    assert doc == json.loads(json.dumps(build_document(cfg.mqtt, alerts_topic="test/asyncapi/alerts", of_daemon=True)))
    assert doc["channels"]["alerts"]["address"] == "test/asyncapi/alerts"  # the running config's alerts topic
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["start"]["address"] == cfg.mqtt.topics.start
    assert doc["servers"]["broker"]["host"] == f"127.0.0.1:{broker.port}"
    assert doc["servers"]["broker"]["bindings"]["mqtt"]["clientId"] == cfg.mqtt.client_id
    assert "s3cret-token" not in resp.text
    assert "get" in ok(anon.get("/openapi.json"))["paths"]["/asyncapi.json"]


def test_docs_work_offline_every_asset_from_this_server(api):
    """A Sense server often has no internet: /docs must reference no other host, and every
    asset it names must be served by the daemon itself."""
    import re

    docs = api.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+", docs.text), docs.text
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs.text)
    assert {r.rsplit("/", 1)[-1] for r in refs} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for ref in refs:
        assert ref.startswith("/"), ref
        asset = api.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    assert "'/openapi.json'" in docs.text or '"/openapi.json"' in docs.text
    assert "validatorUrl" in docs.text and "null" in docs.text.split("validatorUrl", 1)[1][:10]


def test_asyncapi_of_a_daemon_without_alerts_lists_no_alerts_channel(cfg, start_daemon):
    """Issue 25: with alerts.topic unset this daemon publishes no alerts, so its document has no
    alerts channel or operation (the shipped docs/asyncapi.yaml still shows the example)."""
    assert cfg.alerts.topic is None
    doc = ok(Api(start_daemon(cfg).daemon.http_server.port).get("/asyncapi.json"))
    assert "alerts" not in doc["channels"] and "sendAlerts" not in doc["operations"]
    assert {"start", "replies", "status"} <= set(doc["channels"])
    assert "alert" in doc["components"]["messages"]  # what a webhook receives is still described
