"""Round trips: QRS calls per request, read from the simulator's request log.

1. Resolution and starts (StartService + QrsClient against the simulator, no MQTT): GETs per
   request for 1..40 criteria (a mix of task IDs, tags and custom properties) at three
   `qrs.max_filter_length` values (chunking shows where the filter exceeds it), and POSTs per
   request for 1..500 selected tasks.
2. Tracking (an in-process daemon, real Mosquitto, `wait: true` requests): executions in
   flight per poll and `GET /qrs/executionresult` queries per poll.

Targets (issue 8): one resolution GET per request up to the chunk size, one start per task,
one tracking query per poll for all executions (split only when the URL would get too long).

Run: .venv/bin/python bench/roundtrips.py [--tracking 1,10,100,500] [--poll 0.5]
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import machine, table

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses, encoded_length
from butler_mqtt.config import Config, load_config
from butler_mqtt.model import StartRequest
from butler_mqtt.ops.logging import setup_logging
from butler_mqtt.ops.mosquitto import Mosquitto
from butler_mqtt.service import StartService
from butler_mqtt.sim import QrsSimulator, SimTask, ensure_certs

CRITERIA = [1, 2, 5, 10, 20, 40]
SELECTED = [1, 10, 24, 100, 200, 500]
FILTER_LENGTHS = [6000, 1000, 300]


def task_id(i: int) -> str:
    return f"70c40000-0000-4000-8000-{i:012d}"


def repository() -> list[SimTask]:
    """40 tasks named by one criterion each (id / tag / custom property in turn), 500 tasks
    carrying tag `bulk-500` (and smaller `bulk-N` subsets), 500 unrelated tasks."""
    tasks = []
    for i in range(40):
        kind = i % 3
        tasks.append(SimTask(
            task_id(i), f"Criterion task {i}",
            tags=[tag_name(i, False), tag_name(i, True)] if kind == 1 else ["other"],
            custom_properties=[("taskGroup", cp_value(i, False)), ("taskGroup", cp_value(i, True))] if kind == 2 else [("taskGroup", "none")],
            run_seconds=0.05,
        ))
    for j in range(500):
        tags = [f"bulk-{n}" for n in SELECTED if j < n]
        tasks.append(SimTask(task_id(1000 + j), f"Bulk task {j}", tags=tags, run_seconds=0.05))
    for k in range(500):
        tasks.append(SimTask(task_id(5000 + k), f"Unrelated {k}", tags=["unrelated"], custom_properties=[("taskGroup", "x")]))
    return tasks


LONG = " - nightly consolidation of the regional finance and operations data marts"


def tag_name(i: int, long: bool) -> str:
    return f"finance reports {i:02d}" + (LONG if long else "")


def cp_value(i: int, long: bool) -> str:
    return f"operational dashboards {i:02d}" + (LONG if long else "")


def criteria_request(n: int, long: bool = False) -> StartRequest:
    """`n` criteria, in turn a task ID, a tag and a custom property; `long`: ~90-char names."""
    ids, tags, cps = [], [], []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            ids.append(task_id(i))
        elif kind == 1:
            tags.append(tag_name(i, long))
        else:
            cps.append({"name": "taskGroup", "value": cp_value(i, long)})
    return StartRequest(taskId=ids, tag=tags, customProperty=cps)


def make_cfg(certs: Any, port: int, **qrs: Any) -> Config:
    base = load_config(None, environ={})
    return Config.model_validate({
        **base.model_dump(),
        "qrs": {
            **base.qrs.model_dump(), "host": "localhost", "port": port,
            "cert": str(certs.client), "key": str(certs.client_key), "ca": str(certs.root), **qrs,
        },
    })


def calls(sim: QrsSimulator) -> tuple[int, int]:
    log = sim.request_log
    gets = sum(1 for x in log if x.method == "GET" and x.path.lower().startswith("/qrs/reloadtask"))
    posts = sum(1 for x in log if x.method == "POST" and "/start" in x.path.lower())
    return gets, posts


def resolution_tables(work: Path, repeat: int) -> tuple[str, str]:
    certs = ensure_certs(work / "certs")
    sim = QrsSimulator(repository(), certs_dir=work / "certs").start()
    rows_c, rows_s = [], []
    try:
        services = {}
        for length in FILTER_LENGTHS:
            cfg = make_cfg(certs, sim.port, max_filter_length=length)
            services[length] = StartService(cfg, QrsBackend(QrsClient(cfg.qrs)), None)
        for n, long in [(n, False) for n in CRITERIA] + [(n, True) for n in (20, 40)]:
            req = criteria_request(n, long)
            clauses = criteria_clauses(req)
            encoded = encoded_length(" or ".join(clauses))
            label = f"{n} (~90-char names)" if long else n
            row: list[Any] = [label, f"{len(req.taskId)}/{len(req.tag)}/{len(req.customProperty)}", encoded]
            for length in FILTER_LENGTHS:
                sim.clear_log()
                selected = 0
                for _ in range(repeat):
                    selected = len(services[length].resolve(req).selected)
                gets, _ = calls(sim)
                assert len(list(chunk_or(clauses, length))) == gets // repeat
                row.append(f"{gets / repeat:g}")
            row.append(selected)
            rows_c.append(row)
        svc = services[6000]
        for n in SELECTED:
            req = StartRequest(tag=[f"bulk-{n}"])
            sim.clear_log()
            before = len(sim.starts)
            result = svc.run_stage(req, None, lambda _ev: None)
            gets, posts = calls(sim)
            started = len(sim.starts) - before
            assert result.summary["totalTasksStarted"] == started == n, (result.summary["totalTasksStarted"], started, n)
            rows_s.append([n, gets, posts, f"{posts / n:g}", started])
            time.sleep(0.1)  # let the executions end (a running task is not started again)
        # 40 criteria and a 500-task tag in one request
        req = criteria_request(40).model_copy(update={"tag": [*criteria_request(40).tag, "bulk-500"]})
        time.sleep(0.2)
        sim.clear_log()
        before = len(sim.starts)
        result = svc.run_stage(req, None, lambda _ev: None)
        gets, posts = calls(sim)
        rows_s.append([f"{result.summary['totalTasksStarted']} (40 criteria + bulk-500)", gets, posts,
                       f"{posts / max(1, len(sim.starts) - before):g}", len(sim.starts) - before])
        for s in services.values():
            s.close()
            s.qrs.close()
    finally:
        sim.stop()
    t1 = table(
        ["criteria", "ids/tags/CPs", "filter chars (encoded)", *[f"GETs @ max_filter_length {n}" for n in FILTER_LENGTHS], "tasks selected"],
        rows_c,
    )
    t2 = table(["tasks selected", "resolution GETs", "start POSTs", "POSTs per task", "tasks started (QRS)"], rows_s)
    return t1, t2


# --------------------------------------------------------------------------- tracking


def tracking_table(work: Path, sizes: list[int], poll: float, run_seconds: float) -> str:
    from butler_mqtt.daemon import Daemon
    from butler_mqtt.mqtt.requester import Requester

    setup_logging("error", "console")
    certs = ensure_certs(work / "certs")
    total = sum(sizes)
    tasks = [SimTask(task_id(20000 + i), f"Tracked {i}", tags=[f"track-{i // 1000}"], run_seconds=run_seconds) for i in range(total)]
    sim = QrsSimulator(tasks, certs_dir=work / "certs").start()
    broker = Mosquitto(work / "broker").start()
    env = {
        "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
        "BUTLER_MQTT__MQTT__PORT": str(broker.port),
        "BUTLER_MQTT__MQTT__CLIENT_ID": "bench-roundtrips",
        "BUTLER_MQTT__QRS__HOST": "localhost",
        "BUTLER_MQTT__QRS__PORT": str(sim.port),
        "BUTLER_MQTT__QRS__CERT": str(certs.client),
        "BUTLER_MQTT__QRS__KEY": str(certs.client_key),
        "BUTLER_MQTT__QRS__CA": str(certs.root),
        "BUTLER_MQTT__STATE_DIR": str(work / "state"),
        "BUTLER_MQTT__TRACKING__POLL_INTERVAL": str(poll),
        "BUTLER_MQTT__TRACKING__FIRST_POLL": str(min(0.2, poll)),
        "BUTLER_MQTT__LOGGING__LEVEL": "error",
        "BUTLER_MQTT__LOGGING__FORMAT": "console",
    }
    cfg = load_config(None, environ=env)
    daemon = Daemon(cfg)
    daemon.startup()
    loop = threading.Thread(target=daemon.main_loop, daemon=True)
    loop.start()
    polls: list[tuple[int, int]] = []  # (executions in flight, executionresult GETs) per poll
    original = daemon.runtime.tracker.poller._poll

    def counted(pending: dict[str, Any]) -> None:
        before = sum(1 for x in sim.request_log if x.path.lower().startswith("/qrs/executionresult"))
        original(pending)
        after = sum(1 for x in sim.request_log if x.path.lower().startswith("/qrs/executionresult"))
        polls.append((len(pending), after - before))

    daemon.runtime.tracker.poller._poll = counted  # type: ignore[method-assign]
    rows = []
    offset = 0
    try:
        if not daemon.listener.subscribed.wait(15):
            raise RuntimeError("daemon did not subscribe")
        with Requester(cfg.mqtt) as r:
            for n in sizes:
                ids = [task_id(20000 + offset + i) for i in range(n)]
                offset += n
                polls.clear()
                # n requests of one task each, all waiting: one query per poll covers them all.
                boxes = [r.send({"taskId": t, "wait": True})[1] for t in ids]
                finished = 0
                deadline = time.monotonic() + 120 + run_seconds * 2
                for box in boxes:
                    while True:
                        ev = box.get(timeout=max(0.1, deadline - time.monotonic()))
                        if ev["event"] == "requestFinished":
                            finished += 1
                            break
                active = [p for p in polls if p[0] > 0]
                peak = max(p[0] for p in active)
                gets = [p[1] for p in active]
                at_peak = [g for (k, g) in active if k == peak]
                chunks = len(list(chunk_or([f"executionID eq {t}" for t in ids[:peak]], cfg.qrs.max_filter_length)))
                rows.append([
                    n, finished, len(active), peak, f"{sum(gets) / len(gets):.2f}", max(at_peak), chunks,
                ])
    except queue.Empty:
        raise RuntimeError("a waited request did not finish in time") from None
    finally:
        daemon.should_exit.set()
        loop.join(10)
        daemon.shutdown(drain_timeout=10)
        broker.stop()
        sim.stop()
    return table(
        ["wait requests (1 task each)", "finished", "polls", "peak executions in one poll",
         "executionresult GETs per poll (mean)", "GETs in the peak poll", "filter chunks expected at the peak"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="resolves per criteria row (default 5)")
    ap.add_argument("--tracking", default="1,10,100,500", help="executions in flight per tracking row (default 1,10,100,500)")
    ap.add_argument("--poll", type=float, default=0.5, help="tracking.poll_interval in seconds (default 0.5)")
    ap.add_argument("--run-seconds", type=float, default=3.0, help="how long each tracked reload runs (default 3)")
    args = ap.parse_args()
    setup_logging("error", "console")
    work = Path(tempfile.mkdtemp(prefix="butler-mqtt-rt-"))
    t1, t2 = resolution_tables(work, args.repeat)
    t3 = tracking_table(work, [int(x) for x in args.tracking.split(",")], args.poll, args.run_seconds)
    print(f"# QRS round trips per request (from the simulator's request log)\n# {machine()}\n")
    print("## Resolution: GETs per request (criteria mixed: task IDs / tags / custom properties)\n")
    print(t1)
    print("\n## Starts: one POST per selected task (start_concurrency 8)\n")
    print(t2)
    print(f"\n## Tracking: wait=true requests, tracking.poll_interval {args.poll} s, reloads of {args.run_seconds:g} s\n")
    print(t3)


if __name__ == "__main__":
    main()
