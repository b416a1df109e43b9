"""The QRS client: one reused HTTPS session with the Qlik client certificate.

* Server verification against `root.pem` is on unless `qrs.verify: false` is written.
* Every request carries a fresh random 16-character Xrfkey in the header and the query.
* GETs are retried with backoff on connection errors and 5xx; a start is retried only when
  the connection was never made (refused or connect timeout), because a blind retry of a
  start can run a reload twice.
* The transport (qrs/transport.py) carries each request and names its failures in one table:
  unreachable (transient; `never_sent` when the connection never opened), TLS rejected
  (permanent: certificate not trusted, client certificate refused), answered with an error;
  answers are read with a size cap (`qrs.max_response_bytes`). Tests may hand in a
  `MockTransport`.
* QRS's clock is learned from its `Date` header (`clock_offset`): "did my start arrive?"
  questions are asked in QRS's time, so a skewed daemon clock neither doubles nor misreports.
"""

from __future__ import annotations

import json
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import structlog

from butler_mqtt.backends.qrs.filters import execution_filters
from butler_mqtt.backends.qrs.transport import Answer, PoolTransport, Transport, route_name
from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import (
    ButlerError,
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


class QrsClient:
    """Thread-safe: one instance is shared by all workers.

    Built on a urllib3 connection pool rather than `requests`: per call it costs about a
    third of the CPU, which on a 2-core host is most of a start's own latency.
    """

    def __init__(self, cfg: QrsConfig, observer: CallObserver | None = None, transport: Transport | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.base_url
        self._observer = observer
        self._last_ok = 0.0
        self._clock_lock = threading.Lock()
        self._offset = 0.0
        self._offset_known = False
        self._last_date: str | None = None
        self._transport: Transport = transport if transport is not None else PoolTransport(cfg)
        self._headers = {
            "X-Qlik-User": f"UserDirectory={cfg.user_directory}; UserId={cfg.user_id}",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": "butler-mqtt",
        }

    def close(self) -> None:
        self._transport.close()

    def reload_tls(self) -> None:
        """Re-read the certificate files (SIGHUP), when the transport has any (PoolTransport)."""
        reload: Callable[[], None] | None = getattr(self._transport, "reload_tls", None)
        if reload is not None:
            reload()

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
            answer = self._transport.send(method, f"{path}?{query}", body, headers)
            status = answer.status_code
            if status < 500:
                self._last_ok = time.monotonic()
            self._learn_clock(answer.date, t0)
            return answer
        finally:
            if self._observer is not None:
                self._observer(method, route_name(path), status, time.perf_counter() - t0)

    def _learn_clock(self, date_header: str | None, t0: float) -> None:
        # One parse per new header value: under load many answers share the same second.
        if not date_header or date_header == self._last_date:
            return
        self._last_date = date_header
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
                self._check(resp, f"GET {route_name(path)}")
                try:
                    return resp.json()
                except ValueError:
                    raise QrsRefused(f"GET {route_name(path)}: answer is not JSON", resp.status_code, resp.text[:200]) from None
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

    def stop_task(self, task_id: str) -> None:
        """`POST /qrs/task/{id}/stop` (qrs-api.md 13.1): QRS answers 204 whether the task runs or
        not, so the answer says only "asked" (qrs/stopping.py tells running from idle);
        QrsNotFound for an unknown task. A stop is idempotent: retried on transient failures."""
        if not is_guid(task_id):
            raise ValueError(task_id)
        self._post_retried(f"/qrs/task/{task_id}/stop", None, f"stop task {task_id}")

    def stop_tasks(self, task_ids: list[str]) -> None:
        """`POST /qrs/task/stop/many` with the task ids (13.1); 204, unknown ids are ignored."""
        if not all(is_guid(t) for t in task_ids):
            raise ValueError("stop_tasks: every id must be a GUID")
        self._post_retried("/qrs/task/stop/many", [t.lower() for t in task_ids], f"stop {len(task_ids)} tasks")

    def _post_retried(self, path: str, body: Any, what: str) -> None:
        for attempt in range(self.cfg.retries + 1):
            try:
                self._check(self._call("POST", path, json_body=body), what)
                return
            except (QrsUnreachable, QrsRefused) as exc:
                if not is_transient(exc) or attempt >= self.cfg.retries:
                    raise
                time.sleep(retry.QRS_CALL.delay(attempt))

    def execution_results(self, execution_ids: Iterable[str]) -> list[dict[str, Any]]:
        """ExecutionResult full objects for these execution (session) ids, chunked."""
        out: list[dict[str, Any]] = []
        for expr in execution_filters(execution_ids, self.cfg.max_filter_length):
            data = self.get_json("/qrs/executionresult/full", {"filter": expr})
            if isinstance(data, list):
                out.extend(d for d in data if isinstance(d, dict))
        return out

    def executions_of_results(self, result_ids: Iterable[str]) -> dict[str, str]:
        """ExecutionResult id -> its execution (session) id. `operational.lastExecutionResult` of a
        task names only the result; following the execution (run policies: attach, queue) needs
        the session id. One call for every result id asked (chunked only when long)."""
        out: dict[str, str] = {}
        for expr in execution_filters(result_ids, self.cfg.max_filter_length, field="id"):
            data = self.get_json("/qrs/executionresult/full", {"filter": expr})
            for d in data if isinstance(data, list) else []:
                if isinstance(d, dict) and is_guid(str(d.get("id", ""))) and is_guid(str(d.get("executionID", ""))):
                    out[str(d["id"]).lower()] = str(d["executionID"]).lower()
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


__all__ = ["EMPTY_GUID", "QrsClient", "new_xrfkey"]


def probe_at_start(cfg: QrsConfig) -> threading.Thread:
    """Warn at start when QRS cannot be reached (in the background: startup does not wait).

    The daemon still starts: requests wait unacked until QRS answers. The warning says so,
    so an operator reading the first lines of the log sees the problem at once.
    """

    def probe() -> None:
        try:
            client = QrsClient(cfg.model_copy(update={"retries": 0}))
        except ButlerError:
            return  # a certificate problem: startup reports it itself
        try:
            about = client.about()
            log.info("qrs_reachable", qrs=cfg.base_url, build=about.get("buildVersion"))
        except QrsError as exc:
            log.warning(
                "qrs_unreachable_at_start",
                qrs=cfg.base_url,
                error=str(exc),
                detail="requests wait (unacked) until QRS answers; check qrs.host/qrs.port and the "
                "certificates, or run `butler-mqtt check`",
            )
        finally:
            client.close()

    t = threading.Thread(target=probe, name="qrs-probe", daemon=True)
    t.start()
    return t
