"""Callers end to end (contract section 10, issue 24): a real Mosquitto, the QRS simulator over
mTLS, in-process daemons. Each caller starts its own reloads and is denied the others'; an
unknown caller topic is answered and starts nothing; callers_only; REST by token hash and by
client-certificate CN; a chain leaving the caller's allow-list (also after a restart); retries
and queued starts judged again; the rate shared by MQTT and REST; history, metrics and alerts
per caller; the served documents; stops routed; hostile topic levels and a flood of them."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
import trustme
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt.callers import token_sha256
from butler_mqtt.history import run_history
from butler_mqtt.journal.history import HistoryQuery
from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import wait_until
from tests.support.sim import started_ids

ERP1 = "e1e1e1e1-1111-4111-8111-111111111111"
ERP2 = "e2e2e2e2-2222-4222-8222-222222222222"
DWH1 = "d1d1d1d1-3333-4333-8333-333333333333"
NEXT = "a4a4a4a4-4444-4444-8444-444444444444"  # tagged "erp-next": outside erp's allow-list

TASKS = [
    SimTask(ERP1, "ERP orders", tags=["erp", "daily"]),
    SimTask(ERP2, "ERP stock", tags=["erp"]),
    SimTask(DWH1, "DWH load", tags=["daily"]),
    SimTask(NEXT, "After ERP", tags=["erp-next"]),
]
ERP_TOKEN, DWH_TOKEN = "erp-" + "x" * 40, "dwh-" + "y" * 40
START = "qliksense/task/start"


def callers(**erp_extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "erp", "tokens_sha256": [token_sha256(ERP_TOKEN)], "client_cert_cn": "erp-system",
         "allow": {"tags": ["erp"]}, **erp_extra},
        {"name": "dwh", "topic": "dwh-loader", "tokens_sha256": [token_sha256(DWH_TOKEN)],
         "allow": {"task_ids": [DWH1]}},
    ]


@pytest.fixture
def cfg(qrs_certs, sim, broker, tmp_path):
    return make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(),
                       http={"enabled": True, "port": 0})


def ask(requester: Requester, topic: str, body: dict[str, Any], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Publish `body` on `topic` (a caller's), collect replies up to the summary or error."""
    token, box = requester.send(body, topic=topic)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    waits = bool(body.get("wait") or body.get("then"))
    while time.monotonic() < deadline:
        try:
            ev = box.get(timeout=0.2)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        events.append(ev)
        if ev["event"] == "error" or (ev["event"] == ("requestFinished" if waits else "summary")):
            return events
    raise TimeoutError(f"no final reply on {topic} within {timeout} s: {events}")


def statuses(events: list[dict[str, Any]]) -> dict[str, str]:
    return {e["taskId"]: e["status"] for e in events if e["event"] == "task"}


def post(port: int, body: Any, token: str | None = None, path: str = "/v4/reloadtask/-/start") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers, timeout=30)


# ----------------------------------------------------------------------------- MQTT


