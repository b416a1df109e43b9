"""Every log line written for a request carries its requestId, whatever thread writes it: the
tracker (chain stages, retries, timers), the queue runner and the start pool (issue 21 item 5:
the request path; the MQTT worker and REST sides are tested with their edges)."""

from __future__ import annotations

import queue
import time
import uuid
from typing import Any

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess, daemon_env

A = "76111111-1111-4111-8111-111111111111"
B = "76222222-2222-4222-8222-222222222222"
FLAKY = "76333333-3333-4333-8333-333333333333"
LONG = "76444444-4444-4444-8444-444444444444"

TASKS = [
    SimTask(A, "Load A", run_seconds=0.2),
    SimTask(B, "Load B", run_seconds=0.2),
    SimTask(FLAKY, "Flaky load", run_seconds=0.2, fail_first=1),
    SimTask(LONG, "Long load", run_seconds=1.5),
]


def next_event(box: Any, kind: str, timeout: float = 40.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = box.get(timeout=0.5)
        except queue.Empty:
            continue
        if ev.get("event") == kind and all(ev.get(k) == v for k, v in match.items()):
            return ev
    raise AssertionError(f"no {kind} event {match} within {timeout} s")


def daemon(qrs_certs: Any, sim: Any, broker: Any, tmp_path: Any, **extra: str) -> DaemonProcess:
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", f"ctx-{uuid.uuid4().hex[:8]}",
                     BUTLER_MQTT__TRACKING__POLL_INTERVAL="0.2", BUTLER_MQTT__TRACKING__FIRST_POLL="0.1", **extra)
    d = DaemonProcess(env)
    d.wait_log("mqtt_subscribed")
    return d


def lines(d: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in d.events if e.get("event") == event]


def test_a_chain_stage_logs_with_its_request_id(qrs_certs, sim, broker, tmp_path, cfg):
    d = daemon(qrs_certs, sim, broker, tmp_path)
    try:
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "ctx-chain", "taskId": A, "then": {"taskId": B}})
            assert next_event(box, "requestFinished")["finished"] == {"FinishedSuccess": 2}
        d.wait_log("request_finished")
        stage1 = [e for e in lines(d, "stage_done") if e.get("stage") == 1]
        assert len(stage1) == 1 and stage1[0]["requestId"] == "ctx-chain"  # run by the chain pool
        finished = lines(d, "task_finished")  # written by the tracker's polling thread
        assert len(finished) == 2 and {e["requestId"] for e in finished} == {"ctx-chain"}
        assert lines(d, "request_finished")[0]["requestId"] == "ctx-chain"
    finally:
        d.stop()


def test_a_retry_logs_with_its_request_id(qrs_certs, sim, broker, tmp_path, cfg):
    d = daemon(qrs_certs, sim, broker, tmp_path)
    try:
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "ctx-retry", "taskId": FLAKY, "wait": True, "retry": {"attempts": 1, "delay": 0.2}})
            assert next_event(box, "requestFinished")["finished"] == {"FinishedSuccess": 1}
        d.wait_log("request_finished")
        retried = lines(d, "retry_started")  # run on a timer, in the chain pool
        assert len(retried) == 1 and retried[0]["requestId"] == "ctx-retry" and retried[0]["attempt"] == 2
        assert {e["requestId"] for e in lines(d, "task_finished")} == {"ctx-retry"}
    finally:
        d.stop()


def test_a_queued_start_logs_with_its_request_id(qrs_certs, sim, broker, tmp_path, cfg):
    d = daemon(qrs_certs, sim, broker, tmp_path, BUTLER_MQTT__POLICIES__MAX_RUNNING="1")
    try:
        with Requester(cfg.mqtt) as r:
            _, long_box = r.send({"requestId": "ctx-long", "taskId": LONG})
            assert next_event(long_box, "task", taskId=LONG)["status"] == "started"
            _, box = r.send({"requestId": "ctx-queued", "taskId": A})
            assert next_event(box, "task", taskId=A)["status"] == "queued"
            assert next_event(box, "task", taskId=A)["status"] == "started"
        started = d.wait_log("queue_started")  # the queue runner's tick, in the tracker's pool
        assert started["taskId"] == A and started["requestId"] == "ctx-queued"
    finally:
        d.stop()


def test_starts_in_the_start_pool_log_with_their_request_id(qrs_certs, sim, broker, tmp_path, cfg):
    # Two tasks: their starts go through the start pool. Each answer comes after qrs.timeout,
    # so each start is confirmed from QRS (`start_unanswered`), logged on a pool thread.
    d = daemon(qrs_certs, sim, broker, tmp_path, BUTLER_MQTT__QRS__TIMEOUT="1", BUTLER_MQTT__QRS__RETRIES="0")
    try:
        sim.answer_delay_paths, sim.answer_delay_s = r"/start", 2.0
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "ctx-pool", "taskId": [A, B]})
            assert next_event(box, "summary")["totalTasksStarted"] == 2
        unanswered = [d.wait_log("start_unanswered", n) for n in (1, 2)]
        assert {e["taskId"] for e in unanswered} == {A, B}
        assert {e["requestId"] for e in unanswered} == {"ctx-pool"}
    finally:
        sim.answer_delay_s = 0.0
        d.stop()
