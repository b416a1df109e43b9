"""A cloud request's selectors -> the apps to reload, with what matched each (contract 9 / 3).

`resolve` is the union of `appId`, `tag` and `space` (each app once, in that order of
criteria), with `matched_by` as `appId:…`, `tag:…`, `space:…` and `not_found` as
`{"appId": …}`, `{"tag": …}`, `{"space": …}` for every criterion that matched no app (an
unknown tag or space, or one without apps). `allowed` judges the allow-list (`allow.app_ids`,
`allow.tags`, `allow.spaces`) on the app itself, additively like the QRS allow-list: an app may
start when its id is listed, or it carries a listed tag, or it lies in a listed space. The
`allTaskIdsMustExist` rule and `dryRun` stay with the planner (selection.plan's rules: an app
selected only by `appId:` is held back when an `appId` was not found).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .client import CloudClient
from .selection import CloudApp, apps_by_ids, apps_by_space, apps_by_tag, space_names


@dataclass
class CloudSelected:
    app: CloudApp
    matched_by: list[str] = field(default_factory=list)
    space_name: str | None = None  # filled when known (a `space` criterion, or with_space_names)


@dataclass
class CloudSelection:
    selected: list[CloudSelected]
    not_found: list[dict[str, str]]

    @property
    def app_ids(self) -> list[str]:
        return [s.app.app_id for s in self.selected]


def resolve(
    client: CloudClient,
    app_ids: Sequence[str] = (),
    tags: Sequence[str] = (),
    spaces: Sequence[str] = (),
    *,
    with_space_names: bool = False,
) -> CloudSelection:
    """The union of the criteria (see the module docstring). `with_space_names`: look up the
    space name of every selected app (for `allow.spaces`)."""
    chosen: dict[str, CloudSelected] = {}
    not_found: list[dict[str, str]] = []

    def add(apps: Iterable[CloudApp], why: str, space: str | None = None) -> None:
        for app in apps:
            entry = chosen.setdefault(app.app_id, CloudSelected(app))
            if why not in entry.matched_by:
                entry.matched_by.append(why)
            if space is not None:
                entry.space_name = space

    if app_ids:
        found, missing = apps_by_ids(client, app_ids)
        for app_id in dict.fromkeys(i.lower() for i in app_ids):
            if app_id in found:
                add([found[app_id]], f"appId:{app_id}")
        not_found += [{"appId": m} for m in missing]
    for kind, names, lookup in (("tag", tags, apps_by_tag), ("space", spaces, apps_by_space)):
        for name in dict.fromkeys(names):
            apps = lookup(client, name)
            if not apps:
                not_found.append({kind: name})
                continue
            add(apps, f"{kind}:{name}", name if kind == "space" else None)
    selection = CloudSelection(list(chosen.values()), not_found)
    if with_space_names:
        unknown = sorted({s.app.space_id for s in selection.selected if s.space_name is None and s.app.space_id})
        by_id = space_names(client, unknown)
        for s in selection.selected:
            if s.space_name is None and s.app.space_id is not None and s.app.space_id in by_id:
                s.space_name = by_id[s.app.space_id]
    return selection


def allowed(selected: CloudSelected, app_ids: Iterable[str], tags: Iterable[str], spaces: Iterable[str]) -> bool:
    """The allow-list, judged on the app's own id, tags and space (names compared exactly)."""
    app = selected.app
    if app.app_id in {a.lower() for a in app_ids}:
        return True
    if set(tags) & set(app.tag_names):
        return True
    return selected.space_name is not None and selected.space_name in set(spaces)
