"""A Qlik Cloud tenant stand-in over HTTPS: the endpoints a reload trigger uses.

Facts from qlik-cloud-api.md; answers follow Qlik's published OpenAPI schemas (the tests
validate them). Served endpoints:

* ``POST /oauth/token`` (JSON or form): client credentials -> ``{"access_token", "token_type":
  "bearer", "expires_in", "expires_at", "scope"}``; wrong credentials 401.
* ``GET /api/v1/items`` (``resourceType``, ``resourceId``/``resourceIds``, ``spaceId``,
  ``collectionId``, ``name``, ``limit``, ``next``): app items; ``id`` is the ITEM id,
  ``resourceId`` the app id.
* ``GET /api/v1/collections`` (``type=public`` = tags, ``name`` exact and case-sensitive).
* ``GET /api/v1/spaces`` (``name``: case-insensitive substring, as Qlik's "open search"),
  ``GET /api/v1/spaces/{id}``.
* ``GET /api/v1/apps/{appId}`` (NxApp), ``GET /api/v1/apps/{appId}/reloads/logs/{reloadId}``
  (text/plain, once the reload has ended).
* ``POST /api/v1/reloads``, ``GET /api/v1/reloads`` (``appId``, ``filter`` on ``status eq``,
  ``log``), ``GET /api/v1/reloads/{id}``, ``POST /api/v1/reloads/{id}/actions/cancel``
  (QUEUED: 204 and CANCELED at once; RELOADING: 202 ``{"status": "CANCELING"}``; ended: 409).

Every ``/api`` call needs ``Authorization: Bearer <token or API key>`` (401 otherwise). Lists
page with an opaque ``next`` cursor and ``links.next.href`` (a full URL); ``limit`` 1..100,
default 10, further capped by the ``max_page_size`` knob.

Knobs (attributes, changeable while running):

* ``answer_delay_s`` / ``answer_delay_paths``: the request is acted on (a start creates its
  reload), then its answer waits that long; ``answer_delay_paths`` is a regular expression
  searched in ``"METHOD /path"`` (e.g. ``"POST /api/v1/reloads$"``), None = every request.
* ``latency_ms``; ``fault`` (``"error500"``, ``"error503"``, ``"outage"``: close without an
  answer, ``"notjson"``: a 200 HTML page, ``"huge"``: a 200 body of ``huge_bytes``) limited to
  paths matching the regular expression ``fault_paths``; ``"drip"``: a 200 whose body comes
  one byte every ``drip_interval`` seconds (a peer that only a total deadline cuts);
  ``"drip_headers"``: the status line, then a header line every ``drip_interval`` seconds.
* ``token_fault``: ``"garbage"`` (200 that is not JSON), ``"huge"`` (200 of ``huge_bytes``),
  ``"hang"`` (read the request, never answer), ``"refuse"`` (401). ``token_lifetime`` seconds
  (default 21600); :meth:`CloudSimulator.revoke_tokens`; ``api_key_revoked``.
* ``start_limit_per_minute`` (default 50) over a sliding ``rate_window`` (seconds, default
  60, Qlik's is 300): ``POST /api/v1/reloads`` beyond ``limit * window / 60`` accepted starts
  in the window answers 429 ``HTTP-429`` with ``Retry-After`` (whole seconds until a slot
  frees) unless ``retry_after`` is False. ``storm_429 = N``: the next N ``/api`` calls answer
  429, with ``Retry-After: storm_retry_after`` when that is not None.
* A ``POST /api/v1/reloads`` for an app that has a QUEUED reload answers 429 without
  Retry-After (Qlik: "a pending reload request already exists for this app"; the body's code
  ``RELOADS-429-PENDING`` is this simulator's invention, Qlik's is undocumented).
* ``world.max_concurrent``: the tenant's reload concurrency (default 4; 0 = unlimited), reloads
  beyond it stay QUEUED; ``world.generated_apps``: N lazily generated apps; per app
  ``run_seconds``, ``outcome`` (SUCCEEDED/FAILED/EXCEEDED_LIMIT), ``error_message``,
  ``script_log``; ``fail_starts_for`` (500), ``forbidden_apps`` (403 RELOADS-003).
* ``paging_loop``: ``links.next`` of every page after the first points back to the first page.
  ``links_base``: the origin written into links (default the simulator's own), to test a
  ``links.next`` that leads to another host.
* ``request_log``: every request (method, path, decoded query, status, time, auth kind).
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from ..certs import CertPaths, ensure_certs
from . import answers
from .world import ACTIVE, END, GENERATED_TAG, SimApp, StartRecord, World, demo_world

_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=UTF-8"
_STATUS_TERM = re.compile(r'\s*status\s+eq\s+"([A-Z_]+)"\s*', re.IGNORECASE)


@dataclass(frozen=True)
class LoggedRequest:
    """One request: ``query`` decoded (names as sent); ``status`` 0 = closed without an
    answer; ``auth`` is ``"token"``, ``"api_key"``, ``"bad"`` or None."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float
    auth: str | None = None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
        return cls(status, json.dumps(payload, ensure_ascii=False).encode(), _JSON, headers)

    @classmethod
    def error(cls, status: int, code: str, title: str, detail: str = "") -> _Reply:
        return cls.json(status, answers.errors(code, title, detail))


