"""Failure details wired into the product (contract section 8, issue 22 item 1): through the real
broker, the daemon and the simulator over mTLS. A failed execution's `taskFinished`, its
`reloadFailed` alert and the history carry `failure` with the tail of THAT execution's log;
a failing or hanging log route gives `scriptLogError` without holding up other requests; the
log is read once per execution whatever number of requests follow it."""

from __future__ import annotations

import uuid
from typing import Any

from butler_mqtt.backends.logtail import tail_of
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.sim import SimTask
from butler_mqtt.sim.scriptlog import log_bytes
from tests.conftest import make_config
from tests.support import asyncapi_check
from tests.support.mqtt import wait_until

FAIL = "fa1d0000-0000-4000-8000-000000000001"
OK = "fa1d0000-0000-4000-8000-000000000002"
SLOWFAIL = "fa1d0000-0000-4000-8000-000000000003"
UTF16 = "fa1d0000-0000-4000-8000-000000000004"
BADUTF8 = "fa1d0000-0000-4000-8000-000000000005"
HUGE = "fa1d0000-0000-4000-8000-000000000006"
MESSAGE = "Field 'Amount' not found"
TASKS = [
    SimTask(FAIL, "Failing load", tags=["failing"], run_seconds=0.2, outcome="fail", failure_message=MESSAGE,
            log_lines=150),
    SimTask(OK, "Fine load", tags=["fine"], run_seconds=0.1),
    SimTask(SLOWFAIL, "Slow failing load", tags=["slowfail"], run_seconds=1.5, outcome="fail"),
    SimTask(UTF16, "UTF-16 log", tags=["odd"], run_seconds=0.1, outcome="fail", log_encoding="utf-16-le"),
    SimTask(BADUTF8, "Bad bytes log", tags=["odd"], run_seconds=0.1, outcome="fail", log_encoding="invalid-utf-8"),
    SimTask(HUGE, "Huge log", tags=["huge"], run_seconds=0.1, outcome="fail", log_bytes=200 * 1024 * 1024),
]


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def expected_tail(cfg: Any, sim: Any, task_id: str, eid: str, lines: int) -> list[str]:
    """The last `lines` lines of the log of execution `eid`, as the simulator wrote it."""
    client = QrsClient(cfg.qrs)
    try:
        rows = [r for r in client.execution_results([eid]) if r.get("status") not in (2, 3, 4, 5)]
    finally:
        client.close()
    spec = sim.store.log_of_result(task_id, rows[-1]["id"])
    assert spec is not None
    return tail_of(log_bytes(spec), lines)


def log_reads(sim: Any) -> int:
    return sum(1 for r in sim.request_log if r.path.endswith(("/scriptlogfile", "/scriptlog")))


