"""Reloads of Qlik Cloud apps: options, start, follow, cancel, status names and failure details.

* `check_options(partial, variables)` is pure and runs before anything starts: at most 20
  variables, names and values strings of 1..256 / 0..256 characters (qlik-cloud-api.md 3).
* `start_reload` is `POST /api/v1/reloads` through the pacer (`start=True`); `get_reload`,
  `active_reloads` (QUEUED, RELOADING, CANCELING: "running" in section 7's meaning, whoever
  started them), `cancel_reload` (`POST /api/v1/reloads/{id}/actions/cancel`).
* `final_status` maps Qlik Cloud's end statuses to section 4's names; `failure` builds section
  8's object from the reload's `errorMessage` and the script log, capped and cleaned by
  `butler_mqtt.backends.qrs.logtail` (the same rules as for QRS).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from butler_mqtt.backends.qrs.logtail import LINE_CHARS, MESSAGE_CHARS, TailBuffer, clean, tail_of
from butler_mqtt.errors import CloudNotFound, CloudRefused, RequestRejected

from .client import CloudClient, error_summary, query

ACTIVE = frozenset({"QUEUED", "RELOADING", "CANCELING"})
FINAL_STATUS = {
    "SUCCEEDED": "FinishedSuccess",
    "FAILED": "FinishedFail",
    "CANCELED": "Aborted",
    "EXCEEDED_LIMIT": "Error",
}
MAX_VARIABLES = 20
MAX_VARIABLE_CHARS = 256
MAX_DETAILS = 20  # lines of the reload's short `log` kept as `failure.details`
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone (a str holds no pairs): not encodable
_RELOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass(frozen=True)
class CloudReload:
    """A reload as Qlik Cloud reports it (times are Qlik's ISO strings, None when absent)."""

    id: str
    app_id: str
    status: str
    type: str | None = None
    creation_time: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    log: str | None = None

    @property
    def active(self) -> bool:
        """Still going: QUEUED, RELOADING, CANCELING, or a status this client does not know."""
        return self.status not in FINAL_STATUS

    @property
    def final_status(self) -> str | None:
        """Section 4's name (FinishedSuccess, FinishedFail, Aborted, Error), None while active."""
        return FINAL_STATUS.get(self.status)


def final_status(cloud_status: str) -> str | None:
    return FINAL_STATUS.get(cloud_status)


def check_options(partial: bool | None, variables: Mapping[str, Any] | None) -> None:
    """Reject reload options Qlik Cloud would refuse, before anything starts (RequestRejected)."""
    if partial is not None and not isinstance(partial, bool):
        raise RequestRejected("Invalid request", "'partial' must be true or false")
    if variables is None:
        return
    if not isinstance(variables, Mapping):
        raise RequestRejected("Invalid request", "'variables' must be an object of names to string values")
    if len(variables) > MAX_VARIABLES:
        raise RequestRejected("Invalid request", f"'variables': at most {MAX_VARIABLES} (got {len(variables)})")
    for name, value in variables.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_VARIABLE_CHARS:
            raise RequestRejected("Invalid request", f"'variables': names are 1 to {MAX_VARIABLE_CHARS} characters")
        if not isinstance(value, str) or len(value) > MAX_VARIABLE_CHARS:
            raise RequestRejected(
                "Invalid request", f"'variables': values are strings of at most {MAX_VARIABLE_CHARS} characters"
            )


def reload_from(payload: Any) -> CloudReload:
    """A `Reload` object of the API; CloudRefused when it is not one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or not isinstance(payload.get("status"), str):
        raise CloudRefused("Qlik Cloud answered a reload without 'id' and 'status'")
    if not _RELOAD_ID.fullmatch(payload["id"]):
        raise CloudRefused("Qlik Cloud answered a reload id that is not an id")

    def text(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) else None

    return CloudReload(
        id=payload["id"],
        app_id=str(payload.get("appId", "")),
        status=payload["status"],
        type=text("type"),
        creation_time=text("creationTime"),
        start_time=text("startTime"),
        end_time=text("endTime"),
        error_code=text("errorCode"),
        error_message=text("errorMessage"),
        log=text("log"),
    )


def start_reload(
    client: CloudClient, app_id: str, *, partial: bool = False, variables: Mapping[str, str] | None = None
) -> CloudReload:
    """`POST /api/v1/reloads`, paced. Raises CloudRateLimited (transient; `pending` when the app
    already has a queued reload), CloudNotFound, CloudRefused, CloudAuthRefused."""
    check_options(partial, variables)
    body: dict[str, Any] = {"appId": app_id, "partial": bool(partial)}
    if variables:
        body["variables"] = dict(variables)
    return reload_from(client.json("POST", "/api/v1/reloads", body=body, start=True))


def get_reload(client: CloudClient, reload_id: str) -> CloudReload:
    return reload_from(client.json("GET", f"/api/v1/reloads/{_path(reload_id)}"))


def active_reloads(client: CloudClient, app_id: str) -> list[CloudReload]:
    """The app's reloads that are QUEUED, RELOADING or CANCELING, whoever started them."""
    flt = " or ".join(f'status eq "{s}"' for s in sorted(ACTIVE))
    target = "/api/v1/reloads" + query(appId=app_id, filter=f"({flt})", limit=client.settings.page_size)
    found: list[CloudReload] = []
    for page in client.pages(target):
        found.extend(r for r in map(reload_from, page) if r.active and r.app_id == app_id)
    return found


def active_reloads_by_app(client: CloudClient) -> dict[str, list[CloudReload]]:
    """Every QUEUED/RELOADING/CANCELING reload of the tenant, by app id, in one paged listing
    (`GET /api/v1/reloads` without `appId`: allowed to tenant admins, which M2M clients are)."""
    flt = " or ".join(f'status eq "{s}"' for s in sorted(ACTIVE))
    target = "/api/v1/reloads" + query(filter=f"({flt})", limit=client.settings.page_size)
    found: dict[str, list[CloudReload]] = {}
    for page in client.pages(target):
        for reload in map(reload_from, page):
            if reload.active:
                found.setdefault(reload.app_id, []).append(reload)
    return found


def recent_reloads(client: CloudClient, app_id: str, limit: int = 20) -> list[CloudReload]:
    """The app's newest reloads (one page, newest first): after a crash between sending a start
    and reading its answer, the reload that start created is among them (type `external`,
    `creationTime` after the claim)."""
    target = "/api/v1/reloads" + query(appId=app_id, sort="-creationTime", limit=max(1, min(limit, 100)))
    payload = client.json("GET", target)
    rows = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise CloudRefused("GET /api/v1/reloads: the answer has no 'data' list")
    return [r for r in map(reload_from, rows) if r.app_id == app_id]


def started_since(client: CloudClient, app_id: str, since: float, skew: float = 120.0) -> CloudReload | None:
    """Crash resume: the newest API-started (`external`) reload of the app created at or after
    `since` (epoch seconds, when the start was claimed) less `skew` seconds of clock difference,
    or None when Qlik Cloud has none (the start never reached it: it may be sent again)."""
    for reload in recent_reloads(client, app_id, 20):
        created = _epoch(reload.creation_time)
        if reload.type in (None, "external") and created is not None and created >= since - skew:
            return reload
    return None


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        at = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)).timestamp()


