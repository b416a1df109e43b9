"""A daemon with `backend: cloud` (contract section 9) through the real broker and the Qlik Cloud
simulator over HTTPS: the same requests as on client-managed Qlik Sense, apps instead of tasks.

Every JSON answer the simulator gives is validated against Qlik's schemas (support/cloud.py),
every reply the tests receive against the AsyncAPI document (conftest).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.config import Config, deep_merge
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.mosquitto import Mosquitto
from butler_mqtt.sim.cloud import CloudSimulator, World, demo_world
from butler_mqtt.sim.cloud.world import SimApp, SimSpace, SimTag
from tests.support.cloud import cloud_certs, running  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

NASTY = ["Fin & Ops #1 100% \"q\" 'x'", "sales+eu", "Sаles"]  # the last one: a Cyrillic "а"


def cloud_config(sim: CloudSimulator, broker: Mosquitto, state: Path, **sections: Any) -> Config:
    base: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": f"cloud-{uuid.uuid4().hex[:10]}"},
        "backend": "cloud",
        "cloud": {"tenant": sim.base_url, "client_id": sim.client_id, "client_secret": sim.client_secret,
                  "ca": str(sim.certs.root), "timeout": 10, "reloads_per_minute": 6000},
        "logging": {"level": "info", "format": "console"},
        "state_dir": str(state),
        "tracking": {"poll_interval": 0.2, "first_poll": 0.1},
    }
    return Config.model_validate(deep_merge(base, sections))


def nasty_world() -> World:
    world = demo_world()
    odd = SimSpace("a" * 24, NASTY[0])
    world.spaces[odd.id] = odd
    for i, name in enumerate(NASTY):
        tag = SimTag(f"{i:024x}", name)
        world.tags[tag.id] = tag
        app = SimApp(f"{i:08x}-0000-4000-8000-00000000000{i}", f"Odd {i}", odd.id, [tag.id], run_seconds=0.1)
        world.apps[app.id] = app
    return world


@pytest.fixture
def tenant(cloud_certs: Path) -> Iterator[CloudSimulator]:  # noqa: F811 - the fixture above
    with running(nasty_world(), cloud_certs) as sim:
        yield sim


@pytest.fixture
def cloud_daemon(tenant: CloudSimulator, broker: Mosquitto, tmp_path: Path, start_daemon: Callable[..., Any]):
    def start(**sections: Any) -> Any:
        cfg = cloud_config(tenant, broker, tmp_path / f"state-{uuid.uuid4().hex[:6]}", **sections)
        return start_daemon(cfg)

    return start


def ask(broker: Mosquitto, request: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
    cfg = Config.model_validate({"mqtt": {"host": "127.0.0.1", "port": broker.port}})
    with Requester(cfg.mqtt) as r:
        return [dict(e) for e in r.request(request, timeout=timeout)]


def by_app(tenant: CloudSimulator, name: str) -> list[str]:
    return sorted(a.id for a in tenant.world.apps.values() if a.name == name)


def summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in events if e["event"] == "summary")


def tasks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "task"]


def test_apps_by_tag_and_space_with_nasty_names_and_small_pages(tenant, cloud_daemon, broker):
    tenant.max_page_size = 1  # every listing is paged one item at a time
    cloud_daemon()
    events = ask(broker, {"requestId": "n1", "tag": NASTY, "space": [NASTY[0], "Nope"], "dryRun": True})
    found = {e["appId"]: e for e in tasks(events)}
    odd = {a.id: a for a in tenant.world.apps.values() if a.name.startswith("Odd ")}
    assert set(found) == set(odd)
    for i, name in enumerate(NASTY):
        app = next(a for a in odd.values() if a.name == f"Odd {i}")
        assert found[app.id]["matchedBy"] == [f"tag:{name}", f"space:{NASTY[0]}"]
        assert found[app.id]["appName"] == app.name and "taskId" not in found[app.id]
    assert summary(events)["tasksNotFound"] == [{"space": "Nope"}]
    assert not tenant.world.starts  # dryRun started nothing


def test_same_name_apps_in_two_spaces_are_told_apart_and_a_start_is_followed_to_the_end(tenant, cloud_daemon, broker):
    cloud_daemon()
    events = ask(broker, {"requestId": "w1", "space": "Sales", "tag": "nightly", "wait": True})
    revenue_sales = next(a.id for a in tenant.world.apps.values() if a.name == "Revenue" and tenant.world.spaces[a.space_id].name == "Sales")
    started = {e["appId"]: e for e in tasks(events)}
    assert started[revenue_sales]["matchedBy"] == ["tag:nightly", "space:Sales"]
    assert set(started) == set(by_app(tenant, "Revenue")) | set(by_app(tenant, "Pipeline"))
    finished = [e for e in events if e["event"] == "taskFinished"]
    assert {e["appId"] for e in finished} == set(started)
    assert all(e["status"] == "FinishedSuccess" and e["cloudStatus"] == "SUCCEEDED" for e in finished)
    assert {r.reload_id for r in tenant.world.starts} == {e["executionId"] for e in finished}
    assert events[-1]["event"] == "requestFinished" and events[-1]["finished"] == {"FinishedSuccess": 3}


def test_app_ids_all_must_exist_and_a_failed_reload_carries_its_failure(tenant, cloud_daemon, broker):
    cloud_daemon()
    broken = by_app(tenant, "Broken")[0]
    missing = "99999999-9999-4999-8999-999999999999"
    events = ask(broker, {"requestId": "a1", "appId": [broken, missing], "allTaskIdsMustExist": True})
    assert tasks(events)[0]["status"] == "denied" and summary(events)["tasksNotFound"] == [{"appId": missing}]
    assert not tenant.world.starts
    events = ask(broker, {"requestId": "a2", "appId": broken.upper(), "wait": True,
                          "partial": True, "variables": {"region": "EMEA"}})
    fin = next(e for e in events if e["event"] == "taskFinished")
    assert (fin["status"], fin["cloudStatus"]) == ("FinishedFail", "FAILED")
    reload = tenant.world.reloads[fin["executionId"]]
    assert reload.partial is True and reload.variables == {"region": "EMEA"}


def test_selectors_of_the_other_backend_are_refused_naming_what_to_use(tenant, cloud_daemon, broker):
    cloud_daemon()
    for req, word in (({"taskId": "a8b4c123-def4-5678-9abc-def012345678"}, "appId"),
                      ({"customProperty": [{"name": "a", "value": "b"}]}, "tag"),
                      ({"tag": "nightly", "then": {"taskId": "a8b4c123-def4-5678-9abc-def012345678"}}, "appId")):
        events = ask(broker, {"requestId": f"x{uuid.uuid4().hex[:6]}", **req})
        assert [e["event"] for e in events] == ["error"] and word in events[0]["details"], events
    assert not tenant.world.starts


def test_exceeded_limit_is_error_and_queued_reloads_wait_under_the_tenant_limit(tenant, cloud_daemon, broker):
    tenant.world.max_concurrent = 1
    pipeline = tenant.world.apps[by_app(tenant, "Pipeline")[0]]
    pipeline.outcome, pipeline.run_seconds = "EXCEEDED_LIMIT", 0.5
    cloud_daemon()
    events = ask(broker, {"requestId": "q1", "tag": "hourly", "wait": True}, timeout=60)
    fin = {e["appId"]: e for e in events if e["event"] == "taskFinished"}
    assert fin[pipeline.id]["status"] == "Error" and fin[pipeline.id]["cloudStatus"] == "EXCEEDED_LIMIT"
    assert len(fin) == 2 and events[-1]["event"] == "requestFinished"
    # One at a time: the second reload was QUEUED until the first ended.
    ends = sorted((r.started or 0, r.ended or 0) for r in tenant.world.reloads.values())
    assert ends[1][0] >= ends[0][1]


def test_run_policies_against_a_reload_started_elsewhere(tenant, cloud_daemon, broker):
    pipeline = tenant.world.apps[by_app(tenant, "Pipeline")[0]]
    pipeline.run_seconds = 3.0
    cloud_daemon()
    elsewhere = tenant.world.start_elsewhere(pipeline.id)
    events = ask(broker, {"requestId": "p1", "appId": pipeline.id, "ifRunning": "skip"})
    assert tasks(events)[0]["status"] == "skipped" and elsewhere.id in tasks(events)[0]["reason"]
    events = ask(broker, {"requestId": "p2", "appId": pipeline.id, "ifRunning": "attach", "wait": True}, timeout=60)
    assert tasks(events)[0]["status"] == "alreadyRunning" and tasks(events)[0]["executionId"] == elsewhere.id
    fin = next(e for e in events if e["event"] == "taskFinished")
    assert fin["executionId"] == elsewhere.id and fin["cloudStatus"] == "SUCCEEDED"
    assert not tenant.world.starts  # nothing was started by the daemon


def test_token_expiry_and_a_429_burst_lose_nothing_and_start_nothing_twice(tenant, cloud_daemon, broker):
    tenant.token_lifetime = 1.0
    tenant.world.max_concurrent = 0
    apps = sorted(tenant.world.apps)
    cloud_daemon()
    tenant.storm_429, tenant.storm_retry_after = 5, 1
    results: dict[str, list[dict[str, Any]]] = {}

    def one(i: int, app_id: str) -> None:
        results[app_id + str(i)] = ask(broker, {"requestId": f"b{i}", "appId": app_id}, timeout=60)

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(apps)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # tokens expire between the requests
    for t in threads:
        t.join(90)
    started = [e for evs in results.values() for e in tasks(evs)]
    assert len(started) == len(apps) and all(e["status"] == "started" for e in started), started
    assert sorted(r.app_id for r in tenant.world.starts) == apps  # each once
    assert sum(1 for x in tenant.request_log if x.path == "/oauth/token") >= 2  # fetched again


def test_the_secret_is_never_in_a_log_line(tenant, cloud_daemon, broker, _log_stream):
    import io

    lines = io.StringIO()
    _log_stream.current = lines  # this test's log lines (conftest's stream)
    tenant.client_secret = "s3cr3t-" + uuid.uuid4().hex
    d = cloud_daemon(cloud={"client_secret": tenant.client_secret})
    ask(broker, {"requestId": tenant.client_secret, "tag": "nightly"})  # a secret sent as a requestId
    tenant.token_fault = "refuse"  # the error path too
    tenant.revoke_tokens()
    events = ask(broker, {"requestId": "s2", "tag": "nightly"})
    assert events[-1]["event"] == "error" and "cloud.client_id" in events[-1]["details"]
    assert events[-1]["error"] == "Qlik Cloud refused the request"
    d.stop()
    out = lines.getvalue()
    assert "requestId" in out and "qrs_refused" in out and "**********" in out and tenant.client_secret not in out


def test_the_backend_stops_by_cancelling_and_reads_why_a_reload_failed(tenant, broker, tmp_path):
    """The stop use case is not in this base yet (issue 22): the backend's stop and failure directly."""
    from butler_mqtt.runtime import backend

    qlik = backend(cloud_config(tenant, broker, tmp_path))
    try:
        pipeline = by_app(tenant, "Pipeline")[0]
        tenant.world.apps[pipeline].run_seconds = 30
        eid = qlik.start(pipeline)
        assert qlik.stop(pipeline, eid) == "stopping"
        deadline = time.monotonic() + 10
        while (state := qlik.executions([eid]).get(eid)) is None or state.final is None:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert (state.final, state.native_status) == ("Aborted", "CANCELED")
        assert qlik.stop(pipeline, eid) == "notRunning"
        broken = by_app(tenant, "Broken")[0]
        eid = qlik.start(broken)
        while (state := qlik.executions([eid])[eid]).final is None:
            time.sleep(0.1)
        failure = qlik.failure(broken, eid, 5)
        assert failure is not None and "Amount" in failure["message"]
        assert failure["scriptLogTail"] and len(failure["scriptLogTail"]) <= 5
        assert qlik.execution_exists(eid) and not qlik.execution_exists("0" * 24)
    finally:
        qlik.close()


