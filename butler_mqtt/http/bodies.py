"""REST bodies in, REST answers out: pure conversions between HTTP and the one pipeline.

Two body shapes reach `/v4/reloadtask/{taskId}/start` (contract section 5):

* the seed shape, a JSON object with the fields of the MQTT request (`StartRequest`), answered
  with the pipeline's `summary`;
* Butler's shape, a JSON array of `{"type", "payload"}` items, turned into one `StartRequest`
  and answered in Butler's response shape, sorted from the same pipeline's task events.

Nothing here does I/O, so the rules (path ID merge, invalid IDs, allTaskIdsMustExist) are
unit-tested without a server. The validation itself is `model.validate_request`'s: only the
parts Butler's shape needs on top of it live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from butler_mqtt import replies
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import (
    EMPTY_GUID,
    INVALID_GUID_DETAILS,
    INVALID_GUID_ERROR,
    MAX_CRITERIA,
    Match,
    StartRequest,
    is_guid,
    validate_request,
)
from butler_mqtt.replies import Event

#: The `taskId` path value meaning "every criterion is in the body" (Butler's convention).
ALL_IN_BODY = "-"

BUTLER_TYPES = ("starttaskid", "starttasktag", "starttaskcustomproperty")
#: A Butler item type that is deliberately refused (no key-value store here).
KEY_VALUE_STORE = "keyvaluestore"


# --------------------------------------------------------------------------- small inputs


def parse_flag(values: list[str]) -> bool | None:
    """`?allTaskIdsMustExist=` -> True/False, None when absent; anything else is rejected.

    Only the literal `true`/`false` are accepted (what Butler's schema coercion accepts from a
    query string); a repeated parameter is ambiguous and rejected too.
    """
    if not values:
        return None
    if len(values) > 1:
        raise RequestRejected("Invalid request", "query parameter 'allTaskIdsMustExist' given more than once")
    if values[0] == "true":
        return True
    if values[0] == "false":
        return False
    raise RequestRejected("Invalid request", "query parameter 'allTaskIdsMustExist' must be true or false")


def path_task_id(raw: str) -> str | None:
    """The path's task ID, or None for `-` (all criteria in the body). Not validated here:
    each body shape treats a malformed one its own way."""
    value = raw.strip()
    return None if value == ALL_IN_BODY else value


# --------------------------------------------------------------------------- seed shape


def with_path_task_id(data: dict[str, Any], task_id: str | None) -> dict[str, Any]:
    """The body with the path's task ID (`/v4/reloadtask/{id}/...`) put first in its `taskId`
    list; a malformed path ID is refused like a malformed body ID (`Invalid task ID format`)."""
    merged = dict(data)
    if task_id is not None:
        if not is_guid(task_id):
            raise RequestRejected(INVALID_GUID_ERROR, INVALID_GUID_DETAILS)
        body_ids = merged.get("taskId", [])
        if isinstance(body_ids, str):
            body_ids = [body_ids]
        # A wrong type is left in place so validation names it.
        if isinstance(body_ids, list):
            merged["taskId"] = [task_id, *body_ids]
    return merged


def seed_request(data: dict[str, Any], task_id: str | None, all_must_exist: bool | None) -> StartRequest:
    """A seed-shaped body plus the path's task ID and the query flag -> one StartRequest.

    A malformed path ID rejects the request exactly like a malformed body ID (the contract's
    `Invalid task ID format`); `{}` with a path ID is a complete request.
    """
    merged = with_path_task_id(data, task_id)
    if all_must_exist is not None:
        in_body = merged.get("allTaskIdsMustExist")
        if isinstance(in_body, bool) and in_body != all_must_exist:
            raise RequestRejected(
                "Invalid request", "allTaskIdsMustExist differs between the query string and the body"
            )
        if in_body is None or isinstance(in_body, bool):
            merged["allTaskIdsMustExist"] = all_must_exist
    return validate_request(merged)


def summary_response(events: Sequence[Event], backend: str = "qrs") -> dict[str, Any]:
    """The seed shape's 200 body: the first stage's `summary` event without its `event` key
    (with `backend: cloud`, apps named as such: replies.on_wire)."""
    summary = replies.summary_of(events)
    if summary is None:
        raise LookupError("the pipeline produced no summary")  # a bug, never client input
    return replies.without_event(replies.on_wire(summary, backend))


# --------------------------------------------------------------------------- Butler shape


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TaskIdPayload(_Strict):
    taskId: str = Field(description="A task GUID. A malformed one is reported in `tasksId.invalid`, as Butler does.")


class TagPayload(_Strict):
    tag: str = Field(description="A tag name; every task carrying it is started.")


class CustomPropertyPayload(_Strict):
    customPropertyName: str
    customPropertyValue: str


class StartTaskIdItem(_Strict):
    type: Literal["starttaskid"]
    payload: TaskIdPayload


class StartTaskTagItem(_Strict):
    type: Literal["starttasktag"]
    payload: TagPayload


class StartTaskCustomPropertyItem(_Strict):
    type: Literal["starttaskcustomproperty"]
    payload: CustomPropertyPayload


ButlerItem = Annotated[
    StartTaskIdItem | StartTaskTagItem | StartTaskCustomPropertyItem, Field(discriminator="type")
]


class ButlerBody(RootModel[Annotated[list[ButlerItem], Field(max_length=3 * MAX_CRITERIA)]]):
    """Butler's body: a JSON array of start items (`keyvaluestore` items are refused)."""


