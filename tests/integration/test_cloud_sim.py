# ruff: noqa: F811  (pytest fixtures imported from tests/support/cloud.py are parameters here)
"""The Qlik Cloud simulator over real HTTPS: its answers validate against the JSON Schemas of
Qlik's published OpenAPI documents (tests/data/cloud-schemas), and its behaviours and knobs."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3

from butler_mqtt.sim.cloud import CloudSimulator, SimApp, SimSpace, SimTag, World, demo_world
from butler_mqtt.sim.cloud.app import banner
from tests.support.cloud import assert_valid, cloud_certs, cloud_sim, running  # noqa: F401 (fixtures, used by name)

pytestmark = pytest.mark.integration


class Raw:
    """Plain HTTPS calls to the simulator (no product code)."""

    def __init__(self, sim: CloudSimulator) -> None:
        self.sim = sim
        ctx = ssl.create_default_context(cafile=str(sim.certs.root))
        self.http = urllib3.PoolManager(ssl_context=ctx, retries=False, timeout=10)
        self.token = self.fetch_token()

    def fetch_token(self) -> str:
        r = self.http.request(
            "POST", self.sim.base_url + "/oauth/token",
            body=json.dumps({"grant_type": "client_credentials", "client_id": self.sim.client_id,
                             "client_secret": self.sim.client_secret}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 200, r.data
        body = json.loads(r.data)
        assert_valid("oauth.oauth-token-response", body)
        return str(body["access_token"])

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> urllib3.BaseHTTPResponse:
        url = path if path.startswith("https://") else self.sim.base_url + path
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = json.dumps(body) if body is not None else None
        if data:
            headers["Content-Type"] = "application/json"
        return self.http.request(method, url, body=data, headers=headers)

    def json(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        r = self.call(method, path, body)
        assert r.status == status, (r.status, r.data[:500])
        return json.loads(r.data) if r.data else None

    def wait(self, reload_id: str, statuses: tuple[str, ...], timeout: float = 10) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            reload = self.json("GET", f"/api/v1/reloads/{reload_id}")
            if reload["status"] in statuses or time.monotonic() > end:
                return dict(reload)
            time.sleep(0.02)


@pytest.fixture
def raw(cloud_sim: CloudSimulator) -> Raw:
    return Raw(cloud_sim)


def _app_id(sim: CloudSimulator, name: str, space: str | None = None) -> str:
    for app in sim.world.apps.values():
        if app.name == name and (space is None or sim.world.spaces[app.space_id or ""].name == space):
            return app.id
    raise KeyError(name)


# --- shapes -----------------------------------------------------------------------------------


def test_every_answer_validates_against_qliks_schemas(raw: Raw, cloud_sim: CloudSimulator) -> None:
    items = raw.json("GET", "/api/v1/items?resourceType=app&limit=2")
    assert_valid("items.ItemsListItemsResponseBody", items)
    assert "next" in items["links"]
    assert_valid("items.itemResultResponseBody", items["data"][0])
    assert_valid("collections.CollectionsListCollectionsResponseBody", raw.json("GET", "/api/v1/collections?type=public"))
    spaces = raw.json("GET", "/api/v1/spaces?limit=1")
    assert_valid("spaces.Spaces", spaces)
    assert_valid("spaces.Space", raw.json("GET", f"/api/v1/spaces/{spaces['data'][0]['id']}"))
    broken = _app_id(cloud_sim, "Broken")
    assert_valid("apps.NxApp", raw.json("GET", f"/api/v1/apps/{broken}"))
    request = {"appId": broken, "partial": True, "variables": {"region": "EMEA"}}
    assert_valid("reloads.ReloadRequest", request)
    created = raw.json("POST", "/api/v1/reloads", request, status=201)
    assert_valid("reloads.Reload", created)
    done = raw.wait(created["id"], ("FAILED",))
    assert_valid("reloads.Reload", done)
    assert done["errorMessage"] and done["log"]
    assert_valid("reloads.Reloads", raw.json("GET", f"/api/v1/reloads?appId={broken}&log=true"))
    assert_valid("apps.NxApp", raw.json("GET", f"/api/v1/apps/{broken}"))  # now with lastReloadTime
    errors = {
        "reloads.Errors": raw.call("GET", "/api/v1/reloads/doesnotexist"),
        "spaces.Errors": raw.call("GET", "/api/v1/spaces/doesnotexist"),
        "items.ErrorResponseBody": raw.call("GET", "/api/v1/items?limit=1000"),
    }
    for schema, answer in errors.items():
        assert answer.status in (400, 404)
        assert_valid(schema, json.loads(answer.data))


def test_the_schemas_catch_a_drift() -> None:
    """A field Qlik does not name, or a wrong enum, fails: the check can fail."""
    with pytest.raises(AssertionError, match="unevaluated|Unevaluated"):
        assert_valid("reloads.Reload", {"id": "x", "appId": "a", "tenantId": "t", "userId": "u", "type": "external",
                                         "status": "QUEUED", "creationTime": "2026-01-01T00:00:00Z", "duration": 5})
    with pytest.raises(AssertionError, match="status"):
        assert_valid("reloads.Reload", {"id": "x", "appId": "a", "tenantId": "t", "userId": "u", "type": "external",
                                         "status": "DONE", "creationTime": "2026-01-01T00:00:00Z"})


def test_item_id_is_not_the_app_id(raw: Raw, cloud_sim: CloudSimulator) -> None:
    items = raw.json("GET", "/api/v1/items?resourceType=app&limit=100")["data"]
    for item in items:
        assert item["id"] != item["resourceId"]
        assert item["resourceAttributes"]["id"] == item["resourceId"]
        assert raw.call("POST", "/api/v1/reloads", {"appId": item["id"]}).status == 404
    assert not cloud_sim.starts


# --- auth -------------------------------------------------------------------------------------


def test_api_calls_need_a_valid_bearer(raw: Raw, cloud_sim: CloudSimulator) -> None:
    assert raw.call("GET", "/api/v1/spaces", token="nope").status == 401
    assert raw.call("GET", "/api/v1/spaces", token=cloud_sim.api_key).status == 200
    cloud_sim.api_key_revoked = True
    assert raw.call("GET", "/api/v1/spaces", token=cloud_sim.api_key).status == 401
    cloud_sim.revoke_tokens()
    assert raw.call("GET", "/api/v1/spaces").status == 401
    assert raw.call("GET", "/api/v1/spaces", token=raw.fetch_token()).status == 200


def test_tokens_expire(raw: Raw, cloud_sim: CloudSimulator) -> None:
    cloud_sim.token_lifetime = 0.3
    token = raw.fetch_token()
    assert raw.call("GET", "/api/v1/spaces", token=token).status == 200
    time.sleep(0.4)
    assert raw.call("GET", "/api/v1/spaces", token=token).status == 401


def test_token_endpoint_takes_form_bodies_and_refuses_wrong_secrets(raw: Raw, cloud_sim: CloudSimulator) -> None:
    form = f"grant_type=client_credentials&client_id={cloud_sim.client_id}&client_secret={cloud_sim.client_secret}"
    r = raw.http.request("POST", cloud_sim.base_url + "/oauth/token", body=form,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200
    r = raw.http.request("POST", cloud_sim.base_url + "/oauth/token", body=form + "x",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 401
    assert_valid("oauth.Errors", json.loads(r.data))


# --- reloads ----------------------------------------------------------------------------------


def test_concurrency_limit_queues_and_cancel(cloud_certs: Path) -> None:
    apps = [SimApp(f"00000000-0000-4000-a000-00000000000{i}", f"A{i}", run_seconds=30) for i in range(3)]
    world = World([], [], apps, max_concurrent=1)
    with running(world, cloud_certs) as sim:
        raw = Raw(sim)
        first = raw.json("POST", "/api/v1/reloads", {"appId": apps[0].id}, status=201)
        second = raw.json("POST", "/api/v1/reloads", {"appId": apps[1].id}, status=201)
        assert first["status"] == "RELOADING" and second["status"] == "QUEUED"
        # A second request for an app with a QUEUED reload: 429 without Retry-After.
        pending = raw.call("POST", "/api/v1/reloads", {"appId": apps[1].id})
        assert pending.status == 429 and "Retry-After" not in pending.headers
        # Cancel: a QUEUED reload is CANCELED at once (204), a RELOADING one goes through CANCELING.
        assert raw.call("POST", f"/api/v1/reloads/{second['id']}/actions/cancel").status == 204
        canceling = raw.json("POST", f"/api/v1/reloads/{first['id']}/actions/cancel", status=202)
        assert_valid("reloads.ReloadStatus", canceling)
        assert raw.wait(first["id"], ("CANCELED",))["status"] == "CANCELED"
        assert raw.call("POST", f"/api/v1/reloads/{first['id']}/actions/cancel").status == 409
        assert raw.call("POST", "/api/v1/reloads/unknown/actions/cancel").status == 404
        active = raw.json("GET", f'/api/v1/reloads?appId={apps[1].id}&filter=(status eq "QUEUED" or status eq "RELOADING")')
        assert active["data"] == []


def test_exceeded_limit_and_started_elsewhere(cloud_certs: Path) -> None:
    app = SimApp("00000000-0000-4000-a000-0000000000aa", "Big", outcome="EXCEEDED_LIMIT", run_seconds=0.05)
    with running(World([], [], [app]), cloud_certs) as sim:
        raw = Raw(sim)
        hub = sim.world.start_elsewhere(app.id)
        listed = raw.json("GET", f"/api/v1/reloads?appId={app.id}")["data"]
        assert [r["id"] for r in listed] == [hub.id] and listed[0]["type"] == "hub"
        done = raw.wait(hub.id, ("EXCEEDED_LIMIT",))
        assert done["status"] == "EXCEEDED_LIMIT" and done["errorMessage"]
        assert sim.starts == []  # started elsewhere: not a POST /api/v1/reloads


def test_start_rate_limit_answers_429_with_retry_after(cloud_sim: CloudSimulator, raw: Raw) -> None:
    cloud_sim.start_limit_per_minute, cloud_sim.rate_window = 2, 60
    apps = list(cloud_sim.world.apps)
    assert raw.call("POST", "/api/v1/reloads", {"appId": apps[0]}).status == 201
    assert raw.call("POST", "/api/v1/reloads", {"appId": apps[1]}).status == 201
    limited = raw.call("POST", "/api/v1/reloads", {"appId": apps[2]})
    assert limited.status == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert json.loads(limited.data)["errors"][0]["code"] == "HTTP-429"
    cloud_sim.retry_after = False
    assert "Retry-After" not in raw.call("POST", "/api/v1/reloads", {"appId": apps[2]}).headers
    assert len(cloud_sim.starts) == 2


def test_reload_request_limits(raw: Raw, cloud_sim: CloudSimulator) -> None:
    app = next(iter(cloud_sim.world.apps))
    too_many = {f"v{i}": "x" for i in range(21)}
    assert raw.call("POST", "/api/v1/reloads", {"appId": app, "variables": too_many}).status == 400
    assert raw.call("POST", "/api/v1/reloads", {"appId": app, "variables": {"v": "x" * 257}}).status == 400
    assert raw.call("POST", "/api/v1/reloads", {"appId": app, "partial": "yes"}).status == 400
    assert not cloud_sim.starts


# --- paging and hostile knobs -----------------------------------------------------------------


def test_small_pages_and_a_paging_loop(raw: Raw, cloud_sim: CloudSimulator) -> None:
    cloud_sim.max_page_size = 1
    seen, url = [], "/api/v1/items?resourceType=app&limit=100"
    while url:
        page = raw.json("GET", url)
        assert len(page["data"]) <= 1
        seen += [i["resourceId"] for i in page["data"]]
        url = page["links"].get("next", {}).get("href")
    assert sorted(seen) == sorted(cloud_sim.world.apps)
    cloud_sim.paging_loop = True
    first = raw.json("GET", "/api/v1/items?resourceType=app&limit=100")
    second = raw.json("GET", first["links"]["next"]["href"])
    assert raw.json("GET", second["links"]["next"]["href"])["data"] == first["data"]


def test_a_hundred_thousand_generated_apps(raw: Raw, cloud_sim: CloudSimulator) -> None:
    cloud_sim.world.generated_apps = 100_000
    tag = raw.json("GET", "/api/v1/collections?type=public&name=generated")["data"][0]
    assert tag["itemCount"] == 100_000
    page = raw.json("GET", f"/api/v1/items?collectionId={tag['id']}&resourceType=app&limit=100")
    assert len(page["data"]) == 100 and "next" in page["links"]
    last = cloud_sim.world.generated(99_999)
    assert raw.json("GET", f"/api/v1/apps/{last.id}")["attributes"]["name"] == "gen-app-99999"
    assert raw.call("GET", f"/api/v1/apps/{cloud_sim.world.generated(100_000).id}").status == 404


def test_names_with_hostile_characters(cloud_certs: Path) -> None:
    names = ['q"uote', "a&b=c", "x#y", "100%", "plus+sign", "Sаles"]  # the last has a Cyrillic а
    spaces = [SimSpace(f"s{i:023d}", n) for i, n in enumerate(names)]
    tags = [SimTag(f"t{i:023d}", n) for i, n in enumerate(names)]
    with running(World(spaces, tags, []), cloud_certs) as sim:
        raw = Raw(sim)
        from urllib.parse import quote

        for name in names:
            found = raw.json("GET", f"/api/v1/collections?type=public&name={quote(name, safe='')}")["data"]
            assert [c["name"] for c in found] == [name]


def test_faults_and_request_log(raw: Raw, cloud_sim: CloudSimulator) -> None:
    cloud_sim.fault, cloud_sim.fault_paths = "error503", r"/spaces"
    assert raw.call("GET", "/api/v1/spaces").status == 503
    assert raw.call("GET", "/api/v1/items").status == 200
    cloud_sim.fault = "notjson"
    assert raw.call("GET", "/api/v1/spaces").headers["Content-Type"] == "text/html"
    cloud_sim.storm_429, cloud_sim.storm_retry_after = 2, None
    assert [raw.call("GET", "/api/v1/items").status for _ in range(3)] == [429, 429, 200]
    log = cloud_sim.request_log
    assert log[0].path == "/oauth/token" and log[0].auth is None
    assert [e.status for e in log[-3:]] == [429, 429, 200] and log[-1].auth == "token"
    assert all(cloud_sim.client_secret not in json.dumps(e.query) for e in log)


def test_banner_prints_the_credentials(cloud_sim: CloudSimulator, cloud_certs: Path) -> None:
    text = banner(cloud_sim, cloud_certs)
    for value in (cloud_sim.base_url, cloud_sim.client_id, cloud_sim.client_secret, cloud_sim.api_key, "root.pem"):
        assert value in text


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from butler_mqtt.sim.cloud.app import main; sys.exit(main(sys.argv[1:]))",
         "--port", "0", "--certs", str(tmp_path / "c"), "--client-secret", "s3cr3t-for-test"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Qlik Cloud simulator listening on https://127.0.0.1:")
        assert "s3cr3t-for-test" in "".join(proc.stdout.readline() for _ in range(4))
        assert (tmp_path / "c" / "root.pem").exists()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_every_answer_of_every_test_is_checked_and_a_drift_is_caught(
    cloud_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `running` simulators of these tests validate each JSON answer (ReplyChecker): a
    simulator answering a field Qlik's schema does not name is caught."""
    from butler_mqtt.sim.cloud import answers
    from tests.support.cloud import ReplyChecker, checked

    with checked(CloudSimulator(demo_world(), certs_dir=cloud_certs)) as sim:
        raw = Raw(sim)
        raw.json("GET", "/api/v1/spaces")
        original = answers.space
        monkeypatch.setattr(answers, "space", lambda base, s: {**original(base, s), "spaceId": s.id})
        raw.json("GET", "/api/v1/spaces")
        hook = sim.reply_hook
        assert isinstance(hook, ReplyChecker) and hook.checked == 3  # token, spaces, spaces
        assert hook.problems and all("'spaceId' was unexpected" in p for p in hook.problems)


def test_main_refuses_bad_options_and_a_partial_certificate_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from butler_mqtt.sim.cloud.app import main

    assert main(["--port", "not-a-port"]) == 2
    (tmp_path / "root.pem").write_text("only one of the five files")
    assert main(["--port", "0", "--certs", str(tmp_path)]) == 2
    assert "incomplete certificate set" in capsys.readouterr().err
