"""Ceiling: single-task requests through butler-mqtt as a fraction of what the QRS stand-in
itself serves to a minimal client, side by side in one run.

The minimal client makes exactly the QRS calls a single-task request costs butler-mqtt (the
`reloadtask/full` lookup and `task/{id}/start/synchronous`), over the same mutual TLS, from
`--concurrency` threads with keep-alive. Then the same number of requests go through the daemon
over MQTT (all published at once, every summary awaited) and over REST (`--concurrency` clients,
`POST /v4/reloadtask/{id}/start`). The figure is each path's requests/s divided by the minimal
client's; the goal is at least 0.9 on both, with every start confirmed and every request
journaled (the daemon runs with its defaults: SQLite journal, confirmed starts).

Run: .venv/bin/python bench/ceiling.py [--requests 1000] [--concurrency 8] [--rounds 1] [--sim-process] [--sim-cpu-ms 1.2] [--set KEY=VALUE]
(`--sim-process`: the simulator in a process of its own, as an independent stand-in would be.)
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import urllib3
from harness import Replies, Stack, machine, process_cpu_s, publisher, table

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-0000-4000-8000-{i:012d}" for i in range(n)]


def minimal_client(stack: Stack, ids: list[str], concurrency: int) -> float:
    """requests/s of a bare urllib3 client doing the two QRS calls of a single-task request."""
    pool = urllib3.HTTPSConnectionPool(
        "localhost", stack.sim.port, maxsize=concurrency, block=True,
        cert_file=str(stack.certs.client), key_file=str(stack.certs.client_key), ca_certs=str(stack.certs.root),
    )

    def one(task_id: str) -> None:
        key = secrets.token_hex(8)
        headers = {"X-Qlik-Xrfkey": key, "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_api"}
        q = urlencode({"filter": f"id eq {task_id}", "xrfkey": key})
        r = pool.request("GET", f"/qrs/reloadtask/full?{q}", headers=headers)
        assert r.status == 200 and json.loads(r.data), r.data[:200]
        r = pool.request("POST", f"/qrs/task/{task_id}/start/synchronous?xrfkey={key}", headers=headers)
        assert r.status in (200, 201), r.data[:200]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, ids))
    return len(ids) / (time.perf_counter() - t0)


def through_mqtt(stack: Stack, ids: list[str]) -> tuple[float, int]:
    replies = Replies(stack.broker.port)
    pub = publisher(stack.broker.port)
    run_id = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": t}), qos=1) for i, t in enumerate(ids)]
    for info in infos:
        wait_published(info, 60)
    replies.wait(lambda: len(replies.seen) == len(ids), 600)
    rate = len(ids) / (time.perf_counter() - t0)
    lost = len(ids) - len(replies.seen)
    pub.loop_stop()
    replies.close()
    return rate, lost


def through_rest(port: int, ids: list[str], concurrency: int) -> tuple[float, int]:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=concurrency, block=True)
    failed = 0
    lock = threading.Lock()
    run_id = uuid.uuid4().hex[:6]

    def one(item: tuple[int, str]) -> None:
        nonlocal failed
        i, task_id = item
        r = pool.request("POST", f"/v4/reloadtask/{task_id}/start", body=json.dumps({"requestId": f"{run_id}-{i}"}),
                         headers={"Content-Type": "application/json"})
        body: Any = json.loads(r.data) if r.data else {}
        if r.status != 201 and r.status != 200 or not body.get("tasksStarted"):
            with lock:
                failed += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, enumerate(ids)))
    return len(ids) / (time.perf_counter() - t0), failed


def run(n: int, concurrency: int, sim_process: bool = False, sim_cpu_ms: float = 0,
        settings: dict[str, str] | None = None) -> list[list[Any]]:
    http_port = _free_port()
    base, mq, rest = _ids("ce110000", n), _ids("ce220000", n), _ids("ce330000", n)
    tasks = [SimTask(t, f"Task {i}", run_seconds=0.05) for ids in (base, mq, rest) for i, t in enumerate(ids)]
    env = {"BUTLER_MQTT__HTTP__ENABLED": "true", "BUTLER_MQTT__HTTP__PORT": str(http_port), **(settings or {})}
    stack = Stack(tasks, daemon_env=env,
                  sim_process=sim_process or sim_cpu_ms > 0, sim_cpu_ms=sim_cpu_ms)
    try:
        with _Cores(stack) as c0:
            ceiling = minimal_client(stack, base, concurrency)
        with _Cores(stack) as c1:
            mqtt_rate, mqtt_lost = through_mqtt(stack, mq)
        with _Cores(stack) as c2:
            rest_rate, rest_failed = through_rest(http_port, rest, concurrency)
        starts = [s.task_id for s in stack.sim.starts] if stack.sim.starts is not None else None
    finally:
        stack.close()
    doubled: Any = len(starts) - len(set(starts)) if starts is not None else "- (simulator in its own process)"
    return [
        ["minimal client (2 QRS calls)", f"{ceiling:.0f}", "1.00", "-", doubled, *c0.cells()],
        ["MQTT through butler-mqtt", f"{mqtt_rate:.0f}", f"{mqtt_rate / ceiling:.2f}", mqtt_lost, "", *c1.cells()],
        ["REST through butler-mqtt", f"{rest_rate:.0f}", f"{rest_rate / ceiling:.2f}", rest_failed, "", *c2.cells()],
    ]


class _Cores:
    """Cores used during a phase by the stand-in (when in its own process) and by the daemon."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.sim_own = hasattr(stack.sim, "cpu_s")

    def _now(self) -> tuple[float, ...]:
        broker = process_cpu_s(self.stack.broker.proc.pid) if self.stack.broker.proc is not None else 0.0
        return (time.perf_counter(), self.stack.sim.cpu_s() if self.sim_own else 0.0, self.stack.cpu_s(), broker,
                time.process_time())

    def __enter__(self) -> _Cores:
        self.t0 = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = self._now()

    def cells(self) -> list[str]:
        wall = self.t1[0] - self.t0[0]
        sim = f"{(self.t1[1] - self.t0[1]) / wall:.2f}" if self.sim_own else "-"
        return [sim, *(f"{(self.t1[i] - self.t0[i]) / wall:.2f}" for i in (2, 3, 4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8, help="threads of the minimal and the REST client (default 8)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sim-process", action="store_true",
                    help="run the QRS simulator in a process of its own (as an independent stand-in), not in this one")
    ap.add_argument("--sim-cpu-ms", type=float, default=0,
                    help="in its own process, and spending this much CPU on each QRS call (a slower stand-in)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a daemon setting as an environment variable, e.g. BUTLER_MQTT__MQTT__WORKERS=8 (repeatable)")
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.set)
    where = ("in its own process" if args.sim_process or args.sim_cpu_ms > 0 else "in the benchmark's process") + (
        f", {args.sim_cpu_ms} ms CPU per call" if args.sim_cpu_ms > 0 else "")
    print(f"# single-task requests, QRS stand-in answering at once ({where}), {args.requests} per path\n# {machine()}\n")
    for _ in range(args.rounds):
        print(table(["path", "requests/s", "fraction of the stand-in", "lost or not started", "double starts",
                     "stand-in cores", "daemon cores", "broker cores", "load generator cores"],
                    run(args.requests, args.concurrency, args.sim_process, args.sim_cpu_ms, settings)))
        print()


if __name__ == "__main__":
    main()
