"""The request history (issue 15, item 2): `butler-mqtt history` and `GET /v4/requests` over a
journal filled by real requests (MQTT JSON, MQTT plain, REST with and without requestId,
duplicates over both ingresses, a chain), on SQLite and on PostgreSQL, while the daemon runs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from butler_mqtt.journal import HistoryQuery, Journal
from butler_mqtt.sim import SimTask
from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[2]
T1 = "1a000000-0000-4000-8000-000000000001"
T2 = "1a000000-0000-4000-8000-000000000002"
T3 = "1a000000-0000-4000-8000-000000000003"
T4 = "1a000000-0000-4000-8000-000000000004"
T5 = "1a000000-0000-4000-8000-000000000005"
T6 = "1a000000-0000-4000-8000-000000000006"
MISSING = "1a000000-0000-4000-8000-0000000000ff"
TASKS = [
    SimTask(T1, "Finance daily", tags=["daily"], run_seconds=0.2),
    SimTask(T2, "Sales daily", tags=["daily"], run_seconds=0.2, outcome="fail"),
    SimTask(T3, "Weekly", tags=["weekly"], run_seconds=0.2),
    SimTask(T4, "Private", tags=["private"]),
    SimTask(T5, "Broken", tags=["broken"]),
    SimTask(T6, "Next stage", tags=["next"], run_seconds=0.2),
]
TOKEN = "history-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("fresh_pg") if request.param == "postgresql" else None


@pytest.fixture
def cfg(qrs_certs, sim, broker, tmp_path, journal_url):
    sim.fail_starts_for = {T5}
    return make_config(
        qrs_certs, sim.port, broker, tmp_path / "state",
        http={"enabled": True, "port": 0, "token": TOKEN},
        start_filter={"enabled": True, "allow": {"tags": ["daily", "weekly", "broken", "next"]}},
        journal={"url": journal_url},
    )


def history_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "butler_mqtt", "history", "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def fill(cfg, requester, base: str) -> None:
    """Real requests through both ingresses; returns once every answer (and wait) arrived."""
    waited = requester.request(
        {"requestId": "h-mqtt", "tag": ["daily", "no-such-tag"], "taskId": [T4], "wait": True}, timeout=60
    )
    assert waited[-1]["event"] == "requestFinished"
    again = requester.request({"requestId": "h-mqtt", "tag": ["daily"], "wait": True}, timeout=60)  # a duplicate
    assert again[-1] == {**waited[-1], "replayed": True}  # the earlier outcome, marked (issue 25)
    replay = requests.post(f"{base}/v4/reloadtask/start", json={"requestId": "h-mqtt", "tag": "daily"}, headers=AUTH, timeout=30)
    assert replay.status_code == 200 and replay.json()["totalTasksStarted"] == 2  # the same request over REST
    failed = requests.post(f"{base}/v4/reloadtask/start", json={"requestId": "h-rest", "tag": "broken", "taskId": MISSING}, headers=AUTH, timeout=30)
    assert failed.json()["tasksFailed"][0]["taskId"] == T5
    anon = requests.post(f"{base}/v4/reloadtask/{T3}/start", headers=AUTH, timeout=30)
    assert anon.json()["totalTasksStarted"] == 1
    chain = requester.request({"requestId": "h-chain", "tag": "weekly", "then": {"tag": "next"}}, timeout=60)
    assert chain[-1]["finished"] == {"FinishedSuccess": 2}
    _token, box = requester.send(T3.encode(), topic=cfg.mqtt.topics.start_plain)
    while box.get(timeout=30)["event"] != "summary":
        pass


def test_history_over_real_requests_cli_and_rest(cfg, start_daemon, requester, sim, tmp_path):
    d = start_daemon(cfg)
    base = f"http://127.0.0.1:{d.daemon.http_server.port}"
    fill(cfg, requester, base)
    config = tmp_path / "butler.yaml"  # what the CLI needs to find the daemon's journal
    config.write_text(yaml.safe_dump({"state_dir": str(cfg.state_dir), "journal": {"url": cfg.journal.url and cfg.journal.url.get_secret_value()}}))

    out = history_cli(config, "--json", "--since", "1h")  # the daemon is still running
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["requestId"] for r in records] == ["h-mqtt", "h-rest", None, "h-chain", None]  # oldest first
    mqtt, rest, anon, chain, plain = records

    assert mqtt["ingress"] == "mqtt" and mqtt["source"] == cfg.mqtt.topics.start
    assert mqtt["criteria"] == {"taskId": [T4], "tag": ["daily", "no-such-tag"]} and mqtt["request"]["wait"] is True
    tasks = {t["taskId"]: t for t in mqtt["tasks"]}
    assert tasks[T1]["status"] == "started" and tasks[T1]["finalStatus"] == "FinishedSuccess"
    assert tasks[T2]["finalStatus"] == "FinishedFail" and tasks[T4]["status"] == "denied" and "finalStatus" not in tasks[T4]
    assert mqtt["counts"] == {"started": 2, "denied": 1} and mqtt["notFound"] == [{"tag": "no-such-tag"}]
    assert mqtt["finished"] == {"FinishedSuccess": 1, "FinishedFail": 1} and mqtt["state"] == "finished"
    assert mqtt["duplicates"] == 2 and mqtt["lastDuplicate"] >= mqtt["received"]  # once over MQTT, once over REST

    assert rest["ingress"] == "rest" and rest["source"] == "127.0.0.1" and rest["state"] == "answered"
    assert rest["tasks"][0]["status"] == "failed" and "QRS refused the start" in rest["tasks"][0]["reason"]
    assert rest["notFound"] == [{"taskId": MISSING}]
    assert anon["key"].startswith("anon:rest:") and anon["criteria"] == {"taskId": [T3]}
    assert [(t["taskId"], t["stage"], t["finalStatus"]) for t in chain["tasks"]] == [(T3, 0, "FinishedSuccess"), (T6, 1, "FinishedSuccess")]
    assert chain["request"]["then"] == {"tag": ["next"]} and chain["finished"] == {"FinishedSuccess": 2}
    assert plain["ingress"] == "mqtt-plain" and plain["source"] == cfg.mqtt.topics.start_plain

    api = requests.get(f"{base}/v4/requests", params={"since": "1h"}, headers=AUTH, timeout=30)
    assert api.status_code == 200 and api.json()["requests"] == records  # the same records
    assert api.json()["retentionHours"] == 24

    by_task = history_cli(config, "--json", "--task", T5.upper())
    assert [json.loads(x)["requestId"] for x in by_task.stdout.splitlines()] == ["h-rest"]
    named = requests.get(f"{base}/v4/requests", params={"taskId": MISSING}, headers=AUTH, timeout=30).json()["requests"]
    assert [r["requestId"] for r in named] == ["h-rest"]  # no such task: found by what the request named

    table = history_cli(config, "--request-id", "h-chain")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["RECEIVED", "(UTC)", "INGRESS"] and "h-chain" in lines[1]
    assert "tag:weekly then …" in lines[1] and "FinishedSuccess 2" in lines[1] and "finished" in lines[1]
    assert any(T6 in line and "Next stage" in line and " 1 " in line for line in lines[3:])


def test_history_is_token_protected_and_names_bad_input(cfg, start_daemon, tmp_path):
    d = start_daemon(cfg)
    base = f"http://127.0.0.1:{d.daemon.http_server.port}"
    assert requests.get(f"{base}/v4/requests", timeout=30).status_code == 401
    bad = requests.get(f"{base}/v4/requests", params={"since": "yesterday"}, headers=AUTH, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "Invalid query" and "30m, 2h, 1d" in bad.json()["details"]
    assert requests.get(f"{base}/v4/requests", params={"limit": "0"}, headers=AUTH, timeout=30).status_code == 400
    assert requests.get(f"{base}/v4/requests", params={"taskId": "x"}, headers=AUTH, timeout=30).status_code == 400
    assert "/v4/requests" in requests.get(f"{base}/openapi.json", timeout=30).json()["paths"]

    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(cfg.state_dir), "journal": {"url": cfg.journal.url and cfg.journal.url.get_secret_value()}}))
    usage = history_cli(config, "--since", "yesterday")
    assert usage.returncode == 2 and "neither a duration" in usage.stderr
    future = history_cli(config, "--since", "2999-01-01")
    assert future.returncode == 0 and future.stdout.startswith("no requests in the journal")


def test_history_without_a_journal_says_so(tmp_path):
    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "nothing-here")}))
    out = history_cli(config)
    assert out.returncode == 1 and "no journal at" in out.stderr
    assert not (tmp_path / "nothing-here" / "journal.sqlite3").exists()  # reading never creates one


def _age(journal_url: str | None, path: Path, key: str, seconds: float) -> None:
    """Move one request's arrival back in time (as if it came `seconds` ago)."""
    sql = "UPDATE requests SET created = created - ? WHERE key = ?"
    if journal_url is None:
        with sqlite3.connect(path) as db:
            db.execute(sql, (seconds, key))
        return
    import psycopg

    with psycopg.connect(journal_url, autocommit=True) as db:
        db.execute(sql.replace("?", "%s"), (seconds, key))


