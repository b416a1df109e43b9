"""A QRS stand-in served over mutual TLS: the endpoints a reload-task client uses.

Behaviour follows the QRS research notes (qrs-api.md): every request needs a client certificate
signed by the simulator's CA, a matching 16-character Xrfkey in query and header (403
``XSRF prevention check failed. Possible XSRF discovered.`` otherwise) and a parseable
``X-Qlik-User`` (403 ``Unknown users not allowed for repository calls, missing or malformed
http header: X-Qlik-User``). Paths and query parameter names are case-insensitive; ``+`` in the
query decodes as a space. JSON answers carry ``application/json; charset=utf-8``, errors are
plain text (often empty, as QRS's are).

Knobs for tests, all changeable while the simulator runs:

* ``latency_ms``: every answer is delayed by this much (slept in the connection's thread).
* ``fault``: ``None``; ``"error500"``: answer 500 ``Internal Server Error``; ``"outage"``: read
  the request, do nothing with it and close the connection without an answer. A client then
  sees a connection error with no response, which is what a QRS (or its host) going down
  looks like mid-conversation; refused connections are what :meth:`QrsSimulator.stop` gives.
  ``"error403"``: answer 403 ``Forbidden`` (a proxy or a revoked user); ``"notjson"``: answer
  200 with an HTML page (a login page of a proxy in front of QRS); ``"badid"``: the reload
  tasks listed carry an ``id`` that is not a GUID; ``"huge"``: a 200 answer of
  ``huge_bytes`` bytes (a runaway answer).
* ``answer_delay_s`` / ``answer_delay_paths``: the request is acted on (a start starts its
  execution) and logged, then its answer waits this long; only for paths matching the regular
  expression when one is set (e.g. ``r"/start"``). A client killed meanwhile has started a
  reload without ever learning it (the crash window between a start and its answer).
* ``clock_skew``: seconds added to the simulator's clock (its timestamps and ``Date`` header),
  to test a daemon whose clock differs from QRS's.
* ``fault_paths``: a regular expression (``re.search`` on the decoded path, then on the path
  plus ``?`` plus the decoded query) limiting the fault to matching requests, e.g.
  ``r"/start"`` to break only starts, or a tag name to break only lookups of that tag.
* ``fail_starts_for``: task ids whose start answers 500 without starting anything.
* ``already_running``: what starting a task that is still running (Triggered, Queued,
  Started or Retry) answers. ``"same"`` (default): 204 / 201 with the running execution's
  session id, and no second execution; ``"409"``: 409 ``Conflict``. Either way the task never
  runs twice in parallel.
* ``max_concurrent``: the scheduler's "Max concurrent reloads"; 0 (default) = unlimited.
  QRS's own default is 4. Executions triggered beyond it are Queued (3) and start in trigger
  order as slots free (:mod:`.scheduler`).
* ``queue_timeout``: seconds an execution may stay Queued before the scheduler cancels it
  (it ends Aborted, 6, and never runs); None or 0 (default) = off. QRS's own default is 30
  minutes (1800).
* Per task (:class:`SimTask`, changeable with ``store.replace_task``): ``run_seconds``,
  ``outcome``, ``fail_first`` (the first k runs end FinishedFail) and ``max_retries`` (QRS's
  ``maxRetries``: a failed run shows Retry, 10, and runs again in the same session, one
  execution result row per attempt).
* ``store.start_delay`` / ``store.retry_delay``: how long an execution stays Triggered, and
  shows Retry between attempts (0.05 s each by default); ``store.clock`` is the clock.
* Stop (``POST /qrs/task/{id}/stop``, ``/qrs/task/stop/many``; qrs-api.md 13.1): 204 whether the
  task runs or not, 404 for an unknown id; a running execution goes AbortInitiated (4) ->
  Aborting (5) -> Aborted (6), ``store.abort_initiated_seconds`` (0.5) and
  ``store.aborting_seconds`` (1.0) apart (see :meth:`Store.stop`).
* Script logs (qrs-api.md 13.3, 13.4, 13.7): ``GET /qrs/reloadtask/{id}/scriptlogfile?
  executionresultid=`` and ``.../scriptlog?filereferenceid=`` answer ``{"value": "<ticket>"}``;
  ``GET /qrs/download/reloadtask/{ticket}/{any name}`` streams that execution's log (see
  :mod:`.scriptlog`; per-task knobs are SimTask fields). ``store.file_references = False``
  leaves ``fileReferenceID`` empty (a server that no longer fills the deprecated field).
  ``log_faults`` maps a route (``"scriptlogfile"``, ``"scriptlog"``, ``"download"``) to a
  fault: ``"404"``, ``"500"``; ``"hang"`` (no answer until the simulator stops, or
  ``log_hang_seconds``, then the connection closes); ``"garbage"`` (200 with bytes that are
  neither JSON nor a log: binary noise, NULs, invalid UTF-8); ``"deepjson"`` (200 with 100,000
  nested ``[``); ``"badticket"`` (a ticket that
  is not a GUID, ``../../about``); ``"bareticket"`` (the ticket as a bare JSON string, as the
  API reference shows it); ``"drip"`` (the download sends ``log_drip_bytes`` bytes every
  ``log_drip_seconds``); ``"first404"`` (the first download of each ticket answers 404,
  like a QRS asked too soon after the run, Butler #1499).

Choices where the research is silent: a malformed id answers 400 with an empty body; an
unknown route or a wrong method answers 404; ``/qrs/task/start/many`` ignores unknown ids and
answers 500 (starting nothing) when any id is in ``fail_starts_for``; start by name picks the
first task with that name (compared case-insensitively).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus

from .certs import CertPaths, ensure_certs
from .filter import CompiledFilter, FilterError, compile_filter
from .scheduler import STATUS_NAMES
from .scriptlog import LogSpec, log_chunks, log_length
from .store import COLLECTIONS, EMPTY_GUID, SimTask, StartRecord, Store

XSRF_TEXT = "XSRF prevention check failed. Possible XSRF discovered."
USER_TEXT = (
    "Unknown users not allowed for repository calls, missing or malformed http header: X-Qlik-User"
)
_XRFKEY = re.compile(r"[0-9a-zA-Z]{16}")
_USER_PART = re.compile(r"\s*(userdirectory|userid)\s*=\s*(\S(?:.*\S)?)\s*", re.IGNORECASE)
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"

ABOUT = {
    "buildVersion": "28.0.6.0",
    "buildDate": "6/14/2021 16:04:18 PM",
    "databaseProvider": "Devart.Data.PostgreSql",
    "nodeType": 1,
    "sharedPersistence": True,
    "requiresBootstrap": False,
    "singleNodeOnly": False,
    "schemaPath": "About",
}
ENUMS = {
    "TaskExecutionStatus": {
        "values": [f"{n}: {name}" for n, name in enumerate(STATUS_NAMES)],
        "usages": ["ExecutionResult.status", "ExecutionResultCondensed.status"],
    },
    "TaskType": {
        "values": ["0: Reload", "1: ExternalProgram", "2: UserSync", "3: Distribute"],
        "usages": ["Task.taskType", "ReloadTask.taskType", "ExternalProgramTask.taskType"],
    },
}


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the simulator saw it.

    ``query`` has decoded values and lower-cased names; ``status`` is 0 when the connection was
    closed without an answer (``fault="outage"``); ``at`` is ``time.time()`` on arrival.
    """

    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float


