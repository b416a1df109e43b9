"""The QRS transport: how one HTTPS request reaches QRS and how its failures are named.

`PoolTransport` is the real one: urllib3 connections with the Qlik client certificate, server
verification against `qrs.ca` unless `qrs.verify: false`. `send` (every call of the request
path) goes through the lean HTTP/1.1 client of ops/http1.py: each call cut at a TOTAL deadline
of `qrs.timeout` (head and body together, however slowly they drip), answers read with the
`qrs.max_response_bytes` cap while they stream in. `open` (streamed script logs) goes through a
urllib3 pool. ONE table (`map_transport_error`) maps urllib3/ssl/socket
errors to the tree of errors.py. `MockTransport(handler)` stands in for it in unit tests
(in the spirit of httpx's MockTransport): the client's operations and the resume logic above
it are then tested without TLS or a server.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import urllib3

from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import ConfigError, QrsError, QrsRefused, QrsTlsRejected, QrsUnreachable
from butler_mqtt.ops.http1 import Http1Pool
from butler_mqtt.ops.outbound import causes as causes_of
from butler_mqtt.ops.pem import check_pem

#: A path segment that is a GUID, whole (between slashes or the ends).
_GUID_SEGMENT = re.compile(r"(?<![^/])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![^/])")


def route_name(path: str) -> str:
    """A low-cardinality route name for metrics: GUIDs replaced by `{id}` (one regex pass: this
    runs twice per QRS call)."""
    return _GUID_SEGMENT.sub("{id}", path)


@dataclass
class Answer:
    """One QRS answer: status and body."""

    status_code: int
    content: bytes
    date: str | None = None  # the `Date` header: QRS's clock
    retry_after: str | None = None  # the `Retry-After` header (429, 503), as sent

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Transport(Protocol):
    def send(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        """One request (`target`: path and query); raises QrsError subclasses only."""
        ...

    def close(self) -> None: ...


class PoolTransport:
    """Thread-safe urllib3 pool. Per call it costs about a third of the CPU of `requests`,
    which on a 2-core host is most of a start's own latency."""

    def __init__(self, cfg: QrsConfig) -> None:
        self.cfg = cfg
        if cfg.verify:
            try:
                ctx = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca is not None else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("qrs.ca", f"cannot load the CA file {cfg.ca}: {exc}") from None
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("qrs.cert", f"cannot load the client certificate and key: {exc}") from None
        connections = max(cfg.start_concurrency * 2, 10)  # kept idle, per pool
        self._pool = urllib3.HTTPSConnectionPool(  # streamed reads bound their own time (failure.py)
            cfg.host,
            cfg.port,
            maxsize=connections,
            block=False,
            ssl_context=ctx,
            cert_reqs="CERT_REQUIRED" if cfg.verify else "CERT_NONE",
            assert_hostname=cfg.host if cfg.verify else False,
            retries=False,
            timeout=urllib3.Timeout(connect=min(cfg.timeout, 10.0), read=cfg.timeout),
        )
        # The request path's calls (send) go through the lean HTTP/1.1 client on urllib3's own
        # connections (ops/http1.py); the streamed reads of `open` (script logs) through the pool.
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self._lean = Http1Pool(
            self._pool._new_conn,  # the pool's own factory: the same TLS settings and connect errors
            f"{host}:{cfg.port}", maxsize=connections, read_timeout=cfg.timeout,
        )

    def close(self) -> None:
        self._pool.close()
        self._lean.close()

    def reload_tls(self) -> None:
        """Re-read the client certificate, its key and qrs.ca (SIGHUP) into a new pool, swapped in
        at once: new requests use it, requests in flight finish on the old one, closed later.
        ConfigError naming the key when a file cannot be loaded; the pool in use is kept."""
        _check_pem_files(self.cfg)
        fresh = PoolTransport(self.cfg)
        old_pool, old_lean = self._pool, self._lean
        self._pool, self._lean = fresh._pool, fresh._lean  # both: `send` goes through the lean one

        def close_old() -> None:
            old_pool.close()
            old_lean.close()

        closer = threading.Timer(self.cfg.timeout + 15.0, close_old)  # after the longest call on them
        closer.daemon = True
        closer.start()

    def send(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        what = f"{method} {route_name(target.split('?', 1)[0])}"
        cap = self.cfg.max_response_bytes
        try:  # the lean client cuts the call at the deadline itself (no watcher thread)
            reply = self._lean.request(method, target, headers, body, cap, time.monotonic() + self.cfg.timeout)
        except urllib3.exceptions.ReadTimeoutError:  # each read got what was left of qrs.timeout
            raise QrsUnreachable(f"QRS did not answer within {self.cfg.timeout:g} s in all ({what})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise map_transport_error(exc, self.cfg.base_url, self.cfg.timeout, what) from None
        if reply.over:  # the connection was closed, the rest never read
            raise QrsRefused(
                f"{what}: the QRS answer is larger than qrs.max_response_bytes ({cap} bytes);"
                " narrow the selection or raise qrs.max_response_bytes",
                reply.status,
            )
        return Answer(reply.status, reply.body, reply.headers.get("date"), reply.headers.get("retry-after"))

    def open(self, method: str, target: str, headers: dict[str, str], timeout: float) -> Any:
        """One request whose answer the caller reads (a urllib3 response, not preloaded: read it
        with `read1`, then `release_conn()`, or `close()` it). `timeout` bounds the connect and
        each read. Raises QrsError subclasses only; reads may raise urllib3/OS errors."""
        path = target.split("?", 1)[0]
        try:
            return self._pool.urlopen(
                method, target, headers=headers, retries=False, redirect=False, preload_content=False,
                timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise map_transport_error(exc, self.cfg.base_url, timeout, f"{method} {route_name(path)}") from None


def _check_pem_files(cfg: QrsConfig) -> None:
    """Each certificate file fit to load, else ConfigError naming its key (ops/pem.py)."""
    check_pem("qrs.cert", Path(cfg.cert), "certificate")
    check_pem("qrs.key", Path(cfg.key), "private key")
    if cfg.verify and cfg.ca is not None:
        check_pem("qrs.ca", Path(cfg.ca), "certificate")


#: A stand-in QRS for unit tests: (method, path, query parameters, JSON body or None) -> Answer.
Handler = Callable[[str, str, dict[str, str], Any], Answer]


class MockTransport:
    """Answers every request with `handler`; records each (method, path, params) in `calls`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def send(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        path, _, query = target.partition("?")
        params = dict(parse_qsl(query))
        self.calls.append((method, path, params))
        return self.handler(method, path, params, json.loads(body) if body else None)

    def close(self) -> None:
        pass


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


#: Server alerts that mean "your client certificate is not accepted" (OpenSSL reason names).
_CLIENT_CERT_ALERTS = (
    "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
)


#: The peer is not a TLS server of a version we speak (plain HTTP on the port, an old protocol).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION")


def map_transport_error(exc: BaseException, base_url: str, timeout: float, what: str) -> QrsError:
    """The one table from urllib3/ssl/socket errors to the error tree (errors.py)."""
    causes = causes_of(exc)
    verify = next((c for c in causes if isinstance(c, ssl.SSLCertVerificationError)), None)
    if verify is not None:
        return QrsTlsRejected(
            f"the certificate of QRS at {base_url} is not trusted ({verify.verify_message or _short(verify)}):"
            " qrs.ca must be the root.pem exported from this Qlik Sense site and qrs.host the name in the"
            " server certificate (qrs.verify: false turns the check off, not recommended)"
        )
    tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
    if tls is not None and any(a in str(getattr(tls, "reason", "") or tls) for a in _CLIENT_CERT_ALERTS):
        return QrsTlsRejected(
            f"QRS at {base_url} refused our client certificate ({getattr(tls, 'reason', None) or _short(tls)}):"
            " qrs.cert and qrs.key must be the client.pem and client_key.pem exported from this Qlik Sense site"
        )
    if tls is not None and any(r in str(getattr(tls, "reason", "") or tls) for r in _NOT_TLS):
        return QrsTlsRejected(
            f"QRS at {base_url} does not speak TLS as expected ({getattr(tls, 'reason', None) or _short(tls)}):"
            " qrs.port must be the Repository Service's HTTPS port (4242) and qrs.host its server"
        )
    if tls is not None and (isinstance(tls, ssl.SSLEOFError) or "EOF" in str(tls)):
        # QRS closing the TLS connection straight after the handshake is how a server that
        # does not accept our client certificate says so under TLS 1.3 (no alert reaches us).
        return QrsTlsRejected(
            f"QRS at {base_url} closed the TLS connection without answering; usually it does not accept our"
            " client certificate: qrs.cert and qrs.key must be the client.pem and client_key.pem exported"
            " from this Qlik Sense site",
            ambiguous=True,
        )
    oserr = next((c for c in causes if isinstance(c, OSError) and c.errno is not None), None)
    if oserr is not None and oserr.errno in (errno.EMFILE, errno.ENFILE):
        return QrsUnreachable(
            f"cannot open a connection to QRS: too many open files ({oserr.strerror}); raise LimitNOFILE",
            never_sent=True,
        )
    if isinstance(exc, urllib3.exceptions.NameResolutionError) or any(isinstance(c, socket.gaierror) for c in causes):
        return QrsUnreachable(f"cannot resolve the QRS host name in {base_url} (qrs.host)", never_sent=True)
    if oserr is not None and oserr.errno == errno.ECONNREFUSED:
        return QrsUnreachable(
            f"cannot reach QRS at {base_url}: Connection refused (is the Qlik Sense Repository Service"
            " running, and is qrs.port right?)",
            never_sent=True,
        )
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return QrsUnreachable(f"cannot connect to QRS at {base_url}: {_short(oserr or exc)}", never_sent=True)
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return QrsUnreachable(f"cannot connect to QRS at {base_url} within {min(timeout, 10.0):g} s", never_sent=True)
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return QrsUnreachable(f"QRS did not answer within {timeout:g} s ({what})")
    if tls is not None:
        return QrsUnreachable(f"TLS connection to QRS at {base_url} failed: {_short(tls)}")
    return QrsUnreachable(f"QRS connection failed at {base_url}: {_short(exc)}")


