"""Run policies (contract section 7) through the broker and the simulator: attach, skip, queue,
max_running with priorities, queue_timeout, retry, deadline, the plain topic and REST."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import wait_until

LONG = "71111111-1111-4111-8111-111111111111"
SHORT = "72222222-2222-4222-8222-222222222222"
BURST = [f"7333aaaa-0000-4000-8000-{i:012d}" for i in range(6)]

FAILING = "75555555-5555-4555-8555-555555555555"
FLAKY = "76666666-6666-4666-8666-666666666666"
QRS_RETRIES = "77777777-7777-4777-8777-777777777777"

TASKS = [
    SimTask(LONG, "ERP load (long)", tags=["erp-long"], run_seconds=2.0),
    SimTask(FAILING, "Always failing", tags=["failing"], run_seconds=0.2, outcome="fail"),
    SimTask(FLAKY, "Locked source file", tags=["flaky"], run_seconds=0.2, fail_first=2),
    SimTask(QRS_RETRIES, "Retried by QRS", run_seconds=0.3, fail_first=1, max_retries=2),
    SimTask(SHORT, "ERP load (short)", tags=["erp-short"], run_seconds=0.6),
] + [SimTask(t, f"Burst {i}", tags=["burst"], run_seconds=0.8) for i, t in enumerate(BURST)]


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def task_events(events: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "task" and e["taskId"] == task_id]


def starts_of(sim: Any, task_id: str) -> list[Any]:
    return [s for s in sim.starts if s.task_id == task_id]


def collect(box: Any, until: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Replies from a Requester box until `until(events)` holds."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; replies so far: {json.dumps(events)[:2000]}"
        try:
            events.append(box.get(timeout=min(left, 0.5)))
        except Exception:  # queue.Empty
            continue
    return events


def policies_cfg(qrs_certs: Any, sim: Any, broker: Any, tmp_path: Any, **policies: Any) -> Any:
    return make_config(qrs_certs, sim.port, broker, tmp_path / "state", policies=policies)


def test_attach_follows_the_running_execution_and_starts_nothing(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    token1, box1 = requester.send({"requestId": "att-1", "taskId": LONG, "wait": True})
    first = collect(box1, lambda evs: kinds(evs, "summary"))
    eid = task_events(first, LONG)[0]["executionId"]
    second = requester.request({"requestId": "att-2", "taskId": LONG, "ifRunning": "attach", "wait": True}, timeout=30)
    attached = task_events(second, LONG)[0]
    assert attached["status"] == "alreadyRunning" and attached["executionId"] == eid
    summary = kinds(second, "summary")[0]
    assert summary["tasksRunning"][0]["taskId"] == LONG and summary["totalTasksStarted"] == 0
    rest = collect(box1, lambda evs: kinds(evs, "requestFinished"))
    assert kinds(second, "taskFinished")[0]["executionId"] == eid == kinds(rest, "taskFinished")[0]["executionId"]
    assert kinds(second, "requestFinished")[0]["finished"] == {"FinishedSuccess": 1}
    assert len(starts_of(sim, LONG)) == 1  # no second start


def test_attach_to_an_execution_started_elsewhere(cfg, start_daemon, requester, sim):
    """Started in QMC (not by butler-mqtt): found through lastExecutionResult, its session id
    looked up once, followed to its end."""
    started = sim.store.start(LONG)
    start_daemon(cfg)
    events = requester.request({"requestId": "att-3", "taskId": LONG, "ifRunning": "attach", "wait": True}, timeout=30)
    ev = task_events(events, LONG)[0]
    assert ev["status"] == "alreadyRunning" and ev["executionId"] == started.execution_id
    assert kinds(events, "taskFinished")[0]["status"] == "FinishedSuccess"
    assert len(starts_of(sim, LONG)) == 1


def test_skip_names_the_running_execution(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    first = requester.request({"requestId": "skip-1", "taskId": LONG})
    eid = task_events(first, LONG)[0]["executionId"]
    events = requester.request({"requestId": "skip-2", "tag": "erp-long", "ifRunning": "skip"})
    ev = task_events(events, LONG)[0]
    assert ev["status"] == "skipped" and eid in ev["reason"] and "executionId" not in ev
    assert kinds(events, "summary")[0]["tasksRunning"] == [
        {"taskId": LONG, "taskName": "ERP load (long)", "status": "skipped", "reason": ev["reason"]}
    ]
    assert len(starts_of(sim, LONG)) == 1


def test_queue_five_requests_one_rerun(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    first = requester.request({"requestId": "q-0", "taskId": LONG})
    assert task_events(first, LONG)[0]["status"] == "started"
    boxes = [requester.send({"requestId": f"q-{i}", "taskId": LONG, "ifRunning": "queue"})[1] for i in range(1, 6)]
    streams = [collect(box, lambda evs: len(task_events(evs, LONG)) >= 2) for box in boxes]
    reruns = {task_events(evs, LONG)[1]["executionId"] for evs in streams}
    for evs in streams:
        queued, started = task_events(evs, LONG)[:2]
        assert queued["status"] == "queued" and queued["position"] >= 1
        assert kinds(evs, "summary")[0]["tasksQueued"][0]["taskId"] == LONG
        assert started["status"] == "started"
    assert len(reruns) == 1  # every request got the one rerun
    starts = starts_of(sim, LONG)
    assert len(starts) == 2 and starts[1].execution_id in reruns
    assert starts[1].at >= starts[0].at + 2.0  # only after the running execution ended


def test_queue_with_wait_gets_the_rerun_finished(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    requester.request({"requestId": "qw-0", "taskId": SHORT})
    events = requester.request({"requestId": "qw-1", "taskId": SHORT, "ifRunning": "queue", "wait": True}, timeout=30)
    statuses = [e["status"] for e in task_events(events, SHORT)]
    assert statuses == ["queued", "started"]
    assert kinds(events, "taskFinished")[0]["executionId"] == task_events(events, SHORT)[1]["executionId"]
    assert events[-1]["event"] == "requestFinished" and events[-1]["finished"] == {"FinishedSuccess": 1}


def _overlap(sim: Any, seconds: float) -> int:
    """Most executions running at one moment, from the simulator's start times."""
    spans = [(s.at, s.at + seconds) for s in sim.starts]
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def test_max_running_two_with_six_tasks(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    start_daemon(policies_cfg(qrs_certs, sim, broker, tmp_path, max_running=2))
    token, box = requester.send({"requestId": "cap-1", "tag": "burst"})
    events = collect(box, lambda evs: sum(1 for e in evs if e["event"] == "task" and e["status"] == "started") >= 6)
    first = [e for e in events if e["event"] == "task"][:6]
    assert sorted(e["status"] for e in first) == ["queued"] * 4 + ["started"] * 2
    assert sorted(e["position"] for e in first if e["status"] == "queued") == [1, 2, 3, 4]
    summary = kinds(events, "summary")[0]
    assert summary["totalTasksStarted"] == 2 and len(summary["tasksQueued"]) == 4
    assert sorted(s.task_id for s in sim.starts) == sorted(BURST)  # each started exactly once
    assert _overlap(sim, 0.8) <= 2


def test_max_running_priority_order(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    start_daemon(policies_cfg(qrs_certs, sim, broker, tmp_path, max_running=1))
    requester.request({"requestId": "p-0", "taskId": LONG})  # holds the only slot for 2 s
    _, low = requester.send({"requestId": "p-low", "taskId": BURST[0], "priority": 1})
    low_queued = task_events(collect(low, lambda evs: task_events(evs, BURST[0])), BURST[0])[0]
    assert low_queued["status"] == "queued" and low_queued["position"] == 1
    _, high = requester.send({"requestId": "p-high", "taskId": BURST[1], "priority": 9})
    high_queued = task_events(collect(high, lambda evs: task_events(evs, BURST[1])), BURST[1])[0]
    assert high_queued["status"] == "queued" and high_queued["position"] == 1  # ahead of the earlier, lower one
    assert task_events(collect(low, lambda evs: task_events(evs, BURST[0]), timeout=30), BURST[0])[0]["status"] == "started"
    order = [s.task_id for s in sim.starts]
    assert order == [LONG, BURST[1], BURST[0]]  # priority first, then arrival


def test_queue_timeout_expires_and_never_starts(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    start_daemon(policies_cfg(qrs_certs, sim, broker, tmp_path, max_running=1, queue_timeout=1))
    requester.request({"requestId": "exp-0", "taskId": LONG})
    events = requester.request({"requestId": "exp-1", "taskId": SHORT, "wait": True}, timeout=30)
    statuses = [e["status"] for e in task_events(events, SHORT)]
    assert statuses == ["queued", "expired"]
    assert "queue_timeout" in task_events(events, SHORT)[1]["reason"]
    assert events[-1]["event"] == "requestFinished"
    time.sleep(2.5)  # the long task ended meanwhile: the expired one must still not start
    assert starts_of(sim, SHORT) == []


def test_deadline_sends_one_overdue_then_follows_on(cfg, start_daemon, requester, sim):
    running = start_daemon(cfg)
    events = requester.request({"requestId": "dl-1", "taskId": LONG, "deadline": 0.5, "wait": True}, timeout=30)
    overdue = kinds(events, "taskOverdue")
    assert len(overdue) == 1 and overdue[0]["taskId"] == LONG and overdue[0]["runningForMs"] >= 500
    assert overdue[0]["executionId"] == task_events(events, LONG)[0]["executionId"]
    order = [e["event"] for e in events]
    assert order.index("taskOverdue") < order.index("taskFinished")
    assert b"butler_mqtt_executions_overdue_total 1.0" in running.daemon.runtime.metrics.render()


def test_plain_topic_uses_the_configured_default(qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen):
    cfg = policies_cfg(qrs_certs, sim, broker, tmp_path, if_running="skip")
    start_daemon(cfg)
    requester.request({"requestId": "pl-0", "taskId": LONG})
    replies = listen(cfg.mqtt.topics.reply)
    requester.client.publish(cfg.mqtt.topics.start_plain, LONG.encode(), qos=1)
    assert wait_until(lambda: any(m.get("status") == "skipped" for m in replies.messages), 15), replies.messages
    assert len(starts_of(sim, LONG)) == 1


def test_invalid_policy_fields_are_rejected(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    for bad, word in [({"ifRunning": "wait"}, "ifRunning"), ({"priority": 10}, "priority"),
                      ({"retry": {"attempts": -1}}, "retry.attempts"), ({"deadline": "soon"}, "deadline"),
                      ({"retry": {"attempts": 1, "every": 5}}, "retry.every")]:
        events = requester.request({"taskId": SHORT, **bad})
        assert events[-1]["event"] == "error" and word in events[-1]["details"], events
    assert sim.starts == []


@pytest.mark.parametrize("shape", ["seed", "butler"])
def test_rest_answers_the_first_summary_then_mqtt(qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen, shape):
    import urllib.request

    port = free_port()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", policies={"if_running": "queue"},
                      http={"enabled": True, "port": port})
    start_daemon(cfg)
    requester.request({"requestId": "r-0", "taskId": SHORT})
    replies = listen(cfg.mqtt.topics.reply)
    body = {"taskId": SHORT} if shape == "seed" else [{"type": "starttaskid", "payload": {"taskId": SHORT}}]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v4/reloadtask/-/start", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=15) as resp:
        answer = json.loads(resp.read())
    if shape == "seed":
        assert answer["tasksQueued"][0]["taskId"] == SHORT and answer["totalTasksStarted"] == 0
    else:
        assert answer["tasksNotStarted"][0]["status"] == "queued" and answer["tasksNotStarted"][0]["position"] == 1
    assert wait_until(lambda: any(m.get("status") == "started" for m in replies.messages), 15), replies.messages
    assert len(starts_of(sim, SHORT)) == 2


def test_retry_until_the_attempts_are_used(cfg, start_daemon, requester, sim):
    running = start_daemon(cfg)
    req = {"requestId": "rt-1", "taskId": FAILING, "retry": {"attempts": 2, "delay": 0.3}, "wait": True}
    events = requester.request(req, timeout=30)
    finished = kinds(events, "taskFinished")
    assert [(e["attempt"], e.get("retryIn")) for e in finished] == [(1, 0.3), (2, 0.6), (3, None)]
    assert all(e["status"] == "FinishedFail" for e in finished)
    assert [e["attempt"] for e in task_events(events, FAILING)] == [1, 2, 3]
    assert len({e["executionId"] for e in finished}) == 3 and len(starts_of(sim, FAILING)) == 3
    starts = starts_of(sim, FAILING)
    assert starts[2].at - starts[1].at >= 0.6 > 0  # the delay doubles: 0.3 s, then 0.6 s
    assert events[-1]["event"] == "requestFinished" and events[-1]["finished"] == {"FinishedFail": 1}
    assert b"butler_mqtt_retries_total 2.0" in running.daemon.runtime.metrics.render()


def test_retry_without_wait_reports_each_new_start(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    _, box = requester.send({"requestId": "rt-2", "taskId": FAILING, "retry": {"attempts": 1, "delay": 0.1}})
    events = collect(box, lambda evs: len(task_events(evs, FAILING)) >= 2)
    assert [(e["status"], e["attempt"]) for e in task_events(events, FAILING)] == [("started", 1), ("started", 2)]
    assert kinds(events, "taskFinished") == []  # only with wait


def test_retry_fail_twice_then_succeed(cfg, start_daemon, requester, sim):
    req = {"requestId": "rt-3", "tag": "flaky", "retry": {"attempts": 3, "delay": 0.2}, "wait": True}
    start_daemon(cfg)
    events = requester.request(req, timeout=30)
    finished = kinds(events, "taskFinished")
    assert [(e["attempt"], e["status"], "retryIn" in e) for e in finished] == [
        (1, "FinishedFail", True), (2, "FinishedFail", True), (3, "FinishedSuccess", False)]
    assert len(starts_of(sim, FLAKY)) == 3
    assert events[-1]["finished"] == {"FinishedSuccess": 1}  # final outcomes only


def test_retry_then_waits_for_the_last_attempt(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    req = {"requestId": "rt-4", "tag": "flaky", "retry": {"attempts": 2, "delay": 0.2}, "then": {"taskId": SHORT}}
    events = requester.request(req, timeout=30)
    assert events[-1]["stoppedAtStage"] is None and events[-1]["finished"] == {"FinishedSuccess": 2}
    flaky_last = max(s.at for s in starts_of(sim, FLAKY))
    assert starts_of(sim, SHORT)[0].at > flaky_last + 0.2  # stage 1 only after the successful third attempt


def test_qrs_own_retries_are_followed_to_the_real_end(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "qr-1", "taskId": QRS_RETRIES, "wait": True}, timeout=30)
    finished = kinds(events, "taskFinished")
    assert len(finished) == 1 and finished[0]["status"] == "FinishedSuccess"  # not the first attempt's failure
    assert len(starts_of(sim, QRS_RETRIES)) == 1  # QRS retried inside one execution; we started once


def test_a_task_queued_by_the_qlik_scheduler_counts_as_running(cfg, start_daemon, requester, sim):
    sim.max_concurrent = 1
    start_daemon(cfg)
    requester.request({"requestId": "qs-0", "taskId": LONG})
    first = requester.request({"requestId": "qs-1", "taskId": SHORT})  # sits in Queued (3) at QRS
    events = requester.request({"requestId": "qs-2", "taskId": SHORT, "ifRunning": "attach"})
    ev = task_events(events, SHORT)[0]
    assert ev["status"] == "alreadyRunning" and ev["executionId"] == task_events(first, SHORT)[0]["executionId"]
