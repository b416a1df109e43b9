"""Every reply (and status and alert message) the tests receive is checked against the AsyncAPI
document.

The reply collectors (support/mqtt.Inbox, also behind conftest's `listen`, the `requester`,
support/streams.Replies, ...) hand each received payload to `observe`. It runs in paho's
network thread (or the test webhook's thread, support/webhook.py), where an exception would only
kill the client, so a mismatch is recorded; the
autouse fixture `guard` (tests/conftest.py) fails the test with every recorded mismatch. The
schemas are those of the document the daemon serves (butler_mqtt.asyncapi.build_document),
the same that is shipped as docs/asyncapi.yaml.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT7

from butler_mqtt.asyncapi import build_document
from butler_mqtt.replies import REPLY_EVENTS, STOP_SUMMARY

DOC_URI = "urn:butler-mqtt:asyncapi"
STATUS_SCHEMA = "StatusMessage"
ALERT_SCHEMA = "AlertMessage"

_lock = threading.Lock()
_problems: list[str] = []


def _no_network(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)  # every reference must resolve inside the document


def registry(doc: dict[str, Any]) -> Registry[Any]:
    """A registry holding `doc` (JSON-clean) under DOC_URI, and nothing fetched from anywhere."""
    resource = Resource.from_contents(doc, default_specification=DRAFT7)
    return Registry(retrieve=_no_network).with_resource(DOC_URI, resource)


@functools.cache
def validators() -> dict[str, Draft7Validator]:
    """A validator per reply event name (and STATUS_SCHEMA, ALERT_SCHEMA), from the document's components."""
    doc = json.loads(json.dumps(build_document()))
    reg = registry(doc)
    names: dict[str, list[str]] = {spec.name: [spec.schema.__name__] for spec in REPLY_EVENTS}
    names[STOP_SUMMARY.name].append(STOP_SUMMARY.schema.__name__)  # a stop request's summary (section 8)
    names[STATUS_SCHEMA] = [STATUS_SCHEMA]
    names[ALERT_SCHEMA] = [ALERT_SCHEMA]
    return {
        key: Draft7Validator({"anyOf": [{"$ref": f"{DOC_URI}#/components/schemas/{s}"} for s in schemas]}
                             if len(schemas) > 1 else {"$ref": f"{DOC_URI}#/components/schemas/{schemas[0]}"},
                             registry=reg)
        for key, schemas in names.items()
    }


def problem(payload: Any) -> str | None:
    """Why `payload` (a decoded message) is not what the document says; None when it is, or
    when it is no message of the daemon's at all (not an object, neither reply, status nor alert)."""
    if not isinstance(payload, dict):
        return None
    if "event" in payload:
        key = payload["event"]
        if not isinstance(key, str) or key in (STATUS_SCHEMA, ALERT_SCHEMA) or key not in validators():
            return f"event {key!r} is not in the AsyncAPI document: {_short(payload)}"
    elif "alert" in payload:
        key = ALERT_SCHEMA
    elif "status" in payload and "clientId" in payload:
        key = STATUS_SCHEMA
    else:
        return None
    error = best_match(validators()[key].iter_errors(payload))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{key} at {where}: {error.message[:300]}; message: {_short(payload)}"


def _short(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False)
    return text if len(text) <= 600 else text[:600] + "..."


def observe(payload: bytes | Any) -> None:
    """Check one received message (raw bytes or decoded JSON); a mismatch is recorded."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError):
            return
    found = problem(payload)
    if found is not None:
        with _lock:
            _problems.append(found)


def _observing_requester(original: Any) -> Any:
    def on_message(self: Any, client: Any, userdata: Any, msg: Any) -> None:
        observe(msg.payload)
        original(self, client, userdata, msg)

    return on_message


def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Around one test: every in-process Requester observes what it receives; afterwards, fail
    when any observed message did not match the document."""
    from butler_mqtt.mqtt.requester import Requester

    monkeypatch.setattr(Requester, "_on_message", _observing_requester(Requester._on_message))
    with _lock:
        _problems.clear()
    yield
    with _lock:
        found, _problems[:] = list(_problems), []
    if found:
        pytest.fail(
            f"{len(found)} received message(s) do not match the AsyncAPI document (butler_mqtt/replies/types.py, "
            "docs/asyncapi.yaml):\n  " + "\n  ".join(found[:10]),
            pytrace=False,
        )
