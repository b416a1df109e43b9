"""The daemon end to end: real Mosquitto, the QRS simulator over mTLS, contract sections 3-4."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import paho.mqtt.client as mqtt
import pytest

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.support.mqtt import publisher
from tests.support.sim import started_ids

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T3 = "33333333-3333-4333-8333-333333333333"
T4 = "44444444-4444-4444-8444-444444444444"
T5 = "55555555-5555-4555-8555-555555555555"
T6 = "66666666-6666-4666-8666-666666666666"
MISSING = "99999999-9999-4999-8999-999999999999"
EVIL = "it's & #1 + 100% (or) tags.name eq 'x'"

TASKS = [
    SimTask(T1, "Finance daily", tags=["financial-reports", "daily-refresh"], custom_properties=[("taskGroup", "finance")]),
    SimTask(T2, "Sales daily", tags=["daily-refresh"], custom_properties=[("taskGroup", "sales"), ("priority", "finance")]),
    SimTask(T3, "Disabled daily", tags=["daily-refresh"], enabled=False),
    SimTask(T4, "Evil name", tags=[EVIL]),
    SimTask(T5, "Prefix of evil", tags=["it's"]),
    SimTask(T6, "Unicode", tags=["Prognose für Q1"]),
]


@pytest.fixture
def daemon(cfg, start_daemon):
    return start_daemon(cfg)


def by_event(events, kind):
    return [e for e in events if e["event"] == kind]


def test_start_by_id(daemon, requester, sim):
    events = requester.request({"requestId": "r1", "taskId": [T1]})
    [task] = by_event(events, "task")
    assert task["status"] == "started" and task["taskId"] == T1 and task["taskName"] == "Finance daily"
    assert task["requestId"] == "r1" and task["matchedBy"] == [f"taskId:{T1}"]
    assert task["executionId"] == sim.starts[0].execution_id
    summary = events[-1]
    assert summary["event"] == "summary" and summary["totalTasksStarted"] == 1
    assert started_ids(sim) == [T1]


def test_combined_criteria_deduplicated(daemon, requester, sim):
    events = requester.request(
        {"taskId": T1, "tag": ["financial-reports", "daily-refresh"], "customProperty": [{"name": "taskGroup", "value": "finance"}]}
    )
    tasks = {e["taskId"]: e for e in by_event(events, "task")}
    assert set(tasks) == {T1, T2, T3}
    assert tasks[T1]["matchedBy"] == [f"taskId:{T1}", "tag:financial-reports", "tag:daily-refresh", "customProperty:taskGroup=finance"]
    assert tasks[T2]["status"] == "started"
    assert tasks[T3]["status"] == "notStarted"  # disabled: QRS answers the empty GUID
    summary = events[-1]
    assert summary["totalTasksStarted"] == 2
    assert {t["taskId"] for t in summary["tasksStarted"]} == {T1, T2, T3}
    assert started_ids(sim) == sorted([T1, T2])  # each once


def test_custom_property_pair_not_matched_across_properties(daemon, requester, sim):
    # T2 has priority=finance and taskGroup=sales: QRS's filter returns it, we must not start it.
    events = requester.request({"customProperty": [{"name": "taskGroup", "value": "finance"}]})
    assert [e["taskId"] for e in by_event(events, "task")] == [T1]
    assert started_ids(sim) == [T1]


def test_not_found_criteria_listed(daemon, requester, sim):
    events = requester.request(
        {"taskId": [MISSING], "tag": ["no-such-tag"], "customProperty": [{"name": "n", "value": "v"}]}
    )
    assert by_event(events, "task") == []
    assert events[-1]["tasksNotFound"] == [
        {"taskId": MISSING},
        {"tag": "no-such-tag"},
        {"customProperty": {"name": "n", "value": "v"}},
    ]
    assert sim.starts == []


def test_invalid_guid_is_an_error_and_starts_nothing(daemon, requester, sim):
    events = requester.request({"requestId": "bad", "taskId": ["123"], "tag": "daily-refresh"})
    assert events == [
        {"event": "error", "requestId": "bad", "error": "Invalid task ID format", "details": "Task ID must be a valid GUID"}
    ]
    assert sim.starts == []


def test_all_task_ids_must_exist(daemon, requester, sim):
    events = requester.request({"taskId": [T1, MISSING], "tag": "financial-reports", "allTaskIdsMustExist": True})
    # T1 is also selected by its tag, which allTaskIdsMustExist does not affect.
    assert events[-1]["tasksNotFound"] == [{"taskId": MISSING}]
    assert started_ids(sim) == [T1]
    events = requester.request({"taskId": [T2, MISSING], "allTaskIdsMustExist": True})
    [task] = by_event(events, "task")
    assert task["status"] == "denied" and MISSING in task["reason"]
    assert started_ids(sim) == [T1]


def test_dry_run_starts_nothing(daemon, requester, sim):
    events = requester.request({"tag": "daily-refresh", "dryRun": True})
    assert {e["status"] for e in by_event(events, "task")} == {"wouldStart"}
    assert events[-1]["totalTasksStarted"] == 0
    assert sim.starts == []


def test_duplicate_request_id_not_started_again(daemon, requester, sim):
    first = requester.request({"requestId": "dup-1", "tag": "financial-reports"})
    second = requester.request({"requestId": "dup-1", "tag": "financial-reports"})
    # the earlier outcome, re-published and marked so (issue 25); the first replies are not marked
    assert second == [{**e, "replayed": True} for e in first]
    assert not any("replayed" in e for e in first)
    assert started_ids(sim) == [T1]


def test_a_repeated_request_that_waited_is_answered_again_marked_replayed(daemon, requester, sim):
    """Issue 25: the earlier outcome of a followed request (its taskFinished and requestFinished
    too) is re-published with `"replayed": true` on every reply; nothing starts again."""
    first = requester.request({"requestId": "dup-wait", "taskId": [T1], "wait": True}, timeout=60)
    assert [e["event"] for e in first][-1] == "requestFinished" and not any("replayed" in e for e in first)
    second = requester.request({"requestId": "dup-wait", "taskId": [T1], "wait": True}, timeout=60)
    assert {e["event"] for e in second} == {"task", "summary", "taskFinished", "requestFinished"}
    assert all(e["replayed"] is True for e in second)
    assert [{k: v for k, v in e.items() if k != "replayed"} for e in second] == first
    assert started_ids(sim) == [T1]


def test_correlation_data_without_request_id_is_the_idempotency_key(daemon, cfg, sim, listen):
    replies = listen("test/corr/#")
    c = publisher(cfg.mqtt.port)
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    for _ in range(2):
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = "test/corr/1"
        p.CorrelationData = b"\x00\x01corr"
        c.publish(cfg.mqtt.topics.start, json.dumps({"taskId": T1}), qos=1, properties=p).wait_for_publish(5)
    replies.wait_for(lambda m: m["event"] == "summary")
    c.loop_stop()
    c.disconnect()
    summaries = []
    while len(summaries) < 2:
        replies.wait_for(lambda m: len([x for x in replies.messages if x["event"] == "summary"]) >= 2)
        summaries = [(m, r) for m, r in zip(replies.messages, replies.raw, strict=True) if m["event"] == "summary"]
    for _m, raw in summaries:
        assert raw.properties.CorrelationData == b"\x00\x01corr"
    assert started_ids(sim) == [T1]


def test_filter_breaking_names_match_exactly(daemon, requester, sim):
    events = requester.request({"tag": [EVIL]})
    assert [e["taskId"] for e in by_event(events, "task")] == [T4]
    events = requester.request({"tag": ["it's"]})
    assert [e["taskId"] for e in by_event(events, "task")] == [T5]
    events = requester.request({"tag": ["PROGNOSE FÜR Q1"]})  # case-insensitive, like QRS
    assert [e["taskId"] for e in by_event(events, "task")] == [T6]
    events = requester.request({"tag": ["' or tags.name ne '"]})
    assert by_event(events, "task") == []
    assert started_ids(sim) == sorted([T4, T5, T6])


@pytest.mark.parametrize(
    "payload, error",
    [
        (b"{not json", "Invalid JSON"),
        (b"\xff\xfe\x00", "Invalid payload"),
        (b'{"tag": "a", "colour": "red"}', "Invalid request"),
        (b'{"tag": 42}', "Invalid request"),
        (b'{"tag": "a", "wait": "yes"}', "Invalid request"),
        (b"[]", "Invalid request"),
        (b'{"tag": "' + b"x" * (2 * 1024 * 1024) + b'"}', "Payload too large"),
    ],
)
def test_bad_input_gets_an_error_and_the_daemon_keeps_serving(daemon, requester, sim, payload, error):
    _token, box = requester.send(payload)
    ev = box.get(timeout=20)
    assert ev["event"] == "error" and ev["error"] == error
    assert ev["details"]
    events = requester.request({"taskId": T1})  # still serving
    assert events[-1]["totalTasksStarted"] == 1
    assert started_ids(sim) == [T1]


def test_retained_request_is_never_acted_on(cfg, sim, broker, start_daemon, listen):
    topic = f"test/retained/{uuid.uuid4().hex}"
    cfg.mqtt.topics.start = topic
    pub = publisher(broker.port)
    # Retained before the daemon subscribes: never delivered.
    pub.publish(topic, json.dumps({"requestId": "ret-1", "taskId": T1}), qos=1, retain=True).wait_for_publish(5)
    replies = listen(cfg.mqtt.topics.reply)
    start_daemon(cfg)
    # Retained while it is subscribed: delivered, answered with an error, not started.
    pub.publish(topic, json.dumps({"requestId": "ret-2", "taskId": T2}), qos=1, retain=True).wait_for_publish(5)
    err = replies.wait_for(lambda m: m.get("requestId") == "ret-2")
    assert err["event"] == "error" and err["error"] == "Retained request ignored"
    # A normal request after both is handled; neither retained one started anything.
    pub.publish(topic, json.dumps({"requestId": "live", "taskId": T3}), qos=1).wait_for_publish(5)
    replies.wait_for(lambda m: m.get("requestId") == "live" and m["event"] == "summary")
    assert not [m for m in replies.messages if m.get("requestId") == "ret-1"]
    assert sim.starts == []  # T3 is disabled: nothing ran at all
    pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()


def test_mqtt311_publisher(daemon, cfg, sim):
    v3 = MqttConfig.model_validate({**cfg.mqtt.model_dump(), "protocol": "3.1.1"})
    with Requester(v3) as r:
        events = r.request({"requestId": f"v3-{uuid.uuid4().hex}", "taskId": T1})
    assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1
    assert started_ids(sim) == [T1]


def test_mqtt311_daemon(cfg, sim, start_daemon):
    cfg.mqtt.protocol = "3.1.1"
    start_daemon(cfg)
    with Requester(cfg.mqtt) as r:
        events = r.request({"requestId": f"v3d-{uuid.uuid4().hex}", "tag": "financial-reports"})
    assert [e["taskId"] for e in by_event(events, "task")] == [T1]


def test_plain_guid_topic(daemon, cfg, sim, listen):
    replies = listen(cfg.mqtt.topics.reply)
    pub = publisher(cfg.mqtt.port, mqtt.MQTTv311)
    pub.publish(cfg.mqtt.topics.start_plain, f"  {T2}\n", qos=1).wait_for_publish(5)
    summary = replies.wait_for(lambda m: m["event"] == "summary" and m["requestId"] is None)
    assert summary["tasksStarted"][0]["taskId"] == T2
    pub.publish(cfg.mqtt.topics.start_plain, "not-a-guid", qos=1).wait_for_publish(5)
    err = replies.wait_for(lambda m: m["event"] == "error")
    assert err["error"] == "Invalid task ID format"
    pub.loop_stop()
    pub.disconnect()
    assert started_ids(sim) == [T2]


def test_mosquitto_rr_round_trip(daemon, cfg, sim):
    exe = shutil.which("mosquitto_rr")
    if exe is None:
        pytest.fail("mosquitto_rr not found: install mosquitto-clients")
    out = subprocess.run(
        [exe, "-h", "127.0.0.1", "-p", str(cfg.mqtt.port), "-t", cfg.mqtt.topics.start, "-e", f"test/rr/{uuid.uuid4().hex}",
         "-m", json.dumps({"requestId": "rr-1", "taskId": T1}), "-D", "publish", "correlation-data", "abc", "-W", "20", "-q", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout.strip().splitlines()[0])
    assert first["event"] == "task" and first["requestId"] == "rr-1" and first["taskId"] == T1
    assert started_ids(sim) == [T1]


def test_start_filter_denies_outside_the_allow_list(cfg, sim, start_daemon):
    cfg.start_filter.enabled = True
    cfg.start_filter.allow.tags = ["financial-reports"]
    start_daemon(cfg)
    with Requester(cfg.mqtt) as r:
        events = r.request({"tag": "daily-refresh"})
    status = {e["taskId"]: e["status"] for e in by_event(events, "task")}
    assert status == {T1: "started", T2: "denied", T3: "denied"}
    assert [d["taskId"] for d in events[-1]["tasksDenied"]] == [T2, T3]
    assert started_ids(sim) == [T1]