def test_history_window_follows_retention_and_since(journal_url, tmp_path):
    path = tmp_path / "j.sqlite3"
    j = Journal(path, retention_hours=1, url=journal_url)
    try:
        for key in ("id:new", "id:old", "id:older"):
            assert j.begin(key, "mqtt", source="t", request={"requestId": key[3:], "tag": ["x"]}) is None
            j.finish(key, [{"event": "summary", "requestId": key[3:], "tasksNotFound": [{"tag": "x"}]}])
        _age(journal_url, path, "id:old", 1800)
        _age(journal_url, path, "id:older", 7200)  # beyond journal.retention_hours, not purged yet
        assert [r["requestId"] for r in j.history(HistoryQuery())] == ["old", "new"]
        assert [r["requestId"] for r in j.history(HistoryQuery(since=time.time() - 600))] == ["new"]
        assert [r["requestId"] for r in j.history(HistoryQuery(since=time.time() - 86400, limit=1))] == ["new"]
        one: Any = j.history(HistoryQuery(request_id="old"))
        assert len(one) == 1 and one[0]["notFound"] == [{"tag": "x"}] and one[0]["state"] == "answered"
    finally:
        j.close()


def test_history_follows_queued_tasks_and_retries(qrs_certs, sim, broker, tmp_path, start_daemon, requester, journal_url):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", journal={"url": journal_url},
                      policies={"max_running": 1})
    d = start_daemon(cfg)
    _token, box = requester.send({"requestId": "slot", "taskId": T1, "wait": True})  # holds the only slot
    while box.get(timeout=30)["event"] != "summary":
        pass
    queued = requester.request({"requestId": "later", "taskId": T3, "wait": True}, timeout=60)
    assert [e["status"] for e in queued if e["event"] == "task"] == ["queued", "started"]
    requester.request({"requestId": "again", "taskId": T2, "retry": {"attempts": 1, "delay": 0.1}, "wait": True}, timeout=60)

    (later,) = d.daemon.runtime.journal.history(HistoryQuery(request_id="later"))
    (task,) = later["tasks"]
    assert task["status"] == "started" and task["position"] == 1 and task["finalStatus"] == "FinishedSuccess"
    assert later["request"]["taskId"] == [T3] and later["state"] == "finished"
    (again,) = d.daemon.runtime.journal.history(HistoryQuery(request_id="again"))
    (failing,) = again["tasks"]
    assert failing["finalStatus"] == "FinishedFail" and failing["attempt"] == 2 and "retryIn" not in failing
    assert again["finished"] == {"FinishedFail": 1} and again["request"]["retry"] == {"attempts": 1, "delay": 0.1}


