"""Plain typed data shared by every ingress (MQTT JSON, MQTT plain, REST) and the service.

`StartRequest` is the one request model (contract section 3). `parse_request` turns raw bytes
into it, or raises `RequestRejected` with the `error`/`details` pair the caller replies with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from butler_mqtt.errors import RequestRejected

GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
EMPTY_GUID = "00000000-0000-0000-0000-000000000000"

#: Largest accepted request payload. A start request is a few hundred bytes; anything near
#: this size is a mistake or an attack, and parsing it would only cost memory.
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PLAIN_PAYLOAD_BYTES = 1024  # Butler's plain topic: one GUID
MAX_NAME_LENGTH = 255
MAX_CRITERIA = 200  # per list (taskId, tag, customProperty)
MAX_CHAIN_DEPTH = 10
MAX_REQUEST_ID_LENGTH = 128

INVALID_GUID_ERROR = "Invalid task ID format"
INVALID_GUID_DETAILS = "Task ID must be a valid GUID"
INVALID_APP_ID_ERROR = "Invalid app ID format"
INVALID_APP_ID_DETAILS = "App ID must be a valid GUID"
#: Reload options of Qlik Cloud (contract section 9; qlik-cloud-api.md 3).
MAX_VARIABLES = 20
MAX_VARIABLE_CHARS = 256

# Control characters never occur in Qlik tag or property names; rejecting them keeps log
# lines and QRS filters clean. Quotes, `&`, `#`, `+`, `%`, parentheses and non-ASCII are
# legitimate and are escaped instead (see backends/qrs/filters.py).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")

TaskStatus = Literal[
    "started", "notStarted", "denied", "failed", "wouldStart", "alreadyRunning", "skipped", "queued", "expired",
    "stopping", "notRunning",
]
IfRunning = Literal["start", "attach", "skip", "queue", "restart"]
OnDeadline = Literal["notify", "stop"]
FINAL_STATES = {6: "Aborted", 7: "FinishedSuccess", 8: "FinishedFail", 9: "Skipped", 11: "Error", 12: "Reset"}
#: TaskExecutionStatus values of an execution that has not ended (qrs-api.md 6.4, 6.6): Triggered,
#: Started, Queued, AbortInitiated, Aborting, Retry, DistributionQueue, DistributionRunning.
RUNNING_STATES = {1: "Triggered", 2: "Started", 3: "Queued", 4: "AbortInitiated", 5: "Aborting", 10: "Retry",
                  13: "DistributionQueue", 14: "DistributionRunning"}
_RUNNING_NAMES = {name.casefold() for name in RUNNING_STATES.values()}
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5


def is_guid(value: str) -> bool:
    """True when `value` is a GUID in its canonical 8-4-4-4-12 hex form (any case)."""
    return bool(GUID_RE.match(value))


def storable_problem(text: str) -> str | None:
    """Why the journal could never store `text`, or None. U+0000 (PostgreSQL text cannot hold
    it) and lone UTF-16 surrogates (not Unicode: no driver encodes them) are refused for every
    backend alike, so a request valid on SQLite is valid on PostgreSQL too."""
    if "\x00" in text:
        return "contains U+0000 (NUL), which cannot be stored"
    if not encodable(text):
        return "contains a lone UTF-16 surrogate, which is not valid Unicode"
    return None


def check_storable(value: str, what: str) -> str:
    """`value`, or ValueError naming `what` when the journal could never store it."""
    problem = storable_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return value


def storable_text(text: str) -> str:
    """`text` with what no journal can store replaced by U+FFFD (for texts from QRS)."""
    if storable_problem(text) is None:
        return text
    return _UNSTORABLE_RE.sub("\ufffd", text)


def _guids(values: list[str], details: str) -> list[str]:
    """Task or app IDs: GUIDs, lower-cased; ValueError(`details`) for any other."""
    for v in values:
        if not is_guid(v.strip()):
            raise ValueError(details)
    return [v.strip().lower() for v in values]


def _check_name(value: str, what: str) -> str:
    check_storable(value, what)
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} longer than {MAX_NAME_LENGTH} characters")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{what} contains a control character")
    return value


class CustomPropertyCriterion(BaseModel):
    """A custom property name/value pair; a task matches when it carries exactly this pair."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "custom property name")

    @field_validator("value")
    @classmethod
    def _value(cls, v: str) -> str:
        return _check_name(v, "custom property value")