def test_rest_answers_name_apps_and_refuse_task_ids(tenant, cloud_daemon):
    import requests

    d = cloud_daemon(http={"enabled": True, "port": 0})
    base = f"http://127.0.0.1:{d.daemon.http_server.port}/v4/reloadtask"
    answer = requests.post(f"{base}/-/start", json={"tag": "nightly", "dryRun": True}, timeout=30)
    assert answer.status_code == 200, answer.text
    listed = answer.json()["tasksStarted"]
    assert {t["appId"] for t in listed} == set(by_app(tenant, "Revenue")) and all("taskId" not in t for t in listed)
    answer = requests.post(f"{base}/{by_app(tenant, 'Revenue')[0]}/start", json={}, timeout=30)
    assert answer.status_code == 400 and "appId" in answer.json()["details"]
    assert not tenant.world.starts


def test_metrics_and_alerts_in_cloud_mode(tenant, cloud_daemon, broker, listen):
    import requests

    topic = f"alerts/{uuid.uuid4().hex[:8]}"
    alerts = listen(topic)
    d = cloud_daemon(http={"enabled": True, "port": 0}, alerts={"topic": topic})
    broken = by_app(tenant, "Broken")[0]
    events = ask(broker, {"requestId": "m1", "appId": broken, "wait": True})
    assert next(e for e in events if e["event"] == "taskFinished")["cloudStatus"] == "FAILED"
    failed = alerts.wait_for(lambda m: m.get("alert") == "reloadFailed")
    assert failed["taskId"] == broken and failed["requestId"] == "m1"
    text = requests.get(f"http://127.0.0.1:{d.daemon.http_server.port}/metrics", timeout=30).text
    calls = [line for line in text.splitlines() if "/api/v1/reloads" in line and line.startswith("butler_mqtt_qrs")]
    assert any('method="POST",route="/api/v1/reloads"' in line for line in calls), calls[:5]
    assert broken not in text  # ids never become label values


