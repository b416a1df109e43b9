"""Alerts (issue 15, item 3): on an MQTT topic of the real broker and at a real local webhook,
from real requests against the simulator: failed starts, failed reloads, QRS outage and
recovery; a webhook that is down is retried and never holds up a request; secrets stay out of
the log. Every alert received on the topic (conftest's TopicListener) and at the webhook
(support/webhook.py) is validated against the AsyncAPI document's AlertMessage schema by
support/asyncapi_check.py; the first test also checks that explicitly."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support import asyncapi_check
from tests.support.mqtt import wait_until
from tests.support.webhook import WebhookServer

OK = "a1e00000-0000-4000-8000-000000000001"
FAILS = "a1e00000-0000-4000-8000-000000000002"
BROKEN = "a1e00000-0000-4000-8000-000000000003"
LONG = "a1e00000-0000-4000-8000-000000000004"
SHORT = "a1e00000-0000-4000-8000-000000000005"
TASKS = [
    SimTask(OK, "Loads fine", tags=["fine"], run_seconds=0.1),
    SimTask(FAILS, "Fails to load", tags=["failing"], run_seconds=0.1, outcome="fail"),
    SimTask(BROKEN, "Cannot start", tags=["broken"]),
    SimTask(LONG, "Long load", run_seconds=2.5, outcome="fail"),
    SimTask(SHORT, "Short load", run_seconds=0.1),
]
SECRET_PATH = "/hooks/s3cr3t-path-token"
SECRET_HEADER = "Bearer hdr-s3cr3t"
FIELDS = {"alert", "severity", "time", "instance", "requestId", "caller", "taskId", "taskName", "executionId", "status",
          "reason", "stage", "attempt", "runningForMs", "durationMs", "failure", "qrs", "since", "downForMs", "text"}


class Tee:
    """Log lines of this test, kept (and still written to its captured output)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.buf = inner, io.StringIO()

    def write(self, text: str) -> int:
        self.buf.write(text)
        return int(self.inner.write(text)) if self.inner is not None else len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.fixture
def logs(_log_stream: Any) -> Iterator[io.StringIO]:
    from butler_mqtt.ops.logging import setup_logging

    setup_logging("info", "console", stream=_log_stream)  # as conftest does (a test may have reset structlog)
    tee = Tee(_log_stream.current)
    _log_stream.current = tee
    yield tee.buf
    _log_stream.current = tee.inner


@pytest.fixture
def hook() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    yield server
    server.stop()


def alerts_config(topic: str, port: int, **webhook: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "qrs_outage_after": 0.5,
        "webhook": {"url": f"http://127.0.0.1:{port}{SECRET_PATH}?key=q-s3cr3t", "headers": {"Authorization": SECRET_HEADER},
                    "retry_delay": 0.1, "attempts": 30, "timeout": 5, **webhook},
    }


def until(box: Any, kind: str) -> list[dict[str, Any]]:
    """The replies from a Requester.send box up to the first `kind` event."""
    events = [box.get(timeout=30)]
    while events[-1]["event"] != kind:
        events.append(box.get(timeout=30))
    return events


def alert_topic() -> str:
    return f"test/alerts/{uuid.uuid4().hex[:8]}"


def test_failed_start_and_failed_reload_alert_on_the_topic_and_the_webhook(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen, hook, logs
):
    sim.fail_starts_for = {BROKEN}
    topic = alert_topic()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", alerts=alerts_config(topic, hook.port))
    on_topic = listen(topic)
    d = start_daemon(cfg)
    requester.request({"requestId": "fine", "tag": "fine", "wait": True}, timeout=60)  # raises nothing
    requester.request({"requestId": "broken", "tag": "broken"}, timeout=30)
    events = requester.request({"requestId": "reload", "tag": "failing", "wait": True}, timeout=60)
    finished = next(e for e in events if e["event"] == "taskFinished")

    failed = on_topic.wait_for(lambda m: m["alert"] == "failedStart")
    assert failed["requestId"] == "broken" and failed["taskId"] == BROKEN and failed["taskName"] == "Cannot start"
    assert failed["status"] == "failed" and "QRS refused the start" in failed["reason"] and failed["severity"] == "error"
    assert failed["text"].startswith("Start of 'Cannot start' failed") and failed["instance"] == cfg.mqtt.client_id
    reload = on_topic.wait_for(lambda m: m["alert"] == "reloadFailed")
    assert reload["executionId"] == finished["executionId"] and reload["status"] == "FinishedFail"
    assert reload["durationMs"] == finished["durationMs"] and reload["qrs"] == cfg.qrs.base_url
    assert set(reload) == FIELDS and set(failed) == FIELDS

    assert hook.wait_for(lambda b: b["alert"] == "reloadFailed") == reload  # the same message on both sinks
    assert hook.wait_for(lambda b: b["alert"] == "failedStart") == failed
    path, headers, _ = hook.received[0]
    assert path == f"{SECRET_PATH}?key=q-s3cr3t" and headers["Authorization"] == SECRET_HEADER
    assert headers["Content-Type"] == "application/json"
    assert sorted(b["alert"] for b in hook.bodies()) == ["failedStart", "reloadFailed"]  # the success raised nothing
    assert sorted(m["alert"] for m in on_topic.messages) == ["failedStart", "reloadFailed"]
    for received in [*on_topic.messages, *hook.bodies()]:  # as the AsyncAPI document says (alerts channel)
        assert asyncapi_check.problem(received) is None
    sent = 'butler_mqtt_alert_deliveries_total{result="sent",sink="webhook"} 2.0'  # counted once answered
    assert wait_until(lambda: sent in d.daemon.runtime.metrics.render().decode(), 10)
    text = d.daemon.runtime.metrics.render().decode()
    assert 'butler_mqtt_alerts_total{alert="failedStart"} 1.0' in text and 'butler_mqtt_alerts_total{alert="overdue"} 0.0' in text