def test_two_callers_each_start_their_own_and_are_denied_the_others(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    erp = ask(requester, f"{START}/erp", {"requestId": "same", "tag": ["daily"]})
    assert statuses(erp) == {ERP1: "started", DWH1: "denied"}
    denied = next(e for e in erp if e["event"] == "task" and e["status"] == "denied")
    assert denied["reason"] == "not on caller erp's allow-list"
    assert [t["taskId"] for t in erp[-1]["tasksDenied"]] == [DWH1]
    # The same requestId from another caller is another request (keys.for_caller).
    dwh = ask(requester, f"{START}/dwh-loader", {"requestId": "same", "tag": ["daily"]})
    assert statuses(dwh) == {ERP1: "denied", DWH1: "started"}
    assert ask(requester, f"{START}/dwh-loader", {"requestId": "x2", "taskId": [ERP2]})[0]["status"] == "denied"
    assert started_ids(sim) == sorted([ERP1, DWH1])
    # The anonymous caller (bare topic, callers_only off) has no allow-list of its own.
    bare = requester.request({"requestId": "same", "taskId": [ERP2]})
    assert statuses(bare) == {ERP2: "started"}


def test_a_duplicate_of_a_callers_request_is_replayed_not_started(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    first = ask(requester, f"{START}/erp", {"requestId": "dup-1", "taskId": [ERP1]})
    again = ask(requester, f"{START}/erp", {"requestId": "dup-1", "taskId": [ERP1]})
    assert statuses(first) == statuses(again) == {ERP1: "started"}
    assert started_ids(sim) == [ERP1]


@pytest.mark.parametrize("level", ["nobody", "ERP", "erp ", "x" * 1000, "dwh"])
def test_an_unknown_caller_level_is_an_error_and_starts_nothing(cfg, start_daemon, requester, sim, level):
    start_daemon(cfg)
    [err] = ask(requester, f"{START}/{level}", {"requestId": "u1", "tag": ["erp"]})
    assert err["event"] == "error" and err["error"] == "Unknown caller" and err["requestId"] == "u1"
    assert "nothing was started" in err["details"] and len(err["details"]) < 300
    assert sim.starts == []


def test_a_caller_name_in_the_body_is_refused_never_taken(cfg, start_daemon, requester, sim):
    port = start_daemon(cfg).daemon.http_server.port
    for body in ({"tag": ["daily"], "caller": "dwh"}, {"tag": ["daily"], "callers": ["dwh"]}):
        [err] = ask(requester, f"{START}/erp", body)
        assert err["event"] == "error" and "caller" in err["details"]
        resp = post(port, body, ERP_TOKEN)
        assert resp.status_code == 400 and "caller" in resp.json()["details"]
    assert sim.starts == []


def raw_publish(port: int, topic: str, payload: bytes, response_topic: str | None = None) -> bool:
    """Publish QoS 1 from a fresh client; whether the broker took it (PUBACK)."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    props = None
    if response_topic is not None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
    try:
        info = c.publish(topic, payload, qos=1, properties=props)
        return wait_published(info, 5)
    finally:
        c.disconnect()
        c.loop_stop()


def test_hostile_caller_levels_answered_on_the_reply_topic(cfg, start_daemon, broker, listen, sim):
    d = start_daemon(cfg)
    inbox = listen(cfg.mqtt.topics.reply)
    # `$`, unicode, a space, an empty level (a trailing slash): all unknown, each answered.
    levels = ["$SYS", "ünï", "erp ", "", "x" * 1000]
    for i, level in enumerate(levels):
        assert raw_publish(broker.port, f"{START}/{level}", json.dumps({"requestId": f"h{i}", "taskId": [ERP1]}).encode())
    assert wait_until(lambda: len(inbox.messages) >= len(levels), 20), inbox.messages
    errors = {m["requestId"]: m for m in inbox.messages}
    assert {errors[f"h{i}"]["error"] for i in range(len(levels))} == {"Unknown caller"}
    assert "(cut, 1000 characters)" in errors["h4"]["details"] and len(errors["h4"]["details"]) < 300
    # Deeper levels match no subscription (`+` is one level); a control character is refused
    # by the broker itself; wildcards cannot even be published.
    assert raw_publish(broker.port, f"{START}/erp/deeper", b'{"requestId": "deep", "taskId": []}')
    assert not raw_publish(broker.port, f"{START}/a\x01b", b'{"requestId": "ctl"}')
    for wild in ("+", "#"):
        with pytest.raises(ValueError):
            raw_publish(broker.port, f"{START}/{wild}", b"{}")
    time.sleep(0.5)
    assert not {"deep", "ctl"} & {m.get("requestId") for m in inbox.messages}
    assert sim.starts == [] and d.daemon.listener.unacked == 0


def test_wildcards_in_a_topic_are_refused_by_the_broker_and_the_config(cfg):
    from butler_mqtt.config import Config

    for level in ("+", "#", "a/b", "$x", "", "x" * 1000):
        with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError, naming the key
            Config.model_validate({"callers": [{"name": "erp", "topic": level}]})


def test_a_response_topic_on_a_caller_topic_is_refused(cfg, start_daemon, broker, listen, sim):
    start_daemon(cfg)
    inbox = listen(cfg.mqtt.topics.reply)
    raw_publish(broker.port, f"{START}/erp", json.dumps({"requestId": "loop", "taskId": [ERP1]}).encode(),
                response_topic=f"{START}/dwh-loader")
    assert wait_until(lambda: inbox.messages, 15)
    [err] = inbox.messages
    assert err["error"] == "Invalid response topic" and "callers" in err["details"]
    assert sim.starts == []


def test_flood_on_unknown_caller_topics_is_answered_acked_and_bounded(cfg, start_daemon, broker, listen, sim):
    d = start_daemon(cfg)
    inbox = listen(cfg.mqtt.topics.reply)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    n = 400
    infos = [c.publish(f"{START}/u{i}-{'z' * 100}", b'{"taskId": "%s"}' % ERP1.encode(), qos=1) for i in range(n)]
    assert all(wait_published(i, 30) for i in infos)
    c.disconnect()
    c.loop_stop()
    assert wait_until(lambda: len(inbox.messages) >= n, 60), len(inbox.messages)
    assert {m["error"] for m in inbox.messages} == {"Unknown caller"}
    assert wait_until(lambda: d.daemon.listener.unacked == 0, 10)
    callers_obj = d.daemon.runtime.service.callers
    assert set(callers_obj.limiter._times) == set()  # noqa: SLF001 - no state for unknown names
    assert sim.starts == []


def test_the_daemons_own_replies_under_the_start_topic_are_not_answered(cfg, start_daemon, listen, requester):
    # topics.reply is qliksense/task/start/reply: under <topics.start>/+. Shared subscriptions
    # cannot use No Local, so the daemon sees its own replies and must stay silent (no loop).
    shared = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"shared_group": f"g{uuid.uuid4().hex[:6]}"})})
    start_daemon(shared)
    inbox = listen(cfg.mqtt.topics.reply)
    ask(requester, f"{START}/erp", {"requestId": "noloop", "taskId": [ERP1]})
    requester.send({"requestId": "to-reply", "taskId": [ERP1]}, topic=f"{START}/nobody")
    time.sleep(2.0)
    replies_ = [m for m in inbox.messages if m.get("requestId") == "to-reply"]
    assert len(replies_) == 0 or all(m["error"] == "Unknown caller" for m in replies_)
    assert len(inbox.messages) < 20  # a loop would answer its own answers without end


def test_callers_only_refuses_the_bare_topics_and_the_legacy_token(qrs_certs, sim, broker, tmp_path, start_daemon,
                                                                   requester):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(), callers_only=True,
                      http={"enabled": True, "port": 0, "token": "legacy-token-1234"})
    port = start_daemon(cfg).daemon.http_server.port
    [err] = requester.request({"requestId": "bare", "taskId": [ERP1]})
    assert err["error"] == "Caller required"
    resp = post(port, {"taskId": [ERP1]}, "legacy-token-1234")
    assert resp.status_code == 401 and "callers_only" in resp.json()["details"]
    assert sim.starts == []
    resp = post(port, {"taskId": [ERP1]}, ERP_TOKEN)
    assert resp.status_code == 200 and resp.json()["totalTasksStarted"] == 1
    assert statuses(ask(requester, f"{START}/erp", {"taskId": [ERP2]})) == {ERP2: "started"}


# ----------------------------------------------------------------------------- REST


def test_rest_identifies_the_caller_by_token_hash(cfg, start_daemon, sim):
    port = start_daemon(cfg).daemon.http_server.port
    resp = post(port, {"requestId": "r", "tag": ["daily"]}, ERP_TOKEN)
    body = resp.json()
    assert resp.status_code == 200 and [t["taskId"] for t in body["tasksDenied"]] == [DWH1]
    resp = post(port, {"requestId": "r", "tag": ["daily"]}, DWH_TOKEN)  # same requestId: another request
    assert [t["taskId"] for t in resp.json()["tasksStarted"]] == [DWH1]
    wrong = post(port, {"tag": ["daily"]}, ERP_TOKEN + "z")
    assert wrong.status_code == 401 and wrong.json()["error"] == "Unauthorized"
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    # Hostile tokens: very long, a caller's hash given as the token, a name in place of a token.
    for bad in ("t" * 5000, token_sha256(ERP_TOKEN), "erp"):
        resp = post(port, {"tag": ["daily"]}, bad)
        assert resp.status_code == 401 and bad not in resp.text
    # Butler's body shape through the same caller.
    resp = post(port, [{"type": "starttaskid", "payload": {"taskId": DWH1}}], ERP_TOKEN)
    assert resp.json()["tasksId"]["denied"] == [{"taskId": DWH1, "taskName": "DWH load"}]
    assert started_ids(sim) == sorted([ERP1, DWH1])


def _client_cert(ca: trustme.CA, cn: str, path: Path) -> Path:
    ca.issue_cert("client.example", common_name=cn).private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def test_rest_identifies_the_caller_by_client_certificate_cn(qrs_certs, sim, broker, tmp_path, start_daemon):
    server_ca, client_ca = trustme.CA(), trustme.CA()
    d = tmp_path / "pki"
    d.mkdir()
    server = server_ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    server_ca.cert_pem.write_to_path(str(d / "server_ca.pem"))
    client_ca.cert_pem.write_to_path(str(d / "client_ca.pem"))
    erp_cert = _client_cert(client_ca, "erp-system", d / "erp.pem")
    other_cert = _client_cert(client_ca, "someone-else", d / "other.pem")
    tls = {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "client_ca": str(d / "client_ca.pem")}
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(), callers_only=True,
                      http={"enabled": True, "port": 0, "tls": tls})
    port = start_daemon(cfg).daemon.http_server.port
    url = f"https://127.0.0.1:{port}/v4/reloadtask/-/start"

    def call(cert: Path, body: Any, token: str | None = None) -> requests.Response:
        with requests.Session() as s:
            s.trust_env = False
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return s.post(url, json=body, cert=str(cert), verify=str(d / "server_ca.pem"), headers=headers, timeout=30)

    resp = call(erp_cert, {"tag": ["daily"]})
    assert resp.status_code == 200, resp.text
    assert [t["taskId"] for t in resp.json()["tasksStarted"]] == [ERP1]
    assert [t["taskId"] for t in resp.json()["tasksDenied"]] == [DWH1]
    # A certificate of the CA with a CN no caller has is nobody (callers_only).
    assert call(other_cert, {"tag": ["daily"]}).status_code == 401
    # A token naming another caller than the certificate: refused.
    assert call(erp_cert, {"tag": ["daily"]}, DWH_TOKEN).status_code == 401
    assert started_ids(sim) == [ERP1]


def test_the_rate_is_shared_by_mqtt_and_rest(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(requests_per_minute=2),
                      http={"enabled": True, "port": 0})
    d = start_daemon(cfg)
    port = d.daemon.http_server.port
    assert statuses(ask(requester, f"{START}/erp", {"requestId": "q1", "taskId": [ERP1]})) == {ERP1: "started"}
    assert post(port, {"requestId": "q2", "taskId": [ERP2]}, ERP_TOKEN).status_code == 200
    # Third in the minute: over the rate on either ingress, nothing started, the limit named.
    [err] = ask(requester, f"{START}/erp", {"requestId": "q3", "taskId": [ERP1]})
    assert err["error"] == "Rate limited" and "requests_per_minute (2)" in err["details"]
    resp = post(port, {"requestId": "q3", "taskId": [ERP1]}, ERP_TOKEN)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    assert "requests_per_minute (2)" in resp.json()["details"]
    # Another caller is not limited by erp's rate.
    assert post(port, {"requestId": "q3", "taskId": [DWH1]}, DWH_TOKEN).status_code == 200
    assert started_ids(sim) == sorted([ERP1, ERP2, DWH1])
    # The refused request was not stored as its outcome: once the minute has passed (the
    # limiter's clock moved on), the same requestId is handled as a new request.
    limiter = d.daemon.runtime.service.callers.limiter
    limiter._clock = lambda: time.monotonic() + 61  # noqa: SLF001
    assert statuses(ask(requester, f"{START}/erp", {"requestId": "q3", "taskId": [ERP1]})) == {ERP1: "started"}
    assert len(sim.starts) >= 3  # (ERP1 may still run: the simulator then answers its execution)

# ----------------------------------------------------------------------------- chains, history, metrics


def test_a_chain_stage_outside_the_callers_allow_list_is_denied(cfg, start_daemon, requester, sim):
    start_daemon(cfg)
    events = ask(requester, f"{START}/erp", {"requestId": "ch", "taskId": [ERP1], "then": {"tag": ["erp-next"]},
                                             "onFailure": "continue"}, timeout=60)
    stage1 = [e for e in events if e["event"] == "task" and e.get("stage") == 1]
    assert [(e["taskId"], e["status"]) for e in stage1] == [(NEXT, "denied")]
    assert stage1[0]["reason"] == "not on caller erp's allow-list"
    assert events[-1]["event"] == "requestFinished"
    assert started_ids(sim) == [ERP1]


def test_history_and_metrics_per_caller(cfg, start_daemon, requester, sim):
    d = start_daemon(cfg)
    port = d.daemon.http_server.port
    ask(requester, f"{START}/erp", {"requestId": "h1", "tag": ["daily"]})
    ask(requester, f"{START}/dwh-loader", {"requestId": "h1", "taskId": [DWH1]})
    requester.request({"requestId": "h2", "taskId": [ERP2]})
    recs = requests.get(f"http://127.0.0.1:{port}/v4/requests", params={"caller": "erp"}, timeout=10).json()["requests"]
    assert [(r["requestId"], r["caller"]) for r in recs] == [("h1", "erp")]
    both = requests.get(f"http://127.0.0.1:{port}/v4/requests", params={"requestId": "h1"}, timeout=10).json()
    assert sorted(r["caller"] for r in both["requests"]) == ["dwh", "erp"]
    anon = requests.get(f"http://127.0.0.1:{port}/v4/requests", params={"requestId": "h2"}, timeout=10).json()
    assert [r["caller"] for r in anon["requests"]] == [None]
    bad = requests.get(f"http://127.0.0.1:{port}/v4/requests", params={"caller": "ERP;drop"}, timeout=10)
    assert bad.status_code == 400
    # A caller's own token shows its own requests only.
    mine = requests.get(f"http://127.0.0.1:{port}/v4/requests", headers={"Authorization": f"Bearer {DWH_TOKEN}"},
                        timeout=10).json()["requests"]
    assert {r["caller"] for r in mine} == {"dwh"}
    # The CLI reads the same journal: --caller, the column and the JSON field.
    import io

    out = io.StringIO()
    run_history(cfg, HistoryQuery(caller="dwh"), as_json=True, out=out)
    assert [json.loads(line)["caller"] for line in out.getvalue().splitlines()] == ["dwh"]
    out = io.StringIO()
    run_history(cfg, HistoryQuery(), as_json=False, out=out)
    header, *rows = out.getvalue().splitlines()
    assert "CALLER" in header.split() and any(" erp " in r for r in rows) and any(" - " in r for r in rows)
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'butler_mqtt_requests_total{caller="erp",ingress="mqtt",outcome="ok"} 1.0' in metrics
    assert 'butler_mqtt_requests_total{caller="dwh",ingress="mqtt",outcome="ok"} 1.0' in metrics
    assert 'butler_mqtt_requests_total{caller="",ingress="mqtt",outcome="ok"} 1.0' in metrics
    assert 'butler_mqtt_tasks_total{caller="erp",status="started"} 1.0' in metrics
    assert 'butler_mqtt_tasks_total{caller="erp",status="denied"} 1.0' in metrics
    assert 'butler_mqtt_tasks_total{caller="dwh",status="started"} 1.0' in metrics
    # Bounded: unknown caller topics add no label value.
    ask(requester, f"{START}/stranger", {"taskId": [ERP1]})
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'caller="stranger"' not in metrics
    labels = {line.split('caller="')[1].split('"')[0] for line in metrics.splitlines() if 'caller="' in line}
    assert labels <= {"", "erp", "dwh"}


def test_alerts_name_the_caller(qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen):
    sim.fail_starts_for = {ERP2}
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(),
                      alerts={"topic": "qliksense/task/alert"})
    start_daemon(cfg)
    alerts = listen("qliksense/task/alert")
    assert statuses(ask(requester, f"{START}/erp", {"requestId": "al-1", "taskId": [ERP2]})) == {ERP2: "failed"}
    alert = alerts.wait_for(lambda m: m.get("requestId") == "al-1")
    assert alert["alert"] == "failedStart" and alert["caller"] == "erp"
    requester.request({"requestId": "al-2", "taskId": [ERP2]})
    assert alerts.wait_for(lambda m: m.get("requestId") == "al-2")["caller"] is None


FAILS = "f0f0f0f0-5555-4555-8555-555555555555"


def test_a_retry_is_judged_by_the_callers_allow_list_again(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    """A reload that failed is started again (retry) only while the request's caller may still
    start it: here its tag leaves erp's allow-list before the retry is due."""
    sim.store.add_task(SimTask(FAILS, "ERP flaky", tags=["erp"], run_seconds=0.3, outcome="fail"))
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers())
    start_daemon(cfg)
    token, box = requester.send({"requestId": "rt", "taskId": [FAILS], "retry": {"attempts": 2, "delay": 1.0},
                                 "wait": True}, topic=f"{START}/erp")
    events: list[dict[str, Any]] = []
    while not events or events[-1]["event"] != "taskFinished":
        events.append(box.get(timeout=30))
    assert events[-1]["attempt"] == 1 and events[-1]["retryIn"] == 1.0
    sim.store.replace_task(SimTask(FAILS, "ERP flaky", tags=["moved-away"], run_seconds=0.3, outcome="fail"))
    while events[-1]["event"] != "requestFinished":
        events.append(box.get(timeout=30))
    retried = [e for e in events if e["event"] == "task" and e.get("attempt") == 2]
    assert [(e["status"], e["reason"]) for e in retried] == [("denied", "not on caller erp's allow-list")]
    assert [s.task_id for s in sim.starts] == [FAILS]  # the first attempt only


def test_stop_requests_are_judged_by_their_callers_allow_list(cfg, start_daemon, requester, sim):
    """Stops (contract section 8) on a caller's topic are that caller's (section 10): its own task
    is stopped or notRunning, another caller's is denied and never touched; an unknown caller
    level under topics.stop is refused like one under topics.start; a stop starts nothing."""
    start_daemon(cfg)
    stop = cfg.mqtt.topics.stop
    *tasks, summary = ask(requester, f"{stop}/erp", {"requestId": "s1", "taskId": [ERP1, DWH1]})
    by_id = {e["taskId"]: e for e in tasks}
    assert by_id[ERP1]["status"] == "notRunning" and by_id[DWH1]["status"] == "denied", tasks
    assert [t["taskId"] for t in summary["tasksDenied"]] == [DWH1]
    [err] = ask(requester, f"{stop}/nobody", {"requestId": "s2", "taskId": [ERP1]})
    assert err["error"] == "Unknown caller"
    assert sim.starts == [] and sim.stop_requests == []


def test_the_served_documents_name_the_callers(cfg, start_daemon):
    port = start_daemon(cfg).daemon.http_server.port
    asyncapi = requests.get(f"http://127.0.0.1:{port}/asyncapi.json", timeout=10).json()
    channel = asyncapi["channels"]["callerStart"]
    assert channel["address"] == f"{START}/{{caller}}" and channel["parameters"]["caller"]["enum"] == ["erp", "dwh-loader"]
    assert "startTasksAsCaller" in asyncapi["operations"]
    openapi = requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
    start = openapi["paths"]["/v4/reloadtask/{taskId}/start"]["post"]
    assert start["security"] == [{"bearerToken": []}] and "429" in start["responses"]
    history = openapi["paths"]["/v4/requests"]["get"]
    assert "caller" in {p["name"] for p in history["parameters"]}
    assert "caller" in openapi["components"]["schemas"]["HistoryRecord"]["properties"]


LONG = "10101010-6666-4666-8666-666666666666"
QUEUED = "20202020-7777-4777-8777-777777777777"


def test_a_queued_start_is_judged_by_the_callers_allow_list_when_its_turn_comes(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester
):
    sim.store.add_task(SimTask(LONG, "ERP long", tags=["erp"], run_seconds=1.5))
    sim.store.add_task(SimTask(QUEUED, "ERP queued", tags=["erp"], run_seconds=0.1))
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(),
                      policies={"max_running": 1})
    start_daemon(cfg)
    assert statuses(ask(requester, f"{START}/erp", {"requestId": "qa", "taskId": [LONG]})) == {LONG: "started"}
    _token, box = requester.send({"requestId": "qb", "taskId": [QUEUED]}, topic=f"{START}/erp")
    events = [box.get(timeout=20)]
    assert events[0]["status"] == "queued", events
    # While it waits for the slot, the task leaves erp's allow-list.
    sim.store.replace_task(SimTask(QUEUED, "ERP queued", tags=["elsewhere"], run_seconds=0.1))
    while not [e for e in events if e["event"] == "task" and e["status"] not in ("queued",)]:
        events.append(box.get(timeout=30))
    last = [e for e in events if e["event"] == "task"][-1]
    assert (last["status"], last.get("reason")) == ("denied", "not on caller erp's allow-list")
    assert [s.task_id for s in sim.starts] == [LONG]


