"""The FastAPI application: Butler's start endpoint on the shared pipeline, health and metrics.

Every request that starts tasks goes through `service.submit`, the use case MQTT uses,
so the same criteria select the same tasks whichever way they arrive. This module only does
what is HTTP's own: the bearer token, the body size limit, the two body shapes, the method
override, and mapping outcomes and failures to status codes, always with a JSON body.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from butler_mqtt import __version__, keys, replies
from butler_mqtt.asyncapi import build_document
from butler_mqtt.callers import CHALLENGE, CallerRejected, label
from butler_mqtt.config import CallerConfig
from butler_mqtt.errors import JournalError, QrsError, RequestRejected, is_transient, retry_after
from butler_mqtt.http import schemas
from butler_mqtt.http.bodies import (
    ALL_IN_BODY,
    butler_plan,
    butler_response,
    parse_flag,
    path_task_id,
    seed_request,
    summary_response,
)
from butler_mqtt.http.offload import Offload
from butler_mqtt.http.protocol import CLIENT_CERT_CN
from butler_mqtt.http.stops import add_stop_routes, stop_request
from butler_mqtt.journal import history
from butler_mqtt.model import Route as ReplyRoute
from butler_mqtt.model import StartRequest, decode_json
from butler_mqtt.replies import Event
from butler_mqtt.service import Claim, Handled

if TYPE_CHECKING:
    from butler_mqtt.runtime import Runtime

log = structlog.get_logger("butler_mqtt.http")

INGRESS = "rest"
START_PATH = "/v4/reloadtask/{taskId}/start"
#: The seed's third form (its webhook example): the same as `/v4/reloadtask/-/start`.
START_PATH_BODY_ONLY = "/v4/reloadtask/start"
#: The request history (journal/history.py).
HISTORY_PATH = "/v4/requests"
#: QRS counts as up when it answered any call this recently (no probe needed).
QRS_FRESH_S = 60.0
#: A failed health probe is reused this long, so a burst of health checks during an outage
#: does not become a burst of QRS connection attempts.
PROBE_REUSE_S = 5.0
#: What a 503 suggests to clients before retrying.
RETRY_AFTER_S = "30"

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class ApiError(Exception):
    """A request answered with an error status; `outcome` is its requests-metric label."""

    def __init__(
        self, status: int, error: str, details: str, outcome: str = "rejected", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {details}")
        self.status = status
        self.error = error
        self.details = details
        self.outcome = outcome
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.error, self.details, self.headers)


def error_response(status: int, error: str, details: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "details": details}, status_code=status, headers=headers)


class MethodOverride:
    """`POST` + `X-HTTP-Method-Override: M` is handled as method M (Butler's proxy does this).

    Qlik's REST connector can only send GET and POST. Only POST is overridden; the routes then
    decide, so an override to a method the path does not serve is a 405 like any other.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for name, value in scope["headers"]:
                if name == b"x-http-method-override":
                    scope = dict(scope, method=value.decode("latin-1").strip().upper())
                    break
        await self.app(scope, receive, send)


#: The start endpoint's paths (START_PATH, START_PATH_BODY_ONLY) as Starlette matches them.
_START_PATH_RE = re.compile(r"^/v4/reloadtask/(?:(?P<taskId>[^/]+)/)?start$")


class StartFastPath:
    """Butler's start endpoint (POST and PUT on START_PATH and START_PATH_BODY_ONLY) straight
    to `RestApi.start`, ahead of FastAPI's middleware and routing; every other request goes to
    the FastAPI application.

    Why: the start endpoint is the request path, and FastAPI's layers (error and exception
    middleware, body limit, exit stack, routing, dependency solving, the route's wrappers) cost
    about a tenth of a REST request's CPU on the event loop, which every REST request crosses
    twice. The handler is the same one the route declares (its OpenAPI entry stays there), and
    it answers every outcome itself, errors included (`RestApi.start`). A POST carrying
    `X-HTTP-Method-Override`, a `root_path`, and anything else take the application's way.
    """

    def __init__(self, app: ASGIApp, api: RestApi) -> None:
        self.app = app
        self.api = api

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT") and not scope.get("root_path"):
            m = _START_PATH_RE.match(scope["path"])
            if m is not None and not any(name == b"x-http-method-override" for name, _ in scope["headers"]):
                task_id = m.group("taskId")
                scope["path_params"] = {"taskId": task_id} if task_id is not None else {}
                response = await self.api.start(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RestApi:
    """The handlers, bound to one Runtime (config, service, tracker, journal, QRS, metrics, health)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.cfg = runtime.cfg
        self._probe_lock = threading.Lock()
        self._last_probe: tuple[float, str] | None = None
        self._last_qrs_failure = 0.0
        self._asyncapi: dict[str, Any] | None = None
        self.offload = Offload()  # the start and stop endpoints' work, off the event loop
        self.handled = 0  #: start calls answered (any outcome), for the daemon's `stopped` line

    # ------------------------------------------------------------------ start endpoint

    async def start(self, request: Request) -> Response:
        try:
            return await self._start(request)
        except ApiError as exc:
            self._count(exc.outcome)
            log.warning(
                "rest_request_refused",
                status=exc.status,
                error=exc.error,
                details=exc.details,
                client=_client(request),
            )
            return exc.response()
        except Exception:  # a bug: answer JSON, log it once with its traceback
            self._count("error")
            log.exception("rest_internal_error", path=request.url.path)
            return error_response(500, "Internal error", "an unexpected error occurred; see the daemon's log")

    async def _start(self, request: Request) -> Response:
        caller = self._authorize(request)
        structlog.contextvars.bind_contextvars(caller=label(caller))
        _check_content_type(request)
        try:
            flag = parse_flag(request.query_params.getlist("allTaskIdsMustExist"))
            task_id = path_task_id(request.path_params.get("taskId", ALL_IN_BODY))
            raw = await self._read_body(request)
            data: Any = decode_json(raw, self.cfg.http.max_body_bytes) if raw.strip() else {}
            if isinstance(data, list):
                plan = butler_plan(data, task_id, flag)
                events = await self._run(plan.request, request, caller) if plan.request is not None else []
                return JSONResponse(butler_response(plan, events))
            if isinstance(data, dict):
                req = seed_request(data, task_id, flag)
                return JSONResponse(summary_response(await self._run(req, request, caller), self.cfg.backend))
        except RequestRejected as rej:
            raise ApiError(400, rej.error, rej.details) from None
        raise ApiError(
            400,
            "Invalid request",
            "the body must be a JSON object (this API's shape) or a JSON array (Butler's shape)",
        )

    def _authorize(self, request: Request) -> CallerConfig | None:
        """Who calls (contract section 10): a caller by its bearer token's SHA-256 (compared in
        constant time) or by its client certificate's CN (mutual TLS); None: the anonymous
        caller (http.token, or no token configured). ApiError 401 otherwise."""
        try:
            return self.rt.service.callers.identify_rest(request.headers.get("authorization"), _cert_cn(request))
        except CallerRejected as rej:
            raise ApiError(rej.http_status, rej.error, rej.details, "unauthorized", CHALLENGE) from None

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be too large.

        Content-Length is checked first (nothing read), then the streamed size, which also
        covers chunked bodies and a Content-Length that understates the body.
        """
        limit = self.cfg.http.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "Payload too large", f"{declared} bytes; the limit is {limit} bytes (http.max_body_bytes)")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, "Payload too large", f"more than {limit} bytes (http.max_body_bytes)")
        except ClientDisconnect:  # gone mid-body (or closed by http.request_timeout): not a bug
            raise ApiError(400, "Incomplete request", "the connection closed before the whole body arrived") from None
        return bytes(body)

    async def _run(self, req: StartRequest, request: Request, caller: CallerConfig | None = None) -> list[Event]:
        """Run the one pipeline in a worker thread (QRS calls block); return its events.

        `requestId` is the idempotency key exactly as on MQTT (same journal, same key). A
        waited request (`wait`, `then`) is handed to the daemon's tracker once its first stage
        started, as MQTT requests are; the answer is that stage's summary, and the later events
        go to MQTT `topics.reply`. A request without requestId is journaled under an anonymous
        key, as on MQTT: tracking needs a key, and the request history shows every request.
        """
        # On this request's own task: its lines, and those of the threads it hands to (they run
        # in a copy of this context), carry the requestId.
        structlog.contextvars.bind_contextvars(requestId=req.requestId)
        key = keys.for_request_id(req.requestId) if req.requestId else keys.anonymous("rest")
        key = keys.for_caller(key, caller.name if caller is not None else None)  # two callers: two requests
        claim = Claim(INGRESS, key, _client(request), route=ReplyRoute(self.cfg.mqtt.topics.reply), caller=caller)

        def work() -> Handled:
            # The events come back in Handled; nothing to stream.
            return self.rt.service.submit(req, claim, lambda _ev: None)

        try:
            handled = await self.offload.run(work)
        except CallerRejected as rej:  # over its requests_per_minute (counted with MQTT's): nothing claimed
            raise _rate_limited(rej) from None
        except QrsError as exc:
            self._last_qrs_failure = time.monotonic()
            # Raised while resolving (nothing started), or for a start QRS refused with 429 (it did
            # not run; the same requestId resumes the request): safe to retry.
            if is_transient(exc):
                hint = retry_after(exc)
                wait = str(max(int(RETRY_AFTER_S), int(hint + 0.999))) if hint is not None else RETRY_AFTER_S
                raise ApiError(503, "QRS unreachable", str(exc), "unavailable", {"Retry-After": wait}) from None
            raise ApiError(502, "QRS refused the request", str(exc), "error") from None
        except JournalError as exc:
            raise ApiError(503, "Journal unavailable", str(exc), "unavailable", {"Retry-After": RETRY_AFTER_S}) from None
        self.handled += 1  # the request metrics are counted by the use case (service.submit)
        return handled.events

    def _count(self, outcome: str) -> None:
        self.handled += 1
        self.rt.metrics.request(INGRESS, outcome)

    # ------------------------------------------------------------------ request history

    async def requests(self, request: Request) -> Response:
        """`GET /v4/requests`: the journal's request history (journal/history.py)."""
        try:
            caller = self._authorize(request)
            query = history_query(request.query_params.multi_items())
            if caller is not None:  # a caller sees its own requests only
                query = dataclasses.replace(query, caller=caller.name)
            records = await run_in_threadpool(self.rt.journal.history, query)
        except ApiError as exc:
            log.warning("rest_history_refused", status=exc.status, error=exc.error, details=exc.details, client=_client(request))
            return exc.response()
        except JournalError as exc:
            return error_response(503, "Journal unavailable", str(exc), {"Retry-After": RETRY_AFTER_S})
        except RequestRejected as rej:  # a value the journal cannot hold that the checks let through
            return error_response(400, "Invalid query", rej.details)
        return JSONResponse({
            "requests": records,
            "since": history.iso(query.since),
            "retentionHours": self.cfg.journal.retention_hours,
        })

    # ------------------------------------------------------------------ health and metrics

    async def healthz(self) -> JSONResponse:
        body = await run_in_threadpool(self._health)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    def _health(self) -> dict[str, Any]:
        mqtt_ok = self.rt.health.mqtt_connected
        problem = self.rt.health.qrs_problem
        qrs = "refused" if problem is not None else self._qrs_state()
        last = self.rt.qrs.last_success
        waiting, oldest = self.rt.health.waiting()
        stuck = oldest is not None and oldest > WAITING_ALERT_S
        journal_ok = self.rt.journal.healthy()
        body: dict[str, Any] = {
            "status": "ok" if mqtt_ok and qrs == "ok" and not stuck and journal_ok else "unavailable",
            "mqtt": "connected" if mqtt_ok else "disconnected",
            "qrs": qrs,
            "qrsLastAnswerSecondsAgo": round(time.monotonic() - last, 3) if last else None,
            "journal": "ok" if journal_ok else "unavailable",
            "requestsWaiting": waiting,
            "oldestWaitingSeconds": round(oldest, 1) if oldest is not None else None,
            "version": __version__,
        }
        if problem is not None:
            body["qrsProblem"] = problem
        return body

    def _qrs_fresh(self) -> bool:
        """QRS answered recently and no call failed since, whichever ingress made it."""
        last = self.rt.qrs.last_success
        fresh = last > 0 and time.monotonic() - last <= QRS_FRESH_S and last > self._last_qrs_failure
        return fresh and not self.rt.qrs.health.failing

    def _qrs_state(self) -> str:
        """`ok` when QRS answered recently (and nothing failed since), else one probe."""
        if self._qrs_fresh():
            return "ok"
        with self._probe_lock:  # concurrent health checks share one probe
            if self._qrs_fresh():
                return "ok"
            reuse = self._last_probe is not None and time.monotonic() - self._last_probe[0] < PROBE_REUSE_S
            if reuse and self._last_probe is not None and not (self._last_probe[1] == "ok" and self.rt.qrs.health.failing):
                return self._last_probe[1]
            try:
                self.rt.qrs.about()  # bounded by qrs.timeout (and qrs.retries)
                state = "ok"
            except QrsError as exc:
                state = "unreachable" if is_transient(exc) else "refused"
                log.warning("health_qrs_probe_failed", error=str(exc))
            self._last_probe = (time.monotonic(), state)
            if state == "ok":
                self._last_qrs_failure = 0.0
            return state

    def metrics(self) -> Response:
        m = self.rt.metrics
        m.mqtt_connected.set(1 if self.rt.health.mqtt_connected else 0)
        waiting, oldest = self.rt.health.waiting()
        m.waiting.set(waiting)
        m.oldest_waiting.set(oldest or 0)
        m.unacked.set(self.rt.health.unacked)
        m.qrs_refusing.set(1 if self.rt.health.qrs_problem is not None else 0)
        m.followed.set(self.rt.tracker.following())
        return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

    def asyncapi(self) -> JSONResponse:
        """The AsyncAPI 3.0 document of this daemon's MQTT interface: its topics, broker and
        protocol, and its alerts topic (docs/asyncapi.yaml is the same for the default configuration). Open like
        /openapi.json: it names topics and the broker address, never a credential."""
        if self._asyncapi is None:
            self._asyncapi = build_document(self.cfg.mqtt, alerts_topic=self.cfg.alerts.topic,
                                            caller_levels=[c.topic for c in self.cfg.callers], of_daemon=True)
        return JSONResponse(self._asyncapi)


