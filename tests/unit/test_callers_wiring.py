"""Callers wired into the product (contract section 10), the pure parts: routing a delivery,
response topics on caller topics, what the tracker keeps, the metrics label, alerts, history."""

from __future__ import annotations

import json
import time

import pytest

from butler_mqtt.callers import Callers, token_sha256
from butler_mqtt.config import Config
from butler_mqtt.history import table
from butler_mqtt.journal.history import HistoryQuery, build_record, check_query
from butler_mqtt.model import Route
from butler_mqtt.mqtt.ingress import Clear, Reject, route, screen
from butler_mqtt.mqtt.listener import Job
from butler_mqtt.ops.alerts import from_event
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.tracking.records import Waited

T1 = "11111111-1111-4111-8111-111111111111"
CFG = Config.model_validate({"callers": [{"name": "erp", "allow": {"tags": ["erp"]}},
                                         {"name": "dwh", "topic": "loader", "tokens_sha256": [token_sha256("t" * 20)]}]})
START = CFG.mqtt.topics.start
LIMITS = (64 * 1024, 1024)


def job(topic: str, payload: bytes | None = None, **kw: object) -> Job:
    raw = payload if payload is not None else json.dumps({"requestId": "r", "taskId": T1}).encode()
    base: dict[str, object] = dict(ingress="mqtt", topic=topic, payload=raw, mid=7, qos=1, dup=False,
                                   response_topic=None, correlation_data=None, expires_at=None)
    return Job(**{**base, **kw})  # type: ignore[arg-type]


def test_the_topic_level_names_the_caller():
    callers = Callers(CFG)
    found = route(job(f"{START}/loader"), callers, CFG.mqtt, False)
    assert not isinstance(found, (Reject, Clear)) and found is not None
    assert found.action == "start" and found.caller is not None and found.caller.name == "dwh"
    stop = route(job(f"{CFG.mqtt.topics.stop}/erp"), callers, CFG.mqtt, False)
    assert stop is not None and not isinstance(stop, (Reject, Clear)) and stop.action == "stop"
    bare = route(job(START), callers, CFG.mqtt, False)
    assert bare is not None and not isinstance(bare, (Reject, Clear)) and bare.caller is None


@pytest.mark.parametrize("level", ["dwh", "ERP", "", " erp", "x" * 1000, "$SYS", "erp\x00"])
def test_an_unknown_level_is_a_reject_that_keeps_nothing(level: str):
    callers = Callers(CFG)
    r = route(job(f"{START}/{level}"), callers, CFG.mqtt, False)
    assert isinstance(r, Reject) and r.error == "Unknown caller" and r.outcome == "unauthorized"
    assert "nothing was started" in r.details and len(r.details) < 300
    assert callers.limiter._times == {}  # noqa: SLF001 - no state for any name


def test_the_daemons_own_reply_topic_is_ignored_and_a_retained_clear_is_acked():
    callers = Callers(CFG)
    assert route(job(CFG.mqtt.topics.reply), callers, CFG.mqtt, False) is None
    assert isinstance(route(job(f"{START}/nobody", b"", retained=True), callers, CFG.mqtt, True), Clear)


def test_an_unknown_caller_answers_on_a_usable_response_topic_only():
    callers = Callers(CFG)
    ok = route(job(f"{START}/x", response_topic="app/replies/1"), callers, CFG.mqtt, False)
    bad = route(job(f"{START}/x", response_topic=f"{START}/erp"), callers, CFG.mqtt, False)
    assert isinstance(ok, Reject) and not ok.default_route
    assert isinstance(bad, Reject) and bad.default_route


def test_callers_only_rejects_the_bare_topics():
    strict = CFG.model_copy(update={"callers_only": True})
    for topic in (START, CFG.mqtt.topics.start_plain):
        r = route(job(str(topic)), Callers(strict), strict.mqtt, False)
        assert isinstance(r, Reject) and r.error == "Caller required"