SLOW = "30303030-8888-4888-8888-888888888888"


@pytest.mark.parametrize("after_restart", ["same callers", "erp removed"])
def test_a_chain_resumed_after_a_restart_is_judged_by_the_same_caller(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester, after_restart
):
    """The caller is kept with the waited request in the journal: after a restart the next stage
    is judged by that caller's list (outside it: denied), never run as the anonymous caller,
    also when the caller was removed from the configuration meanwhile."""
    sim.store.add_task(SimTask(SLOW, "ERP slow", tags=["erp"], run_seconds=2.0))
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers())
    first = start_daemon(cfg)
    _token, box = requester.send({"requestId": "chain-r", "taskId": [SLOW], "then": {"tag": ["erp", "erp-next"]},
                                  "onFailure": "continue"}, topic=f"{START}/erp")
    events = [box.get(timeout=20)]
    while events[-1]["event"] != "summary":
        events.append(box.get(timeout=20))
    first.stop()  # stage 0 still running
    later = cfg if after_restart == "same callers" else cfg.model_copy(update={"callers": cfg.callers[1:]})
    start_daemon(later)  # same client id and journal: picks the chain up again
    while events[-1]["event"] != "requestFinished":
        events.append(box.get(timeout=30))
    stage1 = {e["taskId"]: e["status"] for e in events if e["event"] == "task" and e.get("stage") == 1}
    if after_restart == "same callers":
        assert stage1 == {ERP1: "started", ERP2: "started", SLOW: "started", NEXT: "denied"}
    else:
        assert set(stage1.values()) == {"denied"} and len(stage1) == 4
        assert sorted(s.task_id for s in sim.starts) == [SLOW]