def test_failed_reload_carries_the_tail_of_that_execution(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = requester.request({"requestId": "f1", "tag": ["failing", "fine"], "wait": True}, timeout=60)
    finished = {e["taskId"]: e for e in kinds(events, "taskFinished")}
    assert "failure" not in finished[OK]  # success costs nothing and says nothing
    fail = finished[FAIL]
    assert fail["status"] == "FinishedFail"
    failure = fail["failure"]
    assert failure["message"] == MESSAGE
    assert failure["details"][-1] == "Changing task state from Started to FinishedFail"
    assert failure["scriptLogTail"] == expected_tail(cfg, sim, FAIL, fail["executionId"], 40)
    assert len(failure["scriptLogTail"]) == 40 and "scriptLogError" not in failure
    assert asyncapi_check.problem(fail) is None
    assert log_reads(sim) == 1  # the success's log was never asked for


def test_each_attempt_of_a_retried_task_gets_its_own_tail(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    req = {"requestId": "f2", "taskId": FAIL, "wait": True, "retry": {"attempts": 1, "delay": 0.2}}
    finished = kinds(requester.request(req, timeout=60), "taskFinished")
    assert [e["attempt"] for e in finished] == [1, 2]
    one, two = (e["failure"]["scriptLogTail"] for e in finished)
    assert one != two
    assert one == expected_tail(cfg, sim, FAIL, finished[0]["executionId"], 40)
    assert two == expected_tail(cfg, sim, FAIL, finished[1]["executionId"], 40)


def test_zero_lines_reads_no_log(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", tracking={"script_log_lines": 0})
    start_daemon(cfg)
    fail = kinds(requester.request({"requestId": "f3", "taskId": FAIL, "wait": True}, timeout=60), "taskFinished")[0]
    assert set(fail["failure"]) == {"message", "details"} and fail["failure"]["message"] == MESSAGE
    assert log_reads(sim) == 0


def test_a_failing_log_route_gives_script_log_error(cfg, start_daemon, requester, sim):
    sim.store.file_references = False  # no older route to fall back to
    sim.log_faults["scriptlogfile"] = "500"
    d = start_daemon(cfg)
    fail = kinds(requester.request({"requestId": "f4", "taskId": FAIL, "wait": True}, timeout=60), "taskFinished")[0]
    assert fail["failure"]["message"] == MESSAGE and "scriptLogTail" not in fail["failure"]
    assert "scriptlogfile: QRS answered 500" in fail["failure"]["scriptLogError"]
    assert "butler_mqtt_script_log_failures_total 1.0" in d.daemon.runtime.metrics.render().decode()


def test_a_hanging_log_route_holds_up_no_other_request(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    """While one failure's log download hangs, another request is answered in full (its start,
    its summary and its own taskFinished); the hanging one ends at the deadline with scriptLogError."""
    sim.log_faults["download"] = "hang"
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", tracking={"script_log_deadline": 8})
    start_daemon(cfg)
    order: list[str] = []
    _, hung = requester.send({"requestId": "hung", "taskId": FAIL, "wait": True})
    assert hung.get(timeout=30)["event"] == "task"
    assert wait_until(lambda: any("/download/" in r.path for r in sim.request_log), 30)  # it hangs now
    events = requester.request({"requestId": "other", "tag": "fine", "wait": True}, timeout=30)
    order.append("other done")
    assert kinds(events, "taskFinished")[0]["status"] == "FinishedSuccess"
    while True:
        hung_ev = hung.get(timeout=30)
        if hung_ev["event"] == "taskFinished":
            break
    order.append("hung done")
    assert order == ["other done", "hung done"]
    assert hung_ev["failure"]["message"] == MESSAGE
    assert "within 8 s" in hung_ev["failure"]["scriptLogError"]


def test_one_read_serves_every_request_following_the_execution(cfg, start_daemon, requester, sim):
    """Two requests follow the same failing execution (ifRunning attach): one log read."""
    d = start_daemon(cfg)
    _, first = requester.send({"requestId": "a1", "taskId": SLOWFAIL, "wait": True})
    started = first.get(timeout=30)
    assert started["status"] == "started"
    second = requester.request({"requestId": "a2", "taskId": SLOWFAIL, "wait": True, "ifRunning": "attach"}, timeout=60)
    attached = kinds(second, "taskFinished")[0]
    ev = first.get(timeout=30)
    while ev["event"] != "taskFinished":
        ev = first.get(timeout=30)
    assert attached["executionId"] == ev["executionId"] == started["executionId"]
    assert attached["failure"] == ev["failure"] and ev["failure"]["scriptLogTail"]
    assert log_reads(sim) == 1
    assert d.daemon.runtime.tracker.failures.reads == 1


def test_the_alert_and_the_history_carry_the_failure(qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen):
    topic = f"test/alerts/{uuid.uuid4().hex[:8]}"
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", alerts={"topic": topic})
    on_topic = listen(topic)
    d = start_daemon(cfg)
    fail = kinds(requester.request({"requestId": "f5", "taskId": FAIL, "wait": True}, timeout=60), "taskFinished")[0]
    alert = on_topic.wait_for(lambda m: m["alert"] == "reloadFailed")
    assert alert["failure"] == fail["failure"] and alert["failure"]["message"] == MESSAGE
    assert asyncapi_check.problem(alert) is None
    recorded = d.daemon.runtime.journal.load(cfg_key("f5"))
    assert recorded is not None
    kept = [e for e in recorded.replies if e.get("event") == "taskFinished"]
    assert kept and kept[0]["failure"] == fail["failure"]


def cfg_key(request_id: str) -> str:
    from butler_mqtt import keys

    return keys.for_request_id(request_id)


def test_the_history_shows_the_failure(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    """`GET /v4/requests` and `butler-mqtt history` (both read_history) carry the failure."""
    import requests

    from butler_mqtt import history as history_cli
    from butler_mqtt.journal.history import HistoryQuery

    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0})
    d = start_daemon(cfg)
    fail = kinds(requester.request({"requestId": "h1", "taskId": FAIL, "wait": True}, timeout=60), "taskFinished")[0]
    page = requests.get(f"http://127.0.0.1:{d.daemon.http_server.port}/v4/requests?requestId=h1", timeout=10).json()
    task = page["requests"][0]["tasks"][0]
    assert task["finalStatus"] == "FinishedFail" and task["failure"] == fail["failure"]
    records = d.daemon.runtime.journal.history(HistoryQuery(request_id="h1"))
    assert MESSAGE in history_cli.table(records, with_tasks=True)


def test_hostile_logs_through_the_daemon(cfg, start_daemon, requester, sim):
    """A UTF-16 log and a log of invalid UTF-8 give valid UTF-8 tails; a 200 MB log gives its
    tail (streamed, only the tail kept: the memory bound itself is tested on the reader)."""
    start_daemon(cfg)
    events = requester.request({"requestId": "odd", "tag": ["odd", "huge"], "wait": True}, timeout=120)
    finished = {e["taskId"]: e for e in kinds(events, "taskFinished")}
    for task in (UTF16, BADUTF8, HUGE):
        tail = finished[task]["failure"]["scriptLogTail"]
        assert len(tail) == 40 and tail == expected_tail(cfg, sim, task, finished[task]["executionId"], 40)
        assert all(line.encode("utf-8").decode("utf-8") == line for line in tail)
        assert asyncapi_check.problem(finished[task]) is None


def test_a_garbage_log_route_gives_script_log_error(cfg, start_daemon, requester, sim):
    sim.store.file_references = False
    sim.log_faults["scriptlogfile"] = "garbage"
    start_daemon(cfg)
    fail = kinds(requester.request({"requestId": "g", "taskId": FAIL, "wait": True}, timeout=60), "taskFinished")[0]
    assert fail["failure"]["message"] == MESSAGE and "scriptLogTail" not in fail["failure"]
    assert fail["failure"]["scriptLogError"].startswith("script log not read: scriptlogfile:")
