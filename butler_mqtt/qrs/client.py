"""The QRS client: one reused HTTPS session with the Qlik client certificate.

* Server verification against `root.pem` is on unless `qrs.verify: false` is written.
* Every request carries a fresh random 16-character Xrfkey in the header and the query.
* GETs are retried with backoff on connection errors and 5xx; a start is retried only when
  the connection was never made (refused or connect timeout), because a blind retry of a
  start can run a reload twice.
* Transport errors map to the tree of errors.py in one table (`_map_transport_error`):
  unreachable (transient; `never_sent` when the connection never opened), TLS rejected
  (permanent: certificate not trusted, client certificate refused), answered with an error.
* Answers are read with a size cap (`qrs.max_response_bytes`).
* QRS's clock is learned from its `Date` header (`clock_offset`): "did my start arrive?"
  questions are asked in QRS's time, so a skewed daemon clock neither doubles nor misreports.
"""

from __future__ import annotations

import errno
import json
import secrets
import socket
import ssl
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import structlog
import urllib3

from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import (
    ConfigError,
    QrsError,
    QrsNotFound,
    QrsRefused,
    QrsTlsRejected,
    QrsUnreachable,
    is_transient,
)
from butler_mqtt.model import EMPTY_GUID, is_guid
from butler_mqtt.ops import retry
from butler_mqtt.ops.ratelimit import RateLimiter
from butler_mqtt.qrs.filters import execution_filters

log = structlog.get_logger("butler_mqtt.qrs")
_limiter = RateLimiter(60.0)

_XRF_ALPHABET = string.ascii_letters + string.digits

#: Called after every QRS call with (method, route, status or None, seconds).
CallObserver = Callable[[str, str, int | None, float], None]


_RANDOM = secrets.SystemRandom()

#: The `Date` header has 1 s resolution; "created since" questions are widened by this much.
CLOCK_TOLERANCE_S = 2.0


def new_xrfkey() -> str:
    """16 characters of [0-9a-zA-Z] from the OS's CSPRNG."""
    return "".join(_RANDOM.choices(_XRF_ALPHABET, k=16))


def _route(path: str) -> str:
    """A low-cardinality route name for metrics: GUIDs replaced by `{id}`."""
    return "/".join("{id}" if is_guid(p) else p for p in path.split("/"))


