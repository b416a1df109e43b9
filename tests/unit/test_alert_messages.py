"""Alerts, the pure parts: which reply event raises which alert, the message, QRS outages."""

from __future__ import annotations

import threading
import time

import pytest

from butler_mqtt.config import WebhookConfig
from butler_mqtt.ops.alerts import FIELDS, QrsOutage, Webhook, alert_kind, message
from butler_mqtt.ops.metrics import Metrics


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ({"event": "task", "status": "failed"}, "failedStart"),
        ({"event": "task", "status": "expired"}, "queueExpired"),
        ({"event": "task", "status": "started"}, None),
        ({"event": "task", "status": "denied"}, None),
        ({"event": "task", "status": "queued"}, None),
        ({"event": "taskFinished", "status": "FinishedFail"}, "reloadFailed"),
        ({"event": "taskFinished", "status": "Aborted", "attempt": 3}, "reloadFailed"),  # the last attempt
        ({"event": "taskFinished", "status": "Error"}, "reloadFailed"),
        ({"event": "taskFinished", "status": "Reset"}, "reloadFailed"),
        ({"event": "taskFinished", "status": "FinishedFail", "attempt": 1, "retryIn": 60}, None),  # retried
        ({"event": "taskFinished", "status": "FinishedSuccess"}, None),
        ({"event": "taskFinished", "status": "Skipped"}, None),
        ({"event": "taskFinished", "status": "Unknown"}, None),
        ({"event": "taskOverdue", "runningForMs": 1800000}, "overdue"),
        ({"event": "summary", "tasksFailed": [{"taskId": "x"}]}, None),  # the task event already alerted
        ({"event": "requestFinished", "finished": {"FinishedFail": 1}}, None),
        ({"event": "error", "error": "Invalid task ID format"}, None),
    ],
)
def test_which_event_raises_which_alert(event, kind):
    assert alert_kind(event) == kind


def test_every_message_has_every_field_and_a_sentence():
    overdue = message("overdue", "b1", {"requestId": "r", "taskId": "t", "runningForMs": 1830000}, now=0)
    assert list(overdue)[:4] == ["alert", "severity", "time", "instance"] and set(overdue) == {*FIELDS, "alert", "severity", "time", "instance", "text"}
    assert overdue["time"] == "1970-01-01T00:00:00.000Z" and overdue["severity"] == "warning" and overdue["taskName"] is None
    assert overdue["text"] == "Reload of task t still running after 30 min 30 s (request r)"
    reload = message("reloadFailed", "b1", {"taskName": "Sales", "status": "Aborted", "attempt": 3})
    assert reload["text"] == "Reload of 'Sales' ended Aborted after 3 attempts"
    expired = message("queueExpired", "b1", {"taskName": "Sales", "requestId": "r"})
    assert expired["text"] == "'Sales' waited too long in butler-mqtt's queue and was given up (request r)"
    assert message("qrsRecovered", "b1", {"qrs": "https://q:4242", "downForMs": 125000})["text"] == "QRS at https://q:4242 answers again after 2 min 5 s"


def test_qrs_outage_needs_failures_for_the_whole_threshold_then_one_success_ends_it():
    o = QrsOutage(after_s=3600)
    assert o.observe(None) is None and o.observe(503) is None and not o.down  # not long enough
    assert o.observe(404) is None  # answered (a 4xx is an answer): the count starts again
    o = QrsOutage(after_s=0.05)
    assert o.observe(None, "GET /qrs/about") is None  # the first failure starts the clock
    time.sleep(0.1)
    change = o.observe(502, "GET /qrs/reloadtask/full")
    assert change is not None
    kind, fields = change
    assert kind == "qrsOutage" and fields["reason"] == "HTTP 502 on GET /qrs/reloadtask/full"
    assert o.down and o.observe(None) is None  # raised once
    back = o.observe(200)
    assert back is not None and back[0] == "qrsRecovered" and back[1]["since"] == fields["since"] and back[1]["downForMs"] >= 100
    assert not o.down and o.observe(200) is None


def test_a_zero_threshold_raises_on_the_first_failure():
    o = QrsOutage(after_s=0)
    change = o.observe(500, "POST /qrs/task/{id}/start/synchronous")
    assert change is not None and change[1]["reason"] == "HTTP 500 on POST /qrs/task/{id}/start/synchronous"


def test_webhook_failures_never_show_the_url_or_header_secrets():
    cfg = WebhookConfig.model_validate({"url": "https://user:pw@hooks.example:8443/services/T0K3N?sig=abc", "headers": {"X-Key": "k3y"}})
    hook = Webhook(cfg, Metrics(), threading.Event())
    assert hook.where == "https://hooks.example:8443"
    scrubbed = hook._scrub("failed https://user:pw@hooks.example:8443/services/T0K3N?sig=abc with k3y and user:pw")
    assert "T0K3N" not in scrubbed and "k3y" not in scrubbed and "pw" not in scrubbed and "sig=abc" not in scrubbed
    hook.close()


@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        ("alerts:\n  topic: qliksense/task/#\n", "alerts.topic", "no wildcards"),
        ("alerts:\n  topic: $SYS/alerts\n", "alerts.topic", "not a $-topic"),
        ("alerts:\n  webhook:\n    url: ftp://example.com/hook\n", "alerts.webhook.url", "http:// or https://"),
        ("alerts:\n  webhook:\n    attempts: 0\n", "alerts.webhook.attempts", "greater than or equal to 1"),
        ("alerts:\n  webhook:\n    retries: 3\n", "alerts.webhook.retries", "unknown key"),
        ("alerts:\n  email: ops@example.com\n", "alerts.email", "unknown key"),
    ],
)
def test_bad_alerts_config_names_the_key(tmp_path, yaml_text, key, reason):
    from butler_mqtt.config import load_config
    from butler_mqtt.errors import ConfigError

    path = tmp_path / "butler.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value) and reason in str(err.value) and f"{path}, line" in str(err.value)


def test_webhook_secrets_are_redacted_and_a_missing_ca_file_names_its_key(tmp_path):
    from butler_mqtt.config import Config
    from butler_mqtt.errors import ConfigError

    certs = {k: str(tmp_path / "x.pem") for k in ("cert", "key", "ca")}
    (tmp_path / "x.pem").write_text("x")
    cfg = Config.model_validate({"qrs": certs, "alerts": {"webhook": {
        "url": "https://hooks.example/T0K3N", "headers": {"Authorization": "Bearer s3cr3t"}, "ca": str(tmp_path / "missing.pem")}}})
    assert "T0K3N" not in str(cfg.redacted()) and "s3cr3t" not in str(cfg.redacted())
    with pytest.raises(ConfigError, match=r"alerts\.webhook\.ca.*file not found"):
        cfg.check_qrs_files()
