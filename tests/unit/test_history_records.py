"""The request history, the pure parts: --since, queries, one record from journal rows, the table."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from butler_mqtt.history import table
from butler_mqtt.journal.history import HistoryQuery, build_record, check_query, iso, parse_since

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 1800),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1w", NOW - 7 * 86400),
        ("45s", NOW - 45),
        ("1.5h", NOW - 5400),
        (" 2H ", NOW - 7200),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC).timestamp()),  # UTC without an offset
        ("2024-05-01T10:30", datetime(2024, 5, 1, 10, 30, tzinfo=UTC).timestamp()),
        ("2024-05-01T10:30:00Z", datetime(2024, 5, 1, 10, 30, tzinfo=UTC).timestamp()),
        ("2024-05-01T12:30:00+02:00", datetime(2024, 5, 1, 10, 30, tzinfo=UTC).timestamp()),
    ],
)
def test_since_accepts_durations_and_iso_dates(text, expected):
    assert parse_since(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "h", "", "2024-13-01", "10:30x"])
def test_since_refuses_anything_else_saying_what_is_accepted(text):
    with pytest.raises(ValueError, match=r"30m, 2h, 1d, 1w, 45s"):
        parse_since(text, now=NOW)


def test_queries_are_checked_and_task_ids_lowercased():
    assert check_query(HistoryQuery(task_id=T1.upper())).task_id == T1
    for bad, field in ((HistoryQuery(task_id="x"), "taskId"), (HistoryQuery(limit=0), "limit"),
                       (HistoryQuery(limit=1001), "limit"), (HistoryQuery(request_id=""), "requestId")):
        with pytest.raises(ValueError, match=field):
            check_query(bad)


def row(key: str = "id:r1", state: str = "done", request: dict | None = None, duplicates: int = 0) -> tuple:
    return (key, state, "mqtt", "qliksense/task/start", json.dumps(request) if request is not None else None,
            NOW, NOW + 2, duplicates, NOW + 60 if duplicates else None)


def test_a_record_follows_a_task_through_queue_retries_and_overdue():
    replies = [
        {"event": "task", "requestId": "r1", "taskId": T1, "taskName": "Load", "status": "queued", "position": 1, "matchedBy": ["tag:a"]},
        {"event": "task", "requestId": "r1", "taskId": T2, "taskName": "Other", "status": "skipped", "reason": "running", "matchedBy": ["tag:a"]},
        {"event": "summary", "requestId": "r1", "tasksNotFound": [{"tag": "b"}]},
        {"event": "task", "requestId": "r1", "taskId": T1, "taskName": "Load", "status": "started", "executionId": "e1", "matchedBy": ["tag:a"]},
        {"event": "taskOverdue", "requestId": "r1", "taskId": T1, "executionId": "e1", "runningForMs": 5000},
        {"event": "taskFinished", "requestId": "r1", "taskId": T1, "taskName": "Load", "executionId": "e1", "status": "FinishedFail", "attempt": 1, "retryIn": 60},
        {"event": "task", "requestId": "r1", "taskId": T1, "taskName": "Load", "status": "started", "executionId": "e2", "matchedBy": ["tag:a"]},
        {"event": "taskFinished", "requestId": "r1", "taskId": T1, "taskName": "Load", "executionId": "e2", "status": "FinishedSuccess", "attempt": 2, "durationMs": 900},
        {"event": "requestFinished", "requestId": "r1", "finished": {"FinishedSuccess": 1}, "stoppedAtStage": None, "durationMs": 70000},
    ]
    rec = build_record(row(request={"requestId": "r1", "tag": ["a", "b"], "wait": True, "ifRunning": "queue"}, duplicates=1), replies)
    load, other = rec["tasks"]
    assert load["status"] == "started" and load["executionId"] == "e2" and load["finalStatus"] == "FinishedSuccess"
    assert load["attempt"] == 2 and "retryIn" not in load and load["overdue"] is True and load["position"] == 1
    assert other == {"taskId": T2, "taskName": "Other", "status": "skipped", "reason": "running", "matchedBy": ["tag:a"]}
    assert rec["counts"] == {"started": 1, "skipped": 1} and rec["notFound"] == [{"tag": "b"}]
    assert rec["state"] == "finished" and rec["finished"] == {"FinishedSuccess": 1} and rec["durationMs"] == 70000
    assert rec["criteria"] == {"tag": ["a", "b"]} and rec["requestId"] == "r1" and rec["duplicates"] == 1
    assert rec["received"] == "2024-05-01T12:00:00.000Z" and rec["lastDuplicate"] == iso(NOW + 60)


def test_record_states_and_rows_from_before_the_request_was_kept():
    started = [{"event": "task", "taskId": T1, "taskName": "Load", "status": "started", "executionId": "e1"}]
    assert build_record(row(state="open", request={"tag": ["a"]}), started)["state"] == "handling"
    assert build_record(row(request={"tag": ["a"]}), started)["state"] == "answered"
    assert build_record(row(request={"tag": ["a"], "then": {"tag": ["b"]}}), started)["state"] == "following"
    old = build_record(row(key="cd:abc:01"), started)  # written by a daemon before journal migration 3
    assert old["requestId"] is None and old["criteria"] is None and old["request"] is None and old["state"] == "answered"
    err = build_record(row(), [{"event": "error", "requestId": "r1", "error": "Internal error", "details": "ref x"}])
    assert err["error"] == {"error": "Internal error", "details": "ref x"} and err["tasks"] == [] and err["requestId"] == "r1"


def test_the_table_has_one_row_per_request_and_task_lines_on_request():
    replies = [
        {"event": "task", "taskId": T1, "taskName": "Load", "status": "started", "executionId": "e1"},
        {"event": "task", "taskId": T2, "taskName": "Other", "status": "denied", "reason": "start_filter"},
        {"event": "summary", "tasksNotFound": [{"taskId": "33333333-3333-4333-8333-333333333333"}]},
    ]
    rec = build_record(row(request={"requestId": "r1", "taskId": [T1, T2], "customProperty": [{"name": "g", "value": "f"}], "wait": True}), replies)
    lines = table([rec], with_tasks=True).splitlines()
    assert lines[0].split() == ["RECEIVED", "(UTC)", "INGRESS", "SOURCE", "REQUEST", "ID", "CRITERIA", "TASKS", "FINAL", "STATE", "DUP"]
    assert lines[1].startswith("2024-05-01 12:00:00  mqtt ")
    assert "taskId:11111111… taskId:22222222… customProperty:g=f" in lines[1]
    assert "1 started, 1 denied, 1 not found" in lines[1] and "running 1" in lines[1] and "following" in lines[1]
    assert lines[2] == "" and lines[3].split()[:2] == ["TASK", "NAME"]
    assert lines[5].split()[:4] == [T2, "Other", "-", "denied"] and lines[5].endswith("start_filter")


@pytest.mark.parametrize(
    "text",
    ["200000w", "9" * 400 + "w", "99999999999d", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
     "2024-05-01T10:30:00+25:00", "2024-05-01T10:30:00+05:30:15", "2024-05-01T10:30:00+05:30:00.5", "nan", "infw"],
)
def test_since_out_of_range_or_with_an_odd_offset_is_a_clear_error(text):
    """Issue 20, class 8: a `since` no clock can show is refused naming the parameter; what is
    accepted is always a time `iso()` can print (the REST answer echoes it)."""
    with pytest.raises(ValueError, match=r"^since: "):
        iso(parse_since(text, now=NOW))  # iso() must never be the one to fail


def test_a_control_character_in_a_request_id_cannot_forge_a_table_row():
    evil = "r1\n2024-05-01 12:00:00  mqtt  forged\x1b[2J\u202e\x9b31m"
    rec = build_record(row(key=f"id:{evil}", request={"requestId": evil, "tag": ["a\tb"]}),
                       [{"event": "task", "requestId": evil, "taskId": T1, "taskName": "N\r\name", "status": "started",
                         "reason": "x\x07y"}])
    text = table([rec], with_tasks=True)
    assert len(text.splitlines()) == 5  # header, the row, blank, task header, the task row: nothing forged
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text and "\r" not in text and "\x07" not in text
    assert "r1\\n2024-05-01" in text and "x\\x07y" in text and "N\\r\\name" in text


def test_json_lines_escape_what_a_terminal_would_act_on_and_stay_the_same_json():
    from butler_mqtt.history import json_line

    rec = {"requestId": "a\x1b[2J\x9b31m\u202e\u2028b", "taskName": "Café"}
    line = json_line(rec)
    assert "\x1b" not in line and "\x9b" not in line and "\u202e" not in line and "\u2028" not in line
    assert "Café" in line and json.loads(line) == rec
