"""Prometheus metrics, kept in a private registry so several daemons can live in one test process.

The dashboard (docs/grafana/butler-mqtt.json) and the alert rules (docs/prometheus/alerts.yml)
use these names; tests/integration/test_monitoring.py checks that each one they name is here.
Task and execution counts come from the reply events themselves (`observe_event`, an observer
of the StartService): every ingress and chain stage is counted, a replayed duplicate is not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from butler_mqtt import replies
from butler_mqtt.replies import Event

#: `task` statuses (contract section 4), as the request model defines them.
TASK_STATUSES = replies.TASK_STATUSES
#: Final states of a followed execution (QRS's, and Unknown when it could not be followed).
FINAL_STATUSES = ("FinishedSuccess", "FinishedFail", "Aborted", "Skipped", "Error", "Reset", "Unknown")


class Recent:
    """The last `size` keys seen, thread-safe. An execution several requests follow (ifRunning
    attach) ends once: it is counted, and alerted, once."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True the first time `key` is seen (among the last `size`)."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            if len(self._keys) > self._size:
                self._keys.popitem(last=False)
            return True


class Metrics:
    """`callers`: every value the `caller` label may take (Callers.labels(): "" for the anonymous
    caller and each configured name); any other value counts as "" (the label set stays bounded)."""

    def __init__(self, callers: Iterable[str] = ("",)) -> None:
        r = self.registry = CollectorRegistry()
        self.callers = frozenset(callers) | {""}
        # Without callers configured the counters keep their labels of before (no `caller`).
        by = ["caller"] if len(self.callers) > 1 else []
        self.requests = Counter(
            "butler_mqtt_requests", "Start requests by ingress and outcome (and caller)", ["ingress", "outcome", *by],
            registry=r,
        )
        self.task_outcomes = Counter("butler_mqtt_tasks", "Tasks by outcome status (and caller)", ["status", *by],
                                     registry=r)
        for status in TASK_STATUSES:  # present from the start: increase() then sees the first one
            for caller in sorted(self.callers):
                self.task_outcomes.labels(status, *([caller] if by else []))
        self.qrs_latency = Histogram(
            "butler_mqtt_qrs_call_seconds",
            "QRS call latency",
            ["method", "route", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.mqtt_connected = Gauge("butler_mqtt_mqtt_connected", "1 when connected to the broker", registry=r)
        self.waiting = Gauge(
            "butler_mqtt_requests_waiting", "Deliveries kept unacked for a retry right now (QRS or journal unavailable)",
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "butler_mqtt_oldest_waiting_seconds", "How long the oldest delivery kept for a retry has waited", registry=r
        )
        self.unacked = Gauge(
            "butler_mqtt_unacked_deliveries", "Deliveries taken from the broker and not yet acked", registry=r
        )
        self.qrs_refusing = Gauge(
            "butler_mqtt_qrs_refusing", "1 while QRS refuses requests for good (certificate, 401/403)", registry=r
        )
        self.http_closed = Counter(
            "butler_mqtt_http_connections_closed",
            "REST connections the daemon closed: over http.max_connections (refused) or no complete request"
            " within http.request_timeout (timeout)",
            ["reason"],
            registry=r,
        )
        self.deferred = Counter(
            "butler_mqtt_requests_deferred", "Requests kept unacked for a retry (QRS or journal unavailable)", registry=r
        )
        self._execution_metrics(r)
        self._alert_metrics(r)
        self._policy_metrics(r)

    def _execution_metrics(self, r: CollectorRegistry) -> None:
        self.start_latency = Histogram(
            "butler_mqtt_start_latency_seconds",
            "Seconds from taking a request on until every start of its first stage was answered by QRS",
            ["ingress"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.followed = Gauge(
            "butler_mqtt_executions_followed", "Executions followed to their end right now (wait, then)", registry=r
        )
        self.executions_finished = Counter(
            "butler_mqtt_executions_finished",
            "Followed executions by final state (a failed attempt that is retried is not final)",
            ["status"],
            registry=r,
        )
        for status in FINAL_STATUSES:
            self.executions_finished.labels(status)
        self._finished = Recent()

    def _alert_metrics(self, r: CollectorRegistry) -> None:
        self.qrs_outage = Gauge(
            "butler_mqtt_qrs_outage", "1 while QRS does not answer (no answer or 5xx for alerts.qrs_outage_after s)", registry=r
        )
        self.alerts = Counter("butler_mqtt_alerts", "Alerts raised, by kind (also without any alert sink)", ["alert"], registry=r)
        self.alert_deliveries = Counter(
            "butler_mqtt_alert_deliveries",
            "Alert messages by sink (mqtt, webhook) and result (sent, retried, failed, dropped)",
            ["sink", "result"],
            registry=r,
        )

    def _policy_metrics(self, r: CollectorRegistry) -> None:
        """Run policies (contract section 7): fed by the run queue and the tracker."""
        self.queue_length = Gauge("butler_mqtt_queue_length", "Tasks waiting in butler-mqtt's queue", registry=r)
        self.queue_waiters = Gauge(
            "butler_mqtt_queue_waiters", "Requests' tasks waiting on those queue entries (joined reruns count each)",
            registry=r,
        )
        self.running_started = Gauge(
            "butler_mqtt_running_started", "Reloads started by butler-mqtt counted against policies.max_running",
            registry=r,
        )
        self.overdue = Counter(
            "butler_mqtt_executions_overdue", "Followed executions still running at their deadline", registry=r
        )
        self.retries = Counter("butler_mqtt_retries", "Extra starts after a failed reload (retry)", registry=r)
        self.queue_expired = Counter(
            "butler_mqtt_queue_expired", "Tasks given up after policies.queue_timeout in butler-mqtt's queue", registry=r
        )
        # Contract section 8: stops and failure details.
        self.stops_requested = Counter(
            "butler_mqtt_stops_requested", "Stop requests handled (MQTT topics.stop, REST, ifRunning restart, onDeadline stop)",
            ["ingress"], registry=r,
        )
        self.stops_done = Counter("butler_mqtt_stops", "Running executions the backend was asked to stop", registry=r)
        self.script_log_failures = Counter(
            "butler_mqtt_script_log_failures", "Failed executions whose script log could not be read (scriptLogError)",
            registry=r,
        )
        for ingress in ("mqtt", "rest", "policy"):
            self.stops_requested.labels(ingress)

    def script_log_failed(self) -> None:
        self.script_log_failures.inc()

    def _by(self, name: str | None = None) -> list[str]:
        """The `caller` label value as a label list: [] when the counters have no caller label."""
        return [self.caller(name)] if len(self.callers) > 1 else []

    def caller(self, name: str | None = None) -> str:
        """The `caller` label: `name`, else the caller bound to this thread's work (the use case
        and the tracker bind it, see service.CALLER_CONTEXT); "" when unknown or not configured."""
        if name is None:
            name = str(structlog.contextvars.get_contextvars().get("caller") or "")
        return name if name in self.callers else ""

    def request(self, ingress: str, outcome: str, caller: str | None = None) -> None:
        self.requests.labels(ingress, outcome, *self._by(caller)).inc()

    def tasks(self, events: list[Event]) -> None:
        for ev in events:
            self.observe_event(ev)

    def observe_event(self, ev: Event) -> None:
        """Count one new reply event (a StartService observer)."""
        kind = replies.kind(ev)
        if kind == replies.TASK and ev.get("status") in ("stopping", "notRunning"):
            pass  # a stop request's answer: the stops sent are counted where they are sent (stops_done)
        elif kind == replies.TASK:
            self.task_outcomes.labels(str(ev.get("status")), *self._by()).inc()
        elif kind == replies.TASK_FINISHED and "retryIn" not in ev and self._finished.first(ev.get("executionId")):
            self.executions_finished.labels(str(ev.get("status"))).inc()

    def handled(self, ingress: str, replayed: bool, start_seconds: float | None, caller: str = "") -> None:
        """A request the use case handled (StartService.submit): counted, its start latency observed;
        its tasks are counted as events (observe_event)."""
        self.request(ingress, "duplicate" if replayed else "ok", caller)
        self.started(ingress, start_seconds)

    def started(self, ingress: str, seconds: float | None) -> None:
        """A request's start latency (None: it sent no start)."""
        if seconds is not None:
            self.start_latency.labels(ingress).observe(seconds)

    def observe_qrs(self, method: str, route: str, status: int | None, seconds: float) -> None:
        self.qrs_latency.labels(method, route, str(status) if status is not None else "error").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
