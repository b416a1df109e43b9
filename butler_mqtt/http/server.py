"""uvicorn in a background thread of the daemon, started and stopped by `Daemon`.

The daemon owns the process: signals stay with `Daemon.install_signals` (uvicorn installs
none here), and `stop()` is called from `Daemon.shutdown`. The listening socket is bound
before the thread starts, so a port in use fails `startup()` with a clear error and `.port`
is the real port also when 0 (pick a free one) was configured.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn

from butler_mqtt.errors import ConfigError
from butler_mqtt.http.app import create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

    from butler_mqtt.daemon import Daemon

log = structlog.get_logger("butler_mqtt.http")

#: Metrics-only mode listens on loopback: no token protects it.
METRICS_HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 10.0
#: In-flight requests get this long to finish at shutdown before connections are closed.
GRACEFUL_S = 5


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 spelling
        return None


def _bind(host: str, port: int, key: str, source: str | None = None) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {host}:{port}: {exc.strerror or exc}", source) from None
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """One uvicorn server on an already bound socket, served from a daemon thread."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self.app = app
        self._sock = sock
        address = sock.getsockname()
        self.host: str = address[0]
        self.port: int = int(address[1])
        config = uvicorn.Config(
            app,
            log_config=None,  # the daemon's logging setup stays in charge
            access_log=False,  # every start request already has an audit line
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_S,
        )
        self._server = _ThreadServer(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"http:{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = GRACEFUL_S + 5) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2)
        self._sock.close()


def start_http(daemon: Daemon) -> HttpServer:
    """Serve the full API on http.host:http.port, or only /metrics and /healthz on
    127.0.0.1:metrics.port when the REST API is off."""
    cfg = daemon.cfg
    full = cfg.http.enabled
    if full:
        host, port, key = cfg.http.host, cfg.http.port, "http.port"
        if cfg.metrics.port is not None:
            log.info("metrics_port_unused", detail="http.enabled: /metrics is served on the REST API's port")
    else:
        assert cfg.metrics.port is not None, "start_http needs http.enabled or metrics.port"
        host, port, key = METRICS_HOST, cfg.metrics.port, "metrics.port"
    server = HttpServer(create_app(daemon, full), _bind(host, port, key, cfg.source(key))).start()
    log.info(
        "http_listening",
        url=server.url,
        api=full,
        # Not "token=...": the log redactor masks every key that looks like a secret.
        auth=("bearer token" if cfg.http.token is not None else "none") if full else "none (metrics only)",
    )
    if full and cfg.http.token is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("http_without_token", detail=f"the REST API on {host} can start tasks without a token (http.token)")
    return server
