"""uvicorn's h11 protocol with a connection cap and a request timeout.

uvicorn alone keeps every accepted connection for as long as the client likes: it has no
header timeout (a client that sends half a request head holds its socket forever, slowloris),
and `limit_concurrency` answers 503 only after reading a request, so idle connections still
hold their file descriptors. Enough of them and the process is out of descriptors: QRS calls
fail and MQTT requests go unanswered. Here:

* a connection over `max_connections` is answered 503 and closed at once, before anything is
  read from it (its descriptor is free again right away); over HTTPS it is closed unanswered
  (before its handshake, a client could not read an answer);
* a client has `request_timeout` seconds to send a complete request (head and body), counted
  from the moment the connection opens or the previous response was sent; then the connection
  is closed (with 408 when part of a request had arrived and nothing was answered yet);
* HTTPS: the TLS handshake runs here (`HttpLimits.tls`), not in asyncio's server (whose
  handshake timeout is 60 s and whose handshaking connections reach no protocol, so nothing
  could count or close them). A connection counts against `max_connections` from accept, and
  its handshake is part of its first request's `request_timeout`;
* between requests uvicorn's own keep-alive timeout (`http.keep_alive_timeout`) closes idle
  connections sooner.

Both events are logged, rate-limited, with a count of how many happened since the last line.
"""

from __future__ import annotations

import asyncio
import json
import ssl
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
    tls: ssl.SSLContext | None = None  # HTTPS: the handshake runs in the protocol, inside these limits
    handshaking: int = 0  # connections accepted and still in their TLS handshake (event loop thread only)


def limited_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


class LimitedH11Protocol(H11Protocol):
    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._made = False  # H11Protocol.connection_made ran (after the TLS handshake, for HTTPS)
        self._raw: asyncio.Transport | None = None  # the TCP transport while its TLS handshake runs
        self._accepted = 0.0
        self._early: list[bytes] = []  # data that came with the end of the TLS handshake

    # ------------------------------------------------------------------ the cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) + self.limits.handshaking >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            if self.limits.tls is None:
                transport.write(_BUSY)
            transport.close()  # nothing is read: the descriptor is released on the next loop pass
            self._closed(
                "refused", log.warning, "http_connection_refused", max_connections=self.limits.max_connections,
                detail="answered 503 (closed unanswered over HTTPS): the REST API is at http.max_connections",
            )
            return
        self._accepted = self.loop.time()
        if self.limits.tls is not None:
            self._begin_tls(transport)
            return
        self._made = True
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
        if not self._made:  # closed during its TLS handshake
            self._handshake_over()
            return
        super().connection_lost(exc)

    # ------------------------------------------------------------------ the TLS handshake

    def _begin_tls(self, raw: asyncio.Transport) -> None:
        self._raw = raw
        self.limits.handshaking += 1
        raw.pause_reading()  # the handshake reads it (start_tls)
        self._arm()  # from accept: the handshake is part of the request time
        self.loop.create_task(self._handshake(raw))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        assert self.limits.tls is not None
        left = self._accepted + self.limits.request_timeout - self.loop.time()
        if raw.is_closing() or left <= 0:
            return
        try:
            tls = await self.loop.start_tls(raw, self, self.limits.tls, server_side=True, ssl_handshake_timeout=left)
        except Exception as exc:  # noqa: BLE001 - whatever ends a handshake, the connection goes and is uncounted
            closed_by_us = self._raw is None  # the request timeout closed it, and said so
            self._handshake_over()
            self._disarm()
            raw.abort()
            if not closed_by_us:
                ok, suppressed = self.limits.limiter.allow("tls")
                if ok:
                    log.info("http_tls_handshake_failed", error=type(exc).__name__, repeated=suppressed or None,
                             detail="the client did not complete a TLS handshake (plain HTTP, or a certificate it refused)")
            return
        if tls is None:  # typeshed allows it; asyncio returns the TLS transport
            self._handshake_over()
            raw.abort()
            return
        if self._raw is None or tls.is_closing():
            tls.abort()  # timed out as the handshake ended
            return
        self._handshake_over()
        self._made = True
        super().connection_made(tls)  # the request timer keeps running from accept
        self._with_peer(tls)  # the client certificate's CN (callers)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def _handshake_over(self) -> None:
        if self._raw is not None:
            self._raw = None
            self.limits.handshaking -= 1

    # ------------------------------------------------------------------ the request timeout

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._made:
            # TLS: what the client sent with its last handshake message arrives as the handshake
            # completes, before start_tls returns to _handshake; it is handed on from there.
            self._early.append(data)
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
        if self._raw is not None:  # still in its TLS handshake
            raw = self._raw
            self._handshake_over()
            raw.abort()
            self._closed(
                "timeout", log.info, "http_request_timeout", timeout_s=self.limits.request_timeout, partial=False,
                detail="connection closed: no TLS handshake and complete request within http.request_timeout",
            )
            return
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
