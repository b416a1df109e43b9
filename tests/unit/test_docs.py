"""The documentation site (issue 25): a short README whose links resolve, pages generated from the
code that are current, a description for every configuration key, and a strict offline build."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = (REPO / "README.md").read_text(encoding="utf-8")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def gendocs() -> Any:
    spec = importlib.util.spec_from_file_location("gendocs", REPO / "scripts" / "gendocs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s-]+", "-", text).strip("-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def nav_pages() -> set[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for v in node.values() for p in walk(v)]
        return []

    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    return set(walk(yaml.safe_load(text)["nav"]))


def test_the_readme_gets_a_newcomer_going_in_at_most_300_lines():
    assert len(README.splitlines()) <= 300
    assert "scripts/demo" in README and "scripts/test" in README
    assert "scripts/setup --base" in README and "sudo" in README  # what each installs, and with which privileges


def test_every_readme_link_resolves_to_an_existing_page_and_heading():
    links = [u for u in LINK.findall(README) if not u.startswith(("http://", "https://"))]
    assert len(links) >= 25
    for url in links:
        path, _, anchor = url.partition("#")
        target = REPO / path
        assert target.exists(), f"README links to {url}: no such file"
        if anchor:
            assert anchor in anchors(target), f"README links to {url}: no such heading"
        if path.startswith("docs/") and path.endswith(".md"):
            assert path.removeprefix("docs/") in nav_pages(), f"{path} is not in the site's nav"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == nav_pages()


def test_the_generated_pages_are_current():
    stale = [str(p.relative_to(REPO)) for p, text in gendocs().pages().items()
             if not p.exists() or p.read_text(encoding="utf-8") != text]
    assert stale == [], f"run scripts/docs: {stale} are stale"


def test_every_configuration_key_has_a_description_and_the_starter_names_no_other_key():
    from butler_mqtt.config import Config

    g = gendocs()
    comments = g.starter_comments((REPO / "etc" / "butler.yaml").read_text(encoding="utf-8"))
    keys = {r["key"] for r in g.config_rows(Config) if not r.get("section")}
    sections = {r["key"] for r in g.config_rows(Config) if r.get("section")}
    assert {"policies.if_running", "mqtt.queue_bytes", "mqtt.response_topic_prefixes", "qrs.max_response_bytes"} <= keys
    assert [k for k in sorted(keys) if not comments.get(k)] == []
    assert set(comments) - keys - sections == set()
    page = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    for key in keys:
        assert f"| `{key}`<br>" in page, key


def test_the_configuration_page_describes_a_key_the_way_the_starter_does():
    g = gendocs()
    text = "mqtt:\n  host: localhost   # broker host\n  tls:\n    ca: null   # the CA\n                # continued\n"
    assert g.starter_comments(text) == {"mqtt.host": "broker host", "mqtt.tls.ca": "the CA continued"}


def test_the_site_builds_strictly_and_loads_nothing_from_elsewhere(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(REPO / ".venv" / "bin")) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is missing: run scripts/setup (it installs the test extra, mkdocs-material included)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    remote = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.I)
    for page in (tmp_path / "site").rglob("*.html"):
        found = remote.findall(page.read_text(encoding="utf-8"))
        assert found == [], f"{page.name} loads {found}"
    assert (tmp_path / "site" / "reference" / "configuration.html").is_file()
    assert (tmp_path / "site" / "asyncapi.yaml").is_file() and (tmp_path / "site" / "reference" / "openapi.json").is_file()


def test_the_documented_journal_backup_copies_a_journal_in_use(tmp_path):
    """docs/operating/upgrade.md "Backing up the journal": its command, run as written (only the
    paths and the venv's python replaced), copies a journal the daemon holds open, WAL included."""
    import sqlite3
    import sys

    from butler_mqtt.journal import Journal

    page = (DOCS / "operating" / "upgrade.md").read_text(encoding="utf-8")
    part = page[page.index("## Backing up the journal"):]
    block = part[part.index("```sh\n") + 6:part.index("```", part.index("```sh\n") + 6)]
    command = block.replace("\\\n", " ").strip()
    assert command.startswith("sudo /opt/butler-mqtt/venv/bin/python -c ")
    live = tmp_path / "state" / "journal.sqlite3"
    live.parent.mkdir()
    journal = Journal(live, 24)
    try:
        assert journal.begin("id:backed-up", "mqtt") is None  # claimed: written, still open (WAL)
        backup = tmp_path / "backup.sqlite3"
        script = (command.removeprefix("sudo ")
                  .replace("/opt/butler-mqtt/venv/bin/python", sys.executable)
                  .replace("/var/lib/private/butler-mqtt/journal.sqlite3", str(live))
                  .replace("/root/butler-mqtt-journal-$(date +%F).sqlite3", str(backup)))
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        journal.close()
    rows = sqlite3.connect(backup).execute("SELECT key FROM requests").fetchall()
    assert rows == [("id:backed-up",)]
