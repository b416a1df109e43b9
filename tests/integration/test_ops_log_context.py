"""Every log line of a request carries its requestId, whatever thread writes it: the MQTT
worker, the REST handler and the thread it hands the request to, the alerter's sink thread.
A daemon subprocess with JSON logs; a quiet daemon, so every line written between a request
and its last alert line is a line of that request."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import pytest

from butler_mqtt.config import MqttConfig
from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.support.mqtt import Inbox, publisher
from tests.support.ops import DaemonProcess, daemon_env

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
TASKS = [SimTask(T1, "Starts"), SimTask(T2, "Refused")]
TOPICS = MqttConfig().topics


@pytest.fixture
def daemon(qrs_certs, sim, broker, tmp_path):
    sim.fail_starts_for = {T2}  # a failedStart alert, sent to a webhook nobody answers
    http_port, dead = free_port(), free_port()
    env = daemon_env(
        qrs_certs, sim.port, broker.port, tmp_path / "state", f"ctx-{uuid.uuid4().hex[:8]}",
        BUTLER_MQTT__HTTP__ENABLED="true", BUTLER_MQTT__HTTP__PORT=str(http_port),
        BUTLER_MQTT__ALERTS__WEBHOOK__URL=f"http://127.0.0.1:{dead}/hook",
        BUTLER_MQTT__ALERTS__WEBHOOK__ATTEMPTS="2", BUTLER_MQTT__ALERTS__WEBHOOK__RETRY_DELAY="0.1",
    )
    d = DaemonProcess(env)
    d.http_port = http_port  # type: ignore[attr-defined]
    try:
        d.wait_log("started")  # the last line of startup()
        d.wait_log("mqtt_subscribed")
        d.wait_log("qrs_reachable")
        yield d
    finally:
        d.stop()


def lines_of(d: DaemonProcess, first: int) -> list[dict[str, Any]]:
    """The lines from `first` up to the request's failed webhook delivery (its last line)."""
    d.wait_log("alert_webhook_failed", timeout=30)
    window = d.events[first:]
    assert any(e.get("event") == "audit" for e in window), window
    assert any(e.get("event") == "alert_webhook_retry" for e in window), window  # the alerter's own thread
    return window


def test_every_line_of_an_mqtt_request_carries_its_request_id(daemon, broker):
    replies = Inbox(broker.port, TOPICS.reply)
    pub = publisher(broker.port)
    try:
        first = len(daemon.events)
        pub.publish(TOPICS.start, json.dumps({"requestId": "ctx-mqtt", "taskId": [T1, T2]}), qos=1).wait_for_publish(10)
        replies.wait_for(lambda m: m.get("event") == "summary" and m.get("requestId") == "ctx-mqtt")
        window = lines_of(daemon, first)
    finally:
        pub.disconnect()
        pub.loop_stop()
        replies.close()
    assert [e for e in window if e.get("requestId") != "ctx-mqtt"] == []


def test_every_line_of_a_rest_request_carries_its_request_id(daemon):
    first = len(daemon.events)
    body = json.dumps({"requestId": "ctx-rest", "taskId": [T1, T2]}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}/v4/reloadtask/-/start", data=body,
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert answer["requestId"] == "ctx-rest" and [t["taskId"] for t in answer["tasksFailed"]] == [T2]
    window = lines_of(daemon, first)
    assert [e for e in window if e.get("requestId") != "ctx-rest"] == []
