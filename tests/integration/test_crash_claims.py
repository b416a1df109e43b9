"""Every start is claimed in the journal before it is sent and, after a crash between the start
and its answer, resumed by asking QRS, never sent again: a retry's start, a queued start, a
chain stage's start (issue 20 item 2). A real daemon process is killed with SIGKILL while the
simulator holds back the answer of a start it has already acted on."""

from __future__ import annotations

import queue
import signal
import time
import uuid
from typing import Any

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess, daemon_env

FLAKY = "75111111-1111-4111-8111-111111111111"  # fails its first run, succeeds after
FIRST = "75222222-2222-4222-8222-222222222222"
SECOND = "75333333-3333-4333-8333-333333333333"
LONG = "75444444-4444-4444-8444-444444444444"

TASKS = [
    SimTask(FLAKY, "Flaky load", run_seconds=0.3, fail_first=1),
    SimTask(FIRST, "First load", run_seconds=0.3),
    SimTask(SECOND, "Second load", run_seconds=0.3),
    SimTask(LONG, "Long load", run_seconds=2.0),
]


def next_event(box: Any, kind: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = box.get(timeout=0.5)
        except queue.Empty:
            continue
        if ev.get("event") == kind and all(ev.get(k) == v for k, v in match.items()):
            return ev
    raise AssertionError(f"no {kind} event {match} within {timeout} s")


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def env_for(qrs_certs: Any, sim: Any, broker: Any, tmp_path: Any, **extra: str) -> dict[str, str]:
    return daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", f"claims-{uuid.uuid4().hex[:8]}",
                      BUTLER_MQTT__TRACKING__POLL_INTERVAL="0.3", BUTLER_MQTT__TRACKING__FIRST_POLL="0.2", **extra)


def test_a_retry_whose_start_reached_qrs_is_not_started_again_after_a_crash(qrs_certs, sim, broker, tmp_path, cfg):
    env = env_for(qrs_certs, sim, broker, tmp_path)
    first = DaemonProcess(env)
    second = None
    try:
        first.wait_log("mqtt_subscribed")
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "claim-retry", "taskId": FLAKY, "wait": True,
                             "retry": {"attempts": 2, "delay": 0.5}})
            assert next_event(box, "task", taskId=FLAKY)["status"] == "started"
            assert next_event(box, "taskFinished", taskId=FLAKY)["status"] == "FinishedFail"
            sim.answer_delay_paths, sim.answer_delay_s = r"/start", 60.0  # the retry's start: acted on, not answered
            wait_for(lambda: len(sim.starts) >= 2)
            first.signal(signal.SIGKILL)
            first.wait(10)
            sim.answer_delay_s = 0.0
            second = DaemonProcess(env)
            done = next_event(box, "requestFinished")
            assert done["finished"] == {"FinishedSuccess": 1}
            assert [s.task_id for s in sim.starts] == [FLAKY, FLAKY]  # attempt 1 failed + attempt 2, not 3
    finally:
        sim.answer_delay_s = 0.0
        if second is not None:
            second.stop()
        first.stop()


def test_a_chain_stage_whose_start_reached_qrs_is_not_started_again_after_a_crash(qrs_certs, sim, broker, tmp_path, cfg):
    env = env_for(qrs_certs, sim, broker, tmp_path)
    first = DaemonProcess(env)
    second = None
    try:
        first.wait_log("mqtt_subscribed")
        with Requester(cfg.mqtt) as r:
            _, box = r.send({"requestId": "claim-chain", "taskId": FIRST, "then": {"taskId": SECOND}})
            assert next_event(box, "task", taskId=FIRST)["status"] == "started"
            sim.answer_delay_paths, sim.answer_delay_s = r"/start", 60.0  # stage 1's start: acted on, not answered
            wait_for(lambda: len(sim.starts) >= 2)
            first.signal(signal.SIGKILL)
            first.wait(10)
            sim.answer_delay_s = 0.0
            second = DaemonProcess(env)
            done = next_event(box, "requestFinished")
            assert done["finished"] == {"FinishedSuccess": 2} and done["stoppedAtStage"] is None
            assert [s.task_id for s in sim.starts] == [FIRST, SECOND]
    finally:
        sim.answer_delay_s = 0.0
        if second is not None:
            second.stop()
        first.stop()


def test_a_queued_start_that_reached_qrs_is_not_started_again_after_a_crash(qrs_certs, sim, broker, tmp_path, cfg):
    env = env_for(qrs_certs, sim, broker, tmp_path, BUTLER_MQTT__POLICIES__MAX_RUNNING="1")
    first = DaemonProcess(env)
    second = None
    try:
        first.wait_log("mqtt_subscribed")
        with Requester(cfg.mqtt) as r:
            _, long_box = r.send({"requestId": "claim-long", "taskId": LONG})
            assert next_event(long_box, "task", taskId=LONG)["status"] == "started"
            _, box = r.send({"requestId": "claim-queued", "taskId": FIRST, "wait": True})
            assert next_event(box, "task", taskId=FIRST)["status"] == "queued"
            sim.answer_delay_paths, sim.answer_delay_s = r"/start", 60.0  # the queued start: acted on, not answered
            wait_for(lambda: len(sim.starts) >= 2)
            first.signal(signal.SIGKILL)
            first.wait(10)
            sim.answer_delay_s = 0.0
            second = DaemonProcess(env)
            done = next_event(box, "requestFinished")
            assert done["finished"] == {"FinishedSuccess": 1}
            assert [s.task_id for s in sim.starts] == [LONG, FIRST]
    finally:
        sim.answer_delay_s = 0.0
        if second is not None:
            second.stop()
        first.stop()