def _rate_limited(rej: CallerRejected) -> ApiError:
    """A caller over its requests_per_minute (counted with MQTT's): 429 with a Retry-After."""
    wait = {"Retry-After": str(max(1, math.ceil(rej.retry_after or 1)))}
    return ApiError(rej.http_status, rej.error, rej.details, "rate_limited", wait)


#: A delivery kept for a retry longer than this turns /healthz unavailable.
WAITING_ALERT_S = 60.0


#: The query parameters of `GET /v4/requests`; any other is a 400 (a misspelt filter must not
#: silently return every record).
HISTORY_PARAMS = ("since", "requestId", "taskId", "limit", "caller")


def history_query(params: Sequence[tuple[str, str]]) -> history.HistoryQuery:
    """The `GET /v4/requests` query parameters (name, value pairs as sent) -> a HistoryQuery;
    ApiError 400 naming a bad, unknown or repeated one."""
    try:
        given: dict[str, str] = {}
        for name, value in params:
            if name not in HISTORY_PARAMS:
                raise ValueError(f"{_shown(name)}: unknown query parameter (known: {', '.join(HISTORY_PARAMS)})")
            if name in given:
                raise ValueError(f"{name}: given more than once")
            given[name] = value
        since = given.get("since")
        q = history.HistoryQuery(
            since=history.parse_since(since) if since is not None else None,  # `since=` alone is a bad query
            request_id=given.get("requestId"),
            task_id=given.get("taskId"),
            limit=_limit(given.get("limit")),
            caller=given.get("caller"),
        )
        return history.check_query(q)
    except ValueError as exc:
        raise ApiError(400, "Invalid query", str(exc)) from None


