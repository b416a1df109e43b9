"""The daemon's life: startup(), main_loop(), shutdown(), with one `should_exit` flag.

Signals are handled in one place (`install_signals`): SIGTERM/SIGINT ask for a clean exit,
SIGHUP reloads the start_filter and the log level from the config file.

Workers take jobs from a bounded queue fed by the MQTT network thread; each job is acked
only after its replies were accepted by the broker. A request QRS cannot resolve (outage,
5xx) or the journal cannot record is kept unacked and retried with backoff: it is never
dropped and never answered with a guess.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from butler_mqtt.config import Config, load_config
from butler_mqtt.errors import (
    ConfigError,
    JournalError,
    QrsError,
    QrsRefused,
    QrsUnreachable,
    RequestRejected,
)
from butler_mqtt.journal import Journal
from butler_mqtt.model import StartRequest, decode_json, parse_plain, validate_request
from butler_mqtt.mqtt.listener import Job, MqttListener, wait_published
from butler_mqtt.ops import systemd
from butler_mqtt.ops.lock import StateDirLock
from butler_mqtt.ops.logging import setup_logging
from butler_mqtt.qrs.client import QrsClient
from butler_mqtt.selection import error_event
from butler_mqtt.service import StageResult, StartService, handle_request
from butler_mqtt.tracking import Route, Tracker

log = structlog.get_logger("butler_mqtt.daemon")

#: How long a redelivered request without requestId is matched to an earlier one by payload.
ANON_DUP_WINDOW_S = 24 * 3600
PUBLISH_TIMEOUT_S = 30.0
RETRY_MAX_S = 30.0


def _request_id_of(payload: bytes) -> str | None:
    """Best effort: the requestId of a payload that failed validation, for the error reply."""
    try:
        data = decode_json(payload)
    except RequestRejected:
        return None
    rid = data.get("requestId") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None


class Daemon:
    def __init__(self, cfg: Config, config_file: Path | None = None) -> None:
        self.cfg = cfg
        self.config_file = config_file
        self.should_exit = threading.Event()
        # Never bounded by us: a full queue would block paho's network thread, which must keep
        # reading PUBACKs for the replies the workers wait on (a deadlock). The broker bounds
        # it: Receive Maximum, and its per-client queue (`max_queued_messages`). Measured on
        # Mosquitto 2.0.11: Receive Maximum is not enforced any more once the client acks.
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.handled = 0
        self.http_server: Any = None

    # ------------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.cfg
        cfg.check_qrs_files()
        if not cfg.qrs.verify:
            log.warning("qrs_tls_verification_disabled", detail="qrs.verify is false: the QRS server is not authenticated")
        if cfg.mqtt.tls.enabled and not cfg.mqtt.tls.verify:
            log.warning("mqtt_tls_verification_disabled", detail="mqtt.tls.verify is false")
        client_id = cfg.mqtt.effective_client_id()
        url = cfg.journal.url.get_secret_value() if cfg.journal.url else None
        self.journal = Journal.from_config(
            cfg.state_dir, url, cfg.journal.retention_hours, owner=client_id, lease_s=cfg.journal.lease_seconds
        )
        try:
            self.journal.purge()
        except JournalError as exc:  # not essential: requests are still claimed and recorded
            log.warning("journal_purge_failed", error=str(exc))
        from butler_mqtt.ops import metrics

        self.metrics = metrics.Metrics()
        self.qrs = QrsClient(cfg.qrs, observer=self.metrics.observe_qrs)
        self.service = StartService(cfg, self.qrs, self.journal)
        self.listener = MqttListener(cfg.mqtt, self._enqueue, client_id=client_id)
        self.tracker = Tracker(cfg.tracking, self.qrs, self.service, self.journal, self.publish_route)
        self.listener.on_subscribed = self._ready
        for i in range(cfg.mqtt.workers):
            t = threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self.listener.start()
        self.tracker.start()
        if cfg.http.enabled or cfg.metrics.port is not None:
            from butler_mqtt.http.server import start_http

            self.http_server = start_http(self)
        log.info(
            "started",
            broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            qrs=cfg.qrs.base_url,
            client_id=self.listener.client_id,
            topics=self.listener.topics(),
            start_filter=cfg.start_filter.enabled,
            http=cfg.http.enabled,
        )

    def _ready(self) -> None:
        systemd.notify("READY=1\nSTATUS=connected and subscribed")

    def main_loop(self) -> None:
        interval = systemd.watchdog_interval()
        last_purge = time.monotonic()
        while not self.should_exit.wait(interval or 1.0):
            if interval and self.healthy_threads():
                systemd.notify("WATCHDOG=1")
            if time.monotonic() - last_purge > 3600:
                last_purge = time.monotonic()
                try:
                    self.journal.purge()
                except JournalError as exc:
                    log.error("journal_purge_failed", error=str(exc))

    def healthy_threads(self) -> bool:
        """The MQTT network thread and every worker are alive (gates the systemd watchdog)."""
        return self.listener.alive and self.tracker.alive and all(t.is_alive() for t in self._workers)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping", in_flight=self._busy)
        self.listener.paused = True  # new deliveries stay unacked: redelivered next run
        deadline = time.monotonic() + drain_timeout
        self._drop_queued()
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.http_server is not None:
            self.http_server.stop()
        self.tracker.stop()  # its records stay in the journal: picked up again next run
        self.listener.stop()
        self.service.close()
        self.qrs.close()
        self.journal.close()
        log.info("stopped", handled=self.handled)

    def _drop_queued(self) -> None:
        # Queued-but-unstarted jobs are dropped unacked: the broker redelivers them next run.
        try:
            while True:
                self._jobs.get_nowait()
        except queue.Empty:
            pass

    def install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self.should_exit.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload, daemon=True).start())

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply the start_filter and the log level."""
        try:
            new = load_config(self.config_file, missing_ok=self.config_file is None)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), detail="the running configuration is kept")
            return
        old, fresh = self.cfg.model_dump(mode="json"), new.model_dump(mode="json")
        unapplied = [k for k in fresh if k not in ("start_filter", "logging") and fresh[k] != old.get(k)]
        unapplied += ["logging.format"] if new.logging.format != self.cfg.logging.format else []
        if unapplied:
            log.warning("reload_needs_restart", changed=unapplied, detail="only start_filter and logging.level are reloaded")
        self.service.set_start_filter(new.start_filter)
        self.cfg.start_filter = new.start_filter
        levels = ("debug", "info", "warning", "error")
        # Logged under the more verbose of the old and new level, so that turning the level up
        # to warning still leaves a trace of the reload that did it.
        quieter = levels.index(new.logging.level) > levels.index(self.cfg.logging.level)
        if quieter:
            self._log_reloaded(new)
        setup_logging(new.logging.level, self.cfg.logging.format)
        self.cfg.logging.level = new.logging.level
        if not quieter:
            self._log_reloaded(new)

    def _log_reloaded(self, new: Config) -> None:
        log.info(
            "config_reloaded",
            start_filter=new.start_filter.enabled,
            allow_task_ids=len(new.start_filter.allow.task_ids),
            allow_tags=len(new.start_filter.allow.tags),
            allow_custom_properties=len(new.start_filter.allow.custom_properties),
            log_level=new.logging.level,
        )

    def run(self) -> int:
        self.install_signals()
        self.startup()
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return 0

    # ------------------------------------------------------------------ workers

    def _enqueue(self, job: Job) -> None:
        self._jobs.put(job)  # never blocks the network thread

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._busy_lock:
                self._busy += 1
            try:
                self._process_with_retry(job)
            except Exception:
                log.exception("worker_error", topic=job.topic)
            finally:
                with self._busy_lock:
                    self._busy -= 1
                structlog.contextvars.clear_contextvars()

    def _process_with_retry(self, job: Job) -> None:
        delay = 0.5
        while True:
            try:
                self._process(job)
                return
            except (QrsUnreachable, QrsRefused, JournalError) as exc:
                retry = isinstance(exc, QrsUnreachable | JournalError) or (getattr(exc, "status", 0) or 0) >= 500
                if not retry:
                    raise
                log.warning(
                    "request_deferred",
                    error=str(exc),
                    retry_in_s=delay,
                    detail="kept unacked and retried; the journal prevents a second start of anything already started",
                )
                self.metrics.deferred.inc()
                if self.should_exit.wait(delay):
                    return  # left unacked: the broker redelivers it to the next run
                delay = min(delay * 2, RETRY_MAX_S)

    def _process(self, job: Job) -> None:
        structlog.contextvars.clear_contextvars()
        ingress = job.ingress
        replies: list[Any] = []

        def emit(ev: dict[str, Any]) -> None:
            replies.append(self.listener.reply(job, ev))

        corr = job.correlation_data.hex() if job.correlation_data else None
        if job.retained and not job.payload:
            self.listener.ack(job)  # someone clearing a retained message: nothing to answer
            return
        if job.retained:
            rid = None if ingress == "mqtt-plain" else _request_id_of(job.payload)
            structlog.contextvars.bind_contextvars(requestId=rid)
            log.warning("retained_request_ignored", topic=job.topic)
            self.metrics.request(ingress, "rejected")
            emit(error_event(rid, "Retained request ignored", "start requests must be published with retain=false; nothing was started"))
            self._finish(job, replies)
            return
        try:
            req: StartRequest = parse_plain(job.payload) if ingress == "mqtt-plain" else validate_request(decode_json(job.payload))
        except RequestRejected as rej:
            rid = None if ingress == "mqtt-plain" else _request_id_of(job.payload)
            structlog.contextvars.bind_contextvars(requestId=rid)
            log.warning("request_rejected", ingress=ingress, topic=job.topic, error=rej.error, details=rej.details)
            self.metrics.request(ingress, "rejected")
            emit(error_event(rid, rej.error, rej.details))
            self._finish(job, replies)
            return
        structlog.contextvars.bind_contextvars(requestId=req.requestId)
        if job.expires_at is not None and time.monotonic() > job.expires_at:
            log.warning("request_expired", ingress=ingress)
            self.metrics.request(ingress, "expired")
            emit(error_event(req.requestId, "Request expired", "the message expiry interval passed before it could be handled"))
            self._finish(job, replies)
            return

        key = f"id:{req.requestId}" if req.requestId else (f"cd:{corr}" if corr else None)
        digest: str | None = None
        if key is None:
            # No idempotency key: a redelivery (dup flag) is matched to its first delivery by
            # payload; a fresh identical message is a new request.
            digest = hashlib.sha256(job.payload).hexdigest()
            earlier = self.journal.recent_hash(digest, ANON_DUP_WINDOW_S) if job.dup else None
            key = earlier or f"anon:{uuid.uuid4()}:{digest}"
        route = Route(job.response_topic or self.cfg.mqtt.topics.reply, corr)

        def follow(result: StageResult) -> None:
            if req.waits:
                self.tracker.follow(key, req, result, route)

        try:
            handled = handle_request(
                self.service, req, emit, ingress=ingress, key=key, source=job.topic, payload_hash=digest, on_started=follow
            )
        except QrsError as exc:
            if isinstance(exc, QrsUnreachable) or (exc.status or 0) >= 500:
                raise
            self.metrics.request(ingress, "error")
            emit(error_event(req.requestId, "QRS refused the request", str(exc)))
            self._finish(job, replies)
            return
        self.metrics.request(ingress, "duplicate" if handled.replayed else "ok")
        self.metrics.tasks(handled.events)
        self._finish(job, replies)

    def publish_route(self, route: Route, event: dict[str, Any]) -> None:
        """Publish a later event (taskFinished, chain stages) to where the request wanted it."""
        self.listener.publish_event(route.topic, route.correlation_bytes, event)

    def _finish(self, job: Job, replies: list[Any]) -> None:
        """Ack only once the broker has every reply (QoS 1 keeps them in order)."""
        if replies and not wait_published(replies[-1], PUBLISH_TIMEOUT_S):
            log.warning("reply_not_confirmed", detail="request left unacked; a redelivery replays the journal")
            return
        self.listener.ack(job)
        self.handled += 1


