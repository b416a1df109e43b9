"""Scale of the repository: resolution time (one filtered `GET /qrs/reloadtask/full`, then
parsing and selection) with 100, 2,000 and 20,000 tasks in the simulator, for a tag that
selects about 10 tasks and for a request with 40 criteria (14 task IDs, 13 tags, 13 custom
properties).

The simulator runs in this process and evaluates the filter by scanning every task in
Python; its share of each round trip is shown separately (a real QRS answers from its
database), as is the daemon's own share (JSON decoding, QrsTask, selection).

Run: .venv/bin/python bench/scale.py [--sizes 100,2000,20000] [--repeat 30] [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import machine, percentile, table

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses
from butler_mqtt.config import Config, load_config
from butler_mqtt.model import QrsTask, StartRequest
from butler_mqtt.selection import select
from butler_mqtt.service import StartService
from butler_mqtt.sim import QrsSimulator, SimTask, ensure_certs, generate_tasks
from butler_mqtt.sim.filter import compile_filter


def repository(n: int) -> list[SimTask]:
    """`generate_tasks(n)` plus a rare custom property (`costCenter`, ~6 tasks per value at
    20,000 tasks) so that 40 criteria select a realistic few hundred tasks, not half the set."""
    tasks = generate_tasks(n)
    for i, t in enumerate(tasks):
        if i % 7 == 0:
            t.custom_properties = [*t.custom_properties, ("costCenter", f"cc-{(i // 7) % 500:03d}")]
    return tasks


def requests_for(tasks: list[SimTask]) -> tuple[StartRequest, StartRequest]:
    reload_tasks = [t for t in tasks if t.task_type == 0]
    counts = Counter(tag for t in reload_tasks for tag in t.tags)
    tag10 = min(counts, key=lambda tag: (abs(counts[tag] - 10), tag))
    rare = sorted(counts, key=lambda tag: (counts[tag], tag))[:13]
    ids = [t.id for t in reload_tasks[:: max(1, len(reload_tasks) // 14)][:14]]
    cps = [{"name": "costCenter", "value": f"cc-{k:03d}"} for k in range(13)]
    return StartRequest(tag=[tag10]), StartRequest(taskId=ids, tag=rare, customProperty=cps)


def make_cfg(certs: Any, port: int) -> Config:
    base = load_config(None, environ={})
    return Config.model_validate({
        **base.model_dump(),
        "qrs": {**base.qrs.model_dump(), "host": "localhost", "port": port,
                "cert": str(certs.client), "key": str(certs.client_key), "ca": str(certs.root)},
    })


def measure(n: int, repeat: int, latency_ms: float, work: Path) -> list[list[Any]]:
    tasks = repository(n)
    certs = ensure_certs(work / "certs")
    sim = QrsSimulator(tasks, certs_dir=work / "certs", latency_ms=latency_ms).start()
    cfg = make_cfg(certs, sim.port)
    qrs = QrsClient(cfg.qrs)
    service = StartService(cfg, QrsBackend(qrs), None)
    rows = []
    try:
        for label, req in zip(["1 tag (~10 tasks)", "40 criteria"], requests_for(tasks), strict=True):
            (expr,) = chunk_or(criteria_clauses(req), cfg.qrs.max_filter_length)  # one GET
            service.resolve(req)  # warm-up: connection, caches
            sim.clear_log()
            total, daemon_side, sim_side = [], [], []
            selected = returned = size = 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                selection = service.resolve(req)
                total.append((time.perf_counter() - t0) * 1000)
                selected = len(selection.selected)
                # The shares: the simulator's filter + rendering, and the daemon's own work.
                t1 = time.perf_counter()
                body = sim.store.query("reloadtask", compile_filter(expr), None, full=True)
                sim_side.append((time.perf_counter() - t1) * 1000)
                objs = qrs.reload_tasks(expr)
                t2 = time.perf_counter()
                parsed = json.loads(body)
                select(req, [QrsTask.from_qrs(o) for o in parsed])
                daemon_side.append((time.perf_counter() - t2) * 1000)
                returned, size = len(objs), len(body)
            gets = sum(1 for x in sim.request_log if x.path.lower().startswith("/qrs/reloadtask"))
            assert gets == 2 * repeat, gets  # one GET per resolve (+ one for the share above)
            rows.append([
                f"{n:,}", label, returned, selected, f"{size / 1024:.0f}",
                f"{percentile(total, 50):.1f}", f"{percentile(total, 95):.1f}",
                f"{percentile(sim_side, 50):.1f}", f"{percentile(daemon_side, 50):.1f}",
            ])
    finally:
        service.close()
        qrs.close()
        sim.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,2000,20000")
    ap.add_argument("--repeat", type=int, default=30, help="resolves per row (default 30)")
    ap.add_argument("--latency-ms", type=float, default=0, help="simulated QRS latency per call")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="butler-mqtt-scale-"))
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        rows += measure(n, args.repeat, args.latency_ms, work)
    print(f"# resolution time vs repository size ({args.repeat} resolves per row, QRS latency {args.latency_ms:g} ms)")
    print(f"# {machine()}\n")
    print(table(
        ["tasks in QRS", "request", "returned by QRS", "selected", "answer KiB", "resolve p50 ms", "resolve p95 ms",
         "of which simulator p50 ms", "of which daemon p50 ms"],
        rows,
    ))
    print("\nresolve = one filtered GET + JSON decoding + selection, as StartService.resolve does it;")
    print("simulator = the simulator's filter scan and rendering alone; daemon = decoding + QrsTask + selection alone.")


if __name__ == "__main__":
    main()