#: Routes of the script-log knobs (``log_faults`` keys) and the faults each may take.
LOG_ROUTES = ("scriptlogfile", "scriptlog", "download")
LOG_FAULTS = ("404", "500", "hang", "garbage", "deepjson", "badticket", "bareticket", "drip", "first404")
_DOWNLOAD_TYPE = "application/octet-stream"
_MAX_TICKETS = 10_000


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = _TEXT
    #: A streamed body (``length`` bytes from ``stream()``) instead of ``body``.
    stream: Callable[[], Iterator[bytes]] | None = None
    length: int = 0
    #: ``"hang"``: never answer (until the simulator stops); ``"drip"``: stream slowly.
    mode: str = ""

    @classmethod
    def json(cls, status: int, payload: Any) -> _Reply:
        return cls(status, json.dumps(payload, ensure_ascii=False).encode(), _JSON)

    @classmethod
    def raw_json(cls, text: str) -> _Reply:
        return cls(200, text.encode(), _JSON)

    @classmethod
    def text(cls, status: int, text: str) -> _Reply:
        return cls(status, text.encode())


class QrsSimulator:
    """A running (after :meth:`start`) simulated QRS on ``https://host:port/qrs``.

    ``certs_dir`` holds or receives the certificate set (see :mod:`.certs`); ``port=0``
    picks a free port. ``require_client_cert=False`` lets clients in without a certificate
    (QRS itself always requires one on 4242).
    """

    def __init__(
        self,
        tasks: list[SimTask] | None = None,
        *,
        certs_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0,
        require_client_cert: bool = True,
        already_running: str = "same",
        max_concurrent: int = 0,
        queue_timeout: float | None = None,
    ) -> None:
        self.store = Store(tasks or [], max_concurrent=max_concurrent, queue_timeout=queue_timeout)
        self.certs: CertPaths = ensure_certs(Path(certs_dir))
        self.host = host
        self.latency_ms = latency_ms
        self.fault: str | None = None
        self.fault_paths: str | None = None
        self.answer_delay_s: float = 0.0
        self.answer_delay_paths: str | None = None
        self.huge_bytes = 100 * 1024 * 1024
        self._clock_skew = 0.0
        self.fail_starts_for: set[str] = set()
        self.log_faults: dict[str, str] = {}
        self.log_hang_seconds = 3600.0
        self.log_drip_seconds = 0.5
        self.log_drip_bytes = 16
        self._tickets: OrderedDict[str, tuple[LogSpec, int]] = OrderedDict()
        self._tickets_lock = threading.Lock()
        self._already_running = _checked_already_running(already_running)
        self._requested_port = port
        self._log: list[LoggedRequest] = []
        self._log_lock = threading.Lock()
        self._stopping = threading.Event()
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(self.certs.server, self.certs.server_key)
        if require_client_cert:
            self._ssl.verify_mode = ssl.CERT_REQUIRED
            self._ssl.load_verify_locations(self.certs.root)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> QrsSimulator:
        """Bind and serve in a background (daemon) thread."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"qrs-sim:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop open connections and wait for the accept loop to end."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping for latency
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> QrsSimulator:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``https://host:port`` (``localhost`` when listening on all interfaces)."""
        host = "localhost" if self.host in ("", "0.0.0.0") else self.host
        return f"https://{host}:{self.port}"

    # --- observation --------------------------------------------------------------------------

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._log_lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()

    @property
    def starts(self) -> list[StartRecord]:
        """Every execution actually started (see :attr:`Store.starts`)."""
        return self.store.starts

    def _record(self, entry: LoggedRequest) -> None:
        with self._log_lock:
            self._log.append(entry)

    # --- request handling ---------------------------------------------------------------------

    @property
    def clock_skew(self) -> float:
        return self._clock_skew

    @clock_skew.setter
    def clock_skew(self, seconds: float) -> None:
        self._clock_skew = seconds
        self.store.clock = (lambda: time.time() + seconds) if seconds else time.time

    @property
    def already_running(self) -> str:
        """``"same"`` or ``"409"``: the answer to a start of a task that is running."""
        return self._already_running

    @already_running.setter
    def already_running(self, value: str) -> None:
        self._already_running = _checked_already_running(value)

    @property
    def max_concurrent(self) -> int:
        """The scheduler's capacity (:attr:`Store.max_concurrent`); 0 = unlimited."""
        return self.store.max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        self.store.max_concurrent = value

    @property
    def queue_timeout(self) -> float | None:
        """The scheduler's queue timeout in seconds (:attr:`Store.queue_timeout`); None = off."""
        return self.store.queue_timeout

    @queue_timeout.setter
    def queue_timeout(self, value: float | None) -> None:
        self.store.queue_timeout = value

    def _fault_for(self, path: str, query: str = "") -> str | None:
        fault, pattern = self.fault, self.fault_paths
        if fault is None:
            return None
        if pattern is not None and not (re.search(pattern, path) or re.search(pattern, f"{path}?{query}")):
            return None
        return fault

    def _answer(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Any,
        body: bytes | None,
        malformed_query: bool,
    ) -> _Reply:
        """Everything after faults and latency: security checks, then routing."""
        key = query.get("xrfkey")
        header_key = headers.get("X-Qlik-Xrfkey")
        if key is None or key != header_key or not _XRFKEY.fullmatch(key):
            return _Reply.text(403, XSRF_TEXT)
        if not _valid_user(headers.get("X-Qlik-User")):
            return _Reply.text(403, USER_TEXT)
        if malformed_query:
            # An unencoded "&" in a filter leaves a parameter without "=" (qrs-api.md 4.4).
            return _Reply.text(400, "Missing parameter value(s)")
        if body is None:
            return _Reply.text(400, "Bad Request")
        route = path.lower().rstrip("/").split("/")[1:]
        if route[:1] != ["qrs"]:
            return _Reply(404)
        try:
            if method == "GET":
                return self._get(route[1:], query)
            if method == "POST":
                return self._post(route[1:], query, body)
        except FilterError as error:
            return _Reply.text(400, str(error))
        return _Reply(404)

    def _get(self, route: list[str], query: dict[str, str]) -> _Reply:
        if route == ["about"]:
            return _Reply.json(200, ABOUT)
        if len(route) == 3 and route[0] == "reloadtask" and route[2] in ("scriptlogfile", "scriptlog"):
            return self._log_ticket(route[1], route[2], query)
        if len(route) == 4 and route[:2] == ["download", "reloadtask"]:
            return self._download(route[2])
        if route == ["about", "api", "enums"]:
            return _Reply.json(200, ENUMS)
        if not route or route[0] not in COLLECTIONS or len(route) > 2:
            return _Reply(404)
        collection = route[0]
        text = query.get("filter", "").strip()
        flt: CompiledFilter | None = compile_filter(text) if text else None
        tail = route[1] if len(route) == 2 else None
        if tail in (None, "full"):
            return _Reply.raw_json(
                self.store.query(collection, flt, query.get("orderby"), full=tail == "full")
            )
        if tail == "count":
            return _Reply.json(200, {"value": self.store.count(collection, flt)})
        if collection == "task":
            return _Reply(404)  # QRS has no GET /qrs/task/{id} (qrs-api.md 3.4)
        assert tail is not None
        if not _GUID.fullmatch(tail):
            return _Reply(400)
        found = self.store.get(collection, tail)
        return _Reply.raw_json(found) if found is not None else _Reply(404)

    def _post(self, route: list[str], query: dict[str, str], body: bytes) -> _Reply:
        if route[:1] != ["task"]:
            return _Reply(404)
        rest = route[1:]
        if rest == ["start", "many"]:
            return self._start_many(body)
        if rest == ["stop", "many"]:
            return self._stop_many(body)
        if len(rest) == 2 and rest[1] == "stop":
            return self._stop_one(rest[0])
        if rest in (["start"], ["start", "synchronous"]):
            name = query.get("name", "")
            task_id = self.store.task_id_by_name(name)
            if task_id is None:
                return _Reply.text(400, f"Cannot find a task with the following name: {name}")
            return self._start_one(task_id, synchronous=len(rest) == 2)
        if len(rest) >= 2 and rest[1:] in (["start"], ["start", "synchronous"]):
            return self._start_one(rest[0], synchronous=len(rest) == 3)
        return _Reply(404)

    def _start_one(self, task_id: str, *, synchronous: bool) -> _Reply:
        if not _GUID.fullmatch(task_id):
            return _Reply(400)
        if self.store.task(task_id) is None:
            return _Reply(404)
        if task_id.lower() in {t.lower() for t in self.fail_starts_for}:
            return _Reply.text(500, "Internal Server Error")
        outcome = self.store.start(task_id)
        if outcome.execution_id is not None and not outcome.created:
            if self.already_running == "409":
                return _Reply.text(409, "Conflict")
        if synchronous:
            return _Reply.json(201, {"value": outcome.execution_id or EMPTY_GUID})
        return _Reply(204)

    def _start_many(self, body: bytes) -> _Reply:
        try:
            ids = json.loads(body or b"null")
        except ValueError:
            return _Reply(400)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return _Reply(400)
        failing = {t.lower() for t in self.fail_starts_for}
        if any(i.lower() in failing for i in ids):
            return _Reply.text(500, "Internal Server Error")
        for task_id in ids:
            if _GUID.fullmatch(task_id) and self.store.task(task_id) is not None:
                self.store.start(task_id)
        return _Reply(204)


    # --- stop -----------------------------------------------------------------------------------

    @property
    def stop_requests(self) -> list[StartRecord]:
        """Every stop request for a known task, oldest first (:attr:`Store.stop_requests`)."""
        return self.store.stop_requests

    def _stop_one(self, task_id: str) -> _Reply:
        if not _GUID.fullmatch(task_id):
            return _Reply(400)
        if self.store.task(task_id) is None:
            return _Reply(404)
        self.store.stop(task_id)
        return _Reply(204)  # running or not: QRS's answer says nothing either way (13.1)

    def _stop_many(self, body: bytes) -> _Reply:
        try:
            ids = json.loads(body or b"null")
        except ValueError:
            return _Reply(400)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return _Reply(400)
        for task_id in ids:
            if _GUID.fullmatch(task_id) and self.store.task(task_id) is not None:
                self.store.stop(task_id)
        return _Reply(204)

    # --- script logs --------------------------------------------------------------------------

    def _log_fault(self, route: str) -> str | None:
        fault = self.log_faults.get(route)
        if fault is not None and fault not in LOG_FAULTS:
            raise ValueError(f"log_faults[{route!r}] must be one of {', '.join(LOG_FAULTS)}, got {fault!r}")
        return fault

    def _log_ticket(self, task_id: str, route: str, query: dict[str, str]) -> _Reply:
        param = "executionresultid" if route == "scriptlogfile" else "filereferenceid"
        fault = self._log_fault(route)
        early = _fault_reply(fault, ticket_route=True)
        if early is not None:
            return early
        if not _GUID.fullmatch(task_id):
            return _Reply(400)
        if self.store.task(task_id) is None:
            return _Reply(404)
        wanted = query.get(param)
        if wanted is None:
            return _Reply.text(400, "Missing parameter value(s)")
        if not _GUID.fullmatch(wanted):
            return _Reply(400)
        if route == "scriptlogfile":
            spec = self.store.log_of_result(task_id, wanted)
        else:
            spec = self.store.log_of_file_reference(task_id, wanted)
        if spec is None:
            return _Reply(404)
        ticket = self._new_ticket(spec)
        if fault == "badticket":
            return _Reply.json(200, {"value": "../../about"})
        if fault == "bareticket":
            return _Reply.json(200, ticket)
        return _Reply.json(200, {"value": ticket})

    def _new_ticket(self, spec: LogSpec) -> str:
        ticket = str(uuid.uuid4())
        with self._tickets_lock:
            self._tickets[ticket] = (spec, 0)
            while len(self._tickets) > _MAX_TICKETS:
                self._tickets.popitem(last=False)
        return ticket

    def _download(self, ticket: str) -> _Reply:
        fault = self._log_fault("download")
        early = _fault_reply(fault, ticket_route=False)
        if early is not None:
            return early
        with self._tickets_lock:
            found = self._tickets.get(ticket)
            if found is None:
                return _Reply(404)
            spec, downloads = found
            self._tickets[ticket] = (spec, downloads + 1)
        if fault == "first404" and downloads == 0:
            return _Reply(404)
        return _Reply(
            200,
            content_type=_DOWNLOAD_TYPE,
            stream=lambda: log_chunks(spec),
            length=log_length(spec),
            mode="drip" if fault == "drip" else "",
        )