def test_a_webhook_that_is_down_is_retried_and_never_holds_up_a_request(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen, logs
):
    sim.fail_starts_for = {BROKEN}
    port, topic = free_port(), alert_topic()  # nothing listens there yet: connection refused
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", alerts=alerts_config(topic, port))
    on_topic = listen(topic)
    d = start_daemon(cfg)
    events = requester.request({"requestId": "while-down", "tag": ["broken", "fine"]}, timeout=30)
    assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1  # answered in full
    assert on_topic.wait_for(lambda m: m["alert"] == "failedStart")["requestId"] == "while-down"  # MQTT is not held up
    assert wait_until(lambda: "alert_webhook_retry" in logs.getvalue(), 30)
    assert requester.request({"requestId": "still-fine", "tag": "fine"}, timeout=30)[-1]["totalTasksStarted"] == 1

    server = WebhookServer()
    server.errors = [503, 503]  # up, but not well yet: retried too
    server.start(port)
    try:
        got = server.wait_for(lambda b: b["alert"] == "failedStart", timeout=60)
        assert got["requestId"] == "while-down" and server.answered[:3] == [503, 503, 200]
    finally:
        server.stop()
    text = d.daemon.runtime.metrics.render().decode()
    retried = next(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("butler_mqtt_alert_deliveries_total") and 'result="retried"' in line)
    assert retried >= 3  # refused at least once, then two 503s
    log = logs.getvalue()
    assert f"http://127.0.0.1:{port}" in log  # failures name where, and only that
    for secret in ("s3cr3t-path-token", "q-s3cr3t", "hdr-s3cr3t"):
        assert secret not in log


def test_qrs_outage_and_recovery_are_alerted_once_each(qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen, hook):
    topic = alert_topic()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", alerts=alerts_config(topic, hook.port))
    on_topic = listen(topic)
    d = start_daemon(cfg)
    sim.fault = "outage"  # QRS closes every connection without an answer
    token, box = requester.send({"requestId": "during-outage", "tag": "fine"})  # kept unacked, retried
    outage = on_topic.wait_for(lambda m: m["alert"] == "qrsOutage", timeout=60)
    assert outage["severity"] == "error" and outage["qrs"] == cfg.qrs.base_url and outage["since"] <= outage["time"]
    assert outage["reason"].startswith("no answer") and outage["requestId"] is None
    assert "butler_mqtt_qrs_outage 1.0" in d.daemon.runtime.metrics.render().decode()
    sim.fault = None
    summary = box.get(timeout=60)
    while summary["event"] != "summary":
        summary = box.get(timeout=60)
    assert summary["totalTasksStarted"] == 1  # the request went through once QRS was back
    recovered = on_topic.wait_for(lambda m: m["alert"] == "qrsRecovered", timeout=30)
    assert recovered["since"] == outage["since"] and recovered["downForMs"] > 0 and recovered["severity"] == "info"
    assert [m["alert"] for m in on_topic.messages] == ["qrsOutage", "qrsRecovered"]  # once each
    assert hook.wait_for(lambda b: b["alert"] == "qrsRecovered") == recovered
    assert "butler_mqtt_qrs_outage 0.0" in d.daemon.runtime.metrics.render().decode()


