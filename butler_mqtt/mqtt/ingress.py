"""Pure: what the daemon does with one MQTT delivery before anything can start.

`screen` answers, in this order: an empty retained message (someone clearing a retained
request: ack, say nothing); a response topic replies may not go to (answered on topics.reply);
an oversize payload (dropped unread by the listener); a retained request (never acted on); a
payload that is not a valid request; an expired one. Otherwise it is the StartRequest.

`idempotency_key` spells the key every ingress shares (keys.py) for an MQTT delivery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from butler_mqtt import keys
from butler_mqtt.callers import CallerRejected, Callers, TopicRoute, caller_topic_filters
from butler_mqtt.config import MqttConfig
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import (
    MAX_PAYLOAD_BYTES,
    MAX_REQUEST_ID_LENGTH,
    StartRequest,
    StopRequest,
    decode_json,
    encodable,
    parse_plain,
    validate_request,
    validate_stop,
)
from butler_mqtt.mqtt.listener import Job
from butler_mqtt.mqtt.topics import response_topic_problem

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Reject:
    """Answer with an `error` reply (and ack); nothing is started."""

    log_event: str
    outcome: str  # the metrics outcome
    error: str
    details: str
    default_route: bool = False  # the request's response topic may not be used


@dataclass(frozen=True)
class Clear:
    """An empty retained message: ack it, answer nothing."""


def screen(
    job: Job, cfg: MqttConfig, limits: tuple[int, int], now: float, retained: bool | None = None,
    listening: Sequence[str] = (),
) -> Reject | Clear | StartRequest | StopRequest:
    """The request in `job`, or why it is not one (`now`: time.monotonic(); `retained`: the
    retain flag when known better than the delivery's, e.g. from the MQTT 3.1.1 probe;
    `listening`: the caller topic filters, which no response topic may match)."""
    retained = job.retained if retained is None else retained
    if retained and not job.payload and not job.oversize:
        return Clear()
    if job.response_topic is not None:
        problem = response_topic_problem(job.response_topic, cfg, listening)
        if problem is not None:
            return Reject("request_rejected", "rejected", "Invalid response topic", f"{problem}; nothing was started", True)
    plain = job.ingress == "mqtt-plain"
    if job.oversize:
        limit = limits[1 if plain else 0]
        return Reject("request_rejected", "rejected", "Payload too large", f"{job.oversize} bytes; the limit is {limit} bytes")
    if retained:
        return Reject("retained_request_ignored", "rejected", "Retained request ignored",
                      "start requests must be published with retain=false (a retained copy on the topic"
                      " counts too: clear it with an empty retained message); nothing was started")
    try:
        if plain:
            req: StartRequest | StopRequest = parse_plain(job.payload)
        elif job.ingress == "mqtt-stop":
            req = validate_stop(decode_json(job.payload))
        else:
            req = validate_request(decode_json(job.payload))
    except RequestRejected as rej:
        return Reject("request_rejected", "rejected", rej.error, rej.details)
    if job.expires_at is not None and now > job.expires_at:
        return Reject("request_expired", "expired", "Request expired",
                      "the message expiry interval passed before it could be handled")
    return req


def route(job: Job, callers: Callers, cfg: MqttConfig, retained: bool) -> TopicRoute | Reject | Clear | None:
    """Whose request `job` is, from its topic alone (contract section 10; never from the body):
    a TopicRoute; None for one of the daemon's own topics under `<topics.start>/+` (its
    replies: ack, answer nothing, no loop); Clear for an empty retained message; a Reject
    (answered, acked, nothing kept) for an unknown caller level or a bare topic with
    callers_only. The error goes to the response topic only when that one is usable."""
    try:
        found = callers.route_topic(job.topic)
    except CallerRejected as rej:
        if retained and not job.payload and not job.oversize:
            return Clear()
        bad_route = job.response_topic is not None and response_topic_problem(
            job.response_topic, cfg, caller_topic_filters(cfg, callers.callers)) is not None
        return Reject("request_rejected", "unauthorized", rej.error, f"{rej.details}; nothing was started", bad_route)
    return found


def request_id_of(job: Job) -> str | None:
    """Best effort: the requestId of a payload (also one that fails validation), for replies."""
    if job.ingress == "mqtt-plain" or job.oversize or len(job.payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        data = json.loads(job.payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    rid = data.get("requestId") if isinstance(data, dict) else None
    ok = isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_LENGTH and encodable(rid) and not _CONTROL.search(rid)
    return rid if ok else None


def idempotency_key(req: StartRequest | StopRequest, job: Job, reply_topic: str) -> tuple[str | None, str | None]:
    """(key, fingerprint). Key None: the request has neither requestId nor correlation data;
    then only a redelivery (dup) of this very delivery, found by its fingerprint in the
    journal, is the same request, and anything else is new (keys.anonymous)."""
    if req.requestId:
        return keys.for_request_id(req.requestId), None
    if job.correlation_data:
        return keys.for_correlation(job.correlation_data, reply_topic), None
    return None, keys.delivery_fingerprint(job.payload, job.topic, job.mid)
