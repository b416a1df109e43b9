"""Run policies of contract section 8 through the real broker, the daemon and the simulator:
`ifRunning: restart` (stop, wait for the end, start once; a later request joins) and
`onDeadline: stop` (stopped at the deadline, taskOverdue action stopped, Aborted, not retried)."""

from __future__ import annotations

from typing import Any

from butler_mqtt.sim import SimTask
from tests.support import asyncapi_check

LONG = "5a0c0000-0000-4000-8000-000000000001"
SHORT = "5a0c0000-0000-4000-8000-000000000002"
TASKS = [
    SimTask(LONG, "Long", tags=["long"], run_seconds=8),
    SimTask(SHORT, "Short", tags=["short"], run_seconds=0.2),
]


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def collect(box: Any, end: str = "requestFinished", timeout: float = 60) -> list[dict[str, Any]]:
    events = [box.get(timeout=timeout)]
    while events[-1]["event"] not in (end, "error"):
        events.append(box.get(timeout=timeout))
    for ev in events:
        assert asyncapi_check.problem(ev) is None, ev
    return events


def test_restart_stops_then_starts_once_and_a_later_request_joins(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    first = kinds(requester.request({"requestId": "run", "taskId": LONG}, timeout=30), "task")[0]
    assert first["status"] == "started"
    _, a = requester.send({"requestId": "re-a", "taskId": LONG, "ifRunning": "restart", "wait": True})
    _, b = requester.send({"requestId": "re-b", "taskId": LONG, "ifRunning": "restart", "wait": True})
    ea, eb = collect(a), collect(b)
    for events in (ea, eb):
        statuses = [e["status"] for e in kinds(events, "task")]
        assert statuses[0] == "stopping" and statuses[-1] == "started", statuses
        assert kinds(events, "task")[0]["executionId"] == first["executionId"]
    restarted = {kinds(e, "task")[-1]["executionId"] for e in (ea, eb)}
    assert len(restarted) == 1 and first["executionId"] not in restarted  # one new start for both
    assert [s.task_id for s in sim.starts] == [LONG, LONG]  # exactly one new start
    assert len(sim.stop_requests) == 1  # one stop for both requests


def test_deadline_stop_is_not_retried(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    req = {"requestId": "dl", "taskId": LONG, "wait": True, "deadline": 1, "onDeadline": "stop",
           "retry": {"attempts": 2, "delay": 0.1}}
    events = requester.request(req, timeout=60)
    overdue = kinds(events, "taskOverdue")
    assert len(overdue) == 1 and overdue[0]["action"] == "stopped"
    finished = kinds(events, "taskFinished")
    assert [(e["status"], e.get("retryIn")) for e in finished] == [("Aborted", None)]
    assert events[-1]["finished"] == {"Aborted": 1}
    assert len(sim.starts) == 1 and len(sim.stop_requests) == 1
    for ev in events:
        assert asyncapi_check.problem(ev) is None, ev


def test_deadline_notify_by_default_does_not_stop(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "dn", "taskId": SHORT, "wait": True, "deadline": 0.05}, timeout=60)
    assert all("action" not in e for e in kinds(events, "taskOverdue"))
    assert sim.stop_requests == []


def test_a_restart_survives_a_daemon_restart(cfg, start_daemon, requester, sim):
    """The restart's rerun waits in the durable queue: the next run of the daemon starts it once
    the stopped execution ended; exactly one new start."""
    first = start_daemon(cfg)
    running = kinds(requester.request({"requestId": "run2", "taskId": LONG}, timeout=30), "task")[0]
    _, box = requester.send({"requestId": "re-r", "taskId": LONG, "ifRunning": "restart", "wait": True})
    events = [box.get(timeout=30)]
    while events[-1]["event"] != "summary":
        events.append(box.get(timeout=30))
    assert [e["status"] for e in kinds(events, "task")] == ["stopping", "queued"]
    first.stop()
    start_daemon(cfg)
    events += collect(box)
    started = [e for e in kinds(events, "task") if e["status"] == "started"]
    assert len(started) == 1 and started[0]["executionId"] != running["executionId"]
    assert [s.task_id for s in sim.starts] == [LONG, LONG] and len(sim.stop_requests) == 1
