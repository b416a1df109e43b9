"""The Grafana dashboard and the Prometheus alert rules (issue 15, item 4).

promtool (Debian's prometheus package; scripts/setup installs it) checks the rules and runs
their unit tests; every dashboard query is checked by promtool too (as a recording rule); every
butler-mqtt metric the dashboard, the rules and their tests name exists in a running daemon's
/metrics; docs/operating/monitoring.md describes every panel and every rule."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "grafana" / "butler-mqtt.json"
RULES = REPO / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "docs" / "prometheus" / "alerts_test.yml"
PAGE = (REPO / "docs" / "operating" / "monitoring.md").read_text(encoding="utf-8")  # was the README (issue 25)
METRIC = re.compile(r"\bbutler_mqtt_[a-z0-9_]+")
TASKS: list[Any] = []  # the simulator fixture's task list: none needed


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found: run scripts/setup (it installs promtool from Debian's prometheus package),"
            " or install it yourself (Debian/Ubuntu: apt-get install prometheus)"
        )
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, also those inside collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard, its template variables included."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"variable {var['name']}", re.sub(r"^label_values\((.*), *\w+\)$", r"\1", text)))
    return queries


def rule_list() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"] for r in g["rules"]]


def test_promtool_checks_the_alert_rules_and_their_unit_tests():
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and "SUCCESS: 10 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    names = {r["alert"] for r in rule_list()}
    for wanted in ("ButlerMqttDown", "ButlerMqttOffline", "ButlerMqttQrsUnreachable", "ButlerMqttFailedStarts",
                   "ButlerMqttReloadFailures", "ButlerMqttReloadsOverdue", "ButlerMqttQueueGrowing"):
        assert wanted in names
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    assert names == {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}  # each one fires in a test


def test_every_rule_says_what_is_wrong_and_how_bad():
    for rule in rule_list():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)) and len({p["title"] for p in panels(dash)}) == len(ids)
    for p in panels(dash):
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and p["targets"], p["title"]
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, (_where, expr) in enumerate(dashboard_queries())
    ]
    file = tmp_path / "dashboard_queries.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(file))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def exposed_names(text: str) -> set[str]:
    """Every sample name /metrics has, or would have once a labelled metric gets its first value."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_every_metric_the_dashboard_and_the_rules_name_is_in_metrics(qrs_certs, sim, broker, tmp_path, start_daemon):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0})
    d = start_daemon(cfg)
    text = requests.get(f"http://127.0.0.1:{d.daemon.http_server.port}/metrics", timeout=30).text
    exposed = exposed_names(text)
    on_dashboard = {m for _where, expr in dashboard_queries() for m in METRIC.findall(expr)}
    in_rules = {m for r in rule_list() for m in METRIC.findall(r["expr"])}
    in_rule_tests = set(METRIC.findall(RULE_TESTS.read_text(encoding="utf-8")))
    assert on_dashboard - exposed == set() and in_rules - exposed == set() and in_rule_tests - exposed == set()
    # What the dashboard is for (issue 15): requests, start latency, QRS latency and errors,
    # executions followed, final states, the queue.
    assert {"butler_mqtt_requests_total", "butler_mqtt_start_latency_seconds_bucket", "butler_mqtt_qrs_call_seconds_bucket",
            "butler_mqtt_qrs_call_seconds_count", "butler_mqtt_executions_followed", "butler_mqtt_executions_finished_total",
            "butler_mqtt_queue_length"} <= on_dashboard


def test_the_readme_describes_every_panel_and_every_rule():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    text = " ".join(PAGE.split())  # a bold title may wrap
    for p in panels(dash):
        assert f"**{p['title']}**" in text, f"docs/operating/monitoring.md does not describe the panel {p['title']!r}"
    for rule in rule_list():
        assert f"`{rule['alert']}`" in PAGE, f"docs/operating/monitoring.md does not describe the alert rule {rule['alert']}"
