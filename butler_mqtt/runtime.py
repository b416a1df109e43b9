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

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from butler_mqtt.backends.base import Backend
from butler_mqtt.backends.cloud.backend import CloudBackend
from butler_mqtt.backends.cloud.client import CloudClient
from butler_mqtt.backends.cloud.settings import CloudSettings
from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import CallObserver, QrsClient
from butler_mqtt.backends.qrs.client import probe_at_start as _qrs_probe
from butler_mqtt.backends.qrs.failure import ScriptLogReader
from butler_mqtt.callers import caller_labels
from butler_mqtt.errors import ButlerError, ConfigError, QrsError
from butler_mqtt.journal import Journal
from butler_mqtt.ops import alerts
from butler_mqtt.ops.alerts import Alerter
from butler_mqtt.ops.backend_health import BackendHealth
from butler_mqtt.ops.logging import scrub_secrets
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.queueing import QueueRunner
from butler_mqtt.service import StartService
from butler_mqtt.stops import StopService
from butler_mqtt.tracking import (
    Deadlines,
    Failures,
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
    stops: StopService = field(default=None)  # type: ignore[assignment]  # set in __post_init__ when not given

    def __post_init__(self) -> None:
        if self.stops is None:  # a Runtime made by hand (tests): stops on its use case
            object.__setattr__(self, "stops", StopService(self.service))

    def close(self) -> None:
        """Release what `build` opened (the tracker is stopped by its owner first)."""
        self.stops.close()
        self.service.close()
        self.qrs.close()
        self.journal.close()


def backend(cfg: Config, observer: CallObserver | None = None, *, retries: int | None = None) -> Backend:
    """The configured backend (`backend: qrs`: client-managed Qlik Sense over QRS; `cloud`: a
    Qlik Cloud tenant). The one place outside `backends/` that names an implementation (an
    import-linter contract); `check`, `resolve` and the daemon get theirs here. `retries`:
    override `qrs.retries` (check: 0)."""
    if cfg.backend == "cloud":
        settings = cloud_settings(cfg)
        health = BackendHealth(f"Qlik Cloud at {settings.tenant}")

        def observed(method: str, route: str, status: int | None, seconds: float) -> None:
            health.observe(method, route, status, seconds)  # every call, whoever made it
            if observer is not None:
                observer(method, route, status, seconds)

        client = CloudClient(settings, observer=observed)
        return CloudBackend(client, space_names=bool(cfg.start_filter.allow.spaces), health=health)
    qrs_cfg = cfg.qrs if retries is None else cfg.qrs.model_copy(update={"retries": retries})
    reader = None
    if cfg.tracking.script_log_lines > 0:  # script logs are read on a connection pool of their own
        reader = ScriptLogReader(qrs_cfg, deadline_s=cfg.tracking.script_log_deadline, observer=observer)
    return QrsBackend(QrsClient(qrs_cfg, observer=observer), reader)


def cloud_settings(cfg: Config) -> CloudSettings:
    """The Qlik Cloud client's settings from the `cloud` section; ConfigError naming the
    `cloud.*` key (and where its value came from) when a value cannot work: no tenant, both or
    neither way to sign in, a proxy that is no URL, an unreadable `cloud.ca`, ..."""
    c = cfg.cloud
    try:
        if not c.tenant:
            raise ConfigError("cloud.tenant", "backend: cloud needs cloud.tenant (https://<tenant>.<region>.qlikcloud.com)")
        if c.ca is not None and not (c.ca.is_file() and os.access(c.ca, os.R_OK)):
            raise ConfigError("cloud.ca", f"file not found or not readable: {c.ca}")
        return CloudSettings(
            tenant=c.tenant, client_id=c.client_id,
            client_secret=c.client_secret.get_secret_value() if c.client_secret else None,
            api_key=c.api_key.get_secret_value() if c.api_key else None,
            timeout=c.timeout, start_concurrency=c.start_concurrency, reloads_per_minute=c.reloads_per_minute,
            verify=c.verify, ca=c.ca, proxy=c.proxy, max_pages=c.max_pages,
        )
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.reason, cfg.source(exc.key)) from None


def check_cloud(cfg: Config) -> list[tuple[bool, str]]:
    """`check` with backend: cloud: (ok, line) for the credentials and for the tenant answering."""
    client = CloudClient(cloud_settings(cfg))
    try:
        return client.check()
    finally:
        client.close()


def backend_url(cfg: Config) -> str:
    """What the logs and alerts name as the backend: the QRS base URL or the tenant."""
    return (cfg.cloud.tenant or "") if cfg.backend == "cloud" else cfg.qrs.base_url


