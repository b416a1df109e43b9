"""The backend seam (backends/base.py): the QRS backend answers the protocol's questions with
the same QRS calls as before, in the protocol's words (contract names, opaque ids)."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from butler_mqtt import replies
from butler_mqtt.backends.base import Backend, NotSupported, StartOptions
from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.transport import Answer, MockTransport
from butler_mqtt.config import Config
from butler_mqtt.model import Match, QrsTask, StartRequest, TaskOutcome, matches

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
E1 = "e1e1e1e1-0000-4000-8000-000000000001"
E2 = "e2e2e2e2-0000-4000-8000-000000000002"
R1 = "a1a1a1a1-0000-4000-8000-00000000000a"


def backend(rows: dict[str, Any]) -> tuple[Backend, MockTransport]:
    def answer(method: str, path: str, params: dict[str, str], _body: Any) -> Answer:
        return Answer(200, json.dumps(rows.get(path, [])).encode())

    transport = MockTransport(answer)
    return QrsBackend(QrsClient(Config().qrs, transport=transport)), transport


def test_tasks_are_resolved_in_one_query_with_their_running_state():
    b, t = backend({"/qrs/reloadtask/full": [
        {"id": T1, "name": "Load", "tags": [{"name": "daily"}],
         "operational": {"lastExecutionResult": {"id": R1, "status": 2}}},
        {"id": "not-a-guid", "name": "Broken"},
    ]})
    tasks = b.tasks(StartRequest(tag=["daily"], taskId=[T2]))
    assert [(x.id, x.running, x.last_result_id) for x in tasks] == [(T1, True, R1)]
    assert [(m, p) for m, p, _ in t.calls] == [("GET", "/qrs/reloadtask/full")]


def test_executions_use_the_contract_names_and_the_newest_result_of_each():
    b, t = backend({"/qrs/executionresult/full": [
        {"executionID": E1.upper(), "status": 8, "startTime": "2026-01-01T00:00:00.000Z", "modifiedDate": "a"},
        {"executionID": E1, "status": 7, "startTime": "2026-01-01T00:05:00.000Z", "stopTime": "2026-01-01T00:06:00.000Z",
         "duration": 60000},
        {"executionID": E2, "status": 2},  # still running
        {"status": 7},  # no execution id: ignored
    ]})
    states = b.executions([E1, E2])
    assert set(states) == {E1, E2} and len(t.calls) == 1
    assert states[E1].final == "FinishedSuccess" and states[E2].final is None
    ev = replies.task_finished("r", T1, "Load", E1, "FinishedSuccess", states[E1].times())
    assert ev["durationMs"] == 60000 and ev["stopTime"] == "2026-01-01T00:06:00.000Z"


def test_running_executions_are_looked_up_once_for_every_running_task():
    b, t = backend({"/qrs/executionresult/full": [{"id": R1, "executionID": E1}]})
    found = b.running_executions([QrsTask(T1, "Load", running=True, last_result_id=R1), QrsTask(T2, "Idle")])
    assert found == {T1: E1} and len(t.calls) == 1
    assert b.running_executions([QrsTask(T2, "Idle")]) == {} and len(t.calls) == 1  # nothing to ask: no call


def test_what_the_qrs_backend_does_not_offer_is_refused_clearly():
    b, t = backend({})
    with pytest.raises(NotSupported, match="backend: cloud"):
        b.start(T1, StartOptions(partial=True))
    assert t.calls == []  # nothing was sent


def test_stop_is_one_post_and_failure_reads_the_row_the_poll_kept():
    """Contract section 8 on the seam: a stop is `POST /qrs/task/{id}/stop`; the failure of an
    execution the poll saw fail costs no call for its texts (log_lines 0: no log either)."""
    row = {"id": R1, "executionID": E1, "taskID": T1, "status": 8, "startTime": "2026-01-01T00:00:00.000Z",
           "details": [{"detailsType": 0, "message": "Field 'Amount' not found", "detailCreatedDate": "2026-01-01T00:00:01.000Z"}]}
    b, t = backend({"/qrs/executionresult/full": [row]})
    assert b.stop(T1, E1) == "stopping"
    assert [c[:2] for c in t.calls] == [("POST", f"/qrs/task/{T1}/stop")]
    assert b.executions([E1])[E1].final == "FinishedFail"
    calls = len(t.calls)
    failure = b.failure(T1, E1, 0)
    assert failure is not None and failure["message"] == "Field 'Amount' not found" and "scriptLogTail" not in failure
    assert len(t.calls) == calls
    assert b.failure(T1, E1, 0) == failure and len(t.calls) == calls + 1  # not kept twice: read again


@pytest.mark.parametrize("match, wire", [
    (Match("taskId", T1), f"taskId:{T1}"),
    (Match("tag", "a:b=c"), "tag:a:b=c"),
    (Match("customProperty", "v=w", "Dept"), "customProperty:Dept=v=w"),
])
def test_a_match_is_data_that_is_its_wire_form(match, wire):
    assert match == wire and json.dumps([match]) == json.dumps([wire])
    assert pickle.loads(pickle.dumps(match)).kind == match.kind
    back = Match.parse(wire)
    assert back is not None and back.kind == match.kind and back == match


@pytest.mark.parametrize("text", ["", "tag", "folder:x", "customProperty:no-equals", "\x00:x", "taskid:x"])
def test_a_string_that_names_no_criterion_is_not_a_match(text):
    assert Match.parse(text) is None
    assert matches([text, "tag:ok"]) == ["tag:ok"]


def test_replies_carry_matches_to_the_wire_and_read_them_back():
    o = TaskOutcome(T1, "Load", "started", [Match("tag", "daily"), Match("customProperty", "x", "Dept")], E1)
    ev = replies.task(o, "r")
    assert ev["matchedBy"] == ["tag:daily", "customProperty:Dept=x"]
    read = replies.matched(json.loads(json.dumps(ev)))  # as stored in the journal
    assert [(m.kind, m.value, m.name) for m in read] == [("tag", "daily", None), ("customProperty", "x", "Dept")]
    assert replies.matched({"matchedBy": "tag:x"}) == [] and replies.matched({"matchedBy": [1, None]}) == []
