"""Cloud pacing: reload starts through the Qlik Cloud client against the Cloud simulator.

The simulator runs in its own process (`butler-mqtt sim --cloud`'s `main`) with a start limit of
`--limit` a minute over a `--window`-second window and `--apps` generated apps; the client
(butler_mqtt/backends/cloud, the pieces the cloud backend is built from) starts one reload of
each app from `--threads` threads with `reloads_per_minute: --limit`. Printed: starts per minute
as a fraction of the limit (aim: >= 0.95), 429s seen, apps lost (never started) and doubled
(started twice) (both must be 0), and the client's CPU per start. The daemon-level figure (CPU
per request next to the QRS backend's) is bench/cloud_daemon.py.

Run: .venv/bin/python bench/cloud_pacing.py [--apps 300] [--limit 600] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from butler_mqtt.backends.cloud import reloads
from butler_mqtt.backends.cloud.client import CloudClient
from butler_mqtt.backends.cloud.settings import CloudSettings


def _start_sim(certs: Path, apps: int, limit: float, window: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from butler_mqtt.sim.cloud.app import main; sys.exit(main(sys.argv[1:]))",
         "--port", "0", "--certs", str(certs), "--generated-apps", str(apps), "--max-concurrent", "0",
         "--start-limit", str(limit), "--rate-window", str(window)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"listening on (https://\S+)", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit("the Cloud simulator did not start")
    return proc, match.group(1)


def _reload_counts(client: CloudClient, app_ids: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for app_id in app_ids:
        counts[app_id] = len(reloads.recent_reloads(client, app_id, 100))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apps", type=int, default=300)
    ap.add_argument("--limit", type=float, default=600, help="simulator start limit and client reloads_per_minute")
    ap.add_argument("--window", type=float, default=60, help="seconds over which the simulator meters its limit")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    certs = Path(tempfile.mkdtemp(prefix="cloud-bench-"))
    proc, base = _start_sim(certs, args.apps, args.limit, args.window)
    try:
        settings = CloudSettings(tenant=base, client_id="sim-client", client_secret="sim-client-secret",
                                 ca=certs / "root.pem", reloads_per_minute=args.limit, timeout=120)
        client = CloudClient(settings)
        app_ids = [f"9e000000-0000-4000-a000-{i:012d}" for i in range(args.apps)]
        todo = list(reversed(app_ids))
        lock = threading.Lock()
        failures: list[str] = []

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    app_id = todo.pop()
                try:
                    reloads.start_reload(client, app_id)
                except Exception as exc:  # counted as lost below
                    failures.append(f"{app_id}: {exc}")

        client.check()  # the token, outside the measured part
        cpu0, t0 = time.process_time(), time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        counts = _reload_counts(client, app_ids)
        per_minute = (args.apps - 1) / elapsed * 60 if elapsed > 0 else 0.0
        print(json.dumps({
            "apps": args.apps,
            "limit_per_minute": args.limit,
            "seconds": round(elapsed, 2),
            "starts_per_minute": round(per_minute, 1),
            "fraction_of_limit": round(per_minute / args.limit, 3),
            "429_seen": client.rate_limited,
            "lost": sum(1 for a in app_ids if counts[a] == 0),
            "doubled": sum(1 for a in app_ids if counts[a] > 1),
            "client_cpu_ms_per_start": round(cpu / args.apps * 1000, 2),
            "errors": failures[:3],
        }, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