def _shown(name: str) -> str:
    """A parameter name as sent, safe to echo (bounded, printable)."""
    text = name if len(name) <= 64 else name[:63] + "…"
    return repr(text) if not text.isprintable() or not text else text


def _limit(text: str | None) -> int:
    if text is None:
        return history.DEFAULT_LIMIT
    if not (text.strip().isascii() and text.strip().isdigit()):
        raise ValueError(f"limit: not a whole number: {history.shown(text)}")
    return int(text)


def _cert_cn(request: Request) -> str | None:
    """The CN of the client certificate this connection presented over mutual TLS (put into
    the scope by http/protocol.py: uvicorn does not pass the peer certificate on)."""
    cn = request.scope.get(CLIENT_CERT_CN)
    return cn if isinstance(cn, str) else None


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _check_content_type(request: Request) -> None:
    """JSON or nothing. Refusing form and text types also keeps a web page from starting
    tasks through a visitor's browser: those are the types a browser posts cross-site
    without asking the server first (CORS preflight)."""
    ctype = request.headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "Unsupported Media Type", f"Content-Type {history.shown(media) if media else '(empty)'}: send the body as application/json")


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    """404, 405 and the rest in the API's `{"error", "details"}` shape, never HTML or text."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            details = f"no endpoint at {request.url.path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(app, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            details = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
        else:
            details = str(exc.detail)
        return error_response(exc.status_code, HTTPStatus(exc.status_code).phrase, details, headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "Invalid request", f"{where}: {first.get('msg')}")

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("rest_internal_error", path=request.url.path, exc_info=exc)
        return error_response(500, "Internal error", "an unexpected error occurred; see the daemon's log")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


class StopEndpoint:
    """The stop handler, on the REST API's helpers (authorization, body limits, metrics)."""

    def __init__(self, api: RestApi) -> None:
        self.api = api

    async def stop(self, request: Request) -> Response:
        try:
            return await self._stop(request)
        except ApiError as exc:
            self.api._count(exc.outcome)
            log.warning("rest_stop_refused", status=exc.status, error=exc.error, details=exc.details)
            return exc.response()
        except Exception:  # a bug: answer JSON, log it once with its traceback
            self.api._count("error")
            log.exception("rest_internal_error", path=request.url.path)
            return error_response(500, "Internal error", "an unexpected error occurred; see the daemon's log")

    async def _stop(self, request: Request) -> Response:
        caller = self.api._authorize(request)
        _check_content_type(request)
        try:
            task_id = path_task_id(request.path_params.get("taskId", "-"))
            raw = await self.api._read_body(request)
            data: Any = decode_json(raw, self.api.cfg.http.max_body_bytes) if raw.strip() else {}
            req = stop_request(data, task_id)
        except RequestRejected as rej:
            raise ApiError(400, rej.error, rej.details) from None
        key = keys.for_request_id(req.requestId) if req.requestId else keys.anonymous("rest")
        key = keys.for_caller(key, caller.name if caller is not None else None)  # two callers: two requests
        claim = Claim(INGRESS, key, _client(request), route=ReplyRoute(self.api.cfg.mqtt.topics.reply), caller=caller)

        def work() -> Handled:
            return self.api.rt.stops.submit(req, claim, lambda _ev: None)

        try:
            handled = await self.api.offload.run(work)
        except CallerRejected as rej:
            raise _rate_limited(rej) from None
        except QrsError as exc:
            if is_transient(exc):
                raise ApiError(503, "QRS unreachable", str(exc), "unavailable", {"Retry-After": RETRY_AFTER_S}) from None
            raise ApiError(502, "QRS refused the request", str(exc), "error") from None
        except JournalError as exc:
            raise ApiError(503, "Journal unavailable", str(exc), "unavailable", {"Retry-After": RETRY_AFTER_S}) from None
        self.api._count("ok")
        summary = next(ev for ev in handled.events if replies.kind(ev) == replies.SUMMARY)
        return JSONResponse(replies.without_event(summary))