def test_a_failed_reload_is_retried_on_the_app(tenant, cloud_daemon, broker):
    cloud_daemon()
    broken = by_app(tenant, "Broken")[0]
    events = ask(broker, {"requestId": "r1", "appId": broken, "wait": True, "retry": {"attempts": 1, "delay": 0},
                          "partial": True, "variables": {"v": "1"}}, timeout=60)
    finished = [e for e in events if e["event"] == "taskFinished"]
    assert [(e["attempt"], e["cloudStatus"]) for e in finished] == [(1, "FAILED"), (2, "FAILED")], events
    assert [r.app_id for r in tenant.world.starts] == [broken, broken]
    assert all(r.partial and r.variables == {"v": "1"} for r in tenant.world.reloads.values())  # the retry's too


def test_max_running_queues_apps_in_butler_mqtts_queue(tenant, cloud_daemon, broker):
    for app_id in by_app(tenant, "Revenue"):
        tenant.world.apps[app_id].run_seconds = 0.5
    cloud_daemon(policies={"max_running": 1})
    events = ask(broker, {"requestId": "mr1", "tag": "nightly", "wait": True, "variables": {"q": "1"}}, timeout=60)
    statuses = [e["status"] for e in tasks(events)]
    assert sorted(statuses) == ["queued", "started", "started"], statuses
    reloads = sorted(tenant.world.reloads.values(), key=lambda r: r.created)
    assert len(reloads) == 2 and (reloads[1].created >= (reloads[0].ended or 0))  # one at a time
    assert events[-1]["event"] == "requestFinished" and events[-1]["finished"] == {"FinishedSuccess": 2}
    assert all(r.variables == {"q": "1"} for r in reloads)  # the queued one's too