def _describe_butler(err: ValidationError) -> RequestRejected:
    """One sentence naming the item at fault: `item 2 (starttasktag) payload.tag: ...`."""
    errors = err.errors()
    # An unknown key is most likely a misspelt one: name it rather than the key it lacks.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(first["loc"])
    where = "body"
    if loc and isinstance(loc[0], int):
        where = f"item {loc.pop(0)}"
        if loc and isinstance(loc[0], str) and loc[0] in BUTLER_TYPES:  # the discriminator pydantic puts in the path
            where += f" ({loc.pop(0)})"
    if loc:
        where += " " + ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        return RequestRejected("Invalid request", f"{where}: unknown field")
    return RequestRejected("Invalid request", f"{where}: {first['msg']}")


@dataclass
class ButlerPlan:
    """A Butler body understood: the request for the pipeline and what never reaches it."""

    request: StartRequest | None  # None: nothing valid to resolve (only malformed IDs)
    invalid: list[str] = field(default_factory=list)  # malformed task IDs, as given
    sentinel: str | None = None  # an ID added only to make allTaskIdsMustExist bite (see below)


def butler_plan(items: list[Any], task_id: str | None, all_must_exist: bool | None) -> ButlerPlan:
    """Butler's array (+ path ID, + query flag) -> one StartRequest for the shared pipeline.

    Malformed task IDs do not reject the request (Butler answers 200 and lists them in
    `tasksId.invalid`; kept for compatibility). Everything else is validated like any request.
    """
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == KEY_VALUE_STORE:
            raise RequestRejected(
                "Not supported",
                f"item {i}: 'keyvaluestore' items are not supported: butler-mqtt has no key-value "
                "store; pass values to the reload another way (e.g. a task custom property)",
            )
    try:
        body = ButlerBody.model_validate(items).root
    except ValidationError as err:
        raise _describe_butler(err) from None
    ids: list[str] = []
    invalid: list[str] = []
    tags: list[str] = []
    cps: list[dict[str, str]] = []
    candidates = [] if task_id is None else [task_id]
    for item in body:
        if isinstance(item, StartTaskIdItem):
            candidates.append(item.payload.taskId)
        elif isinstance(item, StartTaskTagItem):
            tags.append(item.payload.tag)
        else:
            cps.append({"name": item.payload.customPropertyName, "value": item.payload.customPropertyValue})
    for candidate in candidates:
        if is_guid(candidate.strip()):
            ids.append(candidate.strip().lower())
        else:
            invalid.append(candidate)
    invalid = list(dict.fromkeys(invalid))
    if not (ids or invalid or tags or cps):
        raise RequestRejected(
            "Invalid request",
            "nothing to start: give a task ID in the path, or starttaskid, starttasktag or "
            "starttaskcustomproperty items in the body",
        )
    if not (ids or tags or cps):
        return ButlerPlan(None, invalid)
    sentinel: str | None = None
    if all_must_exist and invalid and ids and EMPTY_GUID not in ids:
        # The contract's rule: when any listed ID does not exist, no task selected by ID starts.
        # A malformed ID does not exist either, but it cannot enter a StartRequest; the nil
        # GUID, which QRS never assigns, stands in for it so the pipeline's own rule applies.
        sentinel = EMPTY_GUID
        ids.append(sentinel)
    data: dict[str, Any] = {"taskId": ids, "tag": tags, "customProperty": cps}
    if all_must_exist is not None:
        data["allTaskIdsMustExist"] = all_must_exist
    return ButlerPlan(validate_request(data), invalid, sentinel)