class CloudSimulator:
    """A running (after :meth:`start`) simulated Qlik Cloud tenant on ``https://host:port``.

    ``certs_dir`` holds or receives the certificates (:mod:`butler_mqtt.sim.certs`; clients
    trust ``root.pem``). Credentials: ``client_id``/``client_secret`` (OAuth client
    credentials) and ``api_key``; either may be used.
    """

    def __init__(
        self,
        world: World | None = None,
        *,
        certs_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = "sim-client",
        client_secret: str = "sim-client-secret",
        api_key: str = "sim-api-key",
        latency_ms: float = 0,
        max_page_size: int = 100,
        start_limit_per_minute: float = 50,
        rate_window: float = 60,
    ) -> None:
        self.world = world if world is not None else demo_world()
        self.certs: CertPaths = ensure_certs(Path(certs_dir))
        self.host = host
        self.client_id, self.client_secret, self.api_key = client_id, client_secret, api_key
        self.latency_ms = latency_ms
        self.max_page_size = max_page_size
        self.start_limit_per_minute = start_limit_per_minute
        self.rate_window = rate_window
        self.retry_after = True
        self.storm_429 = 0
        self.storm_retry_after: float | None = 1
        self.fault: str | None = None
        self.fault_paths: str | None = None
        self.token_fault: str | None = None
        self.huge_bytes = 64 * 1024 * 1024
        self.drip_interval = 0.1
        self.answer_delay_s = 0.0
        self.answer_delay_paths: str | None = None
        self.token_lifetime = 21600.0
        self.api_key_revoked = False
        self.paging_loop = False
        self.links_base: str | None = None
        self.fail_starts_for: set[str] = set()
        self.forbidden_apps: set[str] = set()
        #: Called with (method, path, status, body) for every JSON answer that is not a fault
        #: (the tests validate each against Qlik's schemas).
        self.reply_hook: Callable[[str, str, int, bytes], None] | None = None
        self._tokens: dict[str, float] = {}
        self._token_seq = 0
        self._accepted_starts: deque[float] = deque()
        self._requested_port = port
        self._log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(self.certs.server, self.certs.server_key)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> CloudSimulator:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="cloud-sim", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> CloudSimulator:
        return self.start() if self._server is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = "localhost" if self.host in ("", "0.0.0.0") else self.host
        return f"https://{host}:{self.port}"

    # --- observation and control --------------------------------------------------------------

    @property
    def request_log(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    @property
    def starts(self) -> list[StartRecord]:
        """Every reload created through ``POST /api/v1/reloads``, oldest first."""
        with self.world.lock:
            return list(self.world.starts)

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return self._token_seq

    def revoke_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        with self._lock:
            self._tokens.clear()

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)

    # --- request handling ---------------------------------------------------------------------

    def _fault_for(self, path: str) -> str | None:
        if self.fault is None or (self.fault_paths is not None and not re.search(self.fault_paths, path)):
            return None
        return self.fault

    def _auth(self, header: str | None) -> str | None:
        if not header or not header.startswith("Bearer "):
            return None
        value = header[len("Bearer "):]
        if value == self.api_key:
            return "bad" if self.api_key_revoked else "api_key"
        with self._lock:
            expiry = self._tokens.get(value)
        return "token" if expiry is not None and time.time() < expiry else "bad"

    def _answer(self, method: str, path: str, query: dict[str, str], body: bytes, auth: str | None) -> _Reply:
        route = [unquote(p) for p in path.rstrip("/").split("/")[1:]]
        if route == ["oauth", "token"] and method == "POST":
            return self._token(body)
        if route[:2] != ["api", "v1"]:
            return _Reply.error(404, "HTTP-404", "Not Found")
        if auth not in ("token", "api_key"):
            return _Reply.error(401, "HTTP-401", "Unauthorized, JWT invalid or not provided.")
        with self._lock:
            if self.storm_429 > 0:
                self.storm_429 -= 1
                hint = self.storm_retry_after
                return self._too_many(hint)
        rest = route[2:]
        try:
            if method == "GET":
                return self._get(rest, query)
            if method == "POST":
                return self._post(rest, query, body)
        except _BadRequest as bad:
            return _Reply.error(400, bad.code, "Bad Request", str(bad))
        return _Reply.error(404, "HTTP-404", "Not Found")

    @staticmethod
    def _too_many(hint: float | None) -> _Reply:
        detail = f"You need to wait {hint:g} seconds until limit is lifted." if hint is not None else ""
        headers = (("Retry-After", f"{hint:g}"),) if hint is not None else ()
        return _Reply(429, json.dumps(answers.errors("HTTP-429", "API rate limit reached.", detail)).encode(), _JSON, headers)

    # --- oauth ----------------------------------------------------------------------------------

    def _token(self, body: bytes) -> _Reply:
        if self.token_fault == "garbage":
            return _Reply(200, b"<html>\x00\xff garbage {not json", "text/html")
        if self.token_fault == "huge":
            return _Reply(200, b'{"access_token": "' + b"A" * self.huge_bytes + b'"}')
        if self.token_fault == "refuse":
            return _Reply.error(401, "OAUTH-1", "invalid client credentials")
        try:
            text = body.decode()
            fields = json.loads(text) if text.lstrip().startswith("{") else dict(parse_qsl(text))
        except ValueError:
            return _Reply.error(400, "OAUTH-3", "invalid request parameters")
        if not isinstance(fields, dict) or fields.get("grant_type") != "client_credentials":
            return _Reply.error(400, "OAUTH-3", "invalid request parameters")
        if fields.get("client_id") != self.client_id or fields.get("client_secret") != self.client_secret:
            return _Reply.error(401, "OAUTH-1", "invalid client credentials")
        with self._lock:
            self._token_seq += 1
            token = base64.urlsafe_b64encode(f"sim-token-{self._token_seq}-{time.time()}".encode()).decode()
            expiry = time.time() + self.token_lifetime
            self._tokens[token] = expiry
        return _Reply.json(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": math.floor(self.token_lifetime),
                "expires_at": answers.iso(expiry),
                "scope": str(fields.get("scope") or "user_default"),
            },
        )

    # --- reads ----------------------------------------------------------------------------------

    def _get(self, route: list[str], query: dict[str, str]) -> _Reply:
        self.world.advance()
        if route == ["items"]:
            return self._items(query)
        if route == ["collections"]:
            return self._collections(query)
        if route == ["spaces"]:
            return self._spaces(query)
        if len(route) == 2 and route[0] == "spaces":
            found = self.world.spaces.get(route[1])
            if found is None:
                return _Reply.error(404, "SPACES-1", "Space not found or access denied.")
            return _Reply.json(200, answers.space(self._base, found))
        if route == ["reloads"]:
            return self._reloads(query)
        if len(route) == 2 and route[0] == "reloads":
            with self.world.lock:
                found_reload = self.world.reloads.get(route[1])
                if found_reload is None:
                    return _Reply.error(404, "RELOADS-404", "Not Found", "The reload was not found.")
                return _Reply.json(200, answers.reload(self._base, self.world, found_reload, with_log=True))
        if len(route) >= 2 and route[0] == "apps":
            return self._app(route[1], route[2:])
        return _Reply.error(404, "HTTP-404", "Not Found")

    def _app(self, app_id: str, rest: list[str]) -> _Reply:
        app = self.world.app(app_id)
        if app is None:
            return _Reply.error(404, "HTTP-404", "Not Found", "The app was not found.")
        if not rest:
            with self.world.lock:
                ends = [r.ended for r in self.world.reloads.values() if r.app_id == app_id and r.ended is not None]
            return _Reply.json(200, answers.nx_app(app, max(ends) if ends else None))
        if len(rest) == 3 and rest[:2] == ["reloads", "logs"]:
            with self.world.lock:
                found = self.world.reloads.get(rest[2])
                if found is None or found.app_id != app_id or found.status not in END:
                    return _Reply.error(404, "HTTP-404", "Not Found", "No log for this reload.")
                return _Reply(200, self.world.script_log_bytes(found), _TEXT)
        return _Reply.error(404, "HTTP-404", "Not Found")

    def _items(self, query: dict[str, str]) -> _Reply:
        resource_type = query.get("resourceType")
        if resource_type not in (None, "app"):
            return self._page("/api/v1/items", query, [], "items")
        ids: set[str] | None = None
        if "resourceIds" in query or "resourceId" in query:
            if resource_type is None:
                raise _BadRequest("resourceType is required with resourceId", "ITEMS-1")
            ids = set(filter(None, (query.get("resourceIds") or query.get("resourceId") or "").split(",")))
            if len(ids) > 100:
                raise _BadRequest("at most 100 resourceIds", "ITEMS-1")
        space_id, collection_id, name = query.get("spaceId"), query.get("collectionId"), query.get("name")

        def wanted(app: SimApp) -> bool:
            return (
                (ids is None or app.id in ids)
                and (space_id is None or app.space_id == space_id)
                and (collection_id is None or collection_id in app.tag_ids)
                and (name is None or name.casefold() in app.name.casefold())
            )

        if ids is not None:  # a direct look-up, not a scan of a huge tenant
            found = [a for a in (self.world.app(i) for i in sorted(ids)) if a is not None and wanted(a)]
            return self._page("/api/v1/items", query, found, "items")
        return self._scan_page("/api/v1/items", query, wanted)

    def _collections(self, query: dict[str, str]) -> _Reply:
        kind, name = query.get("type"), query.get("name")
        tags = list(self.world.tags.values()) if kind in (None, "public") else []
        tags = [t for t in tags if name is None or t.name == name]
        counts = {t.id: sum(1 for a in self.world.apps.values() if t.id in a.tag_ids) for t in tags}
        for t in tags:
            if t.name == GENERATED_TAG:
                counts[t.id] += self.world.generated_apps
        return self._page("/api/v1/collections", query, [answers.collection(self._base, t, counts[t.id]) for t in tags], "raw")

    def _spaces(self, query: dict[str, str]) -> _Reply:
        needle = (query.get("name") or "").casefold()
        found = [s for s in self.world.spaces.values() if needle in s.name.casefold()]
        return self._page("/api/v1/spaces", query, [answers.space(self._base, s) for s in found], "spaces")

    def _reloads(self, query: dict[str, str]) -> _Reply:
        app_id = query.get("appId")
        statuses = _status_filter(query.get("filter"))
        with self.world.lock:
            found = [
                r for r in self.world.reloads.values()
                if (app_id is None or r.app_id == app_id) and (statuses is None or r.status in statuses)
            ]
            found.sort(key=lambda r: r.created, reverse=True)
            with_log = query.get("log") == "true"
            shaped = [answers.reload(self._base, self.world, r, with_log=with_log) for r in found]
        return self._page("/api/v1/reloads", query, shaped, "raw")

    # --- paging ---------------------------------------------------------------------------------

    @property
    def _base(self) -> str:
        return self.links_base or self.base_url

    def _limit(self, query: dict[str, str]) -> int:
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            raise _BadRequest("limit must be an integer", "HTTP-400") from None
        if not 1 <= limit <= 100:
            raise _BadRequest("limit must be between 1 and 100", "HTTP-400")
        return min(limit, max(1, self.max_page_size))

    def _cursor(self, query: dict[str, str]) -> int:
        raw = query.get("next")
        if raw is None:
            return 0
        try:
            return int(base64.urlsafe_b64decode(raw.encode()).decode().removeprefix("c:"))
        except ValueError:
            raise _BadRequest("invalid cursor", "HTTP-400") from None

    def _links(self, path: str, query: dict[str, str], start: int, next_index: int | None) -> dict[str, Any]:
        plain = {k: v for k, v in query.items() if k != "next"}
        links: dict[str, Any] = {"self": {"href": self._url(path, query)}}
        if self.paging_loop and start > 0:
            links["next"] = {"href": self._url(path, plain)}
        elif next_index is not None:
            cursor = base64.urlsafe_b64encode(f"c:{next_index}".encode()).decode()
            links["next"] = {"href": self._url(path, plain | {"next": cursor})}
        return links

    def _url(self, path: str, query: dict[str, str]) -> str:
        return f"{self._base}{path}" + (f"?{urlencode(query, quote_via=quote)}" if query else "")

    def _page(self, path: str, query: dict[str, str], rows: list[Any], kind: str) -> _Reply:
        limit, start = self._limit(query), self._cursor(query)
        chunk = rows[start:start + limit]
        more = start + limit < len(rows)
        data = [answers.item(self._base, self.world, r) if kind == "items" else r for r in chunk]
        payload: dict[str, Any] = {"data": data, "links": self._links(path, query, start, start + limit if more else None)}
        if kind == "spaces":
            payload["meta"] = {"count": len(rows)}
        return _Reply.json(200, payload)

    def _scan_page(self, path: str, query: dict[str, str], wanted: Any) -> _Reply:
        """A page of the apps matching ``wanted``, scanning from the cursor (apps are generated
        on the fly: a 100,000-app tenant costs no memory)."""
        limit, start = self._limit(query), self._cursor(query)
        data: list[dict[str, Any]] = []
        next_index: int | None = None
        for index, app in self.world.iter_apps(start):
            if len(data) == limit:
                next_index = index
                break
            if wanted(app):
                data.append(answers.item(self._base, self.world, app))
        return _Reply.json(200, {"data": data, "links": self._links(path, query, start, next_index)})

    # --- writes ---------------------------------------------------------------------------------

    def _post(self, route: list[str], query: dict[str, str], body: bytes) -> _Reply:
        if route == ["reloads"]:
            return self._create_reload(body)
        if len(route) == 4 and route[0] == "reloads" and route[2:] == ["actions", "cancel"]:
            outcome = self.world.cancel(route[1])
            if outcome is None:
                return _Reply.error(404, "RELOADS-404", "Not Found", "The specified reload record could not be found.")
            if outcome == "ended":
                return _Reply.error(409, "RELOADS-409", "Conflict", "Reload is not in a cancellable state.")
            if outcome == "canceled":
                return _Reply(204, b"", _JSON)
            return _Reply.json(202, {"status": "CANCELING"})
        return _Reply.error(404, "HTTP-404", "Not Found")

    def _create_reload(self, body: bytes) -> _Reply:
        try:
            request = json.loads(body or b"null")
        except ValueError:
            raise _BadRequest("the body is not JSON", "RELOADS-001") from None
        app_id, partial, variables, weight = _reload_request(request)
        app = self.world.app(app_id)
        if app is None:
            return _Reply.error(404, "HTTP-404", "Not Found", "The app was not found.")
        if app_id in self.forbidden_apps:
            return _Reply.error(403, "RELOADS-003", "Forbidden", "the requesting JWT does not allow for execution of this reload")
        if app_id in self.fail_starts_for:
            return _Reply.error(500, "RELOADS-500", "Internal Server Error")
        with self.world.lock:
            retry = self._rate_limited()
            if retry is not None:
                return self._too_many(retry if self.retry_after else None)
            if self.world.pending_for(app_id) is not None:
                return _Reply.error(
                    429, "RELOADS-429-PENDING", "Too many requests", "a pending reload request already exists for this app"
                )
            self._accepted_starts.append(time.time())
            reload = self.world.create_reload(app, partial, variables, weight)
            return _Reply.json(201, answers.reload(self._base, self.world, reload, with_log=False))

    def _rate_limited(self) -> float | None:
        """Seconds until a start is allowed again, or None when it is allowed now."""
        now = time.time()
        window = max(self.rate_window, 0.001)
        while self._accepted_starts and self._accepted_starts[0] <= now - window:
            self._accepted_starts.popleft()
        allowed = max(1, math.floor(self.start_limit_per_minute * window / 60 + 1e-9))
        if len(self._accepted_starts) < allowed:
            return None
        return float(max(1, math.ceil(self._accepted_starts[0] + window - now)))