@dataclass
class Answer:
    """One QRS answer: status and body."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class QrsClient:
    """Thread-safe: one instance is shared by all workers.

    Built on a urllib3 connection pool rather than `requests`: per call it costs about a
    third of the CPU, which on a 2-core host is most of a start's own latency.
    """

    def __init__(self, cfg: QrsConfig, observer: CallObserver | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.base_url
        self._observer = observer
        self._last_ok = 0.0
        self._clock_lock = threading.Lock()
        self._offset = 0.0
        self._offset_known = False
        if cfg.verify:
            ctx = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca is not None else None)
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("qrs.cert", f"cannot load the client certificate and key: {exc}") from None
        self._pool = urllib3.HTTPSConnectionPool(
            cfg.host,
            cfg.port,
            maxsize=max(cfg.start_concurrency * 2, 10),
            block=False,
            ssl_context=ctx,
            cert_reqs="CERT_REQUIRED" if cfg.verify else "CERT_NONE",
            assert_hostname=cfg.host if cfg.verify else False,
            retries=False,
            timeout=urllib3.Timeout(connect=min(cfg.timeout, 10.0), read=cfg.timeout),
        )
        self._headers = {
            "X-Qlik-User": f"UserDirectory={cfg.user_directory}; UserId={cfg.user_id}",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": "butler-mqtt",
        }

    def close(self) -> None:
        self._pool.close()

    @property
    def last_success(self) -> float:
        """time.monotonic() of the last call QRS answered (any status below 500)."""
        return self._last_ok

    # ----------------------------------------------------------------- transport

    def _call(self, method: str, path: str, params: dict[str, str] | None = None, json_body: Any = None) -> Answer:
        key = new_xrfkey()
        query = urlencode({**(params or {}), "xrfkey": key})  # quote_plus: `&#+%'` are encoded
        headers = {**self._headers, "X-Qlik-Xrfkey": key}
        body = json.dumps(json_body).encode() if json_body is not None else None
        t0 = time.perf_counter()
        status: int | None = None
        try:
            resp = self._pool.urlopen(
                method, f"{path}?{query}", body=body, headers=headers, retries=False, redirect=False,
                preload_content=False,
            )
            status = resp.status
            if status < 500:
                self._last_ok = time.monotonic()
            self._learn_clock(resp.headers.get("Date"), t0)
            return Answer(status, self._read_capped(resp, method, path))
        except QrsError:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _map_transport_error(exc, self.base_url, self.cfg.timeout, f"{method} {_route(path)}") from None
        finally:
            if self._observer is not None:
                self._observer(method, _route(path), status, time.perf_counter() - t0)

    def _read_capped(self, resp: Any, method: str, path: str) -> bytes:
        """The body, at most `qrs.max_response_bytes`: a runaway answer must not eat the memory."""
        cap = self.cfg.max_response_bytes
        try:
            data: bytes = resp.read(cap + 1)
        except BaseException:
            resp.close()
            raise
        if len(data) > cap:
            resp.close()  # neither read nor reuse the rest of this connection
            raise QrsRefused(
                f"{method} {_route(path)}: the QRS answer is larger than qrs.max_response_bytes ({cap} bytes);"
                " narrow the selection or raise qrs.max_response_bytes",
                resp.status,
            )
        resp.release_conn()
        return data

    def _learn_clock(self, date_header: str | None, t0: float) -> None:
        if not date_header:
            return
        try:
            qrs_now = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # The Date header has 1 s resolution and was stamped somewhere during the call.
        local = time.time() - (time.perf_counter() - t0) / 2
        with self._clock_lock:
            self._offset = qrs_now + 0.5 - local
            self._offset_known = True

    @property
    def clock_offset(self) -> float | None:
        """QRS's clock minus ours in seconds (from its `Date` header), None before any answer."""
        with self._clock_lock:
            return self._offset if self._offset_known else None

    def _check(self, resp: Answer, what: str) -> Answer:
        if resp.status_code == 404:
            raise QrsNotFound(f"{what}: not found", 404, resp.text[:200])
        if resp.status_code in (401, 403):
            raise QrsRefused(
                f"{what}: QRS answered {resp.status_code} {resp.text[:200]}".strip()
                + f" (QRS does not let {self.cfg.user_directory}\\{self.cfg.user_id} do this: check qrs.user_directory,"
                " qrs.user_id and that the client certificate is the one exported from this site)",
                resp.status_code,
                resp.text[:500],
            )
        if resp.status_code >= 400:
            raise QrsRefused(f"{what}: QRS answered {resp.status_code} {resp.text[:200]}".strip(), resp.status_code, resp.text[:500])
        return resp

    def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET with retries and backoff on connection errors and 5xx."""
        attempt = 0
        while True:
            try:
                resp = self._call("GET", path, params)
                if resp.status_code >= 500 and attempt < self.cfg.retries:
                    raise QrsRefused(f"GET {path}: {resp.status_code}", resp.status_code)
                self._check(resp, f"GET {_route(path)}")
                try:
                    return resp.json()
                except ValueError:
                    raise QrsRefused(f"GET {_route(path)}: answer is not JSON", resp.status_code, resp.text[:200]) from None
            except (QrsUnreachable, QrsRefused, QrsTlsRejected) as exc:
                # An ambiguous TLS close is tried again a few times before it counts as a refusal.
                again = is_transient(exc) or (isinstance(exc, QrsTlsRejected) and exc.ambiguous)
                if not again or attempt >= self.cfg.retries:
                    raise
                time.sleep(retry.QRS_CALL.delay(attempt))
                attempt += 1

    # ----------------------------------------------------------------- QRS operations

    def about(self) -> dict[str, Any]:
        data = self.get_json("/qrs/about")
        if not isinstance(data, dict):
            raise QrsRefused("GET /qrs/about: unexpected answer")
        return data

    def reload_tasks(self, filter_expr: str) -> list[dict[str, Any]]:
        """`GET /qrs/reloadtask/full?filter=...` -> full ReloadTask objects."""
        data = self.get_json("/qrs/reloadtask/full", {"filter": filter_expr})
        if not isinstance(data, list):
            raise QrsRefused("GET /qrs/reloadtask/full: answer is not a list")
        tasks = []
        for d in data:
            if isinstance(d, dict) and isinstance(d.get("id"), str) and is_guid(d["id"]):
                tasks.append(d)
                continue
            # Not a task QRS could start: never guess, never fail the whole request for it.
            ok, repeated = _limiter.allow("qrs_task_without_guid")
            if ok:
                log.warning(
                    "qrs_task_skipped",
                    reason="the reload task object from QRS has no GUID id; it is not started",
                    id=repr(d.get("id") if isinstance(d, dict) else d)[:80],
                    repeated=repeated,
                )
        return tasks

    def start_synchronous(self, task_id: str) -> str:
        """Start one task; returns the execution session id (EMPTY_GUID: not started)."""
        if not is_guid(task_id):
            raise ValueError(task_id)
        path = f"/qrs/task/{task_id}/start/synchronous"
        for attempt in range(self.cfg.retries + 1):
            try:
                resp = self._call("POST", path)
                break
            except QrsUnreachable as exc:
                # Safe to try again only if the connection itself never opened.
                if not exc.never_sent or attempt >= self.cfg.retries:
                    raise
                time.sleep(retry.QRS_CALL.delay(attempt))
        self._check(resp, f"start task {task_id}")
        try:
            value = resp.json()
        except ValueError:
            value = resp.text.strip().strip('"')
        if isinstance(value, dict):
            value = value.get("value")
        if not isinstance(value, str) or not is_guid(value):
            raise QrsRefused(f"start task {task_id}: unexpected answer {resp.text[:100]!r}", resp.status_code)
        return value.lower()

    def execution_results(self, execution_ids: Iterable[str]) -> list[dict[str, Any]]:
        """ExecutionResult full objects for these execution (session) ids, chunked."""
        out: list[dict[str, Any]] = []
        for expr in execution_filters(execution_ids, self.cfg.max_filter_length):
            data = self.get_json("/qrs/executionresult/full", {"filter": expr})
            if isinstance(data, list):
                out.extend(d for d in data if isinstance(d, dict))
        return out

    def execution_since(self, task_id: str, since: float) -> str | None:
        """The execution id of a run of `task_id` created at or after `since` (epoch seconds).

        Used after a crash between sending a start and recording its answer: QRS is asked
        whether the start arrived, instead of guessing (and risking a double run). `since` is
        our clock; it is moved to QRS's clock (learned from its `Date` header) and widened by
        CLOCK_TOLERANCE_S, so a skewed daemon clock neither misses nor invents a start.
        """
        if not is_guid(task_id):
            raise ValueError(task_id)
        qrs_since = since + (self.clock_offset or 0.0) - CLOCK_TOLERANCE_S
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(qrs_since)) + ".000Z"
        rows = self.get_json(
            "/qrs/executionresult/full", {"filter": f"taskID eq {task_id} and createdDate ge '{stamp}'"}
        )
        found = [r for r in rows if isinstance(r, dict) and is_guid(str(r.get("executionID", "")))] if isinstance(rows, list) else []
        if not found:
            return None
        newest = max(found, key=lambda r: str(r.get("createdDate", "")))
        return str(newest["executionID"]).lower()

    def execution_session_exists(self, execution_id: str) -> bool:
        try:
            self.get_json(f"/qrs/executionsession/{execution_id}")
            return True
        except QrsNotFound:
            return False


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (urllib3 keeps the socket/ssl error in args or cause)."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(out) < 10:
        e = todo.pop(0)
        if e in out:
            continue
        out.append(e)
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return out


#: Server alerts that mean "your client certificate is not accepted" (OpenSSL reason names).
_CLIENT_CERT_ALERTS = (
    "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
)


#: The peer is not a TLS server of a version we speak (plain HTTP on the port, an old protocol).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION")


def _map_transport_error(exc: BaseException, base_url: str, timeout: float, what: str) -> QrsError:
    """The one table from urllib3/ssl/socket errors to the error tree (errors.py)."""
    causes = _causes(exc)
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
            f"cannot reach QRS at {base_url}: connection refused (is the Qlik Sense Repository Service"
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


__all__ = ["EMPTY_GUID", "QrsClient", "new_xrfkey"]
