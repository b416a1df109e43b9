"""Task sets for the simulator: the demo set, a JSON tasks file, and generated large sets.

Tasks file format (``butler-mqtt sim --tasks FILE``): a JSON array of objects::

    [
      {
        "id": "52bc35f3-2826-4691-890f-6d540124f7fb",   // optional GUID
        "name": "Reload Sales dashboard",                // required
        "tags": ["startTask1", "hourly-reload"],         // optional, default []
        "customProperties": [                            // optional, default []
          {"name": "taskGroup", "value": "financial-reports"}
        ],
        "enabled": true,                                 // optional, default true
        "taskType": 0,                                   // optional: 0 reload, 1 external program
        "runSeconds": 2.5,                               // optional, default 0.2
        "outcome": "success",                            // optional: "success" or "fail"
        "failFirst": 0,                                  // optional: the first N runs fail
        "maxRetries": 0,                                 // optional: QRS's maxRetries
        "appName": "Sales dashboard",                    // optional, default: the task name
        "failureMessage": "Field 'Amount' not found",    // optional: error of a failed run
        "logLines": 60,                                  // optional: script lines per log
        "logBytes": 0,                                   // optional: pad each log to N bytes
        "logEncoding": "utf-8"                           // optional: see sim/scriptlog.py
      }
    ]

(The ``//`` comments are for this description only; the file is plain JSON.) A task without
``id`` gets one derived from its name and position, so it keeps that id across restarts.
A custom property listed several times gives the task several values, as QRS allows.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

from .scriptlog import DEFAULT_FAILURE_MESSAGE, ENCODINGS
from .store import SimTask, stable_id

DEMO = "Butler 5.0 demo"

# Notable demo tasks, cited by the docs and tests.
DEMO_DISABLED_ID = "201181ef-3b1f-423b-939d-3e5fedf7c279"
DEMO_FAILING_ID = "be67b837-1591-413f-a4f1-87737f701520"
DEMO_EXTERNAL_ID = "931c0791-862b-473d-8380-91c399c4bded"
DEMO_PITFALL_ID = "609ee145-0ef3-4b20-a211-f368bccffaa2"
DEMO_SPECIAL_TAG = "R&D 'Q1' #1 +50%"
#: Why "Reload Data quality check" (DEMO_FAILING_ID) fails: its Error detail and the error in
#: its script log (contract section 8's example).
DEMO_FAILURE_MESSAGE = "Field 'Amount' not found"


_TG, _PR, _NG = "taskGroup", "priority", "notifyGroup"
_FIN, _OPS, _REG = "financial-reports", "operational-dashboards", "regulatory-compliance"

# (id, name, tags, custom properties, app name, run seconds, other SimTask fields)
_DEMO_ROWS: tuple[tuple[str, str, list[str], list[tuple[str, str]], str, float, dict[str, Any]], ...] = (
    ("52bc35f3-2826-4691-890f-6d540124f7fb", "Reload Sales dashboard",
     [DEMO, "startTask1", "hourly-reload"], [(_TG, _OPS), (_PR, "high")], "Sales dashboard", 1.0, {}),
    ("c753bc11-1dc6-4592-b4bc-a535f0861837", "Reload Finance P&L",
     [DEMO, "financial-reports", "daily-refresh"], [(_TG, _FIN), (_PR, "high")], "Finance P&L", 2.0, {}),
    ("dc012120-0c75-40e2-9afc-14f05e326b35", "Reload Inventory",
     [DEMO, "startTask1", "hourly-reload"], [(_TG, _OPS), (_PR, "low")], "Inventory", 1.0, {}),
    (DEMO_FAILING_ID, "Reload Data quality check",
     [DEMO], [(_TG, _REG)], "Data quality", 1.0,
     {"outcome": "fail", "failure_message": DEMO_FAILURE_MESSAGE, "log_lines": 120}),
    (DEMO_DISABLED_ID, "Reload Legacy warehouse",
     ["startTask1"], [(_TG, _OPS)], "Legacy warehouse", 0.2, {"enabled": False}),
    ("e44bb164-187b-467a-91aa-f8bd9720925a", "Reload Web traffic",
     ["hourly-reload"], [(_TG, _OPS)], "Web traffic", 1.0, {}),
    (DEMO_PITFALL_ID, "Reload Ops KPIs",
     ["hourly-reload"], [(_TG, _OPS), (_NG, _FIN)], "Ops KPIs", 1.0, {}),
    ("1a2c2614-05cf-4417-9cb6-d9f6915d04c4", "Reload Call center",
     ["hourly-reload"], [(_TG, _OPS), (_PR, "low")], "Call center", 1.0, {}),
    ("99e30cbf-b48f-47d9-9a58-9624ca35ff00", "Reload Logistics",
     ["hourly-reload"], [], "Logistics", 1.0, {}),
    ("aec0db07-53b1-4612-9bd1-475ac912b6a4", "Reload Budget vs actual",
     ["financial-reports", "daily-refresh"], [(_TG, _FIN), (_PR, "low")], "Budget vs actual", 1.5, {}),
    ("f70df488-57c7-418e-b549-cf82637a1629", "Reload Regulatory filings",
     ["financial-reports"], [(_TG, _REG), (_TG, _FIN)], "Regulatory filings", 1.5, {}),
    ("2f6c5da9-833f-4ab1-a8e4-0f476a7208ee", "Reload HR headcount",
     ["daily-refresh"], [(_TG, _REG)], "HR headcount", 1.0, {}),
    ("11bd2005-40f2-4b40-82da-34d6b3a2d140", "Reload R&D metrics",
     [DEMO_SPECIAL_TAG], [], "R&D metrics", 1.0, {}),
    (DEMO_EXTERNAL_ID, "Export nightly files",
     ["daily-refresh"], [(_TG, _OPS)], "", 1.0, {"task_type": 1}),
)


def demo_tasks() -> list[SimTask]:
    """The demo data set: 14 tasks with hard-coded GUIDs (fresh objects on every call).

    Exact tag counts: "Butler 5.0 demo" 4 tasks, "startTask1" 3, "hourly-reload" 6,
    "financial-reports" 3, "daily-refresh" 4. Custom property ``taskGroup`` takes the values
    financial-reports, operational-dashboards and regulatory-compliance; ``priority`` and
    ``notifyGroup`` are second properties, and "Reload Ops KPIs" (``DEMO_PITFALL_ID``) has
    ``taskGroup=operational-dashboards`` plus ``notifyGroup=financial-reports``, so the naive
    filter for taskGroup=financial-reports wrongly returns it.
    """
    return [
        SimTask(
            task_id,
            name,
            tags=list(tags),
            custom_properties=list(properties),
            app_name=app_name,
            run_seconds=run_seconds,
            **extra,
        )
        for task_id, name, tags, properties, app_name, run_seconds, extra in _DEMO_ROWS
    ]


def load_tasks_file(path: Path, run_seconds: float | None = None) -> list[SimTask]:
    """Read a tasks file (format in the module docstring); ValueError names the bad item.

    ``run_seconds`` replaces the default run time (0.2 s) of tasks without ``runSeconds``.
    """
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array of task objects")
    default = 0.2 if run_seconds is None else run_seconds
    return [_task_from_json(item, index, path, default) for index, item in enumerate(items)]


def _task_from_json(item: Any, index: int, path: Path, run_seconds: float) -> SimTask:
    where = f"{path}: task #{index}"

    def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = item.get(key, default)
        # bool is an int in Python; only a bool field may hold true/false.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{where}: {key!r} is missing or has the wrong type")
        return value

    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    name = get("name", str, None)
    tags = get("tags", list, [])
    if not all(isinstance(tag, str) for tag in tags):
        raise ValueError(f"{where}: 'tags' must be a list of strings")
    properties = []
    for prop in get("customProperties", list, []):
        if not (
            isinstance(prop, dict)
            and isinstance(prop.get("name"), str)
            and isinstance(prop.get("value"), str)
        ):
            raise ValueError(f"{where}: customProperties entries need string 'name' and 'value'")
        properties.append((prop["name"], prop["value"]))
    task = SimTask(
        id=get("id", str, stable_id("taskfile", name, str(index))),
        name=name,
        tags=tags,
        custom_properties=properties,
        enabled=get("enabled", bool, True),
        task_type=get("taskType", int, 0),
        app_name=get("appName", str, ""),
        run_seconds=float(get("runSeconds", (int, float), run_seconds)),
        outcome=get("outcome", str, "success"),
        fail_first=get("failFirst", int, 0),
        max_retries=get("maxRetries", int, 0),
        failure_message=get("failureMessage", str, DEFAULT_FAILURE_MESSAGE),
        log_lines=get("logLines", int, 60),
        log_bytes=get("logBytes", int, 0),
        log_encoding=get("logEncoding", str, "utf-8"),
    )
    try:
        uuid.UUID(task.id)
    except ValueError:
        raise ValueError(f"{where}: 'id' is not a GUID") from None
    if task.task_type not in (0, 1) or task.outcome not in ("success", "fail"):
        raise ValueError(f"{where}: taskType must be 0 or 1, outcome 'success' or 'fail'")
    if task.fail_first < 0 or task.max_retries < 0 or task.run_seconds < 0:
        raise ValueError(f"{where}: runSeconds, failFirst and maxRetries must be 0 or more")
    if task.log_lines < 0 or task.log_bytes < 0 or task.log_encoding not in ENCODINGS:
        raise ValueError(f"{where}: logLines and logBytes must be 0 or more, logEncoding one of {', '.join(ENCODINGS)}")
    return task


def generate_tasks(n: int, seed: int = 0) -> list[SimTask]:
    """``n`` tasks with a realistic spread, for scale tests and benchmarks; same seed, same set.

    About 300 tags with a skewed popularity (a few on thousands of tasks, most on a handful),
    0-4 tags per task, ``taskGroup`` on ~80% of tasks (25 groups), ``priority`` on ~half,
    ``region`` on ~30%; ~5% disabled, ~3% failing, ~5% external program tasks.
    """
    rng = random.Random(seed)
    tags = [f"tag-{i:03d}" for i in range(300)]
    tag_weights = [1 / (rank + 1) for rank in range(len(tags))]
    groups = [f"group-{i:02d}" for i in range(25)]
    regions = ["EMEA", "APAC", "Americas"]
    tasks = []
    for i in range(n):
        properties: list[tuple[str, str]] = []
        if rng.random() < 0.8:
            properties.append(("taskGroup", rng.choice(groups)))
        if rng.random() < 0.5:
            properties.append(("priority", rng.choice(["high", "medium", "low"])))
        if rng.random() < 0.3:
            properties.append(("region", rng.choice(regions)))
        tasks.append(
            SimTask(
                id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                name=f"Reload app {i:05d}",
                tags=sorted(set(rng.choices(tags, tag_weights, k=rng.randint(0, 4)))),
                custom_properties=properties,
                enabled=rng.random() >= 0.05,
                task_type=1 if rng.random() < 0.05 else 0,
                run_seconds=round(rng.uniform(0.2, 2.0), 2),
                outcome="fail" if rng.random() < 0.03 else "success",
            )
        )
    return tasks
