"""The examples of the README and of the documentation pages run as written against
`butler-mqtt sim --demo`: every task ID, tag and custom property they name is in the demo data
set (issue 12; issue 25 moved most examples from the README into docs/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from butler_mqtt.sim import demo_tasks

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
# Pages whose examples run against the demo data. The operating pages use a site's own names
# (nightly-etl, sense.example.com), the generated ones have no examples of their own.
PAGES = [REPO / "README.md", REPO / "docs" / "getting-started.md", *(REPO / "docs" / "concepts" / f"{n}.md" for n in ("requests", "replies", "chains", "policies")),
         REPO / "docs" / "reference" / "rest-api.md",
         REPO / "docs" / "operating" / "history.md", REPO / "docs" / "operating" / "alerts.md",
         REPO / "docs" / "operating" / "monitoring.md"]
TEXT = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
BLOCKS = "\n".join(re.findall(r"```(?:sh|json)\n(.*?)```", TEXT, flags=re.S))
GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def test_the_pages_with_examples_have_examples():
    for page in PAGES:
        assert re.search(r"```(sh|json)\n", page.read_text(encoding="utf-8")), page


def test_every_task_id_in_the_examples_is_a_demo_task():
    ids = {t.id for t in demo_tasks()}
    named = set(re.findall(GUID, BLOCKS))
    assert named, "no task ID found in the examples"
    assert named - ids == set()
    for prefix in re.findall(r'"taskId": "([0-9a-f]{8})-…"', BLOCKS):
        assert any(i.startswith(prefix) for i in ids), prefix


def test_every_tag_in_the_examples_is_a_demo_tag():
    tags = {tag for t in demo_tasks() for tag in t.tags}
    named: set[str] = set()
    for m in re.finditer(r'"tag": (\[[^\]]*\]|"[^"]*")', BLOCKS):
        value = json.loads(m.group(1))
        named |= set(value if isinstance(value, list) else [value])
    named |= set(re.findall(r'--tag "([^"]+)"', BLOCKS)) | set(re.findall(r"--tag (\w[\w-]*)", BLOCKS))
    named -= {"…", "no-such-tag"}
    assert named and named - tags == set()


def test_every_custom_property_in_the_examples_is_a_demo_pair():
    pairs = {cp for t in demo_tasks() for cp in t.custom_properties}
    named = set(re.findall(r'"name": "(\w+)", "value": "([\w-]+)"', BLOCKS))
    named |= set(re.findall(r'"customPropertyName": "(\w+)", "customPropertyValue": "([\w-]+)"', BLOCKS))
    assert named and named - pairs == set()


def test_the_readme_states_the_install_line_and_the_extras():
    assert "pip install butler-mqtt" in README and 'pip install "butler-mqtt[postgres]"' in README
    assert "PostgreSQL" in README and "scripts/setup" in README