def butler_response(plan: ButlerPlan, events: Sequence[Event]) -> dict[str, Any]:
    """The pipeline's task events sorted into Butler's response sections.

    A task is listed under every section whose criterion selected it (it is started once).
    `started` means QRS really started it; tasks QRS did not start go to `tasksNotStarted`
    (an addition: Butler never learns this), and so do tasks the run policies did not start now
    (`alreadyRunning` with the running `executionId`, `skipped`, `queued` with its `position`:
    its later `started` goes to MQTT `topics.reply`); criteria that matched nothing go to
    `tasksNotFound`.
    """
    started: list[dict[str, Any]] = []
    denied: list[dict[str, Any]] = []
    by_tag: list[dict[str, Any]] = []
    tag_denied: list[dict[str, Any]] = []
    by_cp: list[dict[str, Any]] = []
    cp_denied: list[dict[str, Any]] = []
    not_started: list[dict[str, Any]] = []
    not_found: list[Any] = []  # criteria (replies.types.SummaryEvent tasksNotFound)
    req = plan.request
    tags = list(dict.fromkeys(req.tag)) if req else []
    cps = list(dict.fromkeys(req.customProperty)) if req else []
    summary = replies.summary_of(events)
    if summary is not None:
        not_found = [nf for nf in summary.get("tasksNotFound", []) if nf.get("taskId", "") != plan.sentinel]
    for ev in replies.first_stage_tasks(events):
        matched = replies.matched(ev)
        ref = {"taskId": ev["taskId"], "taskName": ev["taskName"]}
        by_id = any(m.kind == "taskId" for m in matched)
        its_tags = [t for t in tags if Match("tag", t) in matched]
        its_cps = [c for c in cps if Match("customProperty", c.value, c.name) in matched]
        if ev["status"] == replies.STARTED:
            if by_id:
                started.append(ref)
            if its_tags:
                by_tag.append(ref)
            if its_cps:
                by_cp.append(ref)
        elif ev["status"] == replies.DENIED:
            if by_id:
                denied.append(ref)
            tag_denied += [{"tag": t, **ref} for t in its_tags]
            cp_denied += [{"name": c.name, "value": c.value, **ref} for c in its_cps]
        else:  # notStarted, failed, and the run policies' alreadyRunning, skipped, queued
            # (wouldStart cannot occur: Butler's shape has no dryRun)
            entry: dict[str, Any] = {**ref, "status": ev["status"]}
            entry.update((k, ev[k]) for k in ("executionId", "position", "reason") if ev.get(k) is not None)
            not_started.append(entry)
    invalid = [{"taskId": t} for t in plan.invalid]
    invalid += [{"taskId": nf["taskId"]} for nf in not_found if "taskId" in nf]
    return {
        "tasksId": {"started": started, "invalid": invalid, "denied": denied},
        "tasksTag": by_tag,
        "tasksTagDenied": tag_denied,
        "tasksCP": by_cp,
        "tasksCPDenied": cp_denied,
        "tasksNotStarted": not_started,
        "tasksNotFound": not_found,
    }
