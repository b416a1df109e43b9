"""Stop (contract section 8, issue 22 item 2) through the real broker, the daemon and the
simulator over mTLS: MQTT `topics.stop`, REST `/v4/reloadtask/{id|-}/stop`; a running task is
stopped, an idle one is `notRunning`, a running task outside the selection is never touched, a
stop never starts anything, the same requestId is not acted on twice, a flood of stops for one
task sends one stop, a stop selecting many running tasks answers every one."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support import asyncapi_check
from tests.support.mqtt import wait_until

RUN_A = "5a0b0000-0000-4000-8000-000000000001"
RUN_B = "5a0b0000-0000-4000-8000-000000000002"
OUTSIDE = "5a0b0000-0000-4000-8000-000000000003"
IDLE = "5a0b0000-0000-4000-8000-000000000004"
DENIED = "5a0b0000-0000-4000-8000-000000000005"
MISSING = "5a0b0000-0000-4000-8000-0000000000ff"
BULK = [f"5a0bb000-0000-4000-8000-{i:012d}" for i in range(2000)]
TASKS = [
    SimTask(RUN_A, "Long A", tags=["long"], run_seconds=60),
    SimTask(RUN_B, "Long B", tags=["long"], run_seconds=60),
    SimTask(OUTSIDE, "Long outside", tags=["other"], run_seconds=60),
    SimTask(IDLE, "Idle", tags=["long"], run_seconds=0.1),
    SimTask(DENIED, "Not allowed", tags=["secret"], run_seconds=60),
] + [SimTask(t, f"Bulk {i}", tags=["bulk"], run_seconds=120) for i, t in enumerate(BULK)]

ALLOW = {"start_filter": {"enabled": True, "allow": {"tags": ["long", "other", "bulk"]}}}


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def start(requester: Any, *task_ids: str) -> dict[str, str]:
    events = requester.request({"taskId": list(task_ids)}, timeout=60)
    return {e["taskId"]: e["executionId"] for e in kinds(events, "task") if e["status"] == "started"}


def stop(requester: Any, cfg: Any, req: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    token, box = requester.send(req, topic=cfg.mqtt.topics.stop)
    events = [box.get(timeout=timeout)]
    end = "requestFinished" if req.get("wait") else "summary"
    while events[-1]["event"] not in (end, "error"):
        events.append(box.get(timeout=timeout))
    for ev in events:
        assert asyncapi_check.problem(ev) is None, ev
    return events


@pytest.fixture
def allow_cfg(qrs_certs, sim, broker, tmp_path):
    return make_config(qrs_certs, sim.port, broker, tmp_path / "state", **ALLOW)


def test_stop_by_tag_stops_what_runs_and_touches_nothing_outside(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    running = start(requester, RUN_A, OUTSIDE)
    starts_before = len(sim.starts)
    sim_stops = len(sim.stop_requests)
    events = stop(requester, cfg, {"requestId": "s1", "tag": ["long", "nothing-here"], "wait": True})
    tasks = {e["taskId"]: e for e in kinds(events, "task")}
    assert tasks[RUN_A]["status"] == "stopping" and tasks[RUN_A]["executionId"] == running[RUN_A]
    assert tasks[RUN_B]["status"] == "notRunning" and tasks[IDLE]["status"] == "notRunning"
    summary = kinds(events, "summary")[0]
    assert [t["taskId"] for t in summary["tasksStopping"]] == [RUN_A]
    assert {t["taskId"] for t in summary["tasksNotRunning"]} == {RUN_B, IDLE}
    assert summary["tasksNotFound"] == [{"tag": "nothing-here"}]
    finished = kinds(events, "taskFinished")
    assert [(e["taskId"], e["status"]) for e in finished] == [(RUN_A, "Aborted")]
    assert finished[0]["executionId"] == running[RUN_A]
    assert events[-1]["event"] == "requestFinished" and events[-1]["finished"] == {"Aborted": 1}
    assert OUTSIDE not in {r.task_id for r in sim.stop_requests[sim_stops:]}  # outside the selection
    assert len(sim.starts) == starts_before  # a stop never starts anything


def test_allow_list_denies_a_stop_and_the_same_request_id_is_not_acted_on_twice(allow_cfg, start_daemon, requester, sim):
    from butler_mqtt.journal.history import HistoryQuery

    d = start_daemon(allow_cfg)
    running = start(requester, RUN_A)
    assert RUN_A in running
    events = stop(requester, allow_cfg, {"requestId": "s2", "taskId": [RUN_A, DENIED, MISSING]})
    tasks = {e["taskId"]: e["status"] for e in kinds(events, "task")}
    assert tasks == {RUN_A: "stopping", DENIED: "denied"}
    summary = kinds(events, "summary")[0]
    assert summary["tasksNotFound"] == [{"taskId": MISSING}] and summary["tasksDenied"][0]["taskId"] == DENIED
    sent = len(sim.stop_requests)
    again = stop(requester, allow_cfg, {"requestId": "s2", "taskId": [RUN_A, DENIED, MISSING]})
    assert again == events and len(sim.stop_requests) == sent  # replayed, nothing sent
    record = d.daemon.runtime.journal.history(HistoryQuery(request_id="s2"))[0]  # the history shows stops too
    assert record["ingress"] == "mqtt-stop" and record["duplicates"] == 1
    assert {t["taskId"]: t["status"] for t in record["tasks"]} == {RUN_A: "stopping", DENIED: "denied"}


def test_invalid_stop_requests_are_answered_and_start_nothing(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    for bad, error in [({"tag": "long", "dryRun": True}, "unknown field 'dryRun'"),
                       ({"taskId": "nope"}, "Task ID must be a valid GUID"),
                       ({"requestId": "x"}, "at least one of taskId"),
                       ({"tag": "long", "ifRunning": "restart"}, "unknown field 'ifRunning'")]:
        events = stop(requester, cfg, bad)
        assert events[-1]["event"] == "error" and error in events[-1]["details"]
    assert sim.starts == [] and sim.stop_requests == []


def test_a_flood_of_stops_for_one_task_sends_one(cfg, start_daemon, requester, sim):
    d = start_daemon(cfg)
    running = start(requester, RUN_A)
    boxes = [requester.send({"requestId": f"f{i}", "taskId": RUN_A}, topic=cfg.mqtt.topics.stop)[1] for i in range(30)]
    answers = []
    for box in boxes:
        ev = box.get(timeout=60)
        assert ev["event"] == "task"
        answers.append((ev["status"], ev.get("executionId")))
    assert set(answers) == {("stopping", running[RUN_A])}
    assert len(sim.stop_requests) == 1
    metrics = d.daemon.runtime.metrics.render().decode()
    assert 'butler_mqtt_stops_requested_total{ingress="mqtt"} 30.0' in metrics
    assert "butler_mqtt_stops_total 1.0" in metrics  # one execution asked to stop, once


def test_rest_stop_by_path_and_body(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    import json
    import urllib.request

    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0})
    d = start_daemon(cfg)
    running = start(requester, RUN_A)
    port = d.daemon.http_server.port

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = call("POST", f"/v4/reloadtask/{RUN_A}/stop")
    assert status == 200 and body["tasksStopping"][0]["executionId"] == running[RUN_A] and "event" not in body
    status, body = call("PUT", "/v4/reloadtask/-/stop", {"requestId": "r-stop", "tag": "long"})
    assert status == 200 and {t["taskId"] for t in body["tasksNotRunning"]} >= {RUN_B, IDLE}
    assert [t["taskId"] for t in body["tasksStopping"]] == [RUN_A]  # asked once already: not asked again
    status, body = call("POST", "/v4/reloadtask/not-a-guid/stop")
    assert status == 400 and body["error"] == "Invalid task ID format"
    status, body = call("POST", "/v4/reloadtask/-/stop", {"tag": "long", "dryRun": True})
    assert status == 400 and "dryRun" in body["details"]
    assert len(sim.stop_requests) == 1 and len(sim.starts) == 1


def test_a_stop_selecting_2000_running_tasks_answers_every_one(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"tag": "bulk"}, timeout=300)
    started = {e["taskId"]: e["executionId"] for e in kinds(events, "task") if e["status"] == "started"}
    assert len(started) == len(BULK)
    events = stop(requester, cfg, {"requestId": "bulk", "tag": "bulk"}, timeout=300)
    tasks = kinds(events, "task")
    assert len(tasks) == len(BULK) and {e["status"] for e in tasks} == {"stopping"}
    assert {e["executionId"] for e in tasks} == set(started.values())
    assert len(kinds(events, "summary")[0]["tasksStopping"]) == len(BULK)
    assert wait_until(lambda: len(sim.stop_requests) == len(BULK), 30)
    assert threading.active_count() < 200  # bounded concurrency: no thread per task


def test_a_waited_stop_survives_a_daemon_restart(cfg, start_daemon, requester, sim):
    """The journal holds a stop like a start: the stopped execution's taskFinished comes from
    the next run of the daemon, and the same requestId afterwards is replayed, not acted on."""
    first = start_daemon(cfg)
    running = start(requester, RUN_A)
    _, box = requester.send({"requestId": "s-restart", "taskId": RUN_A, "wait": True}, topic=cfg.mqtt.topics.stop)
    events = [box.get(timeout=30)]
    while events[-1]["event"] != "summary":
        events.append(box.get(timeout=30))
    first.stop()  # the stop was sent; the execution is still aborting
    start_daemon(cfg)  # same client id and journal
    while events[-1]["event"] != "requestFinished":
        events.append(box.get(timeout=60))
    finished = kinds(events, "taskFinished")
    assert [(e["executionId"], e["status"]) for e in finished] == [(running[RUN_A], "Aborted")]
    assert len(sim.stop_requests) == 1
    again = stop(requester, cfg, {"requestId": "s-restart", "taskId": RUN_A, "wait": True})
    assert [e["event"] for e in again][:2] == ["task", "summary"] and len(sim.stop_requests) == 1
    assert len(sim.starts) == 1  # a stop never starts anything


def test_cli_request_stop(cfg, start_daemon, requester, sim, broker):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    start_daemon(cfg)
    running = start(requester, RUN_A)
    env = {**os.environ, "BUTLER_MQTT__MQTT__PORT": str(broker.port), "BUTLER_MQTT__MQTT__HOST": "127.0.0.1"}
    repo = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "butler_mqtt", "request", *args], capture_output=True, text=True,
                              timeout=120, cwd=repo, env=env)

    out = cli("--stop", "--task-id", RUN_A, "--task-id", IDLE, "--wait", "--timeout", "60")
    assert out.returncode == 0, out.stderr
    assert "qliksense/task/stop" in out.stderr
    events = [json.loads(x) for x in out.stdout.splitlines()]
    assert {e["taskId"]: e["status"] for e in kinds(events, "task")} == {RUN_A: "stopping", IDLE: "notRunning"}
    assert [(e["executionId"], e["status"]) for e in kinds(events, "taskFinished")] == [(running[RUN_A], "Aborted")]
    assert events[-1]["event"] == "requestFinished"
    out = cli("--stop", "--tag", "long", "--dry-run")
    assert out.returncode == 2 and "--stop" in out.stderr
    assert len(sim.starts) == 1 and len(sim.stop_requests) == 1


def test_a_stop_interrupted_by_a_crash_never_touches_a_later_execution(cfg, start_daemon, requester, sim):
    """A crash after the intent `stop/<task>/<execution>` was recorded and before the answer:
    the redelivered request reports that stop, and a later run of the task is left alone; a
    task whose intended execution still runs is asked again (a stop is idempotent)."""
    from butler_mqtt import keys
    from butler_mqtt.stops import KEY_PREFIX, intent

    d = start_daemon(cfg)
    running = start(requester, RUN_A, RUN_B)
    journal = d.daemon.runtime.journal
    key = KEY_PREFIX + keys.for_request_id("crashed")
    old = "01d0e000-0000-4000-8000-0000000000aa"  # an execution of RUN_A before this run
    assert journal.begin(key, "mqtt-stop") is None
    journal.intents(key, [intent(RUN_A, old), intent(RUN_B, running[RUN_B])])
    events = stop(requester, cfg, {"requestId": "crashed", "taskId": [RUN_A, RUN_B]})
    tasks = {e["taskId"]: e for e in kinds(events, "task")}
    assert tasks[RUN_A]["status"] == "stopping" and tasks[RUN_A]["executionId"] == old  # what was asked before
    assert tasks[RUN_B]["status"] == "stopping" and tasks[RUN_B]["executionId"] == running[RUN_B]
    assert [r.task_id for r in sim.stop_requests] == [RUN_B]  # RUN_A's later execution untouched


def test_hostile_stop_payloads_are_answered_and_stop_nothing(cfg, start_daemon, requester, sim):
    """The stop topic gets the start topic's screening: invalid UTF-8, a lone surrogate, JSON
    nested too deeply, an oversize payload; each answered with an error, nothing stopped."""
    start_daemon(cfg)
    start(requester, RUN_A)
    for payload, error in [(b'{"taskId": "\xff"}', "not valid UTF-8"),
                           (b'{"tag": "\\ud800"}', "lone UTF-16 surrogate"),
                           (b"[" * 60_000, "nested too deeply"),
                           (b'{"tag": "' + b"x" * 300_000 + b'"}', "limit")]:
        _, box = requester.send(payload, topic=cfg.mqtt.topics.stop)
        ev = box.get(timeout=30)
        assert ev["event"] == "error" and error in ev["details"], (payload[:30], ev)
    assert sim.stop_requests == []


def test_rest_stop_hardening(qrs_certs, sim, broker, tmp_path, start_daemon):
    import requests

    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state",
                      http={"enabled": True, "port": 0, "token": "t0ken", "max_body_bytes": 4096})
    d = start_daemon(cfg)
    url = f"http://127.0.0.1:{d.daemon.http_server.port}/v4/reloadtask/-/stop"
    auth = {"Authorization": "Bearer t0ken"}
    assert requests.post(url, json={"tag": "long"}, timeout=10).status_code == 401
    assert requests.post(url, json={"tag": "long"}, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    big = requests.post(url, data=b'{"tag": "' + b"x" * 10_000 + b'"}', headers={**auth, "Content-Type": "application/json"},
                        timeout=10)
    assert big.status_code == 413
    form = requests.post(url, data="tag=long", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
                         timeout=10)
    assert form.status_code == 415
    arr = requests.post(url, json=[{"type": "starttasktag", "payload": {"tag": "long"}}], headers=auth, timeout=10)
    assert arr.status_code == 400 and "JSON object" in arr.json()["details"]
    ok = requests.put(url, json={"tag": "long"}, headers=auth, timeout=10)
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "application/json"
    over = requests.post(url, json={"tag": "long"}, headers={**auth, "X-HTTP-Method-Override": "PUT"}, timeout=10)
    assert over.status_code == 200
    assert sim.stop_requests == [] and sim.starts == []