class _BadRequest(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _reload_request(request: Any) -> tuple[str, bool, dict[str, str], int]:
    if not isinstance(request, dict) or not isinstance(request.get("appId"), str):
        raise _BadRequest("appId is required", "RELOADS-001")
    partial = request.get("partial", False)
    variables = request.get("variables", {})
    weight = request.get("weight", 1)
    if not isinstance(partial, bool):
        raise _BadRequest("partial must be a boolean", "RELOADS-001")
    if not isinstance(variables, dict) or len(variables) > 20:
        raise _BadRequest("variables: at most 20", "RELOADS-001")
    for name, value in variables.items():
        if not isinstance(value, str) or len(name) > 256 or len(value) > 256:
            raise _BadRequest("variables: names and values are strings of at most 256 characters", "RELOADS-001")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10:
        raise _BadRequest("weight must be 1..10", "RELOADS-001")
    return request["appId"], partial, variables, weight


def _status_filter(text: str | None) -> set[str] | None:
    """The statuses of a SCIM filter made only of ``status eq "X"`` terms joined by ``or``."""
    if text is None or not text.strip():
        return None
    stripped = text.replace("(", " ").replace(")", " ")
    terms = re.split(r"\s+or\s+", stripped.strip(), flags=re.IGNORECASE)
    statuses: set[str] = set()
    for term in terms:
        match = _STATUS_TERM.fullmatch(term)
        if match is None or match.group(1).upper() not in ACTIVE + END:
            raise _BadRequest(f"unsupported filter: {text[:100]}", "RELOADS-002")
        statuses.add(match.group(1).upper())
    return statuses


def _fault_reply(fault: str, sim: CloudSimulator) -> _Reply | None:
    """The answer a fault gives in place of the real one (None: answer normally)."""
    if fault in ("error500", "error503"):
        code = int(fault[-3:])
        return _Reply.error(code, f"HTTP-{code}", "Internal Server Error" if code == 500 else "Service Unavailable")
    if fault == "notjson":
        return _Reply(200, b"<html><body>Please log in</body></html>", "text/html")
    if fault == "huge":
        return _Reply(200, b'{"data": [' + b" " * sim.huge_bytes + b"]}")
    return None


class _Server(ThreadingHTTPServer):
    """Plain-TCP accept loop; TLS is negotiated in each connection's own thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: CloudSimulator) -> None:
        self.sim = sim
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.sim._ssl.wrap_socket(request, server_side=True)
        except OSError:
            return
        with self._open_lock:
            self._open.add(conn)
        try:
            _Handler(conn, client_address, self)
        except OSError:
            pass
        finally:
            with self._open_lock:
                self._open.discard(conn)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: ``request_log`` is the record."""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        sim = self.server.sim
        at = time.time()
        raw_path, _, raw_query = self.path.partition("?")
        path = unquote(raw_path)
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        body = self._body()
        if body is None:
            # A body that cannot be read (or skipped) reliably: 400 and close, like the QRS simulator.
            sim._record(LoggedRequest(self.command, path, query, 400, at, None))
            self._send(_Reply(400, b"", _TEXT, (("Connection", "close"),)))
            self.close_connection = True
            return
        auth = sim._auth(self.headers.get("Authorization"))
        if sim.latency_ms > 0:
            sim._stopping.wait(sim.latency_ms / 1000)
        fault = "outage" if sim._stopping.is_set() else sim._fault_for(path)
        if path == "/oauth/token" and sim.token_fault == "hang":
            fault = "hang"
        if fault in ("outage", "hang", "drip", "drip_headers"):
            self._misbehave(fault, sim, LoggedRequest(self.command, path, query, 0 if "drip" not in fault else 200, at, auth))
            return
        reply = _fault_reply(fault, sim) if fault is not None else None
        if reply is None:
            reply = sim._answer(self.command, path, query, body, auth)
            hook = sim.reply_hook
            deliberate = path == "/oauth/token" and sim.token_fault is not None  # a hostile answer on purpose
            if hook is not None and reply.content_type == _JSON and reply.body and not deliberate:
                hook(self.command, path, reply.status, reply.body)
        sim._record(LoggedRequest(self.command, path, query, reply.status, at, auth))
        delay, pattern = sim.answer_delay_s, sim.answer_delay_paths
        if delay > 0 and (pattern is None or re.search(pattern, f"{self.command} {path}")):
            sim._stopping.wait(delay)  # acted on, the answer held back (a crash between send and answer)
        self._send(reply)

    def _body(self) -> bytes | None:
        """The request body; None when its length is unknown, bad or over 1 MiB."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if length < 0 or length > 1024 * 1024 or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.status != 204:
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.status != 204:
            self.wfile.write(reply.body)

    def _misbehave(self, fault: str, sim: CloudSimulator, entry: LoggedRequest) -> None:
        """Faults that are not an answer: close at once, hang, or drip."""
        sim._record(entry)
        if fault == "hang":
            sim._stopping.wait()
        elif fault == "drip":
            self._drip(sim)
        elif fault == "drip_headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            while not sim._stopping.wait(sim.drip_interval):
                self.wfile.write(b"X-Drip: 1\r\n")
                self.wfile.flush()
        self.close_connection = True

    def _drip(self, sim: CloudSimulator) -> None:
        """200 with a 1 MiB Content-Length, then one byte every ``drip_interval`` seconds."""
        self.send_response(200)
        self.send_header("Content-Type", _JSON)
        self.send_header("Content-Length", str(1024 * 1024))
        self.end_headers()
        self.wfile.flush()
        while not sim._stopping.wait(sim.drip_interval):
            self.wfile.write(b" ")
            self.wfile.flush()