def _fault_reply(fault: str | None, *, ticket_route: bool) -> _Reply | None:
    """The answer a log-route fault gives before any lookup, or None."""
    if fault == "404":
        return _Reply(404)
    if fault == "500":
        return _Reply.text(500, "Internal Server Error")
    if fault == "hang":
        return _Reply(0, mode="hang")
    if fault == "deepjson":
        return _Reply(200, b"[" * 100_000, _JSON)
    if fault == "garbage":
        noise = bytes(range(256)) * 8 + b"\x00\xff\xfe<html>\xc3\x28 not a ticket"
        return _Reply(200, noise, _JSON if ticket_route else _DOWNLOAD_TYPE)
    return None


def _checked_already_running(value: str) -> str:
    if value not in ("same", "409"):
        raise ValueError(f"already_running must be 'same' or '409', got {value!r}")
    return value


def _valid_user(header: str | None) -> bool:
    """``UserDirectory=X; UserId=Y``: both keys (any case), once each, in any order."""
    if not header:
        return False
    seen: set[str] = set()
    for part in header.split(";"):
        if not part.strip():
            continue
        match = _USER_PART.fullmatch(part)
        if match is None or match.group(1).lower() in seen:
            return False
        seen.add(match.group(1).lower())
    return seen == {"userdirectory", "userid"}


