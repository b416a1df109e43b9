"""Resolving the cloud selectors to apps (contract section 9, facts: qlik-cloud-api.md 2).

An app has two ids: its **app id** (a GUID: the item's `resourceId`, what `POST /api/v1/reloads`
takes) and its **item id** (the entry in the items collection). Only app ids leave this module.

* `apps_by_ids`: `GET /api/v1/items?resourceType=app&resourceIds=…` (100 per call).
* `apps_by_tag`: tags are collections of type `public`: `GET /api/v1/collections?type=public&name=…`,
  keep the EXACT name (case and every code point: a Cyrillic look-alike is another tag), then
  the items of that collection (`collectionId=`), each checked to carry the tag id.
* `apps_by_space`: `GET /api/v1/spaces?name=…` is a case-insensitive substring search: keep the
  EXACT name, then the items of that space (`spaceId=`), each checked to be in it.

Names go into the query percent-encoded (`&`, `#`, `%`, `+`, quotes, unicode). Items the tenant
answers that do not match what was asked are dropped, so nothing outside the selection is ever
returned even if a filter is ignored. Listings page through `CloudClient.pages` (loop- and
size-bounded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from butler_mqtt.errors import CloudNotFound

from .client import CloudClient, query

_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_IDS_PER_CALL = 100


@dataclass(frozen=True)
class CloudApp:
    """An app of the tenant. `app_id` is the GUID to reload; `item_id` is NOT an app id."""

    app_id: str
    name: str
    space_id: str | None
    item_id: str
    tag_ids: tuple[str, ...] = ()
    tag_names: tuple[str, ...] = ()  # from the item's meta.tags (what the hub shows)


def app_from_item(item: dict[str, Any]) -> CloudApp | None:
    """The app of an items-API row, or None when the row is not an app with a GUID app id."""
    if item.get("resourceType") != "app":
        return None
    raw = item.get("resourceAttributes")
    attributes: dict[str, Any] = raw if isinstance(raw, dict) else {}
    app_id = item.get("resourceId") or attributes.get("id")
    if not isinstance(app_id, str) or not _GUID.fullmatch(app_id):
        return None
    name = item.get("name") if isinstance(item.get("name"), str) else attributes.get("name")
    space = item.get("spaceId")
    tags = item.get("collectionIds")
    meta = item.get("meta") if isinstance(item.get("meta"), dict) else {}
    meta_tags = meta.get("tags") if isinstance(meta, dict) else None
    tag_names = tuple(
        t["name"] for t in (meta_tags if isinstance(meta_tags, list) else [])
        if isinstance(t, dict) and isinstance(t.get("name"), str)
    )
    return CloudApp(
        app_id=app_id.lower(),
        name=name if isinstance(name, str) else "",
        space_id=space if isinstance(space, str) and space else None,
        item_id=str(item.get("id", "")),
        tag_ids=tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
        tag_names=tag_names,
    )


def _apps(client: CloudClient, target: str) -> Iterable[CloudApp]:
    for page in client.pages(target):
        for item in page:
            app = app_from_item(item)
            if app is not None:
                yield app


def apps_by_ids(client: CloudClient, app_ids: Sequence[str]) -> tuple[dict[str, CloudApp], list[str]]:
    """(`{app id: app}` of those found, the ids not found, in the order asked). Ids that are
    not GUIDs are not found without asking the tenant."""
    wanted = list(dict.fromkeys(i.lower() for i in app_ids))
    valid = [i for i in wanted if _GUID.fullmatch(i)]
    found: dict[str, CloudApp] = {}
    for start in range(0, len(valid), _IDS_PER_CALL):
        chunk = valid[start:start + _IDS_PER_CALL]
        target = "/api/v1/items" + query(
            resourceType="app", resourceIds=",".join(chunk), limit=client.settings.page_size, noActions="true"
        )
        for app in _apps(client, target):
            if app.app_id in chunk:
                found.setdefault(app.app_id, app)
    return found, [i for i in wanted if i not in found]


def _exact(client: CloudClient, target: str, name: str, kind: str | None = None) -> str | None:
    """The id of the object named exactly `name` in a listing (collections or spaces)."""
    for page in client.pages(target):
        for row in page:
            if row.get("name") == name and (kind is None or row.get("type") == kind) and isinstance(row.get("id"), str):
                return str(row["id"])
    return None


def tag_id(client: CloudClient, name: str) -> str | None:
    """The id of the tag named exactly `name`, or None."""
    target = "/api/v1/collections" + query(type="public", name=name, limit=client.settings.page_size)
    return _exact(client, target, name, "public")


def space_id(client: CloudClient, name: str) -> str | None:
    """The id of the space named exactly `name`, or None (personal spaces have no name)."""
    target = "/api/v1/spaces" + query(name=name, limit=client.settings.page_size)
    return _exact(client, target, name)


def apps_by_tag(client: CloudClient, name: str) -> list[CloudApp] | None:
    """The apps carrying the tag named exactly `name`; None when there is no such tag."""
    tid = tag_id(client, name)
    if tid is None:
        return None
    target = "/api/v1/items" + query(
        collectionId=tid, resourceType="app", limit=client.settings.page_size, noActions="true"
    )
    return _unique(a for a in _apps(client, target) if tid in a.tag_ids)


def apps_by_space(client: CloudClient, name: str) -> list[CloudApp] | None:
    """The apps in the space named exactly `name`; None when there is no such space."""
    sid = space_id(client, name)
    if sid is None:
        return None
    target = "/api/v1/items" + query(resourceType="app", spaceId=sid, limit=client.settings.page_size, noActions="true")
    return _unique(a for a in _apps(client, target) if a.space_id == sid)


def space_names(client: CloudClient, ids: Iterable[str]) -> dict[str, str]:
    """`{space id: name}` for the given ids (`GET /api/v1/spaces/{id}` each; unknown ids left out)."""
    out: dict[str, str] = {}
    for sid in dict.fromkeys(ids):
        try:
            payload = client.json("GET", f"/api/v1/spaces/{quote(sid, safe='')}")
        except CloudNotFound:
            continue
        if isinstance(payload, dict) and isinstance(payload.get("name"), str):
            out[sid] = payload["name"]
    return out


def _unique(apps: Iterable[CloudApp]) -> list[CloudApp]:
    out: dict[str, CloudApp] = {}
    for app in apps:
        out.setdefault(app.app_id, app)
    return list(out.values())
