"""The QRS client: one reused HTTPS session with the Qlik client certificate.

* Server verification against `root.pem` is on unless `qrs.verify: false` is written.
* Every request carries a fresh random 16-character Xrfkey in the header and the query.
* GETs are retried with backoff on connection errors and 5xx; a start is retried only when
  the connection was never made (refused or connect timeout), because a blind retry of a
  start can run a reload twice.
* Errors map to `QrsUnreachable` / `QrsRefused` / `QrsNotFound` (errors.py).
"""

from __future__ import annotations

import json
import secrets
import ssl
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3

from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import ConfigError, QrsError, QrsNotFound, QrsRefused, QrsUnreachable
from butler_mqtt.model import EMPTY_GUID, is_guid
from butler_mqtt.qrs.filters import execution_filters

_XRF_ALPHABET = string.ascii_letters + string.digits

#: Called after every QRS call with (method, route, status or None, seconds).
CallObserver = Callable[[str, str, int | None, float], None]


_RANDOM = secrets.SystemRandom()


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
            resp = self._pool.urlopen(method, f"{path}?{query}", body=body, headers=headers, retries=False, redirect=False)
            status = resp.status
            if status < 500:
                self._last_ok = time.monotonic()
            return Answer(status, resp.data)
        except urllib3.exceptions.SSLError as exc:
            raise QrsUnreachable(f"TLS handshake with QRS failed: {_short(exc)}") from None
        # NewConnectionError (refused, no route, DNS) subclasses ConnectTimeoutError in urllib3 2:
        # it must be caught first, or a refused port reads "cannot connect within 30 s".
        except urllib3.exceptions.NameResolutionError:
            raise QrsUnreachable(f"cannot reach QRS at {self.base_url}: Failed to establish a connection: "
                                 f"the host name {self.cfg.host!r} does not resolve (qrs.host)") from None
        except urllib3.exceptions.NewConnectionError as exc:
            raise QrsUnreachable(f"cannot reach QRS at {self.base_url}: {_connect_reason(exc)}") from None
        except urllib3.exceptions.ConnectTimeoutError:
            raise QrsUnreachable(
                f"cannot connect to QRS at {self.base_url} within {min(self.cfg.timeout, 10.0):g} s "
                "(a firewall dropping the connection, or a wrong qrs.host?)"
            ) from None
        except urllib3.exceptions.TimeoutError:
            raise QrsUnreachable(f"QRS did not answer within {self.cfg.timeout} s ({method} {_route(path)})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise QrsUnreachable(f"QRS connection failed at {self.base_url}: {_short(exc)}") from None
        finally:
            if self._observer is not None:
                self._observer(method, _route(path), status, time.perf_counter() - t0)

    def _check(self, resp: Answer, what: str) -> Answer:
        if resp.status_code == 404:
            raise QrsNotFound(f"{what}: not found", 404, resp.text[:200])
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
            except (QrsUnreachable, QrsRefused) as exc:
                retryable = isinstance(exc, QrsUnreachable) or (exc.status or 0) >= 500
                if not retryable or attempt >= self.cfg.retries:
                    raise
                attempt += 1
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))

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
        return [d for d in data if isinstance(d, dict) and "id" in d]

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
                if not _never_sent(exc) or attempt >= self.cfg.retries:
                    raise
                time.sleep(min(0.2 * 2**attempt, 2.0))
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
        whether the start arrived, instead of guessing (and risking a double run).
        """
        if not is_guid(task_id):
            raise ValueError(task_id)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since - 1)) + ".000Z"
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


def _connect_reason(exc: urllib3.exceptions.NewConnectionError) -> str:
    """"Connection refused; is QRS running ...": the OS's reason, in words an admin can act on."""
    text = str(exc)
    if "refused" in text.lower():
        return "Connection refused (Failed to establish a connection): is QRS running, and are qrs.host and qrs.port right?"
    reason = text.split(": ", 1)[-1]
    return f"Failed to establish a connection: {reason[:200]}"


def _never_sent(exc: QrsError) -> bool:
    text = str(exc)
    return "Connection refused" in text or "NewConnectionError" in text or "Failed to establish" in text


__all__ = ["EMPTY_GUID", "QrsClient", "new_xrfkey"]
