"""uvicorn's h11 protocol with a connection cap and a request timeout.

uvicorn alone keeps every accepted connection for as long as the client likes: it has no
header timeout (a client that sends half a request head holds its socket forever, slowloris),
and `limit_concurrency` answers 503 only after reading a request, so idle connections still
hold their file descriptors. Enough of them and the process is out of descriptors: QRS calls
fail and MQTT requests go unanswered. Here:

* a connection over `max_connections` is answered 503 and closed at once, before anything is
  read from it (its descriptor is free again right away);
* a client has `request_timeout` seconds to send a complete request (head and body), counted
  from the moment the connection opens or the previous response was sent; then the connection
  is closed (with 408 when part of a request had arrived and nothing was answered yet);
* between requests uvicorn's own keep-alive timeout (`http.keep_alive_timeout`) closes idle
  connections sooner.

Both events are logged, rate-limited, with a count of how many happened since the last line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from butler_mqtt.callers import client_cert_cn
from butler_mqtt.ops.ratelimit import RateLimiter

log = structlog.get_logger("butler_mqtt.http")

def _raw_response(status: str, error: str, details: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer written before (or instead of) reading the request."""
    body = json.dumps({"error": error, "details": details}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _raw_response(
    "503 Service Unavailable", "Too many connections", "the REST API is at http.max_connections; retry", "retry-after: 1\r\n"
)
_TIMEOUT = _raw_response(
    "408 Request Timeout", "Request timeout", "the complete request did not arrive within http.request_timeout"
)
#: The ASGI scope key holding the CN of the client certificate (mutual TLS), None without one.
CLIENT_CERT_CN = "butler_mqtt.client_cert_cn"
#: their_state values of a request that has not fully arrived yet.
_INCOMPLETE = (h11.IDLE, h11.SEND_BODY)


@dataclass
class HttpLimits:
    max_connections: int
    request_timeout: float
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(60.0))
    on_closed: Callable[[str], None] | None = None  # "refused" or "timeout" (the metrics counter)


def limited_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


class LimitedH11Protocol(H11Protocol):
    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ------------------------------------------------------------------ the cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            transport.write(_BUSY)
            transport.close()  # nothing is read: the descriptor is released on the next loop pass
            self._closed(
                "refused", log.warning, "http_connection_refused", max_connections=self.limits.max_connections,
                detail="answered 503 and closed: the REST API is at http.max_connections",
            )
            return
        super().connection_made(transport)
        self._with_peer(transport)
        self._arm()

    def _with_peer(self, transport: asyncio.Transport) -> None:
        """uvicorn does not pass the client certificate to the app: every request of this
        connection gets its CN in the scope (CLIENT_CERT_CN; callers, contract section 10). The
        certificate was verified in the handshake (http.tls.client_ca, CERT_REQUIRED)."""
        cn = client_cert_cn(transport.get_extra_info("peercert"))
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope[CLIENT_CERT_CN] = cn
            await inner(scope, receive, send)

        self.app = app

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)

    # ------------------------------------------------------------------ the request timeout

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._request_timer is not None and self.conn.their_state not in _INCOMPLETE:
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request (keep-alive) must arrive in time too
        super().on_response_complete()
        if self.transport.is_closing() or self.conn.their_state not in _INCOMPLETE:
            self._disarm()  # closed, or a pipelined request is already complete
        elif self.conn.trailing_data[0]:
            self._unset_keepalive_if_required()  # part of the next request is here: not idle

    def _arm(self) -> None:
        self._disarm()
        self._request_timer = self.loop.call_later(self.limits.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or self.conn.their_state not in _INCOMPLETE:
            return
        partial = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        answered = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if partial and not answered and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.write(_TIMEOUT)
        self.transport.close()
        self._closed(
            "timeout", log.info, "http_request_timeout", timeout_s=self.limits.request_timeout, partial=partial,
            detail="connection closed: no complete request within http.request_timeout",
        )

    def _closed(self, reason: str, emit: Callable[..., Any], event: str, **fields: Any) -> None:
        """Count a connection we closed (metrics) and log it once per interval with a count."""
        if self.limits.on_closed is not None:
            self.limits.on_closed(reason)
        ok, suppressed = self.limits.limiter.allow(reason)
        if ok:
            emit(event, repeated=suppressed or None, **fields)
