"""MQTT 3.1.1 and retained requests (issue 11, class 8): a message with the retain flag is never
acted on, whatever the protocol.

3.1.1 brokers clear the retain flag on live delivery, so the daemon asks its retain probe
(butler_mqtt/mqtt/retain_probe.py) before acting: real Mosquitto, the simulator over mTLS.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from butler_mqtt.config import MqttConfig
from butler_mqtt.errors import BrokerUnavailable
from butler_mqtt.mqtt.retain_probe import RetainProbe
from butler_mqtt.sim import SimTask
from tests.support.mqtt import publisher
from tests.support.sim import started_ids as started

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T3 = "33333333-3333-4333-8333-333333333333"
TASKS = [SimTask(T1, "Finance daily"), SimTask(T2, "Sales daily"), SimTask(T3, "HR daily")]
RETAINED = "Retained request ignored"


def _unique_topics(cfg, protocol: str) -> None:
    base = f"test/r311/{uuid.uuid4().hex}"
    cfg.mqtt.protocol = protocol
    cfg.mqtt.topics.start = f"{base}/start"
    cfg.mqtt.topics.start_plain = f"{base}/start_plain"
    cfg.mqtt.topics.reply = f"{base}/reply"


def test_mqtt311_retained_json_and_plain_requests_are_answered_and_not_started(cfg, sim, broker, start_daemon, listen):
    _unique_topics(cfg, "3.1.1")
    t = cfg.mqtt.topics
    replies = listen(t.reply)
    pub = publisher(broker.port, mqtt.MQTTv311)
    try:
        # Retained before the daemon subscribes: 3.1.1 delivers it with retain=1 on subscribe.
        pub.publish(t.start, json.dumps({"requestId": "ret-before", "taskId": T3}), qos=1, retain=True).wait_for_publish(5)
        running = start_daemon(cfg)
        assert running.daemon.retain_probe is not None
        err = replies.wait_for(lambda m: m.get("requestId") == "ret-before")
        assert err["event"] == "error" and err["error"] == RETAINED

        # Retained while the daemon is subscribed: delivered live with retain=0 (3.1.1).
        pub.publish(t.start, json.dumps({"requestId": "ret-json", "taskId": T1}), qos=1, retain=True).wait_for_publish(5)
        err = replies.wait_for(lambda m: m.get("requestId") == "ret-json")
        assert err["event"] == "error" and err["error"] == RETAINED and err["details"]
        pub.publish(t.start_plain, T2, qos=1, retain=True).wait_for_publish(5)
        err = replies.wait_for(lambda m: m["event"] == "error" and m["requestId"] is None)
        assert err["error"] == RETAINED

        # A normal request right after starts, once.
        pub.publish(t.start, json.dumps({"requestId": "live", "taskId": T1}), qos=1).wait_for_publish(5)
        summary = replies.wait_for(lambda m: m.get("requestId") == "live" and m["event"] == "summary")
        assert summary["totalTasksStarted"] == 1
        assert started(sim) == [T1]

        # A live copy of the retained plain GUID is refused while that copy sits on the topic
        # (it would fire on the next resubscribe); once cleared, the same GUID starts.
        n_errors = len([m for m in replies.messages if m["event"] == "error" and m["requestId"] is None])
        pub.publish(t.start_plain, T2, qos=1).wait_for_publish(5)
        replies.wait_for(
            lambda m: len([x for x in replies.messages if x["event"] == "error" and x["requestId"] is None]) > n_errors
        )
        assert [m for m in replies.messages if m["event"] == "error" and m["requestId"] is None][-1]["error"] == RETAINED
        pub.publish(t.start_plain, b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        pub.publish(t.start_plain, T2, qos=1).wait_for_publish(5)
        replies.wait_for(lambda m: m["event"] == "summary" and m["requestId"] is None)
        assert started(sim) == sorted([T1, T2])
        time.sleep(0.5)  # nothing else arrives late
        assert started(sim) == sorted([T1, T2])
    finally:
        for topic in (t.start, t.start_plain):
            pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()


def test_mqtt5_needs_no_probe_and_still_refuses_retained(cfg, sim, broker, start_daemon, listen):
    _unique_topics(cfg, "5")
    replies = listen(cfg.mqtt.topics.reply)
    running = start_daemon(cfg)
    assert running.daemon.retain_probe is None  # retain-as-published shows the flag
    pub = publisher(broker.port)
    try:
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": "r5", "taskId": T1}), qos=1, retain=True).wait_for_publish(5)
        assert replies.wait_for(lambda m: m.get("requestId") == "r5")["error"] == RETAINED
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": "l5", "taskId": T1}), qos=1).wait_for_publish(5)
        assert replies.wait_for(lambda m: m.get("requestId") == "l5" and m["event"] == "summary")["totalTasksStarted"] == 1
        assert started(sim) == [T1]
    finally:
        pub.publish(cfg.mqtt.topics.start, b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()


def test_probe_matches_topic_and_exact_payload(broker):
    topic = f"test/probe/{uuid.uuid4().hex}"
    pub = publisher(broker.port, mqtt.MQTTv311)
    probe = RetainProbe(MqttConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1"), f"probe-{uuid.uuid4().hex[:8]}").start()
    try:
        assert probe.retained_now(topic, b"x") is False  # nothing retained yet
        pub.publish(topic, b'{"taskId": 1}', qos=1, retain=True).wait_for_publish(5)
        assert probe.retained_now(topic, b'{"taskId": 1}') is True
        assert probe.retained_now(topic, b'{"taskId": 2}') is False
        assert probe.retained_now(topic + "/other", b'{"taskId": 1}') is False
        pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        assert probe.retained_now(topic, b'{"taskId": 1}') is False
    finally:
        probe.stop()
        pub.loop_stop()
        pub.disconnect()


def test_probe_without_a_broker_raises_broker_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = RetainProbe(MqttConfig(host="127.0.0.1", port=port, protocol="3.1.1"), "probe-nobody", timeout=0.5).start()
    try:
        with pytest.raises(BrokerUnavailable, match="not connected"):
            probe.retained_now("a/b", b"x")
    finally:
        probe.stop()


def _deferred(daemon) -> float:
    for line in daemon.runtime.metrics.render().decode().splitlines():
        if line.startswith("butler_mqtt_requests_deferred_total "):
            return float(line.split()[1])
    return 0.0


def test_mqtt311_request_waits_unacked_while_the_probe_cannot_answer(cfg, sim, broker, start_daemon, listen):
    _unique_topics(cfg, "3.1.1")
    replies = listen(cfg.mqtt.topics.reply)
    running = start_daemon(cfg)
    probe = running.daemon.retain_probe
    assert probe is not None
    probe.timeout = 0.5
    probe.stop()  # the probe's broker connection is gone: it cannot tell whether a request is retained
    pub = publisher(broker.port, mqtt.MQTTv311)
    try:
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": "w1", "taskId": T1}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 20
        while _deferred(running.daemon) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _deferred(running.daemon) >= 2  # deferred and retried, neither answered nor started
        assert not [m for m in replies.messages if m.get("requestId") == "w1"]
        assert sim.starts == []
        probe.start()
        summary = replies.wait_for(lambda m: m.get("requestId") == "w1" and m["event"] == "summary", timeout=40)
        assert summary["totalTasksStarted"] == 1 and started(sim) == [T1]
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_mqtt311_retained_request_cleared_while_queued_is_still_refused(cfg, sim, broker, start_daemon, listen):
    """The broker is asked when the request arrives, not when a worker gets to it: a publisher
    that clears its retained request while it waits in the queue does not get it started."""
    _unique_topics(cfg, "3.1.1")
    cfg.mqtt.workers = 1
    replies = listen(cfg.mqtt.topics.reply)
    start_daemon(cfg)
    pub = publisher(broker.port, mqtt.MQTTv311)
    try:
        sim.latency_ms = 1000  # the only worker is busy with the first request for a few seconds
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": "busy", "taskId": T3}), qos=1).wait_for_publish(5)
        time.sleep(0.3)
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": "queued-ret", "taskId": T1}), qos=1, retain=True).wait_for_publish(5)
        time.sleep(0.5)  # the question went out on arrival
        pub.publish(cfg.mqtt.topics.start, b"", qos=1, retain=True).wait_for_publish(5)  # cleared
        err = replies.wait_for(lambda m: m.get("requestId") == "queued-ret", timeout=60)
        assert err["event"] == "error" and err["error"] == RETAINED
        replies.wait_for(lambda m: m.get("requestId") == "busy" and m["event"] == "summary", timeout=60)
        assert started(sim) == [T3]
    finally:
        sim.latency_ms = 0
        pub.loop_stop()
        pub.disconnect()


def test_probe_answers_pipelined_questions_from_many_threads_correctly(broker):
    import threading

    base = f"test/probe/{uuid.uuid4().hex}"
    topics = [f"{base}/{i}" for i in range(4)]
    retained = {topics[0]: b"r0", topics[2]: b"r2"}
    pub = publisher(broker.port, mqtt.MQTTv311)
    for topic, payload in retained.items():
        pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    probe = RetainProbe(MqttConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1"), f"probe-{uuid.uuid4().hex[:8]}").start()
    wrong: list[tuple[str, bytes, bool]] = []

    def ask(k: int) -> None:
        for i in range(40):
            topic = topics[(k + i) % 4]
            payload = retained.get(topic, b"x") if i % 2 else b"other"
            got = probe.retained_now(topic, payload)
            if got != (retained.get(topic) == payload):
                wrong.append((topic, payload, got))

    try:
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert wrong == []
    finally:
        probe.stop()
        for topic in retained:
            pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
