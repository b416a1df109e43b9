"""Issue 11, class 6: "did my start arrive?" is asked in QRS's clock, not the daemon's.

The simulator's clock (its execution timestamps and its `Date` header) is skewed against the
daemon's: -300 s and -5 s (the daemon's clock ahead of QRS) and +300 s (behind). In each case:

* a start that reached QRS but whose answer was lost in a crash (start intent recorded, no
  outcome) is found in QRS after the restart: reported `started` with its execution, never
  started again;
* a start that never reached QRS before the crash is started after the restart, even though an
  earlier run of the task exists (which a skewed "since" would mistake for this start);
* a start answered too late (after `qrs.timeout`) is found in QRS, not reported `failed`.

The crash is produced as in tests/integration/test_recovery.py: the journal is left the way a
daemon killed between recording the intent and recording QRS's answer leaves it, then a fresh
daemon (with a QRS client that has learned nothing yet) handles the redelivered request.
No timing assertions: only waits with generous limits.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt import keys
from butler_mqtt.journal import Journal
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import Inbox, Sender, idle, wait_until

X = "c10c0006-0000-4000-8000-000000000001"
TASKS = [SimTask(X, "Clock task", run_seconds=0.2)]

SKEWS = pytest.mark.parametrize("skew", [-300.0, 300.0, -5.0], ids=["daemon-ahead-300s", "daemon-behind-300s", "daemon-ahead-5s"])


def _config(qrs_certs: Path, sim: Any, broker: Any, tmp_path: Path, **sections: Any) -> Any:
    base = f"clock/{uuid.uuid4().hex[:8]}"
    topics = {"start": f"{base}/start", "start_plain": None, "reply": f"{base}/reply", "status": f"{base}/status"}
    return make_config(qrs_certs, sim.port, broker, tmp_path / "state", mqtt={"topics": topics}, **sections)


def _crashed_run(cfg: Any, request_id: str, *, start_reached_qrs: bool, sim: Any) -> None:
    """The journal as a daemon killed after sending X's start (and before its answer) left it."""
    j = Journal.from_config(cfg.state_dir, None, cfg.journal.retention_hours, owner=cfg.mqtt.effective_client_id())
    try:
        key = keys.for_request_id(request_id)
        assert j.begin(key, "mqtt") is None
        j.intents(key, [X])  # recorded in the daemon's clock
        if start_reached_qrs:
            sim.store.start(X)  # created in QRS's clock
    finally:
        j.close()


def _task_events(inbox: Inbox, rid: str) -> list[dict[str, Any]]:
    return [r.event for r in inbox.select(lambda r: r.event.get("requestId") == rid and r.event.get("event") == "task")]


@SKEWS
def test_a_start_whose_answer_was_lost_in_a_crash_is_not_started_again(skew, qrs_certs, sim, broker, tmp_path, start_daemon):
    sim.clock_skew = skew
    cfg = _config(qrs_certs, sim, broker, tmp_path)
    _crashed_run(cfg, "lost-answer", start_reached_qrs=True, sim=sim)
    assert len(sim.starts) == 1
    # The run has ended: a second start would run the task again (not join the running one).
    assert wait_until(lambda: sim.store.clock() - sim.starts[0].at > 0.5, 10)
    running = start_daemon(cfg)
    inbox = Inbox(broker.port, cfg.mqtt.topics.reply)
    sender = Sender(broker.port, cfg.mqtt.topics.start)
    try:
        sender.send({"requestId": "lost-answer", "taskId": X}, confirm=True)  # the broker's redelivery
        final = inbox.wait_final(lambda r: r.event.get("requestId") == "lost-answer", 30)
        assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
        (task_ev,) = _task_events(inbox, "lost-answer")
        assert task_ev["status"] == "started", task_ev
        assert task_ev["executionId"] == sim.starts[0].execution_id, task_ev
        assert len(sim.starts) == 1, "started again after the restart"
        # Sent once more: the journal's outcome, still one start.
        sender.send({"requestId": "lost-answer", "taskId": X}, confirm=True)
        assert inbox.wait_count(lambda r: r.event.get("requestId") == "lost-answer" and r.event["event"] == "summary", 2, 30) == 2
        assert wait_until(lambda: idle(running.daemon), 30)
        assert len(sim.starts) == 1
    finally:
        sender.close()
        inbox.close()


@SKEWS
def test_a_start_that_never_reached_qrs_is_started_despite_an_earlier_run(skew, qrs_certs, sim, broker, tmp_path, start_daemon):
    # An earlier run of X, created 20 s before the crash in QRS's clock and long finished (0.2 s).
    sim.clock_skew = skew - 20
    early = sim.store.start(X)
    sim.clock_skew = skew
    cfg = _config(qrs_certs, sim, broker, tmp_path)
    _crashed_run(cfg, "never-sent", start_reached_qrs=False, sim=sim)
    running = start_daemon(cfg)
    inbox = Inbox(broker.port, cfg.mqtt.topics.reply)
    sender = Sender(broker.port, cfg.mqtt.topics.start)
    try:
        sender.send({"requestId": "never-sent", "taskId": X}, confirm=True)
        final = inbox.wait_final(lambda r: r.event.get("requestId") == "never-sent", 30)
        assert final.event["event"] == "summary", final.event
        (task_ev,) = _task_events(inbox, "never-sent")
        assert task_ev["status"] == "started", task_ev
        assert task_ev["executionId"] != early.execution_id, "the earlier run was taken for this start"
        assert [s.task_id for s in sim.starts] == [X, X], "the start lost in the crash was not made"
        assert task_ev["executionId"] == sim.starts[1].execution_id
        assert wait_until(lambda: idle(running.daemon), 30)
    finally:
        sender.close()
        inbox.close()


@SKEWS
def test_a_start_answered_too_late_is_found_in_qrs_not_reported_failed(skew, qrs_certs, sim, broker, tmp_path, start_daemon):
    sim.clock_skew = skew
    cfg = _config(qrs_certs, sim, broker, tmp_path, qrs={"timeout": 1, "retries": 1})
    running = start_daemon(cfg)
    original = sim.store.start

    def start_then_stall(task_id: str) -> Any:
        outcome = original(task_id)
        sim._stopping.wait(2.5)  # the execution exists; its answer comes after qrs.timeout
        return outcome

    sim.store.start = start_then_stall
    inbox = Inbox(broker.port, cfg.mqtt.topics.reply)
    sender = Sender(broker.port, cfg.mqtt.topics.start)
    try:
        sender.send({"requestId": "late", "taskId": X}, confirm=True)
        final = inbox.wait_final(lambda r: r.event.get("requestId") == "late", 30)
        (task_ev,) = _task_events(inbox, "late")
        assert task_ev["status"] == "started", task_ev
        assert task_ev["executionId"] == sim.starts[0].execution_id
        assert final.event["totalTasksStarted"] == 1 and final.event["tasksFailed"] == [], final.event
        assert [s.task_id for s in sim.starts] == [X]
        # After a restart of the daemon the same request is replayed, not started again.
        running.stop()
        again = start_daemon(cfg)
        sender.send({"requestId": "late", "taskId": X}, confirm=True)
        assert inbox.wait_count(lambda r: r.event.get("requestId") == "late" and r.event["event"] == "summary", 2, 30) == 2
        assert wait_until(lambda: idle(again.daemon), 30)
        assert [s.task_id for s in sim.starts] == [X]
    finally:
        sender.close()
        inbox.close()