def test_the_request_command_publishes_as_a_caller(cfg, start_daemon, broker, sim):
    import os
    import subprocess
    import sys

    start_daemon(cfg)
    env = {**os.environ, "BUTLER_MQTT__MQTT__HOST": "127.0.0.1", "BUTLER_MQTT__MQTT__PORT": str(broker.port)}
    repo = Path(__file__).resolve().parents[2]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "butler_mqtt", "request", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=60)

    denied = run("--task-id", DWH1, "--caller", "erp")
    assert f"sent to topic {START}/erp" in denied.stderr
    assert [json.loads(line)["status"] for line in denied.stdout.splitlines()[:1]] == ["denied"]
    ok = run("--task-id", ERP1, "--caller", "erp")
    assert ok.returncode == 0, ok.stderr
    bad = run("--task-id", ERP1, "--caller", "a/+")
    assert bad.returncode == 2 and "--caller" in bad.stderr
    assert started_ids(sim) == [ERP1]


def test_callers_over_mqtt_311_answer_on_the_reply_topic_without_a_loop(qrs_certs, sim, broker, tmp_path,
                                                                        start_daemon, listen):
    """MQTT 3.1.1 has no No Local: the daemon receives its own replies on topics.reply (under
    <topics.start>/+) and must ack them silently, without asking the retain probe."""
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", callers=callers(), mqtt={"protocol": "3.1.1"})
    d = start_daemon(cfg)
    inbox = listen(cfg.mqtt.topics.reply)
    with Requester(cfg.mqtt) as r:
        events = r.request({"requestId": "v311", "taskId": [ERP1, DWH1]}, topic=f"{START}/erp")
    assert statuses(events) == {ERP1: "started", DWH1: "denied"}
    time.sleep(1.0)
    assert len(inbox.messages) == 3  # two task events and the summary: each once, never answered
    assert d.daemon.listener.unacked == 0 and started_ids(sim) == [ERP1]