def test_received_is_when_the_request_arrived_not_when_qrs_let_it_be_handled(cfg, start_daemon, requester, sim):
    """Issue 25: an MQTT request that waits (unacked) for QRS shows when it came, not when it was
    handled at last."""
    d = start_daemon(cfg)
    sim.fault = "error500"  # QRS answers 500: the request waits, unacked, and is tried again
    sent = time.time()
    done: dict[str, Any] = {}
    import threading

    t = threading.Thread(target=lambda: done.update(r=requester.request({"requestId": "h-late", "tag": "weekly"}, timeout=90)))
    t.start()
    journal = d.daemon.runtime.journal
    deadline = time.monotonic() + 30
    while not [r for r in sim.request_log if r.method == "GET"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # waiting for QRS, however long; nothing asserts on this duration
    sim.fault = None
    t.join(90)
    assert done["r"][-1]["event"] == "summary" and done["r"][-1]["totalTasksStarted"] == 1
    [record] = journal.history(HistoryQuery(request_id="h-late"))
    received = datetime.fromisoformat(record["received"].replace("Z", "+00:00")).timestamp()
    updated = datetime.fromisoformat(record["updated"].replace("Z", "+00:00")).timestamp()
    first_get = min(r.at for r in sim.request_log if r.method == "GET")
    assert sent - 1 <= received <= first_get  # it came before QRS was first asked
    assert updated >= received + 3  # handled after QRS came back


def test_every_bad_history_query_is_a_400_naming_the_parameter_and_the_cli_says_the_same(cfg, start_daemon, tmp_path):
    """Issue 20, class 8: out-of-range and odd-offset times, misspelt or repeated parameters, text
    the journal cannot hold: a 400 naming the parameter (never a 500, never every record); the
    CLI exits 2 with the same message."""
    d = start_daemon(cfg)
    base = f"http://127.0.0.1:{d.daemon.http_server.port}"
    cases: list[tuple[str, str]] = [
        ("since=200000w", "since"), ("since=9999-12-31T23:59:59-01:00", "since"),
        ("since=0001-01-01T00:00:00%2B01:00", "since"), ("since=2024-05-01T10:30:00%2B05:30:15", "since"),
        ("request_id=x", "request_id"), ("task=" + T1, "task"), ("requestId=a&requestId=b", "requestId"),
        ("requestId=%00", "requestId"), ("requestId=", "requestId"), ("since=", "since"), ("limit=1e3", "limit"),
        ("requestId=" + "r" * 129, "requestId"), ("taskId=" + "x" * 10_000, "taskId"), ("since=" + "y" * 10_000, "since"),
    ]
    for query, name in cases:
        answer = requests.get(f"{base}/v4/requests?{query}", headers=AUTH, timeout=30)
        assert answer.status_code == 400, (query, answer.status_code, answer.text)
        assert answer.json()["error"] == "Invalid query" and name in answer.json()["details"], (query, answer.json())
        assert len(answer.json()["details"]) < 300  # a bad value is echoed in part, never whole
    ok = requests.get(f"{base}/v4/requests", params={"since": "1h", "limit": "5"}, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["requests"] == []

    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(cfg.state_dir), "journal": {"url": cfg.journal.url and cfg.journal.url.get_secret_value()}}))
    rest = requests.get(f"{base}/v4/requests?requestId=", headers=AUTH, timeout=30).json()
    empty = history_cli(config, "--request-id", "")
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert f"{rest['error']}: {rest['details']}" in empty.stderr
    far = history_cli(config, "--since", "200000w")
    assert far.returncode == 2 and "out of range" in far.stderr and "Traceback" not in far.stderr