def test_run_policies_alert_overdue_expired_and_only_the_last_retry(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester, listen, hook
):
    topic = alert_topic()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", alerts=alerts_config(topic, hook.port),
                      policies={"max_running": 1, "queue_timeout": 1})
    on_topic = listen(topic)
    start_daemon(cfg)
    _, first = requester.send({"requestId": "long", "taskId": LONG, "deadline": 0.5, "wait": True})  # holds the slot
    assert until(first, "summary")[0]["status"] == "started"
    _, attached = requester.send({"requestId": "attached", "taskId": LONG, "ifRunning": "attach", "wait": True})
    assert until(attached, "summary")[0]["status"] == "alreadyRunning"
    expired = requester.request({"requestId": "queued", "taskId": SHORT, "wait": True}, timeout=30)
    assert [e["status"] for e in expired if e["event"] == "task"] == ["queued", "expired"]

    gone = on_topic.wait_for(lambda m: m["alert"] == "queueExpired")
    assert gone["requestId"] == "queued" and gone["taskId"] == SHORT and "queue_timeout" in gone["reason"]
    late = on_topic.wait_for(lambda m: m["alert"] == "overdue")
    assert late["requestId"] == "long" and late["taskName"] == "Long load" and late["runningForMs"] >= 500
    failed = on_topic.wait_for(lambda m: m["alert"] == "reloadFailed", timeout=30)
    assert failed["executionId"] == late["executionId"]
    for box in (first, attached):  # both requests heard the end of the one execution
        assert until(box, "requestFinished")[-1]["finished"] == {"FinishedFail": 1}
    retried = requester.request({"requestId": "retried", "taskId": FAILS, "retry": {"attempts": 1, "delay": 0.1}, "wait": True},
                                timeout=30)
    finished = [e for e in retried if e["event"] == "taskFinished"]
    assert [(e["attempt"], "retryIn" in e) for e in finished] == [(1, True), (2, False)]
    last = on_topic.wait_for(lambda m: m["alert"] == "reloadFailed" and m["requestId"] == "retried")
    assert last["attempt"] == 2 and last["executionId"] == finished[1]["executionId"]
    assert last["text"] == "Reload of 'Fails to load' ended FinishedFail after 2 attempts (request retried)"
    assert hook.wait_for(lambda b: b["requestId"] == "retried") == last
    alerts = sorted((m["alert"], m["requestId"]) for m in on_topic.messages)
    assert alerts == [("overdue", "long"), ("queueExpired", "queued"), ("reloadFailed", "long"), ("reloadFailed", "retried")]


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) of this process
        f.write("5")


def _webhook_results(d: Any) -> dict[str, float]:
    text = d.daemon.runtime.metrics.render().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("butler_mqtt_alert_deliveries_total") and 'sink="webhook"' in line:
            out[line.split('result="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def test_a_webhook_answering_1_gb_is_read_only_up_to_a_small_cap(qrs_certs, sim, broker, tmp_path, start_daemon, requester):
    """The webhook answers 200 with a 1 GiB body: the daemon (in this process) reads at most
    64 KiB of it and closes the connection; its peak RSS does not grow by the answer."""
    from tests.support.hostile_http import HostileHttpServer

    server = HostileHttpServer("huge").start()
    try:
        sim.fail_starts_for = {BROKEN}
        cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state",
                          alerts=alerts_config(alert_topic(), server.port, attempts=1, timeout=30))
        d = start_daemon(cfg)
        _reset_peak_rss()
        before = _vm_hwm_kb()
        assert requester.request({"requestId": "huge-1", "tag": "broken"}, timeout=30)[-1]["event"] == "summary"
        assert wait_until(lambda: len(server.closed()) == 1, 60), "the daemon never let go of the 1 GiB answer"
        assert wait_until(lambda: _webhook_results(d).get("sent") == 1.0, 30), _webhook_results(d)
        grown_mb = (_vm_hwm_kb() - before) / 1024
        assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB"
        assert server.closed()[0].sent < 256 << 20  # the rest was never read
        assert requester.request({"requestId": "huge-2", "tag": "fine"}, timeout=30)[-1]["totalTasksStarted"] == 1
    finally:
        server.stop()


def test_a_webhook_dripping_its_answer_is_cut_at_the_total_timeout(
    qrs_certs, sim, broker, tmp_path, start_daemon, requester, logs
):
    """The webhook drips its answer head one byte every 0.2 s (for up to 10 min): each POST is
    cut at `timeout` in all (not per read), retried, then given up; requests go on meanwhile."""
    from tests.support.hostile_http import HostileHttpServer

    server = HostileHttpServer("drip", drip_s=0.2).start()
    try:
        sim.fail_starts_for = {BROKEN}
        cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state",
                          alerts=alerts_config(alert_topic(), server.port, attempts=2, timeout=1))
        d = start_daemon(cfg)
        assert requester.request({"requestId": "drip-1", "tag": "broken"}, timeout=30)[-1]["event"] == "summary"
        assert wait_until(lambda: len(server.connections) >= 1, 30)
        assert requester.request({"requestId": "drip-2", "tag": "fine"}, timeout=30)[-1]["totalTasksStarted"] == 1
        # Generous: the server would drip for 600 s per connection.
        assert wait_until(lambda: len(server.closed()) == 2, 90), "a dripping answer was not cut"
        assert wait_until(lambda: _webhook_results(d).get("failed") == 1.0, 30), _webhook_results(d)
        assert all(c.closed is not None and c.closed - c.accepted < 60 for c in server.connections)
        assert "no complete answer within alerts.webhook.timeout" in logs.getvalue()
    finally:
        server.stop()
