"""Task sets for the simulator: the demo set, tasks files and generated sets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from butler_mqtt.sim import demo_tasks, generate_tasks, load_tasks_file
from butler_mqtt.sim.data import (
    DEMO_DISABLED_ID,
    DEMO_EXTERNAL_ID,
    DEMO_FAILING_ID,
    DEMO_PITFALL_ID,
)
from butler_mqtt.sim.filter import compile_filter
from butler_mqtt.sim.store import Store


def test_demo_tag_counts_are_exact() -> None:
    counts = Counter(tag for task in demo_tasks() for tag in task.tags)
    assert counts["Butler 5.0 demo"] == 4
    assert counts["startTask1"] == 3
    assert counts["hourly-reload"] == 6
    assert counts["financial-reports"] == 3
    assert counts["daily-refresh"] == 4


def test_demo_notable_tasks() -> None:
    tasks = {task.id: task for task in demo_tasks()}
    assert len(tasks) == len(demo_tasks())  # ids unique
    assert tasks[DEMO_DISABLED_ID].enabled is False
    assert tasks[DEMO_FAILING_ID].outcome == "fail"
    assert tasks[DEMO_EXTERNAL_ID].task_type == 1
    groups = {v for task in tasks.values() for n, v in task.custom_properties if n == "taskGroup"}
    assert groups == {"financial-reports", "operational-dashboards", "regulatory-compliance"}
    assert demo_tasks() == demo_tasks()  # hard-coded, stable


def test_demo_shows_the_custom_property_pitfall() -> None:
    store = Store(demo_tasks())
    naive = compile_filter(
        "customProperties.definition.name eq 'taskGroup' "
        "and customProperties.value eq 'financial-reports'"
    )
    found = json.loads(store.query("task", naive, full=True))
    ids = {t["id"] for t in found}
    assert DEMO_PITFALL_ID in ids  # matched through notifyGroup=financial-reports
    honest = {
        t["id"]
        for t in found
        if any(
            cp["definition"]["name"] == "taskGroup" and cp["value"] == "financial-reports"
            for cp in t["customProperties"]
        )
    }
    assert DEMO_PITFALL_ID not in honest and len(honest) == 3


def test_load_tasks_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "0b0c0d0e-0000-4000-8000-000000000001",
                    "name": "One",
                    "tags": ["a", "b"],
                    "customProperties": [{"name": "taskGroup", "value": "x"}],
                    "enabled": False,
                    "taskType": 1,
                    "runSeconds": 3,
                    "outcome": "fail",
                    "failFirst": 2,
                    "maxRetries": 1,
                    "appName": "App one",
                },
                {"name": "Two"},
            ]
        ),
        encoding="utf-8",
    )
    one, two = load_tasks_file(path)
    assert one.id == "0b0c0d0e-0000-4000-8000-000000000001"
    assert one.tags == ["a", "b"] and one.custom_properties == [("taskGroup", "x")]
    assert (one.enabled, one.task_type, one.run_seconds, one.outcome) == (False, 1, 3.0, "fail")
    assert one.app_name == "App one"
    assert (one.fail_first, one.max_retries) == (2, 1)
    assert (two.tags, two.enabled, two.task_type, two.outcome) == ([], True, 0, "success")
    assert (two.run_seconds, two.fail_first, two.max_retries) == (0.2, 0, 0)
    assert load_tasks_file(path)[1].id == two.id  # generated ids are stable
    one, two = load_tasks_file(path, run_seconds=7)  # the default of tasks without runSeconds
    assert (one.run_seconds, two.run_seconds) == (3.0, 7.0)
    Store([one, two])  # and usable


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"name": "x"}', "JSON array"),
        ("[1]", "expected an object"),
        ("[{}]", "'name'"),
        ('[{"name": "x", "tags": "a"}]', "'tags'"),
        ('[{"name": "x", "tags": [1]}]', "list of strings"),
        ('[{"name": "x", "enabled": 1}]', "'enabled'"),
        ('[{"name": "x", "taskType": true}]', "'taskType'"),
        ('[{"name": "x", "taskType": 2}]', "taskType"),
        ('[{"name": "x", "id": "42"}]', "GUID"),
        ('[{"name": "x", "customProperties": [{"name": "a"}]}]', "customProperties"),
        ('[{"name": "x", "outcome": "maybe"}]', "outcome"),
        ('[{"name": "x", "failFirst": 1.5}]', "'failFirst'"),
        ('[{"name": "x", "maxRetries": -1}]', "maxRetries"),
        ('[{"name": "x", "runSeconds": -1}]', "runSeconds"),
    ],
)
def test_bad_tasks_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_tasks_file(path)


def test_generate_tasks_is_deterministic_and_spread() -> None:
    tasks = generate_tasks(2000, seed=3)
    assert tasks == generate_tasks(2000, seed=3)
    assert tasks != generate_tasks(2000, seed=4)
    assert len({t.id for t in tasks}) == 2000
    tag_counts = Counter(tag for t in tasks for tag in t.tags)
    assert tag_counts.most_common(1)[0][1] > 100 and len(tag_counts) > 100
    assert 0 < sum(not t.enabled for t in tasks) < 200
    assert 0 < sum(t.task_type == 1 for t in tasks) < 200
    assert 0 < sum(t.outcome == "fail" for t in tasks) < 150
    assert sum(any(n == "taskGroup" for n, _ in t.custom_properties) for t in tasks) > 1400
