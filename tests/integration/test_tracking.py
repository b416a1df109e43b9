"""wait / then: taskFinished per execution, chains, requestFinished, restarts, polling cost."""

from __future__ import annotations

from butler_mqtt.sim import SimTask

A1 = "a1111111-1111-4111-8111-111111111111"
A2 = "a2222222-2222-4222-8222-222222222222"
B1 = "b1111111-1111-4111-8111-111111111111"
C1 = "c1111111-1111-4111-8111-111111111111"
F1 = "f1111111-1111-4111-8111-111111111111"
D1 = "d1111111-1111-4111-8111-111111111111"
SLOW = "e1111111-1111-4111-8111-111111111111"

TASKS = [
    SimTask(A1, "ERP load A", tags=["erp"], run_seconds=0.3),
    SimTask(A2, "ERP load B", tags=["erp"], run_seconds=0.5),
    SimTask(B1, "Finance app", tags=["finance"], run_seconds=0.3),
    SimTask(C1, "Report distributor", tags=["distribution"], run_seconds=0.2),
    SimTask(F1, "Failing load", tags=["failing"], run_seconds=0.2, outcome="fail"),
    SimTask(D1, "Disabled", tags=["erp-disabled"], enabled=False),
    SimTask(SLOW, "Slow", tags=["slow"], run_seconds=3.0),
] + [SimTask(f"0000aaaa-0000-4000-8000-{i:012d}", f"Bulk {i}", tags=["bulk"], run_seconds=1.5) for i in range(50)]


def kinds(events, kind):
    return [e for e in events if e["event"] == kind]


def test_wait_reports_each_final_state_then_request_finished(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "w1", "tag": ["erp", "failing", "erp-disabled"], "wait": True}, timeout=60)
    finished = {e["taskId"]: e for e in kinds(events, "taskFinished")}
    assert set(finished) == {A1, A2, F1}  # the disabled task is notStarted: nothing to wait for
    assert finished[A1]["status"] == "FinishedSuccess" and finished[F1]["status"] == "FinishedFail"
    for ev in finished.values():
        assert ev["startTime"] and ev["stopTime"] and ev["durationMs"] >= 0
        assert ev["executionId"] in {s.execution_id for s in sim.starts}
    last = events[-1]
    assert last["event"] == "requestFinished" and last["requestId"] == "w1"
    assert last["finished"] == {"FinishedSuccess": 2, "FinishedFail": 1}
    assert last["stoppedAtStage"] is None and last["durationMs"] > 0
    # Order: every task event and the summary before any taskFinished.
    order = [e["event"] for e in events]
    assert order.index("summary") < order.index("taskFinished")


def test_three_stage_chain(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    req = {"requestId": "chain-1", "tag": "erp", "then": {"tag": "finance", "then": {"taskId": C1}}}
    events = requester.request(req, timeout=60)
    stages = {(e["event"], e.get("taskId")): e.get("stage") for e in events if e["event"] in ("task", "taskFinished")}
    assert stages[("task", A1)] == 0 and stages[("task", B1)] == 1 and stages[("taskFinished", C1)] == 2
    assert [e["stage"] for e in kinds(events, "summary")] == [0, 1, 2]
    assert events[-1]["finished"] == {"FinishedSuccess": 4} and events[-1]["stoppedAtStage"] is None
    starts = {s.task_id: s.at for s in sim.starts}
    # A stage starts only after every task of the previous one finished (A2 runs 0.5 s).
    assert starts[B1] >= starts[A2] + 0.5
    assert starts[C1] >= starts[B1] + 0.3


def test_chain_stopped_by_failing_stage(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "chain-2", "tag": ["erp", "failing"], "then": {"tag": "finance"}}, timeout=60)
    last = events[-1]
    assert last["event"] == "requestFinished" and last["stoppedAtStage"] == 0
    assert "Failing load" in last["reason"] and "FinishedFail" in last["reason"]
    assert B1 not in {s.task_id for s in sim.starts}


def test_chain_on_failure_continue(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    req = {"requestId": "chain-3", "tag": "failing", "onFailure": "continue", "then": {"tag": "finance"}}
    events = requester.request(req, timeout=60)
    assert events[-1]["finished"] == {"FinishedFail": 1, "FinishedSuccess": 1}
    assert B1 in {s.task_id for s in sim.starts}


def test_stage_with_disabled_task_stops_the_chain(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "chain-4", "tag": "erp-disabled", "then": {"tag": "finance"}}, timeout=60)
    assert events[-1]["stoppedAtStage"] == 0 and "notStarted" in events[-1]["reason"]
    assert kinds(events, "taskFinished") == []


def test_max_wait_reports_unknown(cfg, start_daemon, requester, sim):
    cfg.tracking.max_wait = 0.5
    start_daemon(cfg)
    events = requester.request({"requestId": "slow-1", "tag": "slow", "wait": True}, timeout=60)
    [fin] = kinds(events, "taskFinished")
    assert fin["status"] == "Unknown" and "max_wait" in fin["reason"]
    assert events[-1]["finished"] == {"Unknown": 1}


def test_restart_while_a_chain_waits(cfg, start_daemon, requester, sim):
    first = start_daemon(cfg)
    token, box = requester.send({"requestId": "chain-r", "tag": "slow", "then": {"tag": "finance"}})
    summary = box.get(timeout=20)
    while summary["event"] != "summary":
        summary = box.get(timeout=20)
    first.stop()  # stage 0 (3 s) still running
    start_daemon(cfg)  # same client id and journal: picks the chain up again
    events = []
    while not events or events[-1]["event"] != "requestFinished":
        events.append(box.get(timeout=30))
    assert [e["taskId"] for e in kinds(events, "taskFinished")] == [SLOW, B1]
    assert events[-1]["finished"] == {"FinishedSuccess": 2}
    assert sorted(s.task_id for s in sim.starts) == sorted([SLOW, B1])  # nothing started twice


def test_fifty_executions_cost_one_query_per_poll(cfg, start_daemon, requester, sim):
    cfg.tracking.poll_interval = 0.4
    running = start_daemon(cfg)
    sim.clear_log()
    events = requester.request({"requestId": "bulk", "tag": "bulk", "wait": True}, timeout=60)
    assert len(kinds(events, "taskFinished")) == 50
    polls = [r for r in sim.request_log if r.path.startswith("/qrs/executionresult")]
    assert len(polls) == running.daemon.runtime.tracker.polls >= 2
    ids = {s.execution_id for s in sim.starts}
    # The first poll asked for all 50 executions in one filter.
    assert sum(1 for e in ids if e in polls[0].query["filter"]) == 50
    assert not [r for r in sim.request_log if r.path.startswith("/qrs/executionsession")]