def probe_qrs(cfg: Config) -> threading.Thread:
    """Warn at start when QRS cannot be reached (in the background: startup does not wait).

    The daemon still starts: requests wait unacked until QRS answers. The warning says so,
    so an operator reading the first lines of the log sees the problem at once.
    """
    from butler_mqtt.errors import ButlerError

    def probe() -> None:
        try:
            client = QrsClient(cfg.qrs.model_copy(update={"retries": 0}))
        except ButlerError:
            return  # a certificate problem: startup reports it itself
        try:
            about = client.about()
            log.info("qrs_reachable", qrs=cfg.qrs.base_url, build=about.get("buildVersion"))
        except QrsError as exc:
            log.warning(
                "qrs_unreachable_at_start",
                qrs=cfg.qrs.base_url,
                error=str(exc),
                detail="requests wait (unacked) until QRS answers; check qrs.host/qrs.port and the "
                "certificates, or run `butler-mqtt check`",
            )
        finally:
            client.close()

    t = threading.Thread(target=probe, name="qrs-probe", daemon=True)
    t.start()
    return t


def run(config_file: Path | None) -> int:
    # Threads waiting on QRS wake up to a GIL held by busy ones; CPython's default 5 ms switch
    # interval then adds up to 5 ms per QRS call. 1 ms measured lower latency, same throughput.
    sys.setswitchinterval(0.001)
    cfg = load_config(config_file, missing_ok=False)
    setup_logging(cfg.logging.level, cfg.logging.format)
    # Before anything touches the broker: a second daemon must not take over the session.
    lock = StateDirLock(cfg.state_dir, cfg.mqtt.effective_client_id()).acquire()  # noqa: F841 - held until exit
    probe_qrs(cfg)
    profile = os.environ.get("BUTLER_MQTT_PROFILE")
    if not profile:
        return Daemon(cfg, config_file).run()
    import yappi  # type: ignore[import-untyped]  # benchmarks only (bench/throughput.py --profile): all threads, CPU time

    yappi.set_clock_type("cpu")
    yappi.start()
    try:
        return Daemon(cfg, config_file).run()
    finally:
        yappi.stop()
        yappi.get_func_stats().save(profile, type="pstat")
