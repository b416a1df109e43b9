"""The daemon's life, as uvicorn's `Server`: startup(), main_loop(), shutdown(), one `should_exit`.

`runtime.build` wires the parts once; `Daemon.__init__` adds the MQTT edge (listener, handler,
worker pool, retain probe) and starts nothing. `serve()` runs startup() inside the `try` whose
`finally` is shutdown(): a step that fails (the REST port taken, the journal down) stops what had
started, and the error reaches the command line (exit code 2 for a ConfigError).

Signals are handled in one place: the handler only queues the signal (no lock taken), the
`signals` thread acts on it. SIGTERM/SIGINT ask for a clean exit (in-flight requests finish, up
to 30 s); a second one during that drain exits at once (what was in flight stays unacked: the
broker redelivers it, the journal starts nothing twice); SIGHUP asks for a reload (reload.py:
one at a time, a burst coalesced).
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from butler_mqtt import runtime
from butler_mqtt.callers import caller_subscriptions
from butler_mqtt.config import Config, load_config
from butler_mqtt.errors import JournalError
from butler_mqtt.mqtt.handler import MqttHealth, RequestHandler, alert_publisher, route_publisher
from butler_mqtt.mqtt.listener import MqttListener
from butler_mqtt.mqtt.retain_probe import RetainProbe
from butler_mqtt.mqtt.workers import WorkerPool
from butler_mqtt.ops import fds, scheduling, systemd
from butler_mqtt.ops.lock import StateDirLock
from butler_mqtt.ops.logging import setup_logging
from butler_mqtt.ops.mainthread import run_beside_main
from butler_mqtt.ops.profiling import run_profiled
from butler_mqtt.reload import Reloader

if TYPE_CHECKING:
    from butler_mqtt.http.server import HttpServer

log = structlog.get_logger("butler_mqtt.daemon")

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Daemon:
    """One daemon: everything it owns is made here (checked and wired, nothing started);
    startup() starts it, main_loop() keeps it, shutdown() drains and stops what started."""

    def __init__(self, cfg: Config, config_file: Path | None = None) -> None:
        self.cfg = cfg
        self.should_exit = threading.Event()
        runtime.preflight(cfg)  # before the journal, the broker or a port is touched
        if cfg.serves_http and cfg.http.tls.enabled:  # a bad certificate or key: exit 2 naming it, before the broker
            from butler_mqtt.http.tls import http_ssl_context
            http_ssl_context(cfg.http.tls)
        client_id = cfg.mqtt.effective_client_id()
        self.listener = MqttListener(cfg.mqtt, lambda job: self.workers.enqueue(job), client_id=client_id,
                                     extra=caller_subscriptions(cfg.mqtt, cfg.callers))
        self.listener.on_subscribed = lambda: systemd.notify("READY=1\nSTATUS=connected and subscribed")
        self.health = MqttHealth(self.listener)
        self.runtime = runtime.build(cfg, route_publisher(self.listener, cfg.backend), self.health, alert=alert_publisher(self.listener))
        # MQTT 3.1.1 clears the retain flag on live delivery: ask the broker (mqtt/retain_probe.py).
        self.retain_probe = None if self.listener.v5 else RetainProbe(cfg.mqtt, client_id)
        self.handler = RequestHandler(self.runtime, self.listener, self.health, self.should_exit, self.retain_probe)
        self.workers = WorkerPool(self.handler, self.listener, cfg.mqtt.queue_bytes, self.retain_probe)
        self.http_server: HttpServer | None = None
        self.reloader = Reloader(self.runtime, config_file, lambda: self.http_server)
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._started: list[tuple[str, Callable[[], object]]] = []  # what shutdown() stops, in order

    # ------------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg, rt = self.cfg, self.runtime
        try:
            rt.journal.purge()
        except JournalError as exc:  # not essential: requests are still claimed and recorded
            log.warning("journal_purge_failed", error=str(exc))
        if self.retain_probe is not None:
            self._start("retain_probe", self.retain_probe.start, self.retain_probe.stop)
        self._start("workers", lambda: self.workers.start(cfg.mqtt.workers), lambda: None)  # drained first
        self._start("listener", self.listener.start, self.listener.stop)
        if rt.alerter is not None:  # what is waiting goes out while the broker connection still is up
            self._start("alerter", rt.alerter.start, rt.alerter.stop)
        self._start("tracker", rt.tracker.start, rt.tracker.stop)  # its records stay in the journal
        self._start("reloader", self.reloader.start, self.reloader.stop)
        if cfg.serves_http:
            self._start("http", self._start_http, lambda: self.http_server.stop() if self.http_server else None)
        log.info("started", broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}", qrs=runtime.backend_url(cfg), backend=cfg.backend,
                 client_id=self.listener.client_id, topics=self.listener.topics(),
                 caller_topics=[s.topic for s in self.listener.extra] or None, start_filter=cfg.start_filter.enabled,
                 http=cfg.http.enabled)

    def _start(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        start()
        self._started.insert(0, (name, stop))  # stopped in the reverse order of starting

    def _start_http(self) -> None:
        from butler_mqtt.http.server import start_http  # FastAPI and uvicorn only when served
        self.http_server = start_http(self.runtime)

    def main_loop(self) -> None:
        interval = systemd.watchdog_interval()
        last_purge = time.monotonic()
        while not self.should_exit.wait(interval or 1.0):
            if interval and self.healthy_threads():
                systemd.notify("WATCHDOG=1")
            if time.monotonic() - last_purge > 3600:
                last_purge = time.monotonic()
                try:
                    self.runtime.journal.purge()
                except JournalError as exc:
                    log.error("journal_purge_failed", error=str(exc))

    def healthy_threads(self) -> bool:
        """The MQTT network thread, the tracker, every worker and the acks' deadline sweeper run
        (gates the watchdog)."""
        return self.listener.alive and self.runtime.tracker.alive and self.workers.alive and self.handler.acks.after.alive

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Drain the workers, then stop what startup() started (also after a failed startup)."""
        systemd.notify("STOPPING=1")
        log.info("stopping", in_flight=self.workers.busy)
        self.listener.paused = True  # new deliveries stay unacked: redelivered next run
        deadline = time.monotonic() + drain_timeout
        self.workers.drain(deadline)
        self.handler.acks.after.settle(deadline)  # the last acks, once their replies are confirmed
        started, self._started = self._started, []
        for name, stop in started:
            try:
                stop()
            except Exception:  # noqa: BLE001 - one part failing to stop must not keep the rest running
                log.exception("stop_failed", part=name)
        self.runtime.close()
        rest, mqtt = (int(self.http_server.app.state.api.handled) if self.http_server else 0), self.handler.handled
        log.info("stopped", handled=mqtt + rest, mqtt=mqtt, rest=rest)

    def serve(self) -> None:
        """startup(), main_loop(), shutdown(): shutdown() runs whatever step fails."""
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()

    # ------------------------------------------------------------------ signals

    def install_signals(self) -> None:
        """The handlers only queue the signal (no lock, no log line: they may interrupt either);
        the `signals` thread acts on it."""
        threading.Thread(target=self._handle_signals, name="signals", daemon=True).start()
        for sig in (*EXIT_SIGNALS, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                signal.signal(sig, lambda signum, _frame: self._signals.put(signum))

    def _handle_signals(self) -> None:
        while True:
            signum = self._signals.get()
            if signum not in EXIT_SIGNALS:
                self.reloader.request()
            elif not self.should_exit.is_set():
                log.info("signal", signal=signal.Signals(signum).name)
                self.should_exit.set()
            else:
                self._force_exit(signum)

    def _force_exit(self, signum: int) -> None:
        """A second SIGTERM/SIGINT: exit now; as after a crash, the next run picks up the rest."""
        log.warning("forced_exit", signal=signal.Signals(signum).name, in_flight=self.workers.busy,
                    detail="deliveries in flight stay unacked: redelivered to the next run, the journal starts nothing twice")
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(128 + signum)

    def run(self) -> int:
        self.install_signals()
        run_beside_main(self.serve, "lifecycle")  # the main thread stays free for signal handlers
        return 0


def run(config_file: Path | None) -> int:
    # CPython's 5 ms switch interval adds up to 5 ms per QRS call; 1 ms: lower latency, same throughput.
    sys.setswitchinterval(0.001)
    cfg = load_config(config_file, missing_ok=False)
    setup_logging(cfg.logging.level, cfg.logging.format)
    # Before anything touches the broker: a second daemon must not take over the session.
    lock = StateDirLock(cfg.state_dir, cfg.mqtt.effective_client_id()).acquire()  # noqa: F841 - held until exit
    runtime.probe_at_start(cfg)
    daemon = Daemon(cfg, config_file)  # its preflight: a bad certificate file is the first line a user sees
    fds.raise_fd_limit()  # systemd's default soft limit is 1024; the unit's LimitNOFILE is the hard one
    scheduling.apply(cfg.cpu_scheduling)  # after the preflight; the threads started later inherit it
    return run_profiled(daemon.run)
