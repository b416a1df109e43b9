"""etc/butler.yaml is the documented starter config: every key of the settings model, each
with its default, and nothing else (so the two cannot drift apart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from butler_mqtt.config import Config, load_config
from butler_mqtt.starter import starter_text

REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc" / "butler.yaml"


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= model_keys(ann, f"{prefix}{name}.")
    return keys


def file_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= file_keys(value, f"{prefix}{name}.")
    return keys


def test_etc_butler_yaml_lists_exactly_the_keys_of_the_settings_model():
    in_file = file_keys(yaml.safe_load(ETC.read_text(encoding="utf-8")))
    in_model = model_keys(Config)
    assert in_model - in_file == set(), "keys missing from etc/butler.yaml"
    assert in_file - in_model == set(), "keys in etc/butler.yaml the settings model does not know"


def test_etc_butler_yaml_shows_every_default():
    assert load_config(ETC, environ={}).model_dump() == Config().model_dump()


def test_every_key_in_etc_butler_yaml_has_a_comment_or_a_commented_section():
    """"every key documented in that file" (contract section 2): a key line without a comment
    is allowed only for a section header or a self-explaining sub-key."""
    undocumented = []
    for line in ETC.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and "#" not in value and key not in {"username", "key", "cert", "user_id", "host"}:
            undocumented.append(stripped)
    assert undocumented == []


def test_the_package_ships_etc_butler_yaml_itself():
    assert starter_text() == ETC.read_text(encoding="utf-8")
