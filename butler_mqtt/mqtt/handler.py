"""The MQTT request path: one delivery (a Job from the listener) -> the use case -> replies
-> ack. The daemon's workers call `RequestHandler.deliver` for each job; nothing else here
knows about threads or the process.

Every delivery ends in exactly one outcome: answered and acked, or, while QRS or the journal is
unavailable for now, kept unacked and retried with backoff (visible in /healthz and the metrics
once it waits long). Any other failure is answered with "Internal error" and a reference that
the log line carries, recorded in the journal, and acked.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import structlog

from butler_mqtt import keys, replies
from butler_mqtt.callers import CallerRejected, caller_topic_filters, label
from butler_mqtt.config import CallerConfig, Config
from butler_mqtt.errors import (
    CloudNotFound,
    CloudRefused,
    CloudTlsRejected,
    CloudUnreachable,
    QrsError,
    QrsTlsRejected,
    RequestRejected,
    is_transient,
    retry_after,
)
from butler_mqtt.model import Route, StartRequest, StopRequest
from butler_mqtt.mqtt import ingress as ingress_rules
from butler_mqtt.mqtt.acking import DeliveryAcks
from butler_mqtt.mqtt.listener import Job, MqttListener
from butler_mqtt.mqtt.retain_probe import RetainProbe
from butler_mqtt.ops import retry
from butler_mqtt.ops.alerts import PublishMqtt
from butler_mqtt.ops.ratelimit import RateLimiter
from butler_mqtt.replies import Event
from butler_mqtt.runtime import Runtime
from butler_mqtt.service import Claim
from butler_mqtt.tracking import Publish

log = structlog.get_logger("butler_mqtt.mqtt.handler")

#: How long a redelivery (dup) of a delivery without requestId is matched to its first copy.
ANON_DUP_WINDOW_S = 24 * 3600
PUBLISH_TIMEOUT_S = 30.0


class MqttHealth:
    """What the MQTT side tells /healthz and /metrics (the Runtime's `Health`): the broker
    connection, deliveries taken and not yet acked, those kept unacked for a retry, and a
    standing QRS refusal. The handler keeps it up to date; the REST edge only reads it."""

    def __init__(self, listener: MqttListener) -> None:
        self.listener = listener
        self._lock = threading.Lock()
        self._waiting: dict[int, float] = {}  # deliveries kept for a retry -> since (monotonic)
        self.qrs_problem: str | None = None  # the last permanent QRS failure, until a success

    @property
    def mqtt_connected(self) -> bool:
        return self.listener.connected.is_set()

    @property
    def unacked(self) -> int:
        return self.listener.unacked

    def waiting(self) -> tuple[int, float | None]:
        """Deliveries kept unacked for a retry, and how long the oldest has waited (s)."""
        with self._lock:
            if not self._waiting:
                return 0, None
            return len(self._waiting), time.monotonic() - min(self._waiting.values())

    def deferred(self, job: Job) -> None:
        with self._lock:
            self._waiting.setdefault(id(job), time.monotonic())

    def settled(self, job: Job) -> None:
        with self._lock:
            self._waiting.pop(id(job), None)

    def set_qrs_unreachable(self, problem: str | None) -> None:
        """Show (or clear) on the status topic that QRS has not answered for a while
        (ops/backend_health.py calls this once per outage and once at the recovery)."""
        self.listener.set_problem("qrsUnreachable", problem)

    def set_qrs_problem(self, problem: str | None) -> None:
        """Show (or clear) a permanent QRS failure in /healthz and on the status topic."""
        self.qrs_problem = problem
        self.listener.set_problem("qrs", problem)


def route_publisher(listener: MqttListener, backend: str = "qrs") -> Publish:
    """The tracker's way out: a later event (taskFinished, chain stages) goes to where its
    request wanted the replies (in the words of the `backend`: replies.on_wire)."""

    def publish(route: Route, event: Event) -> None:
        listener.publish_event(route.topic, route.correlation_bytes, replies.on_wire(event, backend))

    return publish


def alert_publisher(listener: MqttListener) -> PublishMqtt:
    """The alerts' way out (ops/alerts.py): a message on a topic, no correlation data."""

    def publish(topic: str, message: dict[str, Any]) -> None:
        listener.publish_event(topic, None, message)

    return publish


class RequestHandler:
    """Thread-safe: every worker shares one."""

    def __init__(
        self,
        rt: Runtime,
        listener: MqttListener,
        health: MqttHealth,
        should_exit: threading.Event,
        retain_probe: RetainProbe | None = None,
    ) -> None:
        self.cfg = rt.cfg
        self.service = rt.service
        self.stops = rt.stops
        self.journal = rt.journal
        self.metrics = rt.metrics
        self.listener = listener
        self.health = health
        self.should_exit = should_exit
        self.retain_probe = retain_probe
        #: The callers (contract section 10), shared with REST through the use case (one rate
        #: limiter); their topic filters, which no response topic may match.
        self.callers = rt.service.callers
        self._listening = caller_topic_filters(rt.cfg.mqtt, rt.cfg.callers)
        self._limiter = RateLimiter(60.0)
        self.handled = 0
        self._handled_lock = threading.Lock()  # counted by workers and by paho's thread (acks)
        self.acks = DeliveryAcks(listener, PUBLISH_TIMEOUT_S, self._answered)
        self.qrs_health = rt.qrs.health
        self.qrs_health.on_change.append(health.set_qrs_unreachable)

    def deliver(self, job: Job) -> None:
        """Every delivery ends in exactly one outcome: answered and acked, or, while QRS or the
        journal is unavailable for now, kept unacked and retried (visible in /healthz and the
        metrics once it waits long). Any other failure is answered with "Internal error" and
        a reference that the log line carries, recorded in the journal, and acked."""
        delivery = Delivery(job)
        attempt = 0
        try:
            while True:
                delivery.replies.clear()
                try:
                    self._process(job, delivery)
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        self._internal_error(job, delivery, exc)
                        return
                    delay = retry.DELIVERY.delay(attempt, retry_after(exc))  # at least a 429's Retry-After
                    attempt += 1
                    self._deferred(job, exc, delay)
                    if self.qrs_health.wait(delay, self.should_exit):  # woken early when QRS answers again
                        self.listener.release(job)  # left unacked: redelivered to the next run
                        return
        finally:
            self.health.settled(job)

    def _deferred(self, job: Job, exc: Exception, delay: float) -> None:
        self.health.deferred(job)
        ok, repeated = self._limiter.allow(("deferred", type(exc).__name__, str(exc)[:120]))
        if ok:
            log.warning(
                "request_deferred",
                error=str(exc),
                retry_in_s=delay,
                repeated=repeated,
                detail="kept unacked and retried; the journal prevents a second start of anything already started",
            )
        self.metrics.deferred.inc()

    def _internal_error(self, job: Job, delivery: Delivery, exc: Exception) -> None:
        reference = uuid.uuid4().hex[:12]
        ok, repeated = self._limiter.allow(("internal", type(exc).__name__, str(exc)[:120]))
        log.error(
            "internal_error",
            reference=reference,
            topic=job.topic,
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
            repeated=repeated,
            exc_info=exc if ok else None,  # the traceback once per interval
        )
        self.metrics.request(job.ingress, "error")
        ev = replies.error(
            delivery.request_id or ingress_rules.request_id_of(job),
            "Internal error",
            f"the request could not be handled (reference {reference} in the daemon's log); what was"
            " already started is reported above and is not started again",
        )
        if delivery.key is not None:
            try:  # a redelivery replays this outcome instead of starting anything again
                prior = self.journal.load(delivery.key)
                if prior is not None and not prior.done:
                    self.journal.finish(delivery.key, [*delivery.events, ev])
            except Exception as jexc:  # noqa: BLE001 - the answer and the ack still follow
                log.error("journal_write_failed", reference=reference, error=str(jexc))
        try:
            delivery.replies.append(self.listener.publish_event(delivery.topic(self.cfg), job.correlation_data, replies.on_wire(ev, self.cfg.backend)))
        except Exception as pexc:  # noqa: BLE001 - nothing more can be said; ack anyway
            log.error("error_reply_failed", reference=reference, error=str(pexc))
        self._finish(job, delivery.replies, force=True)

    def last_resort(self, job: Job, exc: Exception) -> None:
        """The error path itself failed: say what can still be said on topics.reply and ack,
        so that the delivery cannot hold a broker slot (and fail again on every redelivery)."""
        log.error("worker_error", topic=job.topic, error=f"{type(exc).__name__}: {str(exc)[:300]}", exc_info=exc)
        try:
            ev = replies.error(None, "Internal error", "the request could not be handled; see the daemon's log")
            self.listener.publish_event(self.cfg.mqtt.topics.reply, job.correlation_data, replies.on_wire(ev, self.cfg.backend))
        finally:
            self.listener.ack(job)

    def _process(self, job: Job, d: Delivery) -> None:
        structlog.contextvars.clear_contextvars()
        ingress = job.ingress

        def emit(ev: Event) -> None:
            d.events.append(ev)
            d.replies.append(self.listener.publish_event(d.topic(self.cfg), job.correlation_data, replies.on_wire(ev, self.cfg.backend)))

        def reject(r: ingress_rules.Reject) -> None:
            if d.request_id is None:  # a payload that is not a request: echo its requestId if safe
                d.request_id = ingress_rules.request_id_of(job)
                structlog.contextvars.bind_contextvars(requestId=d.request_id)
            d.route_ok = not r.default_route
            log.warning(r.log_event, ingress=ingress, topic=job.topic, error=r.error, details=r.details)
            self.metrics.request(ingress, r.outcome)
            emit(replies.error(d.request_id, r.error, r.details))
            self._finish(job, d.replies)

        # The topic names the caller (contract section 10); first, so our own replies cost no probe.
        found = ingress_rules.route(job, self.callers, self.cfg.mqtt, job.retained)
        if found is None or isinstance(found, ingress_rules.Clear):
            self.listener.ack(job)  # our own reply under <topics.start>/+, or a retained clear: no answer
            return
        if isinstance(found, ingress_rules.Reject):
            return reject(found)
        caller = found.caller
        structlog.contextvars.bind_contextvars(caller=label(caller))
        # MQTT 3.1.1 clears the retain flag on live delivery: the probe asks the broker instead.
        retained = job.retained or (self.retain_probe is not None and self.retain_probe.retained(job))
        verdict = ingress_rules.screen(job, self.cfg.mqtt, self.listener.limits, time.monotonic(), retained,
                                       self._listening)
        if isinstance(verdict, ingress_rules.Clear):
            self.listener.ack(job)  # someone clearing a retained message: nothing to answer
            return
        if isinstance(verdict, ingress_rules.Reject):
            return reject(verdict)
        req, d.request_id = verdict, verdict.requestId
        structlog.contextvars.bind_contextvars(requestId=req.requestId)
        route = Route(d.topic(self.cfg), job.correlation_data.hex() if job.correlation_data else None)
        key, fingerprint = self._key(req, job, d, route, caller)
        try:
            claim = Claim(ingress, key, job.topic, fingerprint, route, job.received, caller)
            if isinstance(req, StopRequest):
                self.stops.submit(req, claim, emit)
            else:
                self.service.submit(req, claim, emit)
        except CallerRejected as rej:  # over its requests_per_minute: nothing claimed, nothing started
            return reject(ingress_rules.Reject("request_rate_limited", "rate_limited", rej.error, rej.details))
        except RequestRejected as rej:  # selectors the backend lacks (section 9), text the journal cannot store
            return reject(ingress_rules.Reject("request_rejected", "rejected", rej.error, rej.details))
        except QrsError as exc:
            if is_transient(exc):
                raise
            self._qrs_refused(exc)
            return reject(ingress_rules.Reject("request_refused_by_qrs", "error", qrs_error_title(exc), str(exc)))
        if self.health.qrs_problem is not None:
            self.health.set_qrs_problem(None)
        self._finish(job, d.replies)

    def _key(self, req: StartRequest | StopRequest, job: Job, d: Delivery, route: Route,
             caller: CallerConfig | None) -> tuple[str | None, str | None]:
        """The request's idempotency key (kept on the delivery) and its payload fingerprint."""
        key, fingerprint = ingress_rules.idempotency_key(req, job, route.topic)
        if key is None and fingerprint is not None:
            # Tried again in this process (QRS or the journal unavailable for now, or a start QRS
            # refused with 429 after others started): the same anonymous request, the same key.
            earlier = d.key or (self.journal.recent_hash(fingerprint, ANON_DUP_WINDOW_S) if job.dup else None)
            key = earlier or keys.anonymous(job.ingress)
        else:  # the same requestId from two callers is two requests
            key = keys.for_caller(key, caller.name if caller is not None else None) if key is not None else None
        d.key = key
        return key, fingerprint

    def _qrs_refused(self, exc: QrsError) -> None:
        """A permanent QRS failure: logged at error level once per interval, shown in /healthz."""
        self.health.set_qrs_problem(str(exc))
        ok, repeated = self._limiter.allow(("qrs_refused", str(exc)[:200]))
        if ok:
            log.error("qrs_refused", error=str(exc), repeated=repeated,
                      detail="requests are answered with an error until this is fixed; nothing is started")

    def _finish(self, job: Job, replies: list[Any], force: bool = False) -> None:
        """Ack only once the broker has taken every reply (mqtt/acking.py: the worker goes on
        meanwhile). A reply the broker has not confirmed in time is left to the broker: the
        delivery stays unacked, the connection is renewed, and the redelivery replays the
        journal's outcome. `force` (an internal error) acks regardless, after a bounded wait."""
        self.acks.finish(job, replies, force)

    def _answered(self) -> None:
        with self._handled_lock:
            self.handled += 1


class Delivery:
    """What one delivery's handling has done so far (for the error path)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.request_id: str | None = None
        self.key: str | None = None
        self.route_ok = True
        self.events: list[Event] = []
        self.replies: list[Any] = []

    def topic(self, cfg: Config) -> str:
        """Where replies go: the request's response topic when it may be used, else topics.reply."""
        rt = self.job.response_topic
        return rt if rt is not None and self.route_ok else cfg.mqtt.topics.reply


#: Errors of the Qlik Cloud backend: their titles name Qlik Cloud rather than QRS.
CLOUD_ERRORS = (CloudRefused, CloudTlsRejected, CloudUnreachable, CloudNotFound)


def qrs_error_title(exc: QrsError) -> str:
    who = "Qlik Cloud" if isinstance(exc, CLOUD_ERRORS) else "QRS"
    if isinstance(exc, QrsTlsRejected):
        return f"{who} TLS handshake refused"
    return f"{who} refused the request"


