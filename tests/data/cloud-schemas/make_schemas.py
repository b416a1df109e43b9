"""Regenerate the JSON Schemas in this directory from Qlik's published OpenAPI documents.

Source: the OpenAPI files Qlik publishes on qlik.dev ("Download specification" on each REST API
page), read from the nightly mirror GitHub ``withdave/qc-specs`` at commit
``807fb1f03d8140cc85c6f29d139aaf41f60391f0`` (2026-07-24), paths ``specs/<api>.json`` (their
``info.version`` is empty, so the commit is the version). Only the structure is kept (types,
required fields, enums, formats, lengths); descriptions and examples are dropped. OpenAPI 3.0
``nullable`` becomes a ``"null"`` type; objects that list their properties and do not say
otherwise get ``unevaluatedProperties: false`` so that a field the simulator invents (or
misspells) fails validation: the simulator cannot drift from Qlik's shapes.

Usage: python make_schemas.py /path/to/qc-specs/specs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SOURCE = "github.com/withdave/qc-specs@807fb1f03d8140cc85c6f29d139aaf41f60391f0"
WANTED = {
    "oauth": ["oauth-token-response", "oauth-client-credentials-request", "Errors"],
    "items": ["ItemsListItemsResponseBody", "itemResultResponseBody", "ErrorResponseBody"],
    "collections": ["CollectionsListCollectionsResponseBody", "collectionResultResponseBody"],
    "spaces": ["Spaces", "Space", "Errors"],
    "apps": ["NxApp", "ScriptLogList"],
    "reloads": ["Reload", "Reloads", "ReloadRequest", "ReloadStatus", "Errors"],
}
_DROP = {"description", "example", "examples", "title", "readOnly", "writeOnly", "deprecated", "xml", "externalDocs", "discriminator"}


def _all_of_members(schemas: dict[str, Any]) -> set[str]:
    """Schemas used as `allOf` members: their strictness goes on the `allOf` node instead
    (`unevaluatedProperties` sees through `allOf` only from outside)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for member in node.get("allOf", []):
                _refs({"x": member} if "$ref" in member else {}, found)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schemas)
    return found


def _loosen(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    node.pop("unevaluatedProperties", None)
    return node


def _clean(node: Any) -> Any:
    if isinstance(node, list):
        return [_clean(n) for n in node]
    if not isinstance(node, dict):
        return node
    one_of = node.get("oneOf")
    if isinstance(one_of, list) and one_of and all(isinstance(o, dict) and "x-qlik-const" in o for o in one_of):
        # Qlik's way of writing a named enum (each entry only a title and a constant).
        node = {k: v for k, v in node.items() if k != "oneOf"} | {"enum": [o["title"] for o in one_of]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-") or key == "nullable":
            continue
        if key == "$ref":
            out[key] = value.replace("#/components/schemas/", "#/$defs/")
        elif key in ("properties", "patternProperties"):
            out[key] = {k: _clean(v) for k, v in value.items()}
        else:
            out[key] = _clean(value)
    if node.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "allOf" in out:
        out["allOf"] = [_loosen(m) for m in out["allOf"]]
        out["unevaluatedProperties"] = False
    elif "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["unevaluatedProperties"] = False
    return out


#: Fields Qlik documents outside the tenant OpenAPI file, added with their source.
EXTENSIONS = {
    ("oauth", "oauth-token-response"): {
        "expires_in": {
            "type": "integer",
            "$comment": "not in specs/oauth.json; shown on the same kind of endpoint in "
            "qlik.dev/apis/org-rest/get-started (qlik-cloud-api.md 1.3)",
        }
    },
}


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _closure(schemas: dict[str, Any], root: str) -> list[str]:
    todo, seen = [root], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(sorted(found))
    return sorted(seen)


def main(specs: Path, out: Path) -> None:
    for api, names in WANTED.items():
        doc = json.loads((specs / f"{api}.json").read_text())
        schemas = doc["components"]["schemas"]
        for name in names:
            schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$comment": f"Structure of '{name}' from Qlik's published OpenAPI document '{api}' "
                f"(openapi {doc['openapi']}, info.version {doc['info'].get('version')!r}), "
                f"read at {SOURCE} specs/{api}.json; generated by make_schemas.py",
                "$ref": f"#/$defs/{name}",
                "$defs": {n: _clean(schemas[n]) for n in _closure(schemas, name)},
            }
            for member in _all_of_members(schemas):
                if member in schema["$defs"]:
                    schema["$defs"][member] = _loosen(schema["$defs"][member])
            for (ext_api, ext_name), fields in EXTENSIONS.items():
                if ext_api == api and ext_name in schema["$defs"]:
                    schema["$defs"][ext_name]["properties"].update(fields)
            (out / f"{api}.{name}.schema.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)
