"""What the edges are handed: the parts of a running daemon, wired once, never the daemon.

`build(cfg, publish, health)` makes them: the journal, the metrics, the alerter, the backend
(`backend(cfg)`: the only place outside `backends/` that names an implementation), the one
`StartService` (whose later events leave through `publish`) and the tracking pieces
(`build_tracker`: every piece of tracking/ wired here, nowhere else). The daemon
calls it once and keeps only the lifecycle (daemon.py); the MQTT handler and the REST API
(http/) are handed the resulting `Runtime`. The REST API sees the MQTT side only through a
narrow `Health` view, so it can be served (and tested) on any Runtime and cannot reach into
the daemon's lifecycle.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from butler_mqtt.backends.base import Backend
from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import CallObserver, QrsClient
from butler_mqtt.backends.qrs.client import probe_at_start as _qrs_probe
from butler_mqtt.callers import caller_labels
from butler_mqtt.journal import Journal
from butler_mqtt.ops import alerts
from butler_mqtt.ops.alerts import Alerter
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.queueing import QueueRunner
from butler_mqtt.service import StartService
from butler_mqtt.tracking import (
    Deadlines,
    Poller,
    QueueTicks,
    Retries,
    Stages,
    Timers,
    Tracker,
    Waits,
)

if TYPE_CHECKING:
    from butler_mqtt.config import Config
    from butler_mqtt.ops.alerts import PublishMqtt
    from butler_mqtt.tracking import Publish

log = structlog.get_logger("butler_mqtt.runtime")


class Health(Protocol):
    """What /healthz and /metrics need to know about the MQTT side of the daemon."""

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def unacked(self) -> int: ...

    @property
    def qrs_problem(self) -> str | None: ...

    def waiting(self) -> tuple[int, float | None]: ...


@dataclass(frozen=True)
class Runtime:
    cfg: Config
    service: StartService
    tracker: Tracker
    journal: Journal
    qrs: Backend  # the backend (named `qrs` for the edges that read its health; Qlik Cloud is one too)
    metrics: Metrics
    health: Health
    alerter: Alerter | None = None  # None: a Runtime made by hand (tests), without alerts

    def close(self) -> None:
        """Release what `build` opened (the tracker is stopped by its owner first)."""
        self.service.close()
        self.qrs.close()
        self.journal.close()


def backend(cfg: Config, observer: CallObserver | None = None, *, retries: int | None = None) -> Backend:
    """The configured backend (today: client-managed Qlik Sense over QRS). The one place
    outside `backends/` that names an implementation (an import-linter contract); `check`,
    `resolve` and the daemon get theirs here. `retries`: override `qrs.retries` (check: 0)."""
    qrs_cfg = cfg.qrs if retries is None else cfg.qrs.model_copy(update={"retries": retries})
    return QrsBackend(QrsClient(qrs_cfg, observer=observer))


def probe_at_start(cfg: Config) -> threading.Thread:
    """Warn at start (in the background) when the backend cannot be reached."""
    return _qrs_probe(cfg.qrs)


def preflight(cfg: Config) -> None:
    """What must hold before anything is opened or connected: every certificate file readable
    (else a ConfigError naming the key: exit 2), and a warning for each TLS verification that is
    turned off. (The HTTPS listener's pair is the REST edge's to check, in the daemon:
    the runtime imports no edge, which imports the runtime.)"""
    cfg.check_qrs_files()
    if not cfg.qrs.verify:
        log.warning("qrs_tls_verification_disabled", detail="qrs.verify is false: the QRS server is not authenticated")
    if cfg.mqtt.tls.enabled and not cfg.mqtt.tls.verify:
        log.warning("mqtt_tls_verification_disabled", detail="mqtt.tls.verify is false")


def build_tracker(
    cfg: Config, backend: Backend, service: StartService, journal: Journal, publish: Publish, metrics: Metrics | None
) -> Tracker:
    """The tracking pieces (tracking/), wired to each other and to the use case, once."""
    waits, timers = Waits(journal), Timers()
    poller = Poller(cfg.tracking, backend, waits, timers, journal.lease_s)
    service.publish = publish  # a request's later events leave through service.send_later
    queue = QueueTicks(QueueRunner(cfg.policies, service, journal, metrics), journal, waits, poller,
                       cfg.tracking.max_wait)
    stages = Stages(cfg.tracking, service, journal, waits, timers, poller)
    retries = Retries(service, waits, timers, stages, metrics)
    deadlines = Deadlines(waits, stages, metrics)
    stages.attach(retries)
    queue.attach(stages.queued_done)
    tracker = Tracker(journal, waits, poller, stages, retries, queue, timers)
    service.follow = tracker.follow

    def ended(eid: str, status: str, row: Mapping[str, Any] | None, reason: str | None) -> None:
        queue.ended(eid)  # a slot of butler-mqtt's queue frees first, then the requests hear it
        stages.execution_ended(eid, status, row, reason)

    poller.attach(ended, deadlines.check, queue, tracker.maintain)
    # The use case asks what the tracker follows (run policies), and wakes the queue.
    service.admission.followed = waits.running_tasks
    service.admission.on_queued = poller.queue_changed
    return tracker


def build(cfg: Config, publish: Publish, health: Health, alert: PublishMqtt | None = None) -> Runtime:
    """The parts, wired once: the journal (owned under this instance's client id), the metrics,
    the alerter (publishing on MQTT through `alert`), the QRS client and the use case reporting
    to both, and the tracker. Nothing is started here: the daemon's startup() starts the
    threads. Call `preflight(cfg)` first."""
    url = cfg.journal.url.get_secret_value() if cfg.journal.url else None
    journal = Journal.from_config(
        cfg.state_dir,
        url,
        cfg.journal.retention_hours,
        owner=cfg.mqtt.effective_client_id(),
        lease_s=cfg.journal.lease_seconds,
    )
    metrics = Metrics(caller_labels(cfg))  # the `caller` label: bounded by the configured callers
    # Alerts (ops/alerts.py) watch the QRS calls and every new reply event, like the metrics.
    alerter = Alerter(cfg.alerts, metrics, instance=cfg.mqtt.effective_client_id(), qrs=cfg.qrs.base_url, publish=alert)
    qrs = backend(cfg, observer=alerts.observers(metrics.observe_qrs, alerter.observe_qrs))
    service = StartService(cfg, qrs, journal)
    service.observers += [metrics.observe_event, alerter.observe]
    service.handled.append(metrics.handled)
    tracker = build_tracker(cfg, qrs, service, journal, publish, metrics)
    return Runtime(cfg, service, tracker, journal, qrs, metrics, health, alerter)


#: The parts' types, for the daemon's typed views of them (it imports no part itself).
__all__ = ["Health", "Journal", "Metrics", "Runtime", "StartService", "Tracker", "backend", "build", "preflight",
           "probe_at_start"]
