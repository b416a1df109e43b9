"""Drop-in for Butler users, REST side (issue 16): the seed's third URL form
`POST|PUT /v4/reloadtask/start`, and the API over HTTPS and mutual TLS. Real HTTP against an
in-process daemon, the QRS simulator over mTLS and a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from butler_mqtt.sim import QrsSimulator, SimTask
from tests.conftest import make_config

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T4 = "44444444-4444-4444-8444-444444444444"
MISSING = "99999999-9999-4999-8999-999999999999"
TASKS = [
    SimTask(T1, "Finance daily", tags=["financial-reports", "daily-refresh"], custom_properties=[("taskGroup", "finance")]),
    SimTask(T2, "Sales daily", tags=["daily-refresh"], custom_properties=[("taskGroup", "sales")]),
    SimTask(T4, "Weekly", tags=["weekly"], custom_properties=[("taskGroup", "finance")]),
]
MAX_BODY = 4096
DASH = "/v4/reloadtask/-/start"
BARE = "/v4/reloadtask/start"


@pytest.fixture
def sim(qrs_certs: Path) -> Iterator[QrsSimulator]:
    s = QrsSimulator(tasks=[SimTask(**vars(t)) for t in TASKS], certs_dir=qrs_certs).start()
    yield s
    s.stop()


@pytest.fixture
def cfg(qrs_certs, sim, broker, tmp_path):
    return make_config(
        qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0, "max_body_bytes": MAX_BODY}
    )


def call(base: str, path: str, body: Any = None, *, method: str = "POST", raw: bytes | None = None,
         headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
         session: requests.Session | Any = requests) -> requests.Response:
    h = dict(headers or {})
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
        return session.request(method, base + path, data=raw, headers=h, params=params, timeout=30)
    if body is None:
        return session.request(method, base + path, headers=h, params=params, timeout=30)
    return session.request(method, base + path, json=body, headers=h, params=params, timeout=30)


def started(sim: QrsSimulator) -> list[str]:
    return sorted(s.task_id for s in sim.starts)


def answer(resp: requests.Response) -> tuple[int, str, Any, dict[str, str]]:
    """What a caller sees: status, content type, body and the headers that matter."""
    keep = {k: resp.headers[k] for k in ("allow", "retry-after", "www-authenticate") if k in resp.headers}
    return resp.status_code, resp.headers.get("content-type", ""), resp.json(), keep


# ----------------------------------------------------------------------------- the third URL form


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_bare_path_starts_with_the_seed_body(cfg, sim, start_daemon, method):
    base = f"http://127.0.0.1:{start_daemon(cfg).daemon.http_server.port}"
    # The seed's webhook example: curl -X POST .../v4/reloadtask/start -d '{"tag": [...], "customProperty": [...]}'
    resp = call(base, BARE, {"requestId": f"bare-{method}", "tag": ["weekly"],
                             "customProperty": [{"name": "taskGroup", "value": "sales"}]}, method=method)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text
    summary = resp.json()
    assert summary["requestId"] == f"bare-{method}" and summary["totalTasksStarted"] == 2
    assert sorted(t["taskId"] for t in summary["tasksStarted"]) == [T2, T4]
    assert started(sim) == [T2, T4]


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_bare_path_starts_with_butler_body(cfg, sim, start_daemon, method):
    base = f"http://127.0.0.1:{start_daemon(cfg).daemon.http_server.port}"
    body = [
        {"type": "starttaskid", "payload": {"taskId": T1}},
        {"type": "starttasktag", "payload": {"tag": "weekly"}},
        {"type": "starttaskid", "payload": {"taskId": MISSING}},
    ]
    resp = call(base, BARE, body, method=method)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text
    res = resp.json()
    assert res["tasksId"] == {"started": [{"taskId": T1, "taskName": "Finance daily"}],
                              "invalid": [{"taskId": MISSING}], "denied": []}
    assert res["tasksTag"] == [{"taskId": T4, "taskName": "Weekly"}]
    assert started(sim) == [T1, T4]


def test_bare_path_method_override(cfg, sim, start_daemon):
    base = f"http://127.0.0.1:{start_daemon(cfg).daemon.http_server.port}"
    # Qlik's REST connector: POST + X-HTTP-Method-Override: PUT, Butler's body.
    resp = call(base, BARE, [{"type": "starttasktag", "payload": {"tag": "weekly"}}],
                headers={"X-HTTP-Method-Override": "PUT"})
    assert resp.status_code == 200 and resp.json()["tasksTag"] == [{"taskId": T4, "taskName": "Weekly"}]
    assert started(sim) == [T4]


def test_bare_path_answers_exactly_like_dash(cfg, sim, start_daemon):
    """Every status code of the start endpoint, asked on both paths: the same answer."""
    cfg.http.token = "tok-16"  # type: ignore[assignment]
    base = f"http://127.0.0.1:{start_daemon(cfg).daemon.http_server.port}"
    auth = {"Authorization": "Bearer tok-16"}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("200 seed dry run", {"body": {"tag": "daily-refresh", "dryRun": True}, "headers": auth}),
        ("200 seed dry run, PUT", {"body": {"tag": "daily-refresh", "dryRun": True}, "headers": auth, "method": "PUT"}),
        ("200 override", {"body": {"tag": "weekly", "dryRun": True}, "headers": {**auth, "X-HTTP-Method-Override": "PUT"}}),
        ("400 no criteria", {"body": {}, "headers": auth}),
        ("400 no body", {"headers": auth}),
        ("400 empty Butler body", {"body": [], "headers": auth}),
        ("400 bad GUID", {"body": {"taskId": "123"}, "headers": auth}),
        ("400 bad JSON", {"raw": b"{nope", "headers": auth}),
        ("400 bad flag", {"body": {"tag": "x"}, "headers": auth, "params": {"allTaskIdsMustExist": "maybe"}}),
        ("400 keyvaluestore", {"body": [{"type": "keyvaluestore", "payload": {"namespace": "n", "key": "k", "value": "v"}}],
                               "headers": auth}),
        ("401 no token", {"body": {"tag": "weekly"}}),
        ("401 wrong token", {"body": {"tag": "weekly"}, "headers": {"Authorization": "Bearer nope"}}),
        ("405 DELETE", {"body": {"tag": "weekly"}, "headers": auth, "method": "DELETE"}),
        ("405 GET", {"headers": auth, "method": "GET"}),
        ("405 override to DELETE", {"body": {"tag": "weekly"}, "headers": {**auth, "X-HTTP-Method-Override": "DELETE"}}),
        ("413 too large", {"raw": b'{"tag": "' + b"x" * MAX_BODY + b'"}', "headers": auth}),
        ("415 text", {"raw": b"{}", "headers": {**auth, "Content-Type": "text/plain"}}),
    ]
    seen: set[int] = set()
    for name, kw in cases:
        dash, bare = answer(call(base, DASH, **kw)), answer(call(base, BARE, **kw))
        assert dash == bare, name
        assert bare[1] == "application/json", name
        assert bare[0] == int(name[:3]), (name, bare)
        seen.add(bare[0])
    # 404: a trailing slash on either form
    assert answer(call(base, BARE + "/", {"tag": "x"}, headers=auth))[0] == 404
    # 502 / 503: QRS refusing or down, nothing started
    sim.fault = "error500"
    dash, bare = answer(call(base, DASH, {"tag": "weekly"}, headers=auth)), answer(call(base, BARE, {"tag": "weekly"}, headers=auth))
    assert dash == bare and bare[0] == 503 and bare[3]["retry-after"] == "30"
    sim.fault = None
    sim.stop()
    dash, bare = answer(call(base, DASH, {"tag": "weekly"}, headers=auth)), answer(call(base, BARE, {"tag": "weekly"}, headers=auth))
    assert dash[:2] == bare[:2] and bare[0] == 503 and bare[2]["error"] == "QRS unreachable"
    assert seen == {200, 400, 401, 405, 413, 415}
    assert sim.starts == []


def test_bare_path_in_the_openapi_document(cfg, start_daemon):
    cfg.http.token = "tok"  # type: ignore[assignment]
    base = f"http://127.0.0.1:{start_daemon(cfg).daemon.http_server.port}"
    doc = requests.get(base + "/openapi.json", timeout=10).json()
    bare, dash = doc["paths"][BARE], doc["paths"]["/v4/reloadtask/{taskId}/start"]
    assert set(bare) == {"post", "put"}
    for method in ("post", "put"):
        assert "taskId" not in {p["name"] for p in bare[method].get("parameters", [])}
        assert bare[method]["requestBody"] == dash[method]["requestBody"]
        assert bare[method]["responses"] == dash[method]["responses"]
        assert bare[method]["security"] == [{"bearerToken": []}]
        assert "/v4/reloadtask/-/start" in bare[method]["description"]
    assert bare["post"]["operationId"] != dash["post"]["operationId"]