CancelOutcome = Literal["canceled", "canceling", "not_running", "not_found"]


def cancel_reload(client: CloudClient, reload_id: str) -> CancelOutcome:
    """Ask Qlik Cloud to cancel: 204 `canceled`, 202 `canceling`, 409 `not_running` (it had
    ended), 404 `not_found`."""
    answer = client.call("POST", f"/api/v1/reloads/{_path(reload_id)}/actions/cancel")
    if answer.status == 204:
        return "canceled"
    if answer.status == 202:
        return "canceling"
    if answer.status == 409:
        return "not_running"
    if answer.status == 404:
        return "not_found"
    raise CloudRefused(
        f"cancelling a reload: Qlik Cloud answered {answer.status} {error_summary(answer)}".rstrip(), answer.status
    )


def script_log_tail(client: CloudClient, app_id: str, reload_id: str, lines: int) -> list[str]:
    """The last `lines` lines of the reload's script log (`GET /api/v1/apps/{appId}/reloads/logs/
    {reloadId}`), streamed through a TailBuffer: a log of any size costs a few KiB, capped and
    cleaned as section 8 says. CloudNotFound when Qlik Cloud has no log for it."""
    if lines <= 0:
        return []
    buffer = TailBuffer(lines)
    answer = client.call(
        "GET", f"/api/v1/apps/{_path(app_id)}/reloads/logs/{_path(reload_id)}", sink=buffer.feed
    )
    if answer.status == 404:
        raise CloudNotFound("the script log of this reload is not available (404)", 404)
    if answer.status != 200:
        raise CloudRefused(
            f"reading the script log: Qlik Cloud answered {answer.status} {error_summary(answer)}".rstrip(), answer.status
        )
    return buffer.close()


def failure(reload: CloudReload, log_tail: list[str] | None = None, log_error: str | None = None) -> dict[str, Any]:
    """Section 8's `failure` object for a reload that did not succeed: `message` from the
    reload's `errorMessage` (else its `errorCode`, else its status), `details` from the short
    `log` Qlik Cloud returns with the reload, `scriptLogTail` / `scriptLogError` as given.
    Capped and cleaned by qrs.logtail, the one place for failure texts."""
    message = reload.error_message or reload.error_code or f"reload ended {reload.status}"
    out: dict[str, Any] = {"message": clean(message, MESSAGE_CHARS)}
    details = tail_of(_SURROGATE.sub("\ufffd", reload.log).encode(), MAX_DETAILS) if reload.log else []
    if details:
        out["details"] = details
    if log_tail is not None:
        out["scriptLogTail"] = log_tail
    if log_error is not None:
        out["scriptLogError"] = clean(log_error, LINE_CHARS)
    return out


def _path(value: str) -> str:
    return quote(value, safe="")
