"""Drop-in for Butler users, REST side (issue 16): the seed's third URL form
`POST|PUT /v4/reloadtask/start`, and the API over HTTPS and mutual TLS. Real HTTP against an
in-process daemon, the QRS simulator over mTLS and a real Mosquitto."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.pki import Pki
from tests.support.sim import started_ids as started

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


# ----------------------------------------------------------------------------- HTTPS and mutual TLS


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def https_cfg(cfg: Any, pki: Pki, client_ca: bool = False, token: str | None = None) -> Any:
    tls = {"cert": pki.cert, "key": pki.key, "client_ca": pki.client_ca if client_ca else None}
    http = cfg.http.model_dump() | {"tls": tls, "token": token}
    return cfg.model_copy(update={"http": type(cfg.http).model_validate(http)})


@pytest.fixture
def clients(pki: Pki) -> Iterator[Any]:
    """HTTPS sessions trusting the server's CA, optionally with a client certificate. Closed
    before the daemon stops (request this fixture after start_daemon): an idle TLS keep-alive
    connection would hold the server's graceful shutdown for its whole bound."""
    made: list[requests.Session] = []

    def make(cert: Path | None = None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # else $REQUESTS_CA_BUNDLE would replace the CA given here
        s.verify = str(pki.server_ca)
        if cert is not None:
            s.cert = str(cert)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


REFUSED = (requests.exceptions.SSLError, requests.exceptions.ConnectionError)


def refused(attempt: Any, errors: Any = REFUSED) -> bool:
    """Whether the call fails with one of `errors`. The exception (and through its traceback
    the refused connection) is dropped here, so no half-open socket outlives the check."""
    try:
        attempt()
    except errors:
        failed = True
    else:
        failed = False
    gc.collect()
    return failed


def test_https_serves_the_api_health_and_metrics(cfg, sim, start_daemon, pki, clients):
    server = start_daemon(https_cfg(cfg, pki)).daemon.http_server
    assert server.url.startswith("https://")
    base = f"https://127.0.0.1:{server.port}"
    s = clients()
    resp = call(base, BARE, {"tag": "weekly"}, session=s)
    assert resp.status_code == 200 and resp.json()["totalTasksStarted"] == 1, resp.text
    resp = call(base, "/v4/reloadtask/-/start", [{"type": "starttaskid", "payload": {"taskId": T1}}], method="PUT", session=s)
    assert resp.json()["tasksId"]["started"] == [{"taskId": T1, "taskName": "Finance daily"}]
    assert s.get(base + "/healthz", timeout=10).json()["status"] == "ok"
    assert "butler_mqtt_mqtt_connected 1.0" in s.get(base + "/metrics", timeout=10).text
    # The server certificate is checked by the client: another CA's trust store refuses it.
    assert refused(lambda: requests.get(base + "/healthz", verify=str(pki.client_ca), timeout=10),
                   requests.exceptions.SSLError)
    # Plain HTTP on the TLS port gets no API answer.
    assert refused(lambda: requests.post(f"http://127.0.0.1:{server.port}{BARE}", json={"tag": "daily-refresh"},
                                         timeout=10), requests.exceptions.ConnectionError)
    assert started(sim) == [T1, T4]


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(cfg, sim, start_daemon, pki, clients):
    server = start_daemon(https_cfg(cfg, pki, client_ca=True)).daemon.http_server
    base = f"https://127.0.0.1:{server.port}"
    for who in (clients(), clients(pki.stranger)):  # no certificate; one from another CA
        assert refused(lambda: call(base, BARE, {"tag": "weekly"}, session=who))  # noqa: B023
        assert refused(lambda: who.get(base + "/healthz", timeout=10))  # noqa: B023
    assert sim.starts == []
    # A certificate of client_ca is enough: no token configured, none needed.
    good = clients(pki.client)
    resp = call(base, BARE, {"tag": "weekly"}, session=good)
    assert resp.status_code == 200 and resp.json()["totalTasksStarted"] == 1, resp.text
    assert good.get(base + "/healthz", timeout=10).status_code == 200
    assert started(sim) == [T4]


def test_mutual_tls_beside_a_token_needs_both(cfg, sim, start_daemon, pki, clients):
    server = start_daemon(https_cfg(cfg, pki, client_ca=True, token="tok-16")).daemon.http_server
    base = f"https://127.0.0.1:{server.port}"
    good = clients(pki.client)
    resp = call(base, BARE, {"tag": "weekly"}, session=good)
    assert resp.status_code == 401 and resp.json()["error"] == "Unauthorized"
    assert refused(lambda: call(base, BARE, {"tag": "weekly"}, headers={"Authorization": "Bearer tok-16"}, session=clients()))
    assert sim.starts == []
    resp = call(base, BARE, {"tag": "weekly"}, headers={"Authorization": "Bearer tok-16"}, session=good)
    assert resp.status_code == 200 and started(sim) == [T4]


def test_bad_tls_files_stop_the_daemon_naming_the_key(cfg, pki, tmp_path):
    from butler_mqtt.daemon import Daemon
    from butler_mqtt.errors import ConfigError

    cases = [
        ({"cert": tmp_path / "nope.pem", "key": pki.key}, "http.tls.cert", "file not found"),
        ({"cert": pki.cert, "key": pki.other_key}, "http.tls.key", "is not the private key of"),
        ({"cert": pki.key, "key": pki.key}, "http.tls.cert", "cannot load"),
        ({"cert": pki.cert, "key": pki.key, "client_ca": pki.key}, "http.tls.client_ca", "no PEM CA certificate"),
        ({"cert": pki.cert, "key": pki.key, "client_ca": tmp_path / "gone.pem"}, "http.tls.client_ca", "file not found"),
    ]
    for tls, key, reason in cases:
        bad = cfg.model_copy(update={"http": cfg.http.model_copy(update={"tls": type(cfg.http.tls).model_validate(tls)})})
        with pytest.raises(ConfigError) as err:
            Daemon(bad).startup()  # fails before the journal, the broker or the port are touched
        assert err.value.key == key and reason in err.value.reason, (tls, err.value)


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUTLER_MQTT__", "CREDENTIALS_DIRECTORY"))}
    return subprocess.run([sys.executable, "-m", "butler_mqtt", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**env, "PYTHONPATH": str(REPO)})


REPO = Path(__file__).resolve().parents[2]


def write_config(cfg: Any, path: Path, **http: Any) -> Path:
    data = cfg.model_dump(mode="json")
    data["http"].update(http)
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_reports_days_left_for_the_https_certificates(cfg, sim, pki, tmp_path):
    conf = write_config(cfg, tmp_path / "butler.yaml", host="127.0.0.1",
                        tls={"cert": str(pki.cert), "key": str(pki.key), "client_ca": str(pki.client_ca)})
    out = cli("check", "--config", str(conf), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for key, path in (("http.tls.cert", pki.cert), ("http.tls.client_ca", pki.client_ca)):
        assert any(ln.startswith(f"[ok  ] {key}: {path} valid, ") and ln.endswith(" days left") for ln in lines), lines
    assert f"[ok  ] http.tls.key: {pki.key} readable" in lines
    assert any(ln.startswith("[ok  ] http: https://127.0.0.1:") and "client certificates" in ln for ln in lines), lines


def test_check_and_run_name_a_wrong_tls_key(cfg, sim, pki, tmp_path):
    conf = write_config(cfg, tmp_path / "butler.yaml", tls={"cert": str(pki.cert), "key": str(pki.other_key)})
    out = cli("check", "--config", str(conf), cwd=tmp_path)
    assert out.returncode == 2  # a configuration error, as `run` says (issue 20, item 9)
    assert f"[FAIL] http.tls.key: {pki.other_key} is not the private key of {pki.cert}" in out.stdout.splitlines()
    out = cli("run", "--config", str(conf), cwd=tmp_path)
    assert out.returncode == 2
    assert "configuration error: http.tls.key:" in out.stderr and "is not the private key" in out.stderr


def test_check_warns_about_a_token_in_clear_beyond_loopback(cfg, sim, tmp_path):
    conf = write_config(cfg, tmp_path / "butler.yaml", host="0.0.0.0", token="t0k")  # only checked, never bound
    out = cli("check", "--config", str(conf), cwd=tmp_path)
    assert out.returncode == 0, out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("[warn] http: "))
    assert "http://0.0.0.0:0, bearer token" in line and "unencrypted" in line and "http.tls.cert" in line


def test_metrics_only_listener_is_https_too(qrs_certs, sim, broker, tmp_path, start_daemon, pki, clients):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", metrics={"port": 0},
                      http={"tls": {"cert": str(pki.cert), "key": str(pki.key), "client_ca": str(pki.client_ca)}})
    assert not cfg.http.enabled
    server = start_daemon(cfg).daemon.http_server
    base = f"https://127.0.0.1:{server.port}"
    assert server.url == base
    assert refused(lambda: clients().get(base + "/metrics", timeout=10))
    assert "butler_mqtt_mqtt_connected 1.0" in clients(pki.client).get(base + "/metrics", timeout=10).text
