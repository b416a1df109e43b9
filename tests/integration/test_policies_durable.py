"""The run queue is durable: across a SIGKILL of the daemon, and across an instance dying in a
pair sharing one PostgreSQL journal (contract section 7)."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import DaemonProcess, daemon_env

LONG = "74111111-1111-4111-8111-111111111111"
SHORT = "74222222-2222-4222-8222-222222222222"
OTHER = "74333333-3333-4333-8333-333333333333"

TASKS = [
    SimTask(LONG, "Long load", run_seconds=2.5),
    SimTask(SHORT, "Short load", run_seconds=0.3),
    SimTask(OTHER, "Other load", run_seconds=0.3),
]


def next_task_event(box: Any, task_id: str, timeout: float = 40.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = box.get(timeout=0.5)
        except Exception:  # queue.Empty
            continue
        if ev.get("event") == "task" and ev.get("taskId") == task_id:
            return ev
    raise AssertionError(f"no task event for {task_id} within {timeout} s")


def test_queue_survives_sigkill(qrs_certs, sim, broker, tmp_path, cfg):
    client_id = f"durable-{uuid.uuid4().hex[:8]}"
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", client_id,
                     BUTLER_MQTT__POLICIES__MAX_RUNNING="1", BUTLER_MQTT__TRACKING__POLL_INTERVAL="0.3",
                     BUTLER_MQTT__TRACKING__FIRST_POLL="0.2")
    first = DaemonProcess(env)
    try:
        first.wait_log("mqtt_subscribed")
        with Requester(cfg.mqtt) as r:
            _, long_box = r.send({"requestId": "dur-long", "taskId": LONG})
            assert next_task_event(long_box, LONG)["status"] == "started"
            _, box = r.send({"requestId": "dur-short", "taskId": SHORT})
            assert next_task_event(box, SHORT)["status"] == "queued"
            first.signal(signal.SIGKILL)
            first.wait(10)
            assert [s.task_id for s in sim.starts] == [LONG]
            second = DaemonProcess(env)
            try:
                started = next_task_event(box, SHORT)  # the restarted daemon starts it once the slot frees
                while started["status"] == "queued":  # a redelivery (ack lost to the kill) replays the answer
                    started = next_task_event(box, SHORT)
                assert started["status"] == "started" and started["requestId"] == "dur-short"
                starts = sim.starts
                assert [s.task_id for s in starts] == [LONG, SHORT]
                assert starts[1].at >= starts[0].at + 2.5  # never two of ours at once
            finally:
                second.stop()
    finally:
        first.stop()


def test_a_dying_instance_hands_its_queue_to_the_other(qrs_certs, sim, broker, tmp_path, fresh_pg, start_daemon):
    def instance(name: str) -> Any:
        return make_config(
            qrs_certs, sim.port, broker, tmp_path / name,
            mqtt={"client_id": "pair", "shared_group": "pair", "instance_id": name},
            journal={"url": fresh_pg, "lease_seconds": 2},
            policies={"max_running": 1},
        )

    a = start_daemon(instance("a"))
    with Requester(a.cfg.mqtt) as r:
        _, long_box = r.send({"requestId": "pair-long", "taskId": LONG})
        assert next_task_event(long_box, LONG)["status"] == "started"
        _, box = r.send({"requestId": "pair-short", "taskId": SHORT})
        assert next_task_event(box, SHORT)["status"] == "queued"
        _, box2 = r.send({"requestId": "pair-other", "taskId": OTHER, "priority": 9})
        other_queued = next_task_event(box2, OTHER)
        assert other_queued["status"] == "queued" and other_queued["position"] == 1
        a.stop()  # a is gone: its leases run out, b takes its slot count and its queue over
        stopped = time.time()
        start_daemon(instance("b"))
        assert next_task_event(box2, OTHER)["status"] == "started"  # priority 9 first
        assert next_task_event(box, SHORT)["status"] == "started"
    order = [s.task_id for s in sim.starts]
    assert order == [LONG, OTHER, SHORT]
    assert all(s.at > stopped for s in sim.starts[1:])
