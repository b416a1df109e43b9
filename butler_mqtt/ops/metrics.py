"""Prometheus metrics, kept in a private registry so several daemons can live in one test process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "butler_mqtt_requests", "Start requests by ingress and outcome", ["ingress", "outcome"], registry=r
        )
        self.task_outcomes = Counter("butler_mqtt_tasks", "Tasks by outcome status", ["status"], registry=r)
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

        # Run policies (contract section 7).
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

    def request(self, ingress: str, outcome: str) -> None:
        self.requests.labels(ingress, outcome).inc()

    def tasks(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            if ev.get("event") == "task":
                self.task_outcomes.labels(str(ev.get("status"))).inc()

    def observe_qrs(self, method: str, route: str, status: int | None, seconds: float) -> None:
        self.qrs_latency.labels(method, route, str(status) if status is not None else "error").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
