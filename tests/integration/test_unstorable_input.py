"""Issue 20, class 1: text the journal cannot store is a bad request, never a transient failure.

Through a real Mosquitto, the simulator over mTLS and a real PostgreSQL journal: requests whose
`requestId` holds U+0000 (PostgreSQL text cannot) are each answered with an `error` and acked;
more of them than there are workers do not wedge the daemon, and a valid request sent after
them is answered and started, also after a restart. No timing assertions.
"""

from __future__ import annotations

import queue
import uuid
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.conftest import make_config

VALID = "d0000020-0000-4000-8000-000000000001"
TASKS = [SimTask(VALID, "After the NULs", run_seconds=0.05)]
WORKERS = 4
BAD = WORKERS * 5 + 1  # far more than every worker


def _first(box: queue.Queue[dict[str, Any]], event: str, timeout: float = 30.0) -> dict[str, Any]:
    while True:
        ev = box.get(timeout=timeout)
        if ev.get("event") == event:
            return ev
        if ev.get("event") == "error":
            raise AssertionError(f"error instead of {event}: {ev}")


@pytest.fixture(params=["postgresql", "sqlite"])
def journal_url(request: pytest.FixtureRequest) -> str | None:
    """PostgreSQL cannot store U+0000; SQLite can, and refuses it all the same (one rule)."""
    return request.getfixturevalue("fresh_pg") if request.param == "postgresql" else None


def _config(qrs_certs: Path, sim: Any, broker: Any, tmp_path: Path, pg: str | None, client_id: str) -> Any:
    base = f"unstorable/{client_id}"
    topics = {"start": f"{base}/start", "start_plain": f"{base}/plain", "reply": f"{base}/reply", "status": f"{base}/status"}
    return make_config(
        qrs_certs, sim.port, broker, tmp_path / "state",
        mqtt={"client_id": client_id, "workers": WORKERS, "topics": topics},
        journal={"url": pg},
    )


def test_nul_request_ids_are_answered_and_do_not_wedge_a_postgresql_daemon(qrs_certs, sim, broker, tmp_path, journal_url, start_daemon):
    client_id = f"nul-{uuid.uuid4().hex[:8]}"
    cfg = _config(qrs_certs, sim, broker, tmp_path, journal_url, client_id)
    first = start_daemon(cfg)
    with Requester(cfg.mqtt) as r:
        boxes = [r.send({"requestId": f"bad\u0000{n}", "taskId": VALID})[1] for n in range(BAD)]
        for box in boxes:
            ev = box.get(timeout=30)
            assert ev["event"] == "error", ev
            assert ev["error"] == "Invalid request" and "U+0000" in ev["details"], ev
        _, box = r.send({"requestId": f"good-{client_id}", "taskId": VALID})
        assert _first(box, "task")["status"] == "started"
        assert _first(box, "summary")["totalTasksStarted"] == 1
    first.stop()
    assert [s.task_id for s in sim.starts] == [VALID]

    second = start_daemon(cfg)  # nothing of the NUL requests is left to be redelivered
    with Requester(cfg.mqtt) as r:
        _, box = r.send({"requestId": f"after-restart-{client_id}", "taskId": VALID})
        ev = _first(box, "task")
        assert ev["status"] == "started", ev
    second.stop()
    assert ev["executionId"] in [s.execution_id for s in sim.starts]
    assert first.daemon.listener.unacked == 0 and second.daemon.listener.unacked == 0


def test_rest_refuses_text_the_journal_cannot_store(qrs_certs, sim, broker, tmp_path, fresh_pg, start_daemon):
    import requests

    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0}, journal={"url": fresh_pg})
    d = start_daemon(cfg)
    base = f"http://127.0.0.1:{d.daemon.http_server.port}"
    for body in ({"requestId": "a\u0000b"}, {"requestId": "ok", "tag": "x\u0000"}, [{"type": "starttasktag", "payload": {"tag": "x\u0000"}}]):
        answer = requests.post(f"{base}/v4/reloadtask/{VALID}/start", json=body, timeout=30)
        assert answer.status_code == 400, (body, answer.text)
        assert "U+0000" in answer.json()["details"] or "control character" in answer.json()["details"]
    for value in ("\u0000", "a\u0000"):
        bad = requests.get(f"{base}/v4/requests", params={"requestId": value}, timeout=30)
        assert bad.status_code == 400 and "requestId" in bad.json()["details"] and "U+0000" in bad.json()["details"]
    assert requests.post(f"{base}/v4/reloadtask/{VALID}/start", json={"requestId": "fine"}, timeout=30).json()["totalTasksStarted"] == 1
    assert sim.starts and len(sim.starts) == 1