def create_app(runtime: Runtime, full: bool) -> FastAPI:
    """The application. `full`: the whole API; else only /metrics and /healthz (metrics.port)."""
    api = RestApi(runtime)
    token_required = runtime.cfg.http.token is not None or any(c.tokens_sha256 for c in runtime.cfg.callers)
    app = FastAPI(
        title="butler-mqtt REST API",
        version=__version__,
        description="Start Qlik Sense reload tasks: Butler's endpoint, on the same pipeline as MQTT.",
        docs_url=None,  # served by _add_docs from the installed package, never from a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if full else None,
        redirect_slashes=False,  # a redirect would not be JSON; a trailing slash is a 404
    )
    _install_error_handlers(app)
    app.add_middleware(MethodOverride)
    if full:
        for path, suffix, with_id in ((START_PATH, "", True), (START_PATH_BODY_ONLY, "_body_only", False)):
            for method in ("POST", "PUT"):
                app.add_api_route(
                    path,
                    api.start,
                    methods=[method],
                    name=f"start_tasks{suffix}_{method.lower()}",
                    operation_id=f"startTasks{'BodyOnly' if suffix else ''}{method.title()}",
                    summary="Start reload tasks" + ("" if with_id else " (every criterion in the body)"),
                    tags=["tasks"],
                    response_model=None,
                    openapi_extra=schemas.start_operation(token_required, path_task_id=with_id),
                )
        add_stop_routes(app, StopEndpoint(api).stop, schemas.stop_operation(token_required))
        app.add_api_route(
            HISTORY_PATH, api.requests, methods=["GET"], operation_id="requestHistory", summary="Request history",
            tags=["requests"], response_model=None, openapi_extra=schemas.history_operation(token_required),
        )
    app.add_api_route(
        "/healthz", api.healthz, methods=["GET"], operation_id="health", summary="Broker and QRS health",
        tags=["operations"], response_model=None, openapi_extra=schemas.health_operation(),
    )
    app.add_api_route(
        "/metrics", api.metrics, methods=["GET"], operation_id="metrics", summary="Prometheus metrics (text format)",
        tags=["operations"], response_model=None, response_class=PlainTextResponse,
    )

    if full:
        app.add_api_route(
            ASYNCAPI_PATH, api.asyncapi, methods=["GET"], operation_id="asyncapi",
            summary="The AsyncAPI 3.0 document of the MQTT interface", tags=["operations"], response_model=None,
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = schemas.finish_document(doc, token_required)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if full:
        _add_docs(app)
    app.state.api, app.state.full = api, full  # served(app) reads both
    return app


def served(app: FastAPI) -> ASGIApp:
    """What the server runs: `app`, behind the start endpoint's fast path when it serves that
    endpoint (the full API; not the metrics-only one)."""
    return StartFastPath(app, app.state.api) if app.state.full else app


DOCS_PATH = "/docs"
ASYNCAPI_PATH = "/asyncapi.json"
DOCS_ASSETS = "/docs/assets"


def _add_docs(app: FastAPI) -> None:
    """The interactive docs (Swagger UI) with its assets from the installed package
    (swagger-ui-bundle-v2): a Sense server often has no internet access, so nothing on the
    page may come from another host."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            # No online validator badge: it would call a public server.
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False, response_model=None)
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
