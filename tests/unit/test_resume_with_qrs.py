"""Crash resume against a stand-in QRS transport (no TLS, no server): an uncertain start is
looked up in QRS, in QRS's clock, and never sent twice."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.transport import Answer, MockTransport
from butler_mqtt.config import Config
from butler_mqtt.journal import Prior
from butler_mqtt.model import StartRequest
from butler_mqtt.resume import intent_key
from butler_mqtt.service import StartService

T1 = "11111111-1111-4111-8111-111111111111"
E1 = "e1e1e1e1-0000-4000-8000-000000000001"
SKEW = -300.0  # QRS's clock is 5 minutes behind ours


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"


class FakeQrs:
    """Answers like QRS: one task; its executions, created in QRS's clock."""

    def __init__(self, ran_at: float | None) -> None:
        self.ran_at = ran_at  # QRS time of an execution of T1, if any
        self.starts = 0

    def __call__(self, method: str, path: str, params: dict[str, str], _body: Any) -> Answer:
        date = formatdate(time.time() + SKEW, usegmt=True)
        if path == "/qrs/reloadtask/full":
            return Answer(200, b'[{"id": "%s", "name": "Load", "tags": [], "customProperties": []}]' % T1.encode(), date)
        if path == "/qrs/executionresult/full":
            since = params["filter"].split("createdDate ge '")[1].rstrip("'")
            rows = [] if self.ran_at is None or iso(self.ran_at) < since else [
                {"executionID": E1, "taskID": T1, "createdDate": iso(self.ran_at)}
            ]
            import json

            return Answer(200, json.dumps(rows).encode(), date)
        if path.endswith("/start/synchronous") and method == "POST":
            self.starts += 1
            return Answer(201, b'{"value": "e2e2e2e2-0000-4000-8000-000000000002"}', date)
        return Answer(404, b"", date)


def service(fake: FakeQrs) -> StartService:
    cfg = Config()
    return StartService(cfg, QrsBackend(QrsClient(cfg.qrs, transport=MockTransport(fake))))


def resume(fake: FakeQrs, sent_at: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    prior = Prior(state="open", intents={intent_key(T1, None): sent_at})
    service(fake).run_stage(StartRequest(taskId=[T1]), "r", events.append, None, "id:r", prior)
    return events


def test_a_start_that_arrived_is_confirmed_not_repeated_despite_the_skew():
    sent = time.time() - 10  # our clock; QRS recorded the execution 5 min "earlier" in its own
    fake = FakeQrs(ran_at=sent + SKEW + 0.5)
    [task, summary] = resume(fake, sent)
    assert task["status"] == "started" and task["executionId"] == E1 and "confirmed from QRS" in task["reason"]
    assert fake.starts == 0 and summary["totalTasksStarted"] == 1


def test_a_start_that_never_arrived_is_sent_now_once():
    fake = FakeQrs(ran_at=None)
    [task, _summary] = resume(fake, time.time() - 10)
    assert task["status"] == "started" and fake.starts == 1


def test_an_older_execution_is_not_mistaken_for_ours():
    sent = time.time() - 10
    fake = FakeQrs(ran_at=sent + SKEW - 60)  # a run a minute before our start (QRS time)
    resume(fake, sent)
    assert fake.starts == 1


def retry_service(fake: FakeQrs, tmp_path: Any) -> tuple[StartService, Any]:
    from butler_mqtt.journal import Journal

    cfg = Config()
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.begin("id:r", "mqtt")
    journal.finish("id:r", [])
    return StartService(cfg, QrsBackend(QrsClient(cfg.qrs, transport=MockTransport(fake))), journal), journal


def start_retry(service: StartService, attempt: int = 2) -> tuple[Any, list[dict[str, Any]]]:
    from butler_mqtt.admission import Ticket
    from butler_mqtt.model import Match, Route
    from butler_mqtt.policies import Policy

    events: list[dict[str, Any]] = []
    o, _queued = service.start_task_again(T1, [Match("taskId", T1)], Policy(), Ticket("id:r", "r", None, Route("t"), attempt),
                                          events.append)
    return o, events


def test_a_retry_whose_answer_was_recorded_is_reported_not_started_again(tmp_path):
    fake = FakeQrs(ran_at=None)
    service, journal = retry_service(fake, tmp_path)
    journal.reply("id:r", {"event": "task", "requestId": "r", "taskId": T1, "taskName": "Load", "status": "started",
                           "executionId": E1, "matchedBy": [f"taskId:{T1}"], "attempt": 1})
    o, _ = start_retry(service)
    assert fake.starts == 1 and o.execution_id != E1  # attempt 1's record is not attempt 2's
    journal.reply("id:r", {"event": "task", "requestId": "r", "taskId": T1, "taskName": "Load", "status": "started",
                           "executionId": o.execution_id, "matchedBy": [f"taskId:{T1}"], "attempt": 2})
    again, events = start_retry(service)  # attempt 2 again (a crash before the tracker noted it)
    assert fake.starts == 1 and again.execution_id == o.execution_id and events[0]["attempt"] == 2


def test_a_retry_claimed_but_unanswered_is_looked_up_in_qrs_not_sent_again(tmp_path):
    fake = FakeQrs(ran_at=None)
    service, journal = retry_service(fake, tmp_path)
    journal.intents("id:r", [intent_key(T1, None, 2)])  # claimed now; the start reached QRS just after
    fake.ran_at = time.time() + SKEW + 0.5
    o, events = start_retry(service)
    assert fake.starts == 0 and o.status == "started" and o.execution_id == E1
    assert [e["status"] for e in events] == ["started"]
    assert intent_key(T1, None, 2) == f"{T1}#2" and intent_key(T1, 1, 1) == f"1/{T1}"
