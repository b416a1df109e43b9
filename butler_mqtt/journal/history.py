"""The request history: the journal read back as one record per request, for people.

`butler-mqtt history` and `GET /v4/requests` both call `read_history`. Decisions:

* One record per journal entry (one idempotency key): when it was received, its ingress and
  source (the MQTT topic, or the REST client's address), the request as received (criteria and
  options, from journal migration 3), one line per task with what happened to its start and
  its final state, the criteria that matched nothing, how often it was seen again as a
  duplicate, and the `requestFinished` outcome. Everything but the request itself comes from
  the reply events the journal already keeps: the history shows what the publisher was told.
* `state`: `handling` (claimed, not answered yet: being handled, or interrupted and waiting
  for its redelivery), `answered` (replied, nothing followed), `following` (replied; waited
  executions still followed) or `finished` (`requestFinished` was sent).
* The window never reaches further back than `journal.retention_hours`: older entries are
  being purged and the history does not pretend to know them. `since` is a duration back from
  now (`45s`, `30m`, `2h`, `1d`, `1w`) or an ISO 8601 date or date-time; one without an offset
  is UTC, like every time the journal and the history show (`...Z`).
* The newest `limit` requests of the window (default 100, at most 1000), oldest first.
* Requests refused before anything was claimed (invalid payloads, QRS refusing) are not in the
  journal and so not in the history: the log's `audit` lines have those.
* Reading never writes, migrates or creates anything (`HistoryReader` for the CLI opens an
  existing journal while the daemon runs: SQLite in WAL mode lets readers in).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from butler_mqtt import keys
from butler_mqtt.config import CALLER_NAME
from butler_mqtt.errors import JournalError
from butler_mqtt.journal.backends import (
    Cursor,
    Postgres,
    Sqlite,
    data_errors,
    db_errors,
    unstorable,
)
from butler_mqtt.model import MAX_REQUEST_ID_LENGTH, storable_problem
from butler_mqtt.redaction import redact_url
from butler_mqtt.replies import Event

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: The first schema version that records the request and its source.
HISTORY_SCHEMA = 3
_CHUNK = 500  # keys per `IN (...)` when reading events
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
FAILED_FINAL = ("FinishedFail", "Aborted", "Error", "Reset")


@dataclass(frozen=True)
class HistoryQuery:
    since: float | None = None  # epoch seconds; None: the whole retention window
    request_id: str | None = None
    task_id: str | None = None
    limit: int = DEFAULT_LIMIT
    caller: str | None = None  # a caller's name (contract section 10)


#: How much of a bad value an error message echoes.
SHOWN_CHARS = 64


def shown(text: str) -> str:
    """A value as an error message may echo it: quoted, escaped, at most SHOWN_CHARS long."""
    return repr(text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…")


def parse_since(text: str, now: float | None = None) -> float:
    """`30m`, `2h`, `1d`, `1w`, `45s` back from now, or an ISO 8601 date / date-time (UTC
    unless it names an offset, in whole minutes) -> epoch seconds, always a time `iso()` can
    show (years 1 to 9999). ValueError, starting `since: `, saying what is accepted."""
    value = text.strip()
    m = _DURATION.match(value.lower())
    if m:
        ts = (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    else:
        ts = _parse_date(text, value)
    try:
        iso(ts)  # the answer echoes it: a time no calendar shows is refused here, not there
    except (OverflowError, ValueError, OSError):
        raise ValueError(f"since: {shown(text)} is out of range (years 1 to 9999)") from None
    return ts


def _parse_date(text: str, value: str) -> float:
    try:
        when = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since: {shown(text)} is neither a duration (30m, 2h, 1d, 1w, 45s) nor an ISO 8601 date or date-time"
            " (2024-05-01, 2024-05-01T10:30, 2024-05-01T10:30:00+02:00)"
        ) from None
    offset = when.utcoffset()
    if offset is not None and (offset.seconds % 60 or offset.microseconds):
        raise ValueError(f"since: {shown(text)} has an offset that is not whole minutes (ISO 8601: +hh:mm)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):  # e.g. year 1 with a positive offset
        raise ValueError(f"since: {shown(text)} is out of range (years 1 to 9999)") from None


def check_query(q: HistoryQuery) -> HistoryQuery:
    """The query with its task ID lowercased; ValueError naming a bad field."""
    if q.task_id is not None and not _GUID.match(q.task_id.strip().lower()):
        raise ValueError(f"taskId: {shown(q.task_id)} is not a task GUID")
    if not 1 <= q.limit <= MAX_LIMIT:
        raise ValueError(f"limit: must be 1..{MAX_LIMIT}, got {q.limit}")
    if q.request_id is not None and not q.request_id:
        raise ValueError("requestId: must not be empty")
    if q.request_id is not None and len(q.request_id) > MAX_REQUEST_ID_LENGTH:  # no request can have one
        raise ValueError(f"requestId: longer than {MAX_REQUEST_ID_LENGTH} characters")
    problem = storable_problem(q.request_id) if q.request_id is not None else None
    if problem is not None:  # the journal holds no such value: asking for it is a bad query
        raise ValueError(f"requestId: {problem}")
    if q.caller is not None and not CALLER_NAME.fullmatch(q.caller):
        raise ValueError(f"caller: {q.caller[:70]!r} is not a caller name (1 to 64 of a-z, 0-9, '_' and '-')")
    task = q.task_id.strip().lower() if q.task_id is not None else None
    return HistoryQuery(q.since, q.request_id, task, q.limit, q.caller)


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> `2024-05-01T10:30:00.123Z`."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---------------------------------------------------------------------------- reading

_COLUMNS = "key, state, ingress, source, request, created, updated, duplicates, last_duplicate, {caller}"
#: The first schema version that records the caller (older journals: every request anonymous).
CALLER_SCHEMA = 4


def read_history(db: Cursor, q: HistoryQuery, retention_s: float, now: float | None = None,
                 *, with_caller: bool = True) -> list[dict[str, Any]]:
    """The records matching `q` within the retention window, oldest first. `with_caller`: the
    journal has the caller column (schema CALLER_SCHEMA)."""
    q = check_query(q)
    cutoff = (time.time() if now is None else now) - retention_s
    where = ["created >= ?"]
    args: list[Any] = [max(cutoff, q.since) if q.since is not None else cutoff]
    if q.request_id is not None:
        # The anonymous caller's key, or a caller's (keys.for_caller: the same requestId from
        # two callers is two requests, both shown); a start or a stop (stops.py: its own key space).
        rid = keys.for_request_id(q.request_id)
        if with_caller:
            where.append("(key IN (?, ?) OR (caller IS NOT NULL AND key = 'caller:' || caller || ':' || ?))")
            args += [rid, "stop:" + rid, rid]
        else:
            where.append("key IN (?, ?)")
            args += [rid, "stop:" + rid]
    if q.caller is not None:
        if not with_caller:
            return []  # written before callers: every request was the anonymous caller's
        where.append("caller = ?")
        args.append(q.caller)
    if q.task_id is not None:
        # The task's own events (started, denied, ...), or a request naming it (not found).
        where.append("(key IN (SELECT key FROM events WHERE kind = 'reply' AND task_id = ?) OR request LIKE ?)")
        args += [q.task_id, f'%"{q.task_id}"%']
    rows = db.run(
        f"SELECT {_COLUMNS.format(caller='caller' if with_caller else 'NULL')} FROM requests WHERE {' AND '.join(where)} ORDER BY created DESC, key LIMIT ?",
        (*args, q.limit),
    )
    replies = _replies(db, [str(r[0]) for r in rows])
    return [build_record(row, replies.get(str(row[0]), [])) for row in reversed(rows)]


def _replies(db: Cursor, keys_: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(keys_), _CHUNK):
        chunk = keys_[i : i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        for key, body in db.run(
            f"SELECT key, body FROM events WHERE kind = 'reply' AND key IN ({marks}) ORDER BY id", chunk
        ):
            try:
                out.setdefault(str(key), []).append(json.loads(body))
            except ValueError:
                continue  # not ours to judge here: the journal itself never writes such a row
    return out


# ---------------------------------------------------------------------------- records (pure)


def build_record(row: Sequence[Any], replies: Sequence[Event]) -> dict[str, Any]:
    """One history record from a `requests` row and its reply events (in journal order)."""
    key, state, ingress, source, request_text, created, updated, duplicates, last_duplicate, *rest = row
    caller = rest[0] if rest else None
    request: dict[str, Any] | None = json.loads(request_text) if request_text else None
    tasks = _tasks(replies)
    finished = next((ev for ev in reversed(replies) if ev.get("event") == "requestFinished"), None)
    error = next((ev for ev in replies if ev.get("event") == "error"), None)
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return {
        "requestId": request.get("requestId") if request else _request_id(str(key)),
        "key": key,
        "received": iso(created),
        "updated": iso(updated),
        "ingress": ingress,
        "source": source or None,
        "caller": caller,
        "state": _state(str(state), request, finished, tasks),
        "criteria": _criteria(request),
        "request": request,
        "tasks": tasks,
        "counts": counts,
        "notFound": [nf for ev in replies if ev.get("event") == "summary" for nf in ev.get("tasksNotFound", [])],
        "finished": finished.get("finished") if finished else None,
        "stoppedAtStage": finished.get("stoppedAtStage") if finished else None,
        "durationMs": finished.get("durationMs") if finished else None,
        "error": {"error": error.get("error"), "details": error.get("details")} if error else None,
        "duplicates": int(duplicates or 0),
        "lastDuplicate": iso(last_duplicate),
    }


def _request_id(key: str) -> str | None:
    key = key.removeprefix("stop:")
    if key.startswith("caller:"):  # keys.for_caller: caller:<name>:<key>
        key = key.split(":", 2)[2] if key.count(":") >= 2 else key
    return key[3:] if key.startswith("id:") else None


def _criteria(request: dict[str, Any] | None) -> dict[str, Any] | None:
    if request is None:
        return None
    return {k: request[k] for k in ("taskId", "tag", "customProperty", "appId", "space") if request.get(k)}


def _state(state: str, request: dict[str, Any] | None, finished: Any, tasks: list[dict[str, Any]]) -> str:
    """handling / answered / following / finished (see the module docstring)."""
    if finished is not None:
        return "finished"
    if state != "done":
        return "handling"
    if request is not None:
        waits = bool(request.get("wait")) or request.get("then") is not None
    else:  # recorded before the journal kept requests: judge by what was followed
        waits = any("finalStatus" in t for t in tasks)
    return "following" if waits else "answered"


def _tasks(replies: Sequence[Event]) -> list[dict[str, Any]]:
    """One entry per task and stage: its last `task` status, its final state, overdue."""
    by: dict[tuple[str, Any], dict[str, Any]] = {}
    for ev in replies:
        kind, task_id = ev.get("event"), ev.get("taskId")
        if kind not in ("task", "taskFinished", "taskOverdue") or not isinstance(task_id, str):
            continue
        t = by.setdefault((task_id, ev.get("stage")), {"taskId": task_id, "taskName": ev.get("taskName"), "status": None})
        if ev.get("stage") is not None:
            t["stage"] = ev["stage"]
        if kind == "task":
            t["status"] = ev.get("status")
            for field in ("executionId", "reason", "matchedBy", "position"):
                if field in ev:
                    t[field] = ev[field]
        elif kind == "taskFinished":
            t["taskName"] = t["taskName"] or ev.get("taskName")
            t["executionId"] = ev.get("executionId", t.get("executionId"))
            t["finalStatus"] = ev.get("status")
            for field in ("startTime", "stopTime", "durationMs", "attempt"):
                if ev.get(field) is not None:
                    t[field] = ev[field]
            if "retryIn" in ev:
                t["retryIn"] = ev["retryIn"]
            else:
                t.pop("retryIn", None)
            if ev.get("reason") is not None:
                t["finalReason"] = ev["reason"]
            if isinstance(ev.get("failure"), dict):  # contract section 8: why, with the log's tail
                t["failure"] = ev["failure"]
            else:
                t.pop("failure", None)
        else:
            t["overdue"] = True
    for t in by.values():
        t["status"] = t["status"] or "started"  # followed only (attached before its task event was kept)
    return list(by.values())


# ---------------------------------------------------------------------------- the CLI's reader


class HistoryReader:
    """Reads the history of an existing journal without writing, migrating or creating it."""

    def __init__(self, db: Sqlite | Postgres, retention_hours: float) -> None:
        self._db = db
        self.retention = retention_hours * 3600
        self._errors = db_errors()
        self.with_caller = True

    @classmethod
    def open(cls, state_dir: Path, url: str | None, retention_hours: float) -> HistoryReader:
        """The journal the daemon with this config uses. JournalError when there is none yet,
        or when its schema is older than the history needs (the daemon upgrades it at start)."""
        where = redact_url(url) if url else str(state_dir / "journal.sqlite3")  # never a password or token
        try:
            if url is None or url.startswith("sqlite:///"):
                path = state_dir / "journal.sqlite3" if url is None else Path(url[len("sqlite:///") :])
                if not path.is_file():
                    raise JournalError(f"no journal at {path}: the daemon has not run with this state_dir / journal.url")
                db: Sqlite | Postgres = Sqlite(path)
            else:
                db = Postgres(url)
            reader = cls(db, retention_hours)
            version = reader._version()
            reader.with_caller = version >= CALLER_SCHEMA
        except JournalError:
            raise
        except db_errors() as exc:
            raise JournalError(f"cannot read the journal at {where}: {exc}") from None
        if version < HISTORY_SCHEMA:
            db.close()
            raise JournalError(
                f"the journal at {where} has schema version {version}; the history needs {HISTORY_SCHEMA}:"
                " restart the daemon of this version once (it upgrades the journal at start)"
            )
        return reader

    def _version(self) -> int:
        try:
            return int(self._db.run("SELECT max(version) FROM schema_version")[0][0] or 0)
        except self._errors:
            return 0  # no schema_version table: not a journal this code wrote

    def history(self, q: HistoryQuery) -> list[dict[str, Any]]:
        try:
            return read_history(self._db, q, self.retention, with_caller=self.with_caller)
        except data_errors() as exc:
            raise unstorable(exc) from None
        except self._errors as exc:
            raise JournalError(f"journal read failed: {exc}") from None

    def close(self) -> None:
        self._db.close()
