"""Failure details: extra QRS calls one failed reload costs (issue 22; stub to complete after wiring).

Today (before the Backend wiring) it measures the QRS layer alone: a task fails in the
simulator, then `failure_details(reader, execution_result, lines=40)` (butler_mqtt/backends/qrs/failure.py)
builds the contract's `failure` object; the calls it made are read from the simulator's request
log, per scenario:

* newer route works (`scriptlogfile` -> ticket, download): the expected case;
* newer route missing (404), older `scriptlog` used; then the same again once the reader
  remembers the older route;
* download answers 404 at first (asked too soon, Butler #1499): one more download.

`message` and `details` cost no call: they come from the execution result the tracker already
polled (`GET /qrs/executionresult/full`); only the log costs calls.

It also prints the time one 200 MB log's tail takes (bytes read per second) for reference.

TODO (lead, after wiring into the Backend): run a daemon with `tracking.script_log_lines: 40`,
send one `wait: true` request for a failing task and count the QRS calls beyond those of a
succeeding task's request; and measure the latency of other requests while 20 log downloads run.

Run: .venv/bin/python bench/failure_log.py [--lines 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import machine, table

from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.failure import ScriptLogReader, failure_details
from butler_mqtt.config import QrsConfig
from butler_mqtt.sim import QrsSimulator, SimTask, ensure_certs

FAILING = "fa1100b0-0000-4000-8000-000000000001"
HUGE = "fa1100b0-0000-4000-8000-000000000002"


def run_to_end(client: QrsClient, task_id: str) -> dict[str, Any]:
    session = client.start_synchronous(task_id)
    for _ in range(2000):
        rows = client.execution_results([session])
        if rows and rows[-1]["status"] in (6, 7, 8):
            return rows[-1]
        time.sleep(0.02)
    raise SystemExit("the execution did not end")


def routes(sim: QrsSimulator) -> str:
    """The calls in the request log as `route:status`, GUIDs left out."""
    counts = Counter(f"{r.path.split('/')[-1] if '/download/' not in r.path else 'download'}:{r.status}" for r in sim.request_log)
    return ", ".join(f"{n}x {k}" for k, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=40, help="script_log_lines (default 40)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-failure-"))
    ensure_certs(work)
    tasks = [
        SimTask(FAILING, "Failing", run_seconds=0.05, outcome="fail"),
        SimTask(HUGE, "Huge log", run_seconds=0.05, outcome="fail", log_bytes=200 * 1024 * 1024),
    ]
    with QrsSimulator(tasks, certs_dir=work) as sim:
        cfg = QrsConfig.model_validate(
            {"host": "localhost", "port": sim.port, "cert": work / "client.pem", "key": work / "client_key.pem",
             "ca": work / "root.pem"}
        )
        client, reader = QrsClient(cfg), ScriptLogReader(cfg)
        result = run_to_end(client, FAILING)
        rows = []
        for name, faults in (
            ("newer route works", {}),
            ("newer route 404, older used", {"scriptlogfile": "404"}),
            ("  same, route remembered", {"scriptlogfile": "404"}),
            ("download 404 at first", {"download": "first404"}),
        ):
            sim.log_faults = dict(faults)
            if name.startswith("download"):
                reader.prefer_old_route = False  # back to the newer route first
            sim.clear_log()
            t0 = time.perf_counter()
            got = failure_details(reader, result, lines=args.lines)
            ms = (time.perf_counter() - t0) * 1000
            ok = got is not None and "scriptLogTail" in got
            rows.append([name, len(sim.request_log), routes(sim), "tail" if ok else "error", f"{ms:.0f}"])
        print(machine())
        print(f"Extra QRS calls for one failed reload's failure details (script_log_lines {args.lines}):")
        print(table(["scenario", "calls", "requests (route:status)", "result", "ms"], rows))
        huge = run_to_end(client, HUGE)
        sim.log_faults = {}
        t0 = time.perf_counter()
        got = failure_details(reader, huge, lines=args.lines)
        seconds = time.perf_counter() - t0
        size = huge["scriptLogSize"] / 1e6
        print(f"\n200 MB log: {size:.0f} MB tail in {seconds:.1f} s ({size / seconds:.0f} MB/s), "
              f"{'tail kept' if got and 'scriptLogTail' in got else 'error: ' + str(got and got.get('scriptLogError'))}")
        reader.close()
        client.close()


if __name__ == "__main__":
    main()
