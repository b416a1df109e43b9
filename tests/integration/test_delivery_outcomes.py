"""Issue 11: every delivery ends in exactly one outcome (answered and acked, or kept for a
retry while QRS or the journal is unavailable), through the real broker and the simulator
over mutual TLS. Each test names the class of failure it pins."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt.errors import JournalError
from butler_mqtt.journal import Journal
from butler_mqtt.sim import QrsSimulator, SimTask
from butler_mqtt.tracking.records import Pending
from tests.conftest import make_config
from tests.support.mqtt import publisher
from tests.support.sim import started_ids as started

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T3 = "33333333-3333-4333-8333-333333333333"
T4 = "44444444-4444-4444-8444-444444444444"
TASKS = [
    SimTask(T1, "Load", tags=["load", "chain-a"]),
    SimTask(T2, "Stuck A", tags=["stuck-a"]),
    SimTask(T3, "Stuck B", tags=["stuck-b"]),
    SimTask(T4, "Free", tags=["free"]),
]


def publish(c: mqtt.Client, topic: str, payload: bytes | str, response_topic: str | None = None,
            correlation: bytes | None = None, retain: bool = False) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    info = c.publish(topic, payload, qos=1, retain=retain, properties=props)
    info.wait_for_publish(10)


def settle(daemon: Any, timeout: float = 20.0) -> None:
    """Wait until every delivery the daemon took was acked (none holds a broker slot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.listener.unacked == 0 and daemon.workers.jobs.empty() and daemon.workers.busy == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{daemon.listener.unacked} deliveries still unacked after {timeout} s")


def until_error(requester: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    _token, box = requester.send(request)
    events = [box.get(timeout=20)]
    while events[-1]["event"] != "error":
        events.append(box.get(timeout=20))
    return events


@pytest.fixture
def daemon(cfg, start_daemon):
    return start_daemon(cfg).daemon


@pytest.fixture
def pub(broker):
    c = publisher(broker.port)
    yield c
    c.disconnect()
    c.loop_stop()


# --------------------------------------------------------------------------- class 1


@pytest.mark.parametrize(
    "topic",
    ["evil/#", "a/+/b", "$SYS/broker/evil", "qliksense/task/start", "butler-mqtt/status", "x" * 2000],
    ids=["hash", "plus", "dollar", "own-start", "own-status", "too-long"],
)
def test_bad_response_topic_is_answered_on_the_reply_topic_and_starts_nothing(daemon, pub, listen, sim, cfg, topic):
    replies = listen(cfg.mqtt.topics.reply)
    rid = f"rt-{uuid.uuid4().hex[:6]}"
    publish(pub, cfg.mqtt.topics.start, json.dumps({"requestId": rid, "taskId": T1}), response_topic=topic, correlation=b"c1")
    err = replies.wait_for(lambda m: m.get("requestId") == rid)
    assert err["event"] == "error" and err["error"] == "Invalid response topic"
    assert "nothing was started" in err["details"]
    settle(daemon)
    assert started(sim) == []


@pytest.mark.parametrize(
    "payload",
    [
        '{"requestId": "sur-tag", "tag": ["a\\ud800b"]}',
        '{"requestId": "sur-cp", "customProperty": [{"name": "\\udfff", "value": "v"}]}',
        '{"requestId": "x\\ud800", "taskId": "' + T1 + '"}',
    ],
    ids=["tag", "custom-property", "request-id"],
)
def test_lone_surrogates_are_rejected_like_any_bad_input(daemon, requester, sim, payload):
    token, box = requester.send(payload.encode())
    ev = box.get(timeout=20)
    assert ev["event"] == "error" and ev["error"] == "Invalid JSON" and "surrogate" in ev["details"]
    assert ev["requestId"] in ("sur-tag", "sur-cp", None)  # an unencodable requestId is not echoed
    settle(daemon)
    assert started(sim) == []


def test_a_task_from_qrs_without_a_guid_id_is_skipped(daemon, requester, sim):
    sim.fault = "badid"
    events = requester.request({"requestId": "badid", "tag": "load"})
    assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 0
    assert events[-1]["tasksNotFound"] == [{"tag": "load"}]
    settle(daemon)
    assert started(sim) == []


def test_an_unexpected_error_is_answered_acked_and_not_started_again(daemon, requester, sim, monkeypatch):
    original = daemon.runtime.service.run_stage

    def start_then_fail(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)  # T1 is started, then a bug strikes
        raise RuntimeError("boom")

    monkeypatch.setattr(daemon.runtime.service, "run_stage", start_then_fail)
    with structlog.testing.capture_logs() as logs:
        events = until_error(requester, {"requestId": "bug", "taskId": T1})
    assert [e["event"] for e in events] == ["task", "summary", "error"]  # what started is reported
    err = events[-1]
    assert err["error"] == "Internal error"
    reference = err["details"].split("reference ")[1].split(" ")[0]
    assert any(e.get("reference") == reference and e["log_level"] == "error" for e in logs)
    settle(daemon)
    assert started(sim) == [T1]
    monkeypatch.setattr(daemon.runtime.service, "run_stage", original)
    again = until_error(requester, {"requestId": "bug", "taskId": T1})  # the journal replays it
    assert [e["event"] for e in again] == ["task", "summary", "error"]
    assert started(sim) == [T1]


def test_many_internal_errors_never_wedge_the_daemon(daemon, requester, sim, monkeypatch):
    monkeypatch.setattr(daemon.runtime.service, "resolve_tasks", lambda *_: (_ for _ in ()).throw(ValueError("bad")))
    boxes = [requester.send({"requestId": f"w{i}", "taskId": T1})[1] for i in range(40)]  # > the in-flight window
    assert all(box.get(timeout=60)["error"] == "Internal error" for box in boxes)
    settle(daemon, 60)
    monkeypatch.undo()
    events = requester.request({"requestId": "after", "taskId": T1})
    assert events[-1]["event"] == "summary" and started(sim) == [T1]


# --------------------------------------------------------------------------- class 3


def test_an_untrusted_qrs_certificate_is_answered_not_retried(qrs_certs, broker, tmp_path, start_daemon, requester, listen):
    other = QrsSimulator(tasks=[SimTask(T1, "Load")], certs_dir=tmp_path / "other-ca").start()  # its own CA
    try:
        cfg = make_config(qrs_certs, other.port, broker, tmp_path / "state")
        d = start_daemon(cfg).daemon
        status = listen(cfg.mqtt.topics.status)
        events = requester.request({"requestId": "tls", "taskId": T1}, timeout=30)
        err = events[-1]
        assert err["event"] == "error" and err["error"] == "QRS TLS handshake refused"
        assert "not trusted" in err["details"] and "qrs.ca" in err["details"]
        settle(d)
        assert other.starts == [] and d.health.qrs_problem is not None
        st = status.wait_for(lambda m: "qrs" in m.get("problems", {}))
        assert "not trusted" in st["problems"]["qrs"]
    finally:
        other.stop()


def test_qrs_403_on_lookup_is_answered_with_the_fix(daemon, requester, sim):
    sim.fault, sim.fault_paths = "error403", "reloadtask"
    err = requester.request({"requestId": "403", "tag": "load"})[-1]
    assert err["event"] == "error" and err["error"] == "QRS refused the request"
    assert "403" in err["details"] and "qrs.user_id" in err["details"]
    settle(daemon)
    assert started(sim) == []


# --------------------------------------------------------------------------- class 4


@pytest.mark.parametrize("fault", ["error403", "notjson"])
def test_a_chain_stage_refused_for_good_ends_the_chain(daemon, requester, sim, fault):
    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "summary" and ev.get("stage") == 0:
            sim.fault, sim.fault_paths = fault, "stuck-a"

    events = requester.request({"requestId": f"chain-{fault}", "tag": "load", "then": {"tag": "stuck-a"}},
                               timeout=60, on_event=on_event)
    done = events[-1]
    assert done["event"] == "requestFinished" and done["stoppedAtStage"] == 1
    assert "stage 1 could not be started" in done["reason"]
    assert started(sim) == [T1]


def test_chains_waiting_on_qrs_do_not_hold_up_other_chains(daemon, requester, sim):
    sim.fault, sim.fault_paths = "outage", "stuck-"  # stage 1 lookups of two chains fail, transiently
    a, box_a = requester.send({"requestId": "ca", "tag": "load", "then": {"tag": "stuck-a"}})
    b, box_b = requester.send({"requestId": "cb", "tag": "load", "then": {"tag": "stuck-b"}})
    time.sleep(2)  # both chains are now retrying their stage 1
    free = requester.request({"requestId": "cfree", "tag": "load", "then": {"tag": "free"}}, timeout=60)
    assert free[-1]["event"] == "requestFinished" and free[-1]["stoppedAtStage"] is None
    sim.fault = None  # QRS is back: the waiting chains go on
    for box in (box_a, box_b):
        ev: dict[str, Any] = {}
        while ev.get("event") != "requestFinished":
            ev = box.get(timeout=60)
        assert ev["stoppedAtStage"] is None and ev["finished"] == {"FinishedSuccess": 2}
    assert started(sim).count(T2) == 1 and started(sim).count(T3) == 1


# --------------------------------------------------------------------------- class 10


def test_a_runaway_qrs_answer_is_refused_with_a_clear_error(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", qrs={"max_response_bytes": 1024 * 1024})
    d = start_daemon(cfg).daemon
    sim.fault, sim.fault_paths, sim.huge_bytes = "huge", "reloadtask", 8 * 1024 * 1024
    err = requester.request({"requestId": "huge", "tag": "load"})[-1]
    assert err["event"] == "error" and "qrs.max_response_bytes" in err["details"]
    settle(d)
    assert started(sim) == []


def test_rest_body_with_a_lone_surrogate_is_400(qrs_certs, sim, broker, tmp_path, start_daemon):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0})
    d = start_daemon(cfg).daemon
    url = f"http://127.0.0.1:{d.http_server.port}/v4/reloadtask/-/start"
    with structlog.testing.capture_logs() as logs:
        resp = requests.post(url, data=b'{"tag": ["\\ud800"]}', headers={"Content-Type": "application/json"}, timeout=10)
        ok = requests.post(url, json={"requestId": "rest-audit", "taskId": T1}, timeout=10)
    assert resp.status_code == 400 and "surrogate" in resp.json()["details"]
    assert ok.status_code == 200
    [audit] = [e for e in logs if e.get("event") == "audit"]
    assert audit["requestId"] == "rest-audit" and audit["ingress"] == "rest"
    assert started(sim) == [T1]


def test_a_deleted_journal_file_stops_acking_until_it_is_back(daemon, requester, sim, cfg):
    path = Path(cfg.state_dir) / "journal.sqlite3"
    assert requester.request({"requestId": "before", "taskId": T1})[-1]["event"] == "summary"
    daemon.runtime.journal._db.run("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = path.with_suffix(".bak")
    shutil.copy(path, backup)
    path.unlink()
    token, box = requester.send({"requestId": "during", "taskId": T4})
    deadline = time.monotonic() + 20
    while daemon.health.waiting()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.health.waiting()[0] == 1 and not daemon.runtime.journal.healthy()
    assert box.empty() and T4 not in started(sim)  # not answered, not started, not acked
    shutil.copy(backup, path)  # the operator restores it
    assert box.get(timeout=30)["event"] == "task"
    settle(daemon)
    again = requester.request({"requestId": "before", "taskId": T1})  # the restored journal knows it
    assert started(sim).count(T1) == 1 and again[-1]["event"] == "summary"


def test_a_missing_journal_is_not_silently_recreated(tmp_path):
    j = Journal(tmp_path / "journal.sqlite3")
    j.close()
    (tmp_path / "journal.sqlite3").unlink()
    with pytest.raises(JournalError, match="is missing.*restore the journal from a backup"):
        Journal(tmp_path / "journal.sqlite3")


def test_waits_use_the_monotonic_clock(monkeypatch):
    p = Pending("e", "t", "n", None, started=time.time(), deadline=time.time() + 60)
    left = p.mono_deadline - time.monotonic()
    monkeypatch.setattr(time, "time", lambda: 1e10)  # a wall-clock step far ahead
    assert p.mono_deadline - time.monotonic() == pytest.approx(left, abs=1)
    assert "mono_deadline" not in json.dumps(p.stored())


def test_executions_qrs_refuses_to_report_end_as_unknown_with_the_reason(daemon, requester, sim):
    daemon.runtime.tracker.grace_s = 1.0

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "summary":
            sim.fault, sim.fault_paths = "error403", "executionresult"

    events = requester.request({"requestId": "poll403", "taskId": T1, "wait": True}, timeout=60, on_event=on_event)
    [fin] = [e for e in events if e["event"] == "taskFinished"]
    assert fin["status"] == "Unknown" and "refuses to report executions" in fin["reason"]
    assert events[-1]["event"] == "requestFinished"


def test_a_failure_of_the_error_path_itself_is_still_answered_and_acked(daemon, pub, listen, sim, cfg, monkeypatch):
    def broken(*_a: Any) -> None:
        raise RuntimeError("the error path broke")

    monkeypatch.setattr(daemon.handler, "_process", broken)
    monkeypatch.setattr(daemon.handler, "_internal_error", broken)
    replies = listen(cfg.mqtt.topics.reply)
    publish(pub, cfg.mqtt.topics.start, json.dumps({"requestId": "lr", "taskId": T1}), correlation=b"lr")
    err = replies.wait_for(lambda m: m.get("event") == "error")
    assert err["error"] == "Internal error"
    settle(daemon)
    assert started(sim) == [] and all(t.is_alive() for t in daemon.workers.threads)