def test_history_by_caller_on_both_journals(journal_url, tmp_path):
    """Callers (contract section 10): the caller is stored with the request (migration 4); the
    same requestId from two callers is two records, both found by requestId; --caller filters."""
    from butler_mqtt import keys
    from butler_mqtt.journal.history import HistoryReader

    path = tmp_path / "j.sqlite3"
    j = Journal(path, retention_hours=1, url=journal_url)
    try:
        for caller in ("erp", "dwh", None):
            key = keys.for_caller(keys.for_request_id("same"), caller)
            assert j.begin(key, "mqtt", source="t", request={"requestId": "same", "tag": ["x"]}, caller=caller) is None
            j.finish(key, [{"event": "summary", "requestId": "same", "tasksNotFound": [{"tag": "x"}]}])
        recs = j.history(HistoryQuery(request_id="same"))
        assert sorted((r["caller"] or "", r["requestId"]) for r in recs) == [("", "same"), ("dwh", "same"), ("erp", "same")]
        assert [r["key"] for r in j.history(HistoryQuery(caller="erp"))] == ["caller:erp:id:same"]
        assert j.history(HistoryQuery(caller="nobody")) == []
        with pytest.raises(ValueError, match="caller"):
            j.history(HistoryQuery(caller="Erp' OR 1=1 --"))
    finally:
        j.close()
    reader = HistoryReader.open(tmp_path, journal_url or f"sqlite:///{path}", 1)  # the CLI's reader
    try:
        assert [r["caller"] for r in reader.history(HistoryQuery(caller="dwh"))] == ["dwh"]
    finally:
        reader.close()


def test_a_journal_of_schema_3_is_read_as_anonymous_and_upgraded(tmp_path):
    """The CLI reads a journal the daemon has not upgraded yet (no caller column): every request
    anonymous, `--caller` finds none; the daemon's Journal upgrades it at start (migration 4)."""
    from butler_mqtt.journal.history import HistoryReader

    path = tmp_path / "journal.sqlite3"
    j = Journal(path, retention_hours=1)
    assert j.begin("id:old", "mqtt", source="t", request={"requestId": "old", "tag": ["x"]}) is None
    j.finish("id:old", [{"event": "summary", "requestId": "old", "tasksNotFound": []}])
    j.close()
    with sqlite3.connect(path) as db:  # as a version 3 journal
        db.execute("DROP INDEX requests_caller")
        db.execute("ALTER TABLE requests DROP COLUMN caller")
        db.execute("DELETE FROM schema_version WHERE version = 4")
    reader = HistoryReader.open(tmp_path, None, 1)
    try:
        assert [r["caller"] for r in reader.history(HistoryQuery())] == [None]
        assert reader.history(HistoryQuery(caller="erp")) == []
        assert [r["requestId"] for r in reader.history(HistoryQuery(request_id="old"))] == ["old"]
    finally:
        reader.close()
    j = Journal(path, retention_hours=1)
    try:
        assert j.schema_version() == 4 and j.history(HistoryQuery())[0]["caller"] is None
    finally:
        j.close()
