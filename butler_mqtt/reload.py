"""SIGHUP: re-read the config file and apply what can change without a restart.

Applied: `start_filter`, `logging.level`, and the certificate files at the running paths (the
QRS client certificate, its key and `qrs.ca`; the REST API's `http.tls.cert`, `.key` and
`.client_ca`), so a certificate rotation needs no restart. Any other change is named in
`reload_needs_restart`. A config file that does not validate changes nothing
(`reload_failed`); a certificate file that cannot be loaded keeps the ones in use
(`tls_reload_failed`, naming the key).

One reload at a time, on one thread: `request()` only queues (it is safe in a signal handler),
and a burst of requests that arrive during a reload is served by one more reload after it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from butler_mqtt.config import Config, load_config
from butler_mqtt.errors import ConfigError
from butler_mqtt.ops.logging import setup_logging

if TYPE_CHECKING:
    from butler_mqtt.http.server import HttpServer
    from butler_mqtt.runtime import Runtime

log = structlog.get_logger("butler_mqtt.reload")

_LEVELS = ("debug", "info", "warning", "error")
_STOP = 0
_RELOAD = 1


class Reloader:
    """Applies SIGHUP reloads to a running daemon's Runtime (and its REST listener)."""

    def __init__(self, runtime: Runtime, config_file: Path | None, http: Callable[[], HttpServer | None]) -> None:
        self.runtime = runtime
        self.cfg = runtime.cfg
        self.config_file = config_file
        self._http = http
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._requests.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(10)

    def request(self) -> None:
        """Ask for a reload; never blocks (SimpleQueue.put is reentrant: signal-handler safe)."""
        self._requests.put(_RELOAD)

    def _run(self) -> None:
        while True:
            wanted = {self._requests.get()}
            try:  # a burst coalesces: the requests waiting now are all served by one reload
                while True:
                    wanted.add(self._requests.get_nowait())
            except queue.Empty:
                pass
            if _STOP in wanted:
                return
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - a bug in one reload must not end the next ones
                log.exception("reload_error", detail="the running configuration is kept")

    def reload(self) -> None:
        """Re-read the config file and apply it (never two at once)."""
        with self._lock:
            log.info("reloading", config_file=str(self.config_file) if self.config_file else None)
            try:
                new = load_config(self.config_file, missing_ok=self.config_file is None)
            except ConfigError as exc:
                log.error("reload_failed", error=str(exc), detail="the running configuration is kept")
                return
            self._apply(new)
            self.reload_tls()

    def _apply(self, new: Config) -> None:
        old, fresh = self.cfg.model_dump(mode="json"), new.model_dump(mode="json")
        unapplied = [k for k in fresh if k not in ("start_filter", "logging") and fresh[k] != old.get(k)]
        unapplied += ["logging.format"] if new.logging.format != self.cfg.logging.format else []
        if unapplied:
            log.warning(
                "reload_needs_restart",
                changed=unapplied,
                detail="only start_filter, logging.level and the certificate files (at their running paths) are reloaded",
            )
        self.runtime.service.set_start_filter(new.start_filter)
        self.cfg.start_filter = new.start_filter
        # Logged under the more verbose of the old and new level, so that turning the level up
        # to warning still leaves a trace of the reload that did it.
        quieter = _LEVELS.index(new.logging.level) > _LEVELS.index(self.cfg.logging.level)
        if quieter:
            _log_reloaded(new)
        setup_logging(new.logging.level, self.cfg.logging.format)
        self.cfg.logging.level = new.logging.level
        if not quieter:
            _log_reloaded(new)

    def reload_tls(self) -> None:
        """Re-read the certificate files at the running paths; a file that fails keeps the old."""
        _reload_one("qrs", self.runtime.qrs.reload_tls)
        http = self._http()
        if http is not None and http.tls:
            _reload_one("http.tls", lambda: http.reload_tls(self.cfg.http.tls))


def _reload_one(what: str, reload: Callable[[], None]) -> None:
    try:
        reload()
    except ConfigError as exc:  # the message names the file and the reason, never its content
        log.error("tls_reload_failed", key=exc.key, error=exc.reason, detail="the certificates loaded before are kept")
        return
    log.info("tls_reloaded", certificates=what, detail="new connections use the files as they are now")


def _log_reloaded(new: Config) -> None:
    log.info(
        "config_reloaded",
        start_filter=new.start_filter.enabled,
        allow_task_ids=len(new.start_filter.allow.task_ids),
        allow_tags=len(new.start_filter.allow.tags),
        allow_custom_properties=len(new.start_filter.allow.custom_properties),
        log_level=new.logging.level,
    )
