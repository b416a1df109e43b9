"""Throughput with 1, 2 and 3 instances: shared subscription on one Mosquitto, one PostgreSQL
journal (also 1 instance on SQLite for comparison). Single-task requests, QRS latency 0 and
20 ms; every request answered once, every task started once.

Run: .venv/bin/python bench/instances.py [--requests N] [--pg postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from harness import REPO, Replies, machine, publisher, table

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.ops.mosquitto import Mosquitto
from butler_mqtt.sim import QrsSimulator, SimTask, ensure_certs


def run(instances: int, n: int, latency_ms: float, pg_admin: str | None) -> list[object]:
    work = Path(tempfile.mkdtemp(prefix="butler-mqtt-inst-"))
    certs = ensure_certs(work / "certs")
    ids = [f"1a5c0000-0000-4000-8000-{i:012d}" for i in range(n)]
    sim = QrsSimulator([SimTask(t, f"T{i}", run_seconds=0.05) for i, t in enumerate(ids)], certs_dir=work / "certs", latency_ms=latency_ms).start()
    broker = Mosquitto(work / "broker").start()
    db_name = None
    url = None
    if pg_admin:
        db_name = f"butler_mqtt_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{db_name}"')
        url = f"{pg_admin.rsplit('/', 1)[0]}/{db_name}"
    env = {
        **os.environ,
        "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
        "BUTLER_MQTT__MQTT__PORT": str(broker.port),
        "BUTLER_MQTT__MQTT__CLIENT_ID": "bench",
        "BUTLER_MQTT__MQTT__SHARED_GROUP": "bench",
        "BUTLER_MQTT__QRS__PORT": str(sim.port),
        "BUTLER_MQTT__QRS__CERT": str(certs.client),
        "BUTLER_MQTT__QRS__KEY": str(certs.client_key),
        "BUTLER_MQTT__QRS__CA": str(certs.root),
        "BUTLER_MQTT__LOGGING__LEVEL": "warning",
    }
    if url:
        env["BUTLER_MQTT__JOURNAL__URL"] = url
    procs = []
    for k in range(instances):
        e = {**env, "BUTLER_MQTT__MQTT__INSTANCE_ID": f"i{k}", "BUTLER_MQTT__STATE_DIR": str(work / f"state{k}")}
        procs.append(subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    replies = Replies(broker.port)
    replies.wait(lambda: len(replies.online) >= instances, 60)
    pub = publisher(broker.port)
    run_id = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": t}), qos=1) for i, t in enumerate(ids)]
    for info in infos:
        wait_published(info, 60)
    replies.wait(lambda: len(replies.seen) == n, 600)
    elapsed = time.perf_counter() - t0
    starts = [s.task_id for s in sim.starts]
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
    pub.loop_stop()
    replies.close()
    broker.stop()
    sim.stop()
    if db_name and pg_admin:
        with psycopg.connect(pg_admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    return [
        instances, "PostgreSQL" if url else "SQLite", f"{latency_ms:g} ms", n, f"{elapsed:.2f}", f"{n / elapsed:.0f}",
        n - len(replies.seen), len(starts) - len(set(starts)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--pg", default=os.environ.get("BUTLER_MQTT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    rows = []
    for latency in (0, 20):
        rows.append(run(1, args.requests, latency, None))
        for k in (1, 2, 3):
            rows.append(run(k, args.requests, latency, args.pg))
    print(f"# single-task requests through 1-3 instances (shared subscription)\n# {machine()}\n")
    print(table(["instances", "journal", "QRS latency", "requests", "seconds", "requests/s", "lost", "double starts"], rows))


if __name__ == "__main__":
    main()
