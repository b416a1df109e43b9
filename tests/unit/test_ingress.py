"""The ingress decisions for one MQTT delivery (pure; no broker)."""

from __future__ import annotations

import json

import pytest

from butler_mqtt.config import MqttConfig
from butler_mqtt.model import StartRequest
from butler_mqtt.mqtt.ingress import Clear, Reject, idempotency_key, request_id_of, screen
from butler_mqtt.mqtt.listener import Job

T1 = "11111111-1111-4111-8111-111111111111"
CFG = MqttConfig()
LIMITS = (64 * 1024, 1024)


def job(payload: object = None, **kw: object) -> Job:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload or {"requestId": "r", "taskId": T1}).encode()
    base: dict[str, object] = dict(ingress="mqtt", topic=CFG.topics.start, payload=raw, mid=7, qos=1, dup=False,
                                   response_topic=None, correlation_data=None, expires_at=None)
    return Job(**{**base, **kw})  # type: ignore[arg-type]


def test_a_valid_request_passes():
    assert isinstance(screen(job(), CFG, LIMITS, 0.0), StartRequest)


def test_an_empty_retained_message_is_acked_silently_a_retained_request_is_refused():
    assert isinstance(screen(job(b"", retained=True), CFG, LIMITS, 0.0), Clear)
    r = screen(job(retained=True), CFG, LIMITS, 0.0)
    assert isinstance(r, Reject) and r.error == "Retained request ignored"


@pytest.mark.parametrize("topic", ["a/#", "+", "$SYS/x", "", CFG.topics.start, f"{CFG.topics.status}/me", "t" * 1025])
def test_bad_response_topics_are_refused_and_answered_elsewhere(topic: str):
    r = screen(job(response_topic=topic), CFG, LIMITS, 0.0)
    assert isinstance(r, Reject) and r.error == "Invalid response topic" and r.default_route


def test_the_response_topic_allow_list():
    cfg = MqttConfig(response_topic_prefixes=["erp/"])
    assert isinstance(screen(job(response_topic="erp/r/1"), cfg, LIMITS, 0.0), StartRequest)
    r = screen(job(response_topic="other/r"), cfg, LIMITS, 0.0)
    assert isinstance(r, Reject) and "response_topic_prefixes" in r.details


def test_oversize_expired_and_invalid_are_refused_with_their_reason():
    big = screen(job(b"", oversize=70_000), CFG, LIMITS, 0.0)
    assert isinstance(big, Reject) and big.error == "Payload too large" and "65536" in big.details
    late = screen(job(expires_at=5.0), CFG, LIMITS, 6.0)
    assert isinstance(late, Reject) and late.outcome == "expired"
    bad = screen(job(b'{"taskId": "nope"}'), CFG, LIMITS, 0.0)
    assert isinstance(bad, Reject) and bad.error == "Invalid task ID format"


def test_the_request_id_of_a_bad_payload_is_echoed_only_when_it_is_safe():
    assert request_id_of(job({"requestId": "ok", "taskId": "nope"})) == "ok"
    assert request_id_of(job(b'{"requestId": "x\\ud800"}')) is None
    assert request_id_of(job(b'{"requestId": "a\\u0007"}')) is None
    assert request_id_of(job(ingress="mqtt-plain", payload=b"r")) is None


def test_idempotency_keys():
    req = StartRequest(requestId="r", taskId=[T1])
    assert idempotency_key(req, job(), "reply") == ("id:r", None)
    anon = StartRequest(taskId=[T1])
    k1, _ = idempotency_key(anon, job(correlation_data=b"c"), "a/replies")
    k2, _ = idempotency_key(anon, job(correlation_data=b"c"), "b/replies")
    assert k1 != k2 and k1 is not None and k1.startswith("cd:")
    key, fp = idempotency_key(anon, job(), "reply")
    assert key is None and fp is not None
    assert idempotency_key(anon, job(mid=8), "reply")[1] != fp  # another delivery, another fingerprint
