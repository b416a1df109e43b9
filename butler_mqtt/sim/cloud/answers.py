"""The JSON shapes the Qlik Cloud simulator answers with.

Every shape follows a schema of Qlik's published OpenAPI documents (tests/data/cloud-schemas,
generated from the specs at withdave/qc-specs@807fb1f); tests validate the answers against them,
with no field the schema does not name.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .world import END, TENANT_ID, USER_ID, SimApp, SimReload, SimSpace, SimTag, World

EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: creation time of every object of the tenant


def iso(at: float | None) -> str:
    """``2026-01-01T00:00:00.000Z``."""
    stamp = dt.datetime.fromtimestamp(at if at is not None else EPOCH, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def errors(code: str, title: str, detail: str = "") -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "title": title}
    if detail:
        error["detail"] = detail
    return {"errors": [error]}


def item(base: str, world: World, app: SimApp) -> dict[str, Any]:
    tags = [{"id": t, "name": world.tags[t].name} for t in app.tag_ids if t in world.tags]
    out: dict[str, Any] = {
        "id": app.item_id,
        "name": app.name,
        "tenantId": TENANT_ID,
        "createdAt": iso(EPOCH),
        "updatedAt": iso(EPOCH),
        "isFavorited": False,
        "links": {"self": {"href": f"{base}/api/v1/items/{app.item_id}"}},
        "resourceType": "app",
        "resourceId": app.id,
        "resourceCreatedAt": iso(EPOCH),
        "resourceUpdatedAt": iso(EPOCH),
        "actions": [],
        "collectionIds": list(app.tag_ids),
        "resourceAttributes": {"id": app.id, "name": app.name, "usage": "ANALYTICS"},
        "resourceCustomAttributes": {},
        "meta": {"isFavorited": False, "actions": [], "tags": tags, "collections": []},
        "ownerId": USER_ID,
    }
    if app.space_id is not None:
        out["spaceId"] = app.space_id
        out["resourceAttributes"]["spaceId"] = app.space_id
    return out


def space(base: str, s: SimSpace) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "type": s.type,
        "tenantId": TENANT_ID,
        "ownerId": USER_ID,
        "createdBy": USER_ID,
        "createdAt": iso(EPOCH),
        "updatedAt": iso(EPOCH),
        "description": "",
        "meta": {"actions": ["read"], "roles": [], "assignableRoles": []},
        "links": {
            "self": {"href": f"{base}/api/v1/spaces/{s.id}"},
            "assignments": {"href": f"{base}/api/v1/spaces/{s.id}/assignments"},
        },
    }


def collection(base: str, tag: SimTag, item_count: int) -> dict[str, Any]:
    return {
        "id": tag.id,
        "name": tag.name,
        "type": "public",
        "tenantId": TENANT_ID,
        "createdAt": iso(EPOCH),
        "updatedAt": iso(EPOCH),
        "itemCount": item_count,
        "links": {
            "self": {"href": f"{base}/api/v1/collections/{tag.id}"},
            "items": {"href": f"{base}/api/v1/collections/{tag.id}/items"},
        },
    }


def nx_app(app: SimApp, last_reload: float | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "id": app.id,
        "name": app.name,
        "description": "",
        "ownerId": USER_ID,
        "owner": USER_ID,
        "createdDate": iso(EPOCH),
        "modifiedDate": iso(EPOCH),
        "published": False,
        "usage": "ANALYTICS",
        "hasSectionAccess": False,
        "isDirectQueryMode": False,
        "encrypted": True,
        "thumbnail": "",
        "dynamicColor": "",
        "originAppId": "",
        "custom": {},
    }
    if last_reload is not None:
        attributes["lastReloadTime"] = iso(last_reload)
    return {"attributes": attributes, "privileges": ["read", "update", "reload"], "create": []}


def reload(base: str, world: World, r: SimReload, *, with_log: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id,
        "appId": r.app_id,
        "tenantId": TENANT_ID,
        "userId": USER_ID,
        "type": r.type,
        "status": r.status,
        "partial": r.partial,
        "weight": r.weight,
        "creationTime": iso(r.created),
        "links": {"self": {"href": f"{base}/api/v1/reloads/{r.id}"}},
    }
    if r.started is not None:
        out["startTime"] = iso(r.started)
    if r.ended is not None:
        out["endTime"] = iso(r.ended)
    if r.status == "SUCCEEDED" and r.ended is not None:
        out["engineTime"] = iso(r.ended)
    if r.status in ("FAILED", "EXCEEDED_LIMIT"):
        app = world.app(r.app_id)
        out["errorCode"] = "EngineReloadError" if r.status == "FAILED" else "ReloadLimitExceeded"
        out["errorMessage"] = app.error_message if app is not None else "app deleted"
    if with_log and r.status in END:
        out["log"] = world.log_of(r)
    return out