def _parse_query(raw: str) -> tuple[dict[str, str], bool]:
    """Decoded parameters with lower-cased names (first wins), and whether any lacked '='."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        params.setdefault(name.lower(), value)
    malformed = any(part and "=" not in part for part in raw.split("&"))
    return params, malformed


class _Server(ThreadingHTTPServer):
    """Plain-TCP accept loop; TLS is negotiated in each connection's own thread.

    Doing the handshake there (not in ``accept``) keeps one slow or broken client from
    stalling everybody else, and lets :meth:`close_connections` cut idle keep-alive sockets.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: QrsSimulator) -> None:
        self.sim = sim
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)  # bounds the handshake and idle keep-alive waits
        # Headers and body leave in separate writes; without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.sim._ssl.wrap_socket(request, server_side=True)
        except OSError:
            return  # bad or missing client certificate, or not TLS at all
        with self._open_lock:
            self._open.add(conn)
        try:
            _Handler(conn, client_address, self)
        except OSError:
            pass  # the peer went away mid-request
        finally:
            with self._open_lock:
                self._open.discard(conn)
            _close(conn)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                # Shut the TCP socket under the TLS layer: the owning thread's read then ends
                # with EOF and that thread closes the connection itself.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections to QRS
    server: _Server

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header in the simulator's clock (``clock_skew``)."""
        return super().date_time_string(self.server.sim.store.clock() if timestamp is None else timestamp)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib's stderr access log; ``request_log`` is the record."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        sim = self.server.sim
        at = time.time()
        raw_path, _, raw_query = self.path.partition("?")
        path = unquote(raw_path)
        query, malformed = _parse_query(raw_query)
        body = self._read_body()
        if sim.latency_ms > 0:
            sim._stopping.wait(sim.latency_ms / 1000)
        # A simulator stopped during the latency wait must not act on the request either.
        fault = "outage" if sim._stopping.is_set() else sim._fault_for(path, unquote_plus(raw_query))
        if fault == "outage":
            sim._record(LoggedRequest(self.command, path, query, 0, at))
            self.close_connection = True
            return
        if fault == "error500":
            reply = _Reply.text(500, "Internal Server Error")
        elif fault == "error403":
            reply = _Reply.text(403, "Forbidden")
        elif fault == "notjson":
            reply = _Reply(200, b"<html><body>Please log in</body></html>", "text/html")
        elif fault == "huge":
            reply = _Reply(200, b"[" + b" " * max(0, sim.huge_bytes - 2) + b"]", "application/json; charset=utf-8")
        else:
            reply = sim._answer(self.command, path, query, self.headers, body, malformed)
            if fault == "badid" and reply.status == 200 and "reloadtask" in path.lower():
                reply = _Reply(reply.status, _bad_ids(reply.body), reply.content_type)
        # Logged before the answer is written, so a client that has its answer finds it logged.
        sim._record(LoggedRequest(self.command, path, query, reply.status, at))
        delay, pattern = sim.answer_delay_s, sim.answer_delay_paths
        if delay > 0 and (pattern is None or re.search(pattern, path)):
            sim._stopping.wait(delay)
        if reply.mode == "hang":
            sim._stopping.wait(sim.log_hang_seconds)
            self.close_connection = True
            return
        self.send_response(reply.status)
        if reply.status != 204:
            self.send_header("Content-Type", reply.content_type)
            length = reply.length if reply.stream is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
        if body is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if reply.stream is None:
            self.wfile.write(reply.body)
        elif reply.mode == "drip":
            self._drip(reply.stream())
        else:
            for chunk in reply.stream():
                self.wfile.write(chunk)

    def _drip(self, chunks: Iterator[bytes]) -> None:
        """Write ``log_drip_bytes`` every ``log_drip_seconds`` (a peer that trickles)."""
        sim = self.server.sim
        for chunk in chunks:
            for i in range(0, len(chunk), max(1, sim.log_drip_bytes)):
                if sim._stopping.wait(sim.log_drip_seconds):
                    self.close_connection = True
                    return
                self.wfile.write(chunk[i : i + max(1, sim.log_drip_bytes)])
                self.wfile.flush()

    def _read_body(self) -> bytes | None:
        """The request body; None when its length is unknown (chunked or a bad header).

        Such a body cannot be skipped reliably, so it is answered 400 and the connection closed.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        return self.rfile.read(length) if length > 0 else b""


def _bad_ids(body: bytes) -> bytes:
    """Every task `id` of a reloadtask answer replaced by one that is not a GUID."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    for i, obj in enumerate(data if isinstance(data, list) else [data]):
        if isinstance(obj, dict) and "id" in obj:
            obj["id"] = f"not-a-guid-{i}"
    return json.dumps(data).encode()
