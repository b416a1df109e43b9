"""Cloud pacing through the daemon: N single-app requests over MQTT to a daemon with
`backend: cloud`, against the Qlik Cloud simulator (HTTPS) whose start limit is `--limit` a
minute, with `cloud.reloads_per_minute: --limit`.

Printed: reloads started per minute as a fraction of the limit (first to last start, aim >= 0.95),
429s the simulator answered, apps lost (never started) and doubled (started twice) (both must
be 0), and the daemon's CPU per request, next to the same figure for the QRS backend (N
single-task requests against the QRS simulator, as bench/throughput.py measures it).

Run: .venv/bin/python bench/cloud_daemon.py [--requests 300] [--limit 600] [--no-qrs]
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
from collections import Counter
from pathlib import Path

from harness import REPO, Replies, machine, publisher, table
from throughput import run as qrs_run

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.ops.mosquitto import Mosquitto
from butler_mqtt.sim.cloud import CloudSimulator, World


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon(work: Path, sim: CloudSimulator, broker: Mosquitto, limit: float) -> tuple[subprocess.Popen[bytes], Replies]:
    env = {
        **os.environ,
        "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
        "BUTLER_MQTT__MQTT__PORT": str(broker.port),
        "BUTLER_MQTT__MQTT__CLIENT_ID": f"bench-{uuid.uuid4().hex[:8]}",
        "BUTLER_MQTT__BACKEND": "cloud",
        "BUTLER_MQTT__CLOUD__TENANT": sim.base_url,
        "BUTLER_MQTT__CLOUD__CLIENT_ID": sim.client_id,
        "BUTLER_MQTT__CLOUD__CLIENT_SECRET": sim.client_secret,
        "BUTLER_MQTT__CLOUD__CA": str(sim.certs.root),
        "BUTLER_MQTT__CLOUD__RELOADS_PER_MINUTE": str(limit),
        "BUTLER_MQTT__CLOUD__TIMEOUT": "120",
        "BUTLER_MQTT__STATE_DIR": str(work / "state"),
        "BUTLER_MQTT__LOGGING__LEVEL": "warning",
    }
    (work / "none.yaml").write_text("{}\n")
    replies = Replies(broker.port)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "run", "--config", str(work / "none.yaml")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"),  # noqa: SIM115
    )
    if not replies.wait(lambda: bool(replies.online), 30):
        daemon.kill()
        raise SystemExit(f"the daemon did not come online; see {work / 'daemon.log'}")
    return daemon, replies


def cloud_run(n: int, limit: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="butler-mqtt-cloud-bench-"))
    world = World([], [], [], max_concurrent=0, generated_apps=n)
    sim = CloudSimulator(world, certs_dir=work / "certs", start_limit_per_minute=limit, rate_window=60).start()
    broker = Mosquitto(work / "broker").start()
    daemon, replies = _daemon(work, sim, broker, limit)
    pub = publisher(broker.port)
    try:
        apps = [world.generated(i).id for i in range(n)]
        cpu0, t0 = _cpu_s(daemon.pid), time.perf_counter()
        infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"c-{i}", "appId": a}), qos=1)
                 for i, a in enumerate(apps)]
        for info in infos:
            wait_published(info, 60)
        answered = replies.wait(lambda: len(replies.seen) == n, n * 60 / limit * 3 + 120)
        elapsed, cpu = time.perf_counter() - t0, _cpu_s(daemon.pid) - cpu0
        starts = sorted(s.at for s in world.starts)
        counts = Counter(s.app_id for s in world.starts)
        span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        per_minute = (len(starts) - 1) / span * 60 if span > 0 else 0.0
        return {
            "requests": n, "limit_per_minute": limit, "all answered in s": round(elapsed, 1),
            "starts/min": round(per_minute, 1), "fraction of limit": round(per_minute / limit, 3),
            "429 seen": sum(1 for x in sim.request_log if x.status == 429),
            "lost": sum(1 for a in apps if counts[a] == 0) + (0 if answered else n - len(replies.seen)),
            "doubled": sum(1 for a in apps if counts[a] > 1),
            "daemon CPU ms/request": round(cpu * 1000 / n, 2),
        }
    finally:
        pub.loop_stop()
        replies.close()
        daemon.terminate()
        daemon.wait(20)
        broker.stop()
        sim.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--limit", type=float, default=600, help="simulator start limit and cloud.reloads_per_minute")
    ap.add_argument("--no-qrs", action="store_true", help="skip the QRS backend's figure")
    args = ap.parse_args()
    row = cloud_run(args.requests, args.limit)
    print(f"# single-app requests, backend: cloud, one daemon\n# {machine()}\n")
    print(table(list(row), [list(row.values())]))
    if not args.no_qrs:
        qrs = qrs_run(args.requests, None)
        print("\n# the same number of single-task requests, backend: qrs (bench/throughput.py)\n")
        print(table(["requests", "daemon CPU ms/request (qrs)", "daemon CPU ms/request (cloud)"],
                    [[args.requests, qrs[8], row["daemon CPU ms/request"]]]))


if __name__ == "__main__":
    main()