def test_a_start_that_reached_the_tenant_is_not_sent_again_after_a_crash(tenant, broker, tmp_path):
    """SIGKILL between POST /api/v1/reloads being acted on and its answer: the next run finds the
    reload (started_since) and follows it; the app is reloaded once."""
    import signal

    from tests.support.ops import DaemonProcess

    env = {"BUTLER_MQTT__MQTT__HOST": "127.0.0.1", "BUTLER_MQTT__MQTT__PORT": str(broker.port),
           "BUTLER_MQTT__MQTT__CLIENT_ID": f"crash-{uuid.uuid4().hex[:8]}", "BUTLER_MQTT__BACKEND": "cloud",
           "BUTLER_MQTT__CLOUD__TENANT": tenant.base_url, "BUTLER_MQTT__CLOUD__CLIENT_ID": tenant.client_id,
           "BUTLER_MQTT__CLOUD__CLIENT_SECRET": tenant.client_secret, "BUTLER_MQTT__CLOUD__CA": str(tenant.certs.root),
           "BUTLER_MQTT__STATE_DIR": str(tmp_path / "state"), "BUTLER_MQTT__LOGGING__FORMAT": "json",
           "BUTLER_MQTT__TRACKING__POLL_INTERVAL": "0.3", "BUTLER_MQTT__TRACKING__FIRST_POLL": "0.2"}
    pipeline = by_app(tenant, "Pipeline")[0]
    first = DaemonProcess(env)
    second = None
    cfg = Config.model_validate({"mqtt": {"host": "127.0.0.1", "port": broker.port}})
    try:
        first.wait_log("mqtt_subscribed")
        tenant.answer_delay_paths, tenant.answer_delay_s = r"^POST /api/v1/reloads$", 60.0
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "crash-1", "appId": pipeline, "wait": True})
            deadline = time.monotonic() + 30
            while not tenant.world.starts:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            first.signal(signal.SIGKILL)
            first.wait(10)
            tenant.answer_delay_s = 0.0
            second = DaemonProcess(env)
            seen: list[dict[str, Any]] = []
            while not any(e.get("event") == "requestFinished" for e in seen):
                seen.append(box.get(timeout=60))
        assert [e["finished"] for e in seen if e["event"] == "requestFinished"] == [{"FinishedSuccess": 1}]
        assert [s.app_id for s in tenant.world.starts] == [pipeline]  # reloaded once
    finally:
        tenant.answer_delay_s = 0.0
        if second is not None:
            second.stop()
        first.stop()


def test_a_selection_past_cloud_max_pages_is_refused_naming_it(tenant, cloud_daemon, broker):
    tenant.world.generated_apps, tenant.max_page_size = 20, 2  # 10 pages of apps
    cloud_daemon(cloud={"max_pages": 5})
    events = ask(broker, {"requestId": "big1", "tag": "generated"})
    assert [e["event"] for e in events] == ["error"] and "cloud.max_pages" in events[0]["details"], events
    assert not tenant.world.starts