class RetryRequest(BaseModel):
    """`retry` of a request: extra starts after a failed reload (see policies.retry)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    attempts: int = Field(ge=0, le=10)
    delay: float = Field(default=60, ge=0, le=3600)


class StartRequest(BaseModel):
    """A start request. Field names are the wire names."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    requestId: str | None = Field(default=None, max_length=MAX_REQUEST_ID_LENGTH)
    taskId: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    tag: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    customProperty: list[CustomPropertyCriterion] = Field(default_factory=list, max_length=MAX_CRITERIA)
    allTaskIdsMustExist: bool = False
    wait: bool = False
    dryRun: bool = False
    then: StartRequest | None = None
    onFailure: Literal["stop", "continue"] = "stop"
    ifRunning: IfRunning | None = None
    retry: RetryRequest | None = None
    deadline: float | None = Field(default=None, gt=0, le=7 * 86400)
    priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY)
    # Contract section 9: apps by id (both backends), spaces and reload options (Qlik Cloud).
    appId: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    space: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    partial: bool | None = None
    variables: dict[str, str] | None = Field(default=None, max_length=MAX_VARIABLES)
    onDeadline: OnDeadline | None = None

    @field_validator("requestId")
    @classmethod
    def _request_id(cls, v: str | None) -> str | None:
        return None if v is None else check_storable(v, "requestId")

    @field_validator("taskId", "tag", "appId", "space", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        # The contract accepts a single string where a list is expected.
        return [v] if isinstance(v, str) else v

    @field_validator("tag")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        return [_check_name(t, "tag") for t in v]

    @field_validator("taskId")
    @classmethod
    def _task_ids(cls, v: list[str]) -> list[str]:
        return _guids(v, INVALID_GUID_DETAILS)

    @field_validator("appId")
    @classmethod
    def _app_ids(cls, v: list[str]) -> list[str]:
        return _guids(v, INVALID_APP_ID_DETAILS)

    @field_validator("space")
    @classmethod
    def _spaces(cls, v: list[str]) -> list[str]:
        return [_check_name(t, "space") for t in v]

    @field_validator("variables")
    @classmethod
    def _variables(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, value in (v or {}).items():
            check_storable(name, "variables (a name)")  # kept in the journal with the request
            check_storable(value, "variables (a value)")
            if not 1 <= len(name) <= MAX_VARIABLE_CHARS:
                raise ValueError(f"variable names are 1 to {MAX_VARIABLE_CHARS} characters")
            if len(value) > MAX_VARIABLE_CHARS:
                raise ValueError(f"variable values are at most {MAX_VARIABLE_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _has_criteria(self) -> StartRequest:
        if not (self.taskId or self.tag or self.customProperty or self.appId or self.space):
            raise ValueError("at least one of taskId, tag, customProperty, appId, space is required")
        return self

    @property
    def waits(self) -> bool:
        """`then` implies waiting for the end of every task of this stage."""
        return self.wait or self.then is not None

    def chain_depth(self) -> int:
        return 1 + (self.then.chain_depth() if self.then else 0)


class StopRequest(BaseModel):
    """A stop request (contract section 8): the selectors, `requestId` and `wait` of a start
    request, no other field."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    requestId: str | None = Field(default=None, max_length=MAX_REQUEST_ID_LENGTH)
    taskId: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    tag: list[str] = Field(default_factory=list, max_length=MAX_CRITERIA)
    customProperty: list[CustomPropertyCriterion] = Field(default_factory=list, max_length=MAX_CRITERIA)
    wait: bool = False

    _one_or_many = field_validator("taskId", "tag", mode="before")(StartRequest._one_or_many.__func__)  # type: ignore[attr-defined]
    _tags = field_validator("tag")(StartRequest._tags.__func__)  # type: ignore[attr-defined]
    _task_ids = field_validator("taskId")(StartRequest._task_ids.__func__)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _has_criteria(self) -> StopRequest:
        if not (self.taskId or self.tag or self.customProperty):
            raise ValueError("at least one of taskId, tag, customProperty is required")
        return self

    def selection(self, wait: bool = False) -> StartRequest:
        """The same selectors as a StartRequest (what the selection reads); never started."""
        return StartRequest(requestId=self.requestId, taskId=self.taskId, tag=self.tag,
                            customProperty=self.customProperty, wait=wait)


def validate_stop(data: Any) -> StopRequest:
    """Validate already-decoded JSON into a StopRequest, or raise RequestRejected."""
    if not isinstance(data, dict):
        raise RequestRejected("Invalid request", "the request must be a JSON object")
    try:
        return StopRequest.model_validate(data)
    except ValidationError as err:
        for e in err.errors():
            if e["type"] == "value_error" and INVALID_GUID_DETAILS in e["msg"]:
                raise RequestRejected(INVALID_GUID_ERROR, INVALID_GUID_DETAILS) from None
        raise _describe(err) from None
    except RecursionError:
        raise RequestRejected("Invalid request", "the request is nested too deeply") from None


def _describe(err: ValidationError) -> RequestRejected:
    """One clear sentence from pydantic's first error; GUID errors get the contract's text."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "value_error" and INVALID_GUID_DETAILS in msg:
        return RequestRejected(INVALID_GUID_ERROR, INVALID_GUID_DETAILS)
    if first["type"] == "value_error" and INVALID_APP_ID_DETAILS in msg:
        return RequestRejected(INVALID_APP_ID_ERROR, INVALID_APP_ID_DETAILS)
    if first["type"] == "extra_forbidden":
        return RequestRejected("Invalid request", f"unknown field '{loc}'")
    msg = msg.removeprefix("Value error, ")
    where = f"field '{loc}': " if loc else ""
    return RequestRejected("Invalid request", f"{where}{msg}")


def validate_request(data: Any) -> StartRequest:
    """Validate already-decoded JSON into a StartRequest, or raise RequestRejected."""
    if not isinstance(data, dict):
        raise RequestRejected("Invalid request", "the request must be a JSON object")
    try:
        req = StartRequest.model_validate(data)
    except ValidationError as err:
        # A GUID error anywhere wins: the contract gives it a fixed reply.
        for e in err.errors():
            if e["type"] == "value_error" and INVALID_GUID_DETAILS in e["msg"]:
                raise RequestRejected(INVALID_GUID_ERROR, INVALID_GUID_DETAILS) from None
        raise _describe(err) from None
    except RecursionError:
        raise RequestRejected("Invalid request", "the request is nested too deeply") from None
    if req.chain_depth() > MAX_CHAIN_DEPTH:
        raise RequestRejected("Invalid request", f"'then' chains are limited to {MAX_CHAIN_DEPTH} stages")
    return req


def decode_json(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> Any:
    """Bytes -> JSON value, with the size, UTF-8 and syntax checks every ingress needs."""
    if len(payload) > limit:
        raise RequestRejected("Payload too large", f"{len(payload)} bytes; the limit is {limit} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRejected("Invalid payload", f"not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestRejected("Invalid JSON", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a number beyond Python's int-parsing limit (4300 digits)
        raise RequestRejected("Invalid JSON", str(exc).split(":", 1)[0]) from None
    except RecursionError:
        raise RequestRejected("Invalid JSON", "nested too deeply") from None
    if "\\u" in text:  # only an escape can smuggle in a lone surrogate
        _reject_lone_surrogates(data)
    return data


def encodable(text: str) -> bool:
    """False for a string that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_lone_surrogates(value: Any) -> None:
    """JSON may write a lone surrogate (`"\\ud800"`), which is no character at all: it cannot be
    put in a QRS filter, a reply or a log line, so it is refused like any other bad input."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if not encodable(v):
                raise RequestRejected("Invalid JSON", "a string contains a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode")
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)


def parse_request(payload: bytes) -> StartRequest:
    """Raw MQTT payload -> StartRequest, or RequestRejected naming the problem."""
    return validate_request(decode_json(payload))


def parse_plain(payload: bytes) -> StartRequest:
    """Butler's plain topic: the payload is one task GUID (whitespace trimmed)."""
    if len(payload) > MAX_PLAIN_PAYLOAD_BYTES:
        raise RequestRejected("Payload too large", f"{len(payload)} bytes; a task ID is 36 characters")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RequestRejected("Invalid payload", "not valid UTF-8") from None
    if not is_guid(text):
        raise RequestRejected(INVALID_GUID_ERROR, INVALID_GUID_DETAILS)
    return StartRequest(taskId=[text.lower()])


# --------------------------------------------------------------------------- QRS-side data


@dataclass(frozen=True)
class QrsTask:
    """The parts of a QRS ReloadTask that selection and replies need."""

    id: str
    name: str
    enabled: bool = True
    tags: tuple[str, ...] = ()
    custom_properties: tuple[tuple[str, str], ...] = ()  # (definition name, value)
    app_id: str | None = None  # the app the task reloads (Qlik Cloud: the task is the app)
    space: str | None = None  # Qlik Cloud: the name of the app's space
    #: Names compare exactly (Qlik Cloud) rather than case-insensitively (QRS).
    exact_names: bool = False
    #: `operational.lastExecutionResult` in a non-final state: the task is running in QRS.
    running: bool = False
    last_result_id: str | None = None  # that ExecutionResult's id (not the execution session id)

    @classmethod
    def from_qrs(cls, obj: dict[str, Any]) -> QrsTask:
        """Build from a QRS full object, tolerating null collections (QRS sends `tags: null`)
        and skipping entries of any other shape: a malformed answer selects less, never more."""
        tags = tuple(
            t["name"] for t in _dicts(obj.get("tags")) if isinstance(t.get("name"), str)
        )
        cps = tuple(
            (cp["definition"]["name"], cp["value"])
            for cp in _dicts(obj.get("customProperties"))
            if isinstance(cp.get("definition"), dict)
            and isinstance(cp["definition"].get("name"), str)
            and isinstance(cp.get("value"), str)
        )
        name = obj.get("name")
        enabled = obj.get("enabled", True)
        running, result_id = _last_execution(obj.get("operational"))
        app = obj.get("app")
        app_id = app.get("id") if isinstance(app, dict) else None
        return cls(
            id=str(obj["id"]).lower(),
            name=storable_text(name) if isinstance(name, str) else "",
            enabled=enabled if isinstance(enabled, bool) else True,
            tags=tags,
            custom_properties=cps,
            running=running,
            last_result_id=result_id,
            app_id=app_id.lower() if isinstance(app_id, str) and is_guid(app_id) else None,
        )


def is_running_status(status: Any) -> bool:
    """A QRS TaskExecutionStatus (an integer; some tools print the name) that has not ended."""
    if isinstance(status, bool):
        return False
    if isinstance(status, int):
        return status in RUNNING_STATES
    return isinstance(status, str) and status.strip().casefold() in _RUNNING_NAMES


def _last_execution(operational: Any) -> tuple[bool, str | None]:
    """(running?, ExecutionResult id) from `operational.lastExecutionResult`; odd shapes: not running."""
    last = operational.get("lastExecutionResult") if isinstance(operational, dict) else None
    if not isinstance(last, dict) or not is_running_status(last.get("status")):
        return False, None
    rid = last.get("id")
    return True, (rid.lower() if isinstance(rid, str) and is_guid(rid) else None)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


MatchKind = Literal["taskId", "tag", "customProperty", "appId", "space"]


class Match(str):
    """One criterion a task matched, carried as data (`kind`, `value`, and for a custom
    property its `name`) from the selection to the wire. It *is* its wire form
    (`taskId:<id>`, `tag:<name>`, `customProperty:<name>=<value>`, contract section 4), so
    records and replies store it unchanged; readers get the parts back with `Match.parse`."""

    kind: MatchKind
    value: str
    name: str | None

    def __new__(cls, kind: MatchKind, value: str, name: str | None = None) -> Match:
        wire = f"{kind}:{name}={value}" if kind == "customProperty" else f"{kind}:{value}"
        m = super().__new__(cls, wire)
        m.kind, m.value, m.name = kind, value, name
        return m

    def __reduce__(self) -> tuple[Any, ...]:
        return (Match, (self.kind, self.value, self.name))

    @classmethod
    def parse(cls, text: str) -> Match | None:
        """The Match a wire string names (None: not one of ours)."""
        kind, sep, rest = text.partition(":")
        if not sep:
            return None
        if kind == "customProperty":
            name, eq, value = rest.partition("=")
            return cls("customProperty", value, name) if eq else None
        if kind in ("taskId", "tag", "appId", "space"):
            return cls(kind, rest)  # type: ignore[arg-type]  # narrowed by the test above
        return None


def matches(texts: Iterable[str]) -> list[Match]:
    """Matches read back from their wire form (a stored record, a reply)."""
    return [m for m in map(Match.parse, texts) if m is not None]


@dataclass
class TaskOutcome:
    """What happened to one selected task."""

    task_id: str
    task_name: str
    status: TaskStatus
    matched_by: list[Match] = field(default_factory=list)
    execution_id: str | None = None
    reason: str | None = None
    position: int | None = None  # queued: 1 = next
    attempt: int | None = None  # with retry: 1 = the first start
    partial: bool = False  # Qlik Cloud reload options of the stage that selected it
    variables: dict[str, str] | None = None


@dataclass
class Route:
    """Where a request's replies go: an MQTT topic plus the request's correlation data."""

    topic: str
    correlation: str | None = None  # hex

    @property
    def correlation_bytes(self) -> bytes | None:
        return bytes.fromhex(self.correlation) if self.correlation is not None else None