def probe_at_start(cfg: Config) -> threading.Thread:
    """Warn at start (in the background) when the backend cannot be reached."""
    if cfg.backend == "qrs":
        return _qrs_probe(cfg.qrs)

    def probe() -> None:
        try:
            tenant = backend(cfg)
        except ButlerError:
            return  # a configuration problem: startup reports it itself
        try:
            tenant.about()
            log.info("cloud_reachable", tenant=backend_url(cfg))
        except QrsError as exc:
            log.warning("cloud_unreachable_at_start", tenant=backend_url(cfg), error=str(exc),
                        detail="requests wait (unacked) until the tenant answers; run `butler-mqtt check`")
        finally:
            tenant.close()

    t = threading.Thread(target=probe, name="cloud-probe", daemon=True)
    t.start()
    return t


def preflight(cfg: Config) -> None:
    """What must hold before anything is opened or connected: every certificate file readable
    (else a ConfigError naming the key: exit 2), and a warning for each TLS verification that is
    turned off. (The HTTPS listener's pair is the REST edge's to check, in the daemon:
    the runtime imports no edge, which imports the runtime.)"""
    scrub_secrets(cfg.secret_values())  # before anything can log one
    cfg.check_qrs_files()
    if cfg.backend == "cloud":
        cloud_settings(cfg)  # ConfigError naming the cloud.* key
        if not cfg.cloud.verify:
            log.warning("cloud_tls_verification_disabled", detail="cloud.verify is false: the tenant is not authenticated")
    elif not cfg.qrs.verify:
        log.warning("qrs_tls_verification_disabled", detail="qrs.verify is false: the QRS server is not authenticated")
    if cfg.mqtt.tls.enabled and not cfg.mqtt.tls.verify:
        log.warning("mqtt_tls_verification_disabled", detail="mqtt.tls.verify is false")


def build_tracker(
    cfg: Config, backend: Backend, service: StartService, journal: Journal, publish: Publish, metrics: Metrics | None
) -> tuple[Tracker, Deadlines]:
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

    failures = Failures(cfg.tracking, backend, timers, metrics)

    def ended(eid: str, status: str, row: Mapping[str, Any] | None, reason: str | None) -> None:
        if failures.busy(eid):
            return  # its failure is being read: the requests hear the end once it is known
        queue.ended(eid)  # a slot of butler-mqtt's queue frees first, then the requests hear it
        following = waits.following_execution(eid)
        if status in ("FinishedSuccess", "Unknown") or not following:
            stages.execution_ended(eid, status, row, reason)
            return
        p = following[0].pending.get(eid)
        if p is None:
            return
        task_id = p.task_id
        failures.fetch(eid, task_id, lambda failure: stages.execution_ended(eid, status, row, reason, failure))

    tracker.failures = failures
    poller.attach(ended, deadlines.check, queue, tracker.maintain)
    # The use case asks what the tracker follows (run policies), and wakes the queue.
    service.admission.followed = waits.running_tasks
    service.admission.on_queued = poller.queue_changed
    return tracker, deadlines


def build(cfg: Config, publish: Publish, health: Health, alert: PublishMqtt | None = None) -> Runtime:
    """The parts, wired once: the journal (owned under this instance's client id), the metrics,
    the alerter (publishing on MQTT through `alert`), the QRS client and the use case reporting
    to both, and the tracker. Nothing is started here: the daemon's startup() starts the
    threads. Call `preflight(cfg)` first."""
    scrub_secrets(cfg.secret_values())  # before anything can log one
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
    alerter = Alerter(cfg.alerts, metrics, instance=cfg.mqtt.effective_client_id(), qrs=backend_url(cfg), publish=alert)
    qrs = backend(cfg, observer=alerts.observers(metrics.observe_qrs, alerter.observe_qrs))
    service = StartService(cfg, qrs, journal)
    service.observers += [metrics.observe_event, alerter.observe]
    service.handled.append(metrics.handled)
    tracker, deadlines = build_tracker(cfg, qrs, service, journal, publish, metrics)
    stops = StopService(service)
    service.admission.stop = stops.stop_for_policy  # ifRunning restart
    deadlines.stop = stops.stop_for_policy  # onDeadline stop
    stops.coalescer.on_stopped = metrics.stops_done.inc
    stops.handled.append(lambda ingress: metrics.stops_requested.labels(_stop_ingress(ingress)).inc())
    return Runtime(cfg, service, tracker, journal, qrs, metrics, health, alerter, stops)


def _stop_ingress(ingress: str) -> str:
    return "mqtt" if ingress.startswith("mqtt") else "policy" if ingress == "policy" else "rest"


#: The parts' types, for the daemon's typed views of them (it imports no part itself).
__all__ = ["Health", "Journal", "Metrics", "Runtime", "StartService", "Tracker", "backend", "backend_url", "build", "check_cloud", "cloud_settings",
           "preflight", "probe_at_start"]
