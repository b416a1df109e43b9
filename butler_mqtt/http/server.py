"""uvicorn in a background thread of the daemon, started and stopped by `Daemon`.

The daemon owns the process: signals stay with `Daemon.install_signals` (uvicorn installs
none here), and `stop()` is called from `Daemon.shutdown`. The listening socket is bound
before the thread starts, so a port in use fails `startup()` with a clear error and `.port`
is the real port also when 0 (pick a free one) was configured.

Descriptors: the protocol class (`http/protocol.py`) caps connections and times out requests
that do not arrive, and for HTTPS runs the TLS handshake itself (uvicorn gets no ssl options),
so handshakes count against the cap and the request timeout from accept; an accept loop that still runs out of descriptors is logged once per
minute as "too many open files (raise LimitNOFILE)" instead of thousands of times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from butler_mqtt.config import HttpTlsConfig
from butler_mqtt.errors import ConfigError
from butler_mqtt.http.app import create_app, served
from butler_mqtt.http.protocol import HttpLimits, limited_protocol
from butler_mqtt.http.tls import http_ssl_context, listener_warnings, reloaded_context
from butler_mqtt.ops.fds import (
    FD_HINT,
    describe_os_error,
    fd_limit,
    http_connection_cap,
    is_fd_exhaustion,
)
from butler_mqtt.ops.ratelimit import RateLimiter

if TYPE_CHECKING:
    from fastapi import FastAPI

    from butler_mqtt.runtime import Runtime

log = structlog.get_logger("butler_mqtt.http")

#: Metrics-only mode listens on loopback: no token protects it.
METRICS_HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 10.0
#: In-flight requests get this long to finish at shutdown before connections are closed.
GRACEFUL_S = 5


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the daemon and names fd exhaustion."""

    _loop_errors = RateLimiter(60.0)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        await super().startup(sockets)

    @classmethod
    def _loop_error(cls, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's accept loop reports EMFILE here for every connection it cannot accept
        # (Python 3.11: up to `backlog` times per pass); the default handler logs each one.
        exc = context.get("exception")
        if is_fd_exhaustion(exc):
            ok, suppressed = cls._loop_errors.allow("fds")
            if ok:
                log.error(
                    "http_out_of_file_descriptors",
                    error=FD_HINT,
                    message=str(context.get("message", "")),
                    repeated=suppressed or None,
                    detail="new REST connections wait until descriptors are free; lower http.max_connections or raise LimitNOFILE",
                )
            return
        loop.default_exception_handler(context)  # the asyncio logger, rate-limited in setup_logging

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
        raise ConfigError(key, f"cannot listen on {host}:{port}: {describe_os_error(exc)}", source) from None
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """One uvicorn server on an already bound socket, served from a daemon thread."""

    def __init__(
        self, app: FastAPI, sock: socket.socket, limits: HttpLimits, keep_alive_s: int = 5, tls: HttpTlsConfig | None = None
    ) -> None:
        self.app = app
        self._sock = sock
        address = sock.getsockname()
        self.host: str = address[0]
        self.port: int = int(address[1])
        self.tls = tls is not None and tls.enabled
        config = uvicorn.Config(
            served(app),  # the start endpoint's fast path ahead of the application (app.py)
            log_config=None,  # the daemon's logging setup stays in charge
            access_log=False,  # every start request already has an audit line
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_S,
            http=limited_protocol(limits),
            ws="none",  # no websocket endpoints: an upgrade request is plain HTTP
            timeout_keep_alive=keep_alive_s,
            # No ssl options: the TLS handshake runs in the protocol (limits.tls), inside the
            # connection cap and the request timeout (http/protocol.py).
        )
        self.limits = limits
        self._server = _ThreadServer(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"http:{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def reload_tls(self, tls: HttpTlsConfig) -> None:
        """SIGHUP: new handshakes (run by the protocol with `limits.tls`) use `tls`'s files as
        they are now; connections already open keep theirs."""
        if self.limits.tls is not None:
            self.limits.tls = reloaded_context(tls)

    def stop(self, timeout: float = GRACEFUL_S + 5) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2)
        self._sock.close()


def start_http(runtime: Runtime) -> HttpServer:
    """Serve the full API on http.host:http.port, or only /metrics and /healthz on
    127.0.0.1:metrics.port when the REST API is off; over HTTPS on either when http.tls is set."""
    cfg = runtime.cfg
    full = cfg.http.enabled
    if full:
        host, port, key = cfg.http.host, cfg.http.port, "http.port"
        if cfg.metrics.port is not None:
            log.info("metrics_port_unused", detail="http.enabled: /metrics is served on the REST API's port")
    else:
        assert cfg.metrics.port is not None, "start_http needs http.enabled or metrics.port"
        host, port, key = METRICS_HOST, cfg.metrics.port, "metrics.port"
    limit = fd_limit()
    cap = http_connection_cap(cfg.http.max_connections, limit)
    if cap < cfg.http.max_connections:
        log.warning(
            "http_max_connections_lowered",
            configured=cfg.http.max_connections,
            used=cap,
            fd_limit=limit,
            detail="the open-file limit leaves room for fewer REST connections; raise LimitNOFILE",
        )
    closed = runtime.metrics.http_closed
    tls = cfg.http.tls  # checked once already by runtime.preflight (http_ssl_context): errors named the key
    limits = HttpLimits(
        max_connections=cap,
        request_timeout=cfg.http.request_timeout,
        on_closed=lambda why: closed.labels(why).inc(),
        tls=http_ssl_context(tls) if tls.enabled else None,
    )
    sock = _bind(host, port, key, cfg.source(key))
    server = HttpServer(create_app(runtime, full), sock, limits, cfg.http.keep_alive_timeout, tls).start()
    log.info(
        "http_listening",
        url=server.url,
        api=full,
        # Not "token=...": the log redactor masks every key that looks like a secret.
        auth=("bearer token" if cfg.http.token is not None else "none") if full else "none (metrics only)",
        max_connections=cap,
        request_timeout_s=cfg.http.request_timeout,
        keep_alive_timeout_s=cfg.http.keep_alive_timeout,
        tls=tls.enabled,
        client_certificates=tls.client_ca is not None,
    )
    if full:
        for event, detail in listener_warnings(cfg.http):
            log.warning(event, detail=detail)
    return server
