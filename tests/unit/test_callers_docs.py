"""docs/callers.md cannot drift from the product: its YAML loads as a configuration, its ACL
lines are in the tested example ACL, its dynamic-security role is the example's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from butler_mqtt.config import Config

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "callers.md").read_text(encoding="utf-8")
EXAMPLE = REPO / "docs" / "examples" / "mosquitto" / "callers"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def test_the_yaml_example_is_a_valid_configuration():
    (text,) = blocks("yaml")
    cfg = Config.model_validate(yaml.safe_load(text))
    assert [c.name for c in cfg.callers] == ["erp", "dwh"] and cfg.callers[1].topic == "dwh"
    assert cfg.callers[0].allow.tags == ["erp-nightly"]


def test_the_acl_lines_are_those_of_the_tested_example():
    acl = {line.strip() for line in (EXAMPLE / "acl").read_text().splitlines()}
    shown = [line.strip() for block in blocks("text") for line in block.splitlines() if line.strip()]
    assert len(shown) >= 12
    assert [line for line in shown if line not in acl] == []


def test_the_dynsec_role_is_the_examples():
    (text,) = blocks("json")
    role = json.loads(text)
    example = json.loads((EXAMPLE / "dynamic-security.json").read_text())
    (same,) = [r for r in example["roles"] if r["rolename"] == role["rolename"]]
    assert role["acls"] == same["acls"]
    assert {"username": "erp", "textname": "caller erp", "roles": [{"rolename": "caller-erp"}]} in example["clients"]
    assert example["defaultACLAccess"]["publishClientSend"] is False and example["defaultACLAccess"]["subscribe"] is False


def test_the_mosquitto_ctrl_lines_grant_what_the_role_holds():
    (_, ctrl) = blocks("sh")
    example = json.loads((EXAMPLE / "dynamic-security.json").read_text())
    (role,) = [r for r in example["roles"] if r["rolename"] == "caller-erp"]
    for acl in role["acls"]:
        if "erp" in acl["topic"]:
            assert f"{acl['acltype']} {acl['topic']} allow" in ctrl.replace("'", "")
