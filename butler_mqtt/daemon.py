"""The daemon's life: startup(), main_loop(), shutdown(), with one `should_exit` flag.

Like uvicorn's Config/Server split, the wiring is elsewhere: `runtime.build` makes the journal,
the QRS client, the use case, the tracker and the metrics once; `Daemon.__init__` adds the MQTT
edge (listener, request handler, retain probe) and owns nothing else. Nothing runs before
startup(). The edges are handed that Runtime and narrow views (`MqttHealth`), never the daemon.

Signals are handled in one place (`install_signals`): SIGTERM/SIGINT ask for a clean exit,
SIGHUP reloads the start_filter and the log level from the config file.

Workers take jobs from a bounded queue fed by the MQTT network thread; each job is acked
only after its replies were accepted by the broker. A request QRS cannot resolve (outage,
5xx) or the journal cannot record is kept unacked and retried with backoff: it is never
dropped and never answered with a guess.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from butler_mqtt import runtime
from butler_mqtt.callers import caller_subscriptions
from butler_mqtt.config import Config, load_config
from butler_mqtt.errors import ConfigError, JournalError
from butler_mqtt.mqtt.handler import MqttHealth, RequestHandler, alert_publisher, route_publisher
from butler_mqtt.mqtt.listener import Job, MqttListener
from butler_mqtt.mqtt.retain_probe import RetainProbe
from butler_mqtt.ops import fds, systemd
from butler_mqtt.ops.lock import StateDirLock
from butler_mqtt.ops.logging import setup_logging

if TYPE_CHECKING:
    from butler_mqtt.http.server import HttpServer
    from butler_mqtt.runtime import Journal, Metrics, StartService, Tracker

log = structlog.get_logger("butler_mqtt.daemon")


class Daemon:
    """One daemon: everything it owns is made here (checked and wired, nothing started);
    startup() starts it, main_loop() keeps it, shutdown() drains and stops it."""

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
        self._queued_bytes = 0
        runtime.preflight(cfg)  # before the journal, the broker or a port is touched
        if cfg.serves_http and cfg.http.tls.enabled:
            from butler_mqtt.http.tls import http_ssl_context

            http_ssl_context(cfg.http.tls)  # a bad certificate or key: exit 2 naming it, before the broker
        client_id = cfg.mqtt.effective_client_id()
        self.listener = MqttListener(cfg.mqtt, self._enqueue, client_id=client_id,
                                     extra=caller_subscriptions(cfg.mqtt, cfg.callers))
        self.listener.on_subscribed = self._ready
        self.health = MqttHealth(self.listener)
        self.runtime = runtime.build(cfg, route_publisher(self.listener), self.health, alert=alert_publisher(self.listener))
        # MQTT 3.1.1 clears the retain flag on live delivery: ask the broker (mqtt/retain_probe.py).
        self.retain_probe = None if self.listener.v5 else RetainProbe(cfg.mqtt, client_id)
        self.handler = RequestHandler(self.runtime, self.listener, self.health, self.should_exit, self.retain_probe)
        self.http_server: HttpServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.cfg
        try:
            self.journal.purge()
        except JournalError as exc:  # not essential: requests are still claimed and recorded
            log.warning("journal_purge_failed", error=str(exc))
        if self.retain_probe is not None:
            self.retain_probe.start()
        for i in range(cfg.mqtt.workers):
            t = threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self.listener.start()
        if self.runtime.alerter is not None:
            self.runtime.alerter.start()
        self.tracker.start()
        if cfg.serves_http:
            from butler_mqtt.http.server import start_http

            self.http_server = start_http(self.runtime)
        log.info(
            "started",
            broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            qrs=cfg.qrs.base_url,
            client_id=self.listener.client_id,
            topics=self.listener.topics(),
            caller_topics=[s.topic for s in self.listener.extra] or None,
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
        if self.runtime.alerter is not None:
            self.runtime.alerter.stop()  # what is waiting goes out while the broker connection still is up
        self.listener.stop()
        if self.retain_probe is not None:
            self.retain_probe.stop()
        self.runtime.close()
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

    def _enqueue(self, job: Job) -> bool:
        """Called in paho's network thread: never blocks. False: not taken (queue full)."""
        size = len(job.payload)
        with self._busy_lock:
            if self._queued_bytes + size > self.cfg.mqtt.queue_bytes and self._queued_bytes > 0:
                return False
            self._queued_bytes += size
        if self.retain_probe is not None:
            self.retain_probe.ask(job)  # 3.1.1: ask on arrival, while a retained copy is surely there
        self._jobs.put(job)
        return True

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._busy_lock:
                self._busy += 1
                self._queued_bytes -= len(job.payload)
            try:
                self.handler.deliver(job)
            except Exception as exc:  # deliver answers everything; this is the last resort
                try:
                    self.handler.last_resort(job, exc)
                except Exception:  # noqa: BLE001 - the worker must live on
                    # Not even the ack could be sent (the broker is gone): left for redelivery.
                    log.exception("worker_error_unanswered", topic=job.topic)
                    self.listener.release(job)
                    self.listener.request_redelivery()
            finally:
                with self._busy_lock:
                    self._busy -= 1
                    drained = self._queued_bytes < self.cfg.mqtt.queue_bytes // 2
                structlog.contextvars.clear_contextvars()
            if drained and self.listener.refused:
                self.listener.request_redelivery()

    # ------------------------------------------------------------------ for operators and tests

    @property
    def journal(self) -> Journal:
        return self.runtime.journal

    @property
    def service(self) -> StartService:
        return self.runtime.service

    @property
    def tracker(self) -> Tracker:
        return self.runtime.tracker

    @property
    def metrics(self) -> Metrics:
        return self.runtime.metrics

    @property
    def qrs_problem(self) -> str | None:
        return self.health.qrs_problem

    @property
    def handled(self) -> int:
        return self.handler.handled

    def waiting(self) -> tuple[int, float | None]:
        """Deliveries kept unacked for a retry, and how long the oldest has waited (s)."""
        return self.health.waiting()


def run(config_file: Path | None) -> int:
    # Threads waiting on QRS wake up to a GIL held by busy ones; CPython's default 5 ms switch
    # interval then adds up to 5 ms per QRS call. 1 ms measured lower latency, same throughput.
    sys.setswitchinterval(0.001)
    cfg = load_config(config_file, missing_ok=False)
    setup_logging(cfg.logging.level, cfg.logging.format)
    fds.raise_fd_limit()  # systemd's default soft limit is 1024; the unit's LimitNOFILE is the hard one
    # Before anything touches the broker: a second daemon must not take over the session.
    lock = StateDirLock(cfg.state_dir, cfg.mqtt.effective_client_id()).acquire()  # noqa: F841 - held until exit
    runtime.probe_at_start(cfg)
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
