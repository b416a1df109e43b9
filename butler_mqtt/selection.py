"""Pure selection logic: criteria + the tasks QRS returned -> what to start, what not, and why.

Nothing here does I/O. QRS's answer is treated as a superset: every task is re-checked
against the criteria here, so a custom-property filter that QRS matched clause by clause
(name on one property, value on another) cannot start a task the request did not name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from butler_mqtt.config import AllowList
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import Match, QrsTask, StartRequest, TaskOutcome


def _eq(a: str, b: str) -> bool:
    # QRS compares strings case-insensitively (qrs-api.md 4.1); do the same.
    return a.casefold() == b.casefold()


def _same(task: QrsTask) -> Any:
    """The name comparison of the task's backend: Qlik Cloud's names are exact (a look-alike,
    another case or "ß" against "ss" is another tag or space); QRS's are case-insensitive."""
    return str.__eq__ if task.exact_names else _eq


@dataclass
class Selected:
    task: QrsTask
    matched_by: list[Match] = field(default_factory=list)


@dataclass
class Selection:
    """The union of all criteria of one stage: each task once, with what matched it."""

    selected: list[Selected]
    not_found: list[dict[str, Any]]

    @property
    def task_ids(self) -> list[str]:
        return [s.task.id for s in self.selected]


def matched_by(task: QrsTask, req: StartRequest) -> list[Match]:
    """Every criterion of `req` that `task` satisfies."""
    eq = _same(task)
    out = [Match("taskId", t) for t in req.taskId if t == task.id]
    out += [Match("appId", a) for a in req.appId if a == task.app_id]
    out += [Match("tag", tag) for tag in req.tag if any(eq(tag, t) for t in task.tags)]
    out += [Match("space", sp) for sp in req.space if task.space is not None and sp == task.space]
    out += [
        Match("customProperty", c.value, c.name)
        for c in req.customProperty
        if any(_eq(c.name, n) and _eq(c.value, v) for n, v in task.custom_properties)
    ]
    return list(dict.fromkeys(out))


def select(req: StartRequest, tasks: Iterable[QrsTask]) -> Selection:
    """Union of criteria over the tasks QRS returned; criteria nothing matched are listed."""
    chosen: dict[str, Selected] = {}
    for task in tasks:
        if task.id in chosen:
            continue  # chunked queries may return a task twice
        why = matched_by(task, req)
        if why:
            chosen[task.id] = Selected(task, why)
    hits = {m for s in chosen.values() for m in s.matched_by}
    not_found: list[dict[str, Any]] = []
    for t in dict.fromkeys(req.taskId):
        if Match("taskId", t) not in hits:
            not_found.append({"taskId": t})
    for a in dict.fromkeys(req.appId):
        if Match("appId", a) not in hits:
            not_found.append({"appId": a})
    for tag in dict.fromkeys(req.tag):
        if Match("tag", tag) not in hits:
            not_found.append({"tag": tag})
    for c in dict.fromkeys(req.customProperty):
        if Match("customProperty", c.value, c.name) not in hits:
            not_found.append({"customProperty": {"name": c.name, "value": c.value}})
    for sp in dict.fromkeys(req.space):
        if Match("space", sp) not in hits:
            not_found.append({"space": sp})
    return Selection(list(chosen.values()), not_found)


def allowed(task: QrsTask, allow: AllowList) -> bool:
    """The allow-list is judged on the task's own ID, tags and custom properties.

    Lists are additive: a task may start when its ID is listed, or it carries a listed tag,
    or a listed custom-property pair, whatever criterion selected it.
    """
    eq = _same(task)
    if task.id in allow.task_ids or (task.app_id is not None and task.app_id in allow.app_ids):
        return True
    if any(eq(a, t) for a in allow.tags for t in task.tags):
        return True
    if task.space is not None and task.space in allow.spaces:
        return True
    return any(_eq(a.name, n) and _eq(a.value, v) for a in allow.custom_properties for n, v in task.custom_properties)


def plan(selection: Selection, req: StartRequest, allow: AllowList | None) -> list[TaskOutcome]:
    """Decide per selected task: start it (status `started` pending QRS), deny it, or dry-run.

    Returned outcomes with status `started` are *candidates*: the service replaces the status
    with what QRS answered.
    """
    missing_ids = [nf.get("taskId") or nf["appId"] for nf in selection.not_found if "taskId" in nf or "appId" in nf]
    block_ids = req.allTaskIdsMustExist and bool(missing_ids)
    out: list[TaskOutcome] = []
    for s in selection.selected:
        o = TaskOutcome(s.task.id, s.task.name, "started", list(s.matched_by), partial=bool(req.partial),
                        variables=dict(req.variables) if req.variables else None)
        only_by_id = all(m.kind in ("taskId", "appId") for m in s.matched_by)
        if block_ids and only_by_id:
            o.status, o.reason = "denied", "allTaskIdsMustExist: task ID(s) not found: " + ", ".join(missing_ids)
        elif allow is not None and not allowed(s.task, allow):
            o.status, o.reason = "denied", "not on the start_filter allow-list"
        elif req.dryRun:
            o.status = "wouldStart"
        out.append(o)
    return out


def check_for_backend(req: StartRequest, backend: str) -> None:
    """The selectors and options the configured backend understands (contract section 9), for
    every stage of the chain; RequestRejected naming what to use instead. Nothing is claimed or
    started before this passes."""
    stage: StartRequest | None = req
    while stage is not None:
        if backend == "cloud":
            if stage.taskId:
                raise RequestRejected(
                    "Invalid request", "'taskId' is not supported with backend: cloud; Qlik Cloud apps are addressed by 'appId', 'tag' or 'space'"
                )
            if stage.customProperty:
                raise RequestRejected(
                    "Invalid request", "'customProperty' is not supported with backend: cloud (Qlik Cloud has no custom properties); use 'tag', 'space' or 'appId'"
                )
        else:
            if stage.space:
                raise RequestRejected(
                    "Invalid request", "'space' needs backend: cloud; on client-managed Qlik Sense select by 'appId', 'tag', 'taskId' or 'customProperty'"
                )
            for name in ("partial", "variables"):
                if getattr(stage, name) is not None:
                    raise RequestRejected("Invalid request", f"'{name}' is a Qlik Cloud reload option and needs backend: cloud")
        stage = stage.then