@pytest.mark.parametrize("topic", [f"{START}/erp", f"{START}/loader", f"{CFG.mqtt.topics.stop}/x"])
def test_a_response_topic_the_daemon_listens_on_for_callers_is_refused(topic: str):
    listening = [f"{START}/+", f"{CFG.mqtt.topics.stop}/+"]
    r = screen(job(START, response_topic=topic), CFG.mqtt, LIMITS, 0.0, listening=listening)
    assert isinstance(r, Reject) and r.error == "Invalid response topic" and r.default_route
    # topics.reply (under <start>/+, ignored there by the daemon) and deeper topics stay usable.
    for fine in (CFG.mqtt.topics.reply, f"{START}/reply/erp/r1"):
        assert not isinstance(screen(job(START, response_topic=fine), CFG.mqtt, LIMITS, 0.0, listening=listening), Reject)


def test_a_waited_request_keeps_its_caller_across_a_restart():
    w = Waited(key="caller:erp:id:r", request_id="r", request={"taskId": [T1]}, route=Route("t"), started=time.time(),
               chained=False, caller="erp")
    assert Waited.from_json(w.to_json()).caller == "erp"
    older = json.loads(w.to_json())
    del older["caller"]  # a record written before callers: the anonymous caller
    assert Waited.from_json(json.dumps(older)).caller is None
    # A caller removed from the configuration meanwhile: a stand-in that admits nothing.
    gone = Callers(CFG).stored("old-caller")
    assert gone is not None and gone.name == "old-caller" and gone.allow.tags == [] and gone.allow.task_ids == []


def test_the_caller_label_is_bounded_and_absent_without_callers():
    plain = Metrics()
    plain.request("mqtt", "ok", "erp")
    assert 'butler_mqtt_requests_total{ingress="mqtt",outcome="ok"} 1.0' in plain.render().decode()
    m = Metrics(Callers(CFG).labels())
    m.request("mqtt", "ok", "erp")
    m.request("mqtt", "ok", "not-configured")
    text = m.render().decode()
    assert 'butler_mqtt_requests_total{caller="erp",ingress="mqtt",outcome="ok"} 1.0' in text
    assert 'butler_mqtt_requests_total{caller="",ingress="mqtt",outcome="ok"} 1.0' in text
    assert "not-configured" not in text
    assert {line.split('caller="')[1].split('"')[0] for line in text.splitlines() if 'caller="' in line} == {"", "erp", "dwh"}


def test_an_alert_names_the_caller_or_null():
    ev = {"event": "task", "requestId": "r", "taskId": T1, "taskName": "n", "status": "failed", "reason": "x"}
    assert from_event("failedStart", ev, "b1", "https://q", "erp")["caller"] == "erp"
    assert from_event("failedStart", ev, "b1", "https://q")["caller"] is None


def test_history_records_and_table_show_the_caller():
    row = ("caller:erp:id:r1", "done", "mqtt", f"{START}/erp", json.dumps({"requestId": "r1", "taskId": [T1]}),
           0.0, 0.0, 0, None, "erp")
    rec = build_record(row, [])
    assert rec["caller"] == "erp" and rec["requestId"] == "r1"
    anon = build_record(("id:r2", "done", "mqtt", START, None, 0.0, 0.0, 0, None, None), [])
    assert anon["caller"] is None and anon["requestId"] == "r2"
    header, erp_row, anon_row = table([rec, anon]).splitlines()
    assert header.split()[4] == "CALLER" and erp_row.split()[4] == "erp" and anon_row.split()[4] == "-"
    assert "CALLER" not in table([anon])
    with pytest.raises(ValueError, match="caller"):
        check_query(HistoryQuery(caller="../etc"))


def test_check_names_the_callers_and_warns_about_open_doors(capsys: pytest.CaptureFixture[str]):
    from butler_mqtt.check import check_callers

    assert check_callers(Config()) is True and capsys.readouterr().out == ""
    assert check_callers(CFG) is True
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[ok  ] callers: 2: erp (qliksense/task/start/erp), dwh (qliksense/task/start/loader)")
    assert out[1] == "[warn] callers[1].allow: dwh's allow-list is empty: it may start nothing"
    assert out[2].startswith("[warn] callers_only: false")
    strict = CFG.model_copy(update={"callers_only": True})
    check_callers(strict)
    assert not any("callers_only" in line for line in capsys.readouterr().out.splitlines())
