"""`butler-mqtt history`: the request history, read from the journal of the configured daemon.

The journal is read directly (state_dir's SQLite file, or journal.url), so the command works
while the daemon runs and while it does not; it never writes to the journal. What a record
holds, and the window (`--since`, journal.retention_hours), is decided in journal/history.py.

Output: a table (one row per request, oldest first; with `--request-id` also one line per
task), or with `--json` one JSON object per line, the same records `GET /v4/requests` returns.
Times are UTC.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from butler_mqtt.config import Config
from butler_mqtt.journal.history import HistoryQuery, HistoryReader
from butler_mqtt.terminal import json_text, terminal_text

COLUMNS = ("RECEIVED (UTC)", "INGRESS", "SOURCE", "REQUEST ID", "CRITERIA", "TASKS", "FINAL", "STATE", "DUP")
TASK_COLUMNS = ("  TASK", "NAME", "STAGE", "STATUS", "EXECUTION", "FINAL", "DURATION", "REASON")
MAX_CELL = 40


def json_line(rec: dict[str, Any]) -> str:
    """One JSON record, safe for a terminal (see terminal.json_text)."""
    return json_text(rec)


def run_history(cfg: Config, query: HistoryQuery, as_json: bool, out: TextIO = sys.stdout) -> int:
    url = cfg.journal.url.get_secret_value() if cfg.journal.url else None
    reader = HistoryReader.open(cfg.state_dir, url, cfg.journal.retention_hours)
    try:
        records = reader.history(query)
    finally:
        reader.close()
    if as_json:
        for rec in records:
            out.write(json_line(rec) + "\n")
    elif not records:
        out.write(f"no requests in the journal for this query (it keeps {cfg.journal.retention_hours:g} h)\n")
    else:
        out.write(table(records, with_tasks=query.request_id is not None))
    return 0


def _cut(text: str, width: int = MAX_CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def criteria_text(rec: dict[str, Any]) -> str:
    """`taskId:1a2b3c4d… tag:daily customProperty:group=finance then …` (GUIDs shortened)."""
    crit = rec.get("criteria")
    if crit is None:
        return "?"
    parts = [f"taskId:{t[:8]}…" for t in crit.get("taskId", [])] + [f"tag:{t}" for t in crit.get("tag", [])]
    parts += [f"customProperty:{c['name']}={c['value']}" for c in crit.get("customProperty", [])]
    if (rec.get("request") or {}).get("then") is not None:
        parts.append("then …")
    return " ".join(parts) or "-"


#: The order of task statuses in the TASKS column (others follow as they come).
STATUS_ORDER = ("started", "notStarted", "wouldStart", "alreadyRunning", "queued", "skipped", "denied", "failed", "expired")


def tasks_text(rec: dict[str, Any]) -> str:
    counts: dict[str, int] = rec["counts"]
    order = [s for s in STATUS_ORDER if s in counts] + [s for s in counts if s not in STATUS_ORDER]
    parts = [f"{counts[status]} {status}" for status in order]
    if rec["notFound"]:
        parts.append(f"{len(rec['notFound'])} not found")
    if rec.get("error"):
        parts.append(f"error: {rec['error'].get('error')}")
    return ", ".join(parts) or "-"


def final_text(rec: dict[str, Any]) -> str:
    """requestFinished's counts; before it, the final states seen so far and what still runs."""
    counts: dict[str, int] = dict(rec["finished"] or {})
    if rec["finished"] is None:
        for t in rec["tasks"]:
            if t.get("finalStatus") is not None:
                counts[t["finalStatus"]] = counts.get(t["finalStatus"], 0) + 1
        running = sum(1 for t in rec["tasks"] if t["status"] == "started" and t.get("finalStatus") is None)
        if running and rec["state"] == "following":
            counts["running"] = running
    text = ", ".join(f"{status} {n}" for status, n in counts.items())
    if rec.get("stoppedAtStage") is not None:
        text += f" (stopped at stage {rec['stoppedAtStage']})"
    return text or "-"


def _row(rec: dict[str, Any]) -> list[str]:
    received = str(rec["received"]).replace("T", " ")[:19]
    return [
        received,
        str(rec["ingress"]),
        _cut(rec["source"] or "-", 28),
        _cut(rec["requestId"] or "-", 36),
        _cut(criteria_text(rec), 60),
        _cut(tasks_text(rec)),
        _cut(final_text(rec)),
        str(rec["state"]),
        str(rec["duplicates"] or ""),
    ]


def _task_row(t: dict[str, Any]) -> list[str]:
    duration = f"{t['durationMs'] / 1000:.1f} s" if isinstance(t.get("durationMs"), int) else "-"
    final = str(t.get("finalStatus") or "-") + (" (overdue)" if t.get("overdue") else "")
    return [
        "  " + t["taskId"],
        _cut(str(t.get("taskName") or "-"), 30),
        str(t["stage"]) if t.get("stage") is not None else "-",
        str(t["status"]),
        str(t.get("executionId") or "-"),
        final,
        duration,
        _cut(str(t.get("reason") or t.get("finalReason") or _failure_message(t)), 60),
    ]


def _failure_message(t: dict[str, Any]) -> str:
    """The failure's message (contract section 8); --json shows the whole failure with its tail."""
    failure = t.get("failure")
    return str(failure.get("message") or "") if isinstance(failure, dict) else ""


def _render(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    rows = [[terminal_text(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def table(records: list[dict[str, Any]], with_tasks: bool = False) -> str:
    """The records as an aligned table; `with_tasks`: each request's tasks below it."""
    rows = [_row(r) for r in records]
    header: tuple[str, ...] = COLUMNS
    if any(r.get("caller") for r in records):  # callers (contract section 10): whose request, "-" anonymous
        header = (*COLUMNS[:3], "CALLER", *COLUMNS[3:])
        rows = [[*row[:3], str(r.get("caller") or "-"), *row[3:]] for row, r in zip(rows, records, strict=True)]
    lines = _render(header, rows)
    if with_tasks:
        for rec in records:
            if rec["tasks"]:
                lines += ["", *_render(TASK_COLUMNS, [_task_row(t) for t in rec["tasks"]])]
    return "\n".join(lines) + "\n"
