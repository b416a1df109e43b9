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

Through the daemon (wired, issue 22): a daemon (subprocess) with `tracking.script_log_lines`
(default 40) follows one `wait: true` request for a succeeding task and one for a failing task;
the QRS calls of each are read from the simulator's request log by route, and the difference is
what the failure costs. Then 20 failing reloads whose log downloads drip (the simulator's
`drip` fault: 16 bytes every 0.5 s, cut at `tracking.script_log_deadline`) run while other
requests (`tag` start, no wait) are timed from publish to summary, against the same requests
with no download running.

Run: .venv/bin/python bench/failure_log.py [--lines 40] [--others 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import Stack, machine, percentile, table

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


def main() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=40, help="script_log_lines (default 40)")
    parser.add_argument("--others", type=int, default=40, help="timed other requests per series (default 40)")
    args, _ = parser.parse_known_args()
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
    return args


OK_TASK = "fa1100b0-0000-4000-8000-000000000003"
OTHER = "fa1100b0-0000-4000-8000-000000000004"
DRIPPING = [f"fa1100b0-0000-4000-8000-1000000000{i:02d}" for i in range(20)]


def by_route(sim: QrsSimulator) -> Counter[str]:
    out: Counter[str] = Counter()
    for r in sim.request_log:
        parts = r.path.split("/")
        out["download" if "/download/" in r.path else parts[-1] if parts[-1] in ("scriptlogfile", "scriptlog") else
            "/".join(p for p in parts[2:4] if p and len(p) != 36)] += 1
    return out


def daemon_calls(lines: int) -> list[list[Any]]:
    """QRS calls of a waited request for a succeeding task and for a failing one, by route."""
    from butler_mqtt.config import MqttConfig
    from butler_mqtt.mqtt.requester import Requester

    tasks = [SimTask(OK_TASK, "Fine", run_seconds=0.3), SimTask(FAILING, "Failing", run_seconds=0.3, outcome="fail")]
    env = {"BUTLER_MQTT__TRACKING__SCRIPT_LOG_LINES": str(lines), "BUTLER_MQTT__TRACKING__POLL_INTERVAL": "0.2",
           "BUTLER_MQTT__TRACKING__FIRST_POLL": "0.1"}
    stack = Stack(tasks, daemon_env=env)
    rows: list[list[Any]] = []
    try:
        with Requester(MqttConfig(host="127.0.0.1", port=stack.broker.port)) as requester:
            counts = {}
            for name, task in (("succeeding task", OK_TASK), ("failing task", FAILING)):
                stack.sim.clear_log()
                events = requester.request({"taskId": task, "wait": True}, timeout=60)
                finished = next(e for e in events if e["event"] == "taskFinished")
                counts[name] = by_route(stack.sim)
                tail = len((finished.get("failure") or {}).get("scriptLogTail") or [])
                rows.append([name, sum(counts[name].values()), ", ".join(f"{n}x {k}" for k, n in sorted(counts[name].items())),
                             finished["status"], tail])
            extra = counts["failing task"] - counts["succeeding task"]
            rows.append(["extra for the failure", sum(extra.values()), ", ".join(f"{n}x {k}" for k, n in sorted(extra.items())), "", ""])
    finally:
        stack.close()
    return rows


def latency_while_downloading(others: int) -> tuple[list[float], list[float], int]:
    """Publish-to-summary seconds of `others` start requests, alone and while 20 log downloads drip."""
    from butler_mqtt.config import MqttConfig
    from butler_mqtt.mqtt.requester import Requester

    tasks = [SimTask(OTHER, "Other", tags=["other"], run_seconds=0.05)]
    tasks += [SimTask(t, f"Dripping {i}", tags=["drip"], run_seconds=0.1, outcome="fail") for i, t in enumerate(DRIPPING)]
    env = {"BUTLER_MQTT__TRACKING__POLL_INTERVAL": "0.2", "BUTLER_MQTT__TRACKING__FIRST_POLL": "0.1",
           "BUTLER_MQTT__TRACKING__SCRIPT_LOG_DEADLINE": "60"}
    stack = Stack(tasks, daemon_env=env)
    stack.sim.log_faults = {"download": "drip"}

    def timed(requester: Any) -> list[float]:
        out = []
        for _ in range(others):
            t0 = time.perf_counter()
            requester.request({"tag": "other"}, timeout=60)
            out.append(time.perf_counter() - t0)
        return out

    try:
        with Requester(MqttConfig(host="127.0.0.1", port=stack.broker.port)) as requester:
            alone = timed(requester)
            _, box = requester.send({"tag": "drip", "wait": True})
            deadline = time.monotonic() + 30
            while sum(1 for r in stack.sim.request_log if "/download/" in r.path) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            during = timed(requester)
            downloading = sum(1 for r in stack.sim.request_log if "/download/" in r.path)
    finally:
        stack.close()
    return alone, during, downloading


def daemon_main(lines: int, others: int) -> None:
    print(f"\nThrough the daemon (tracking.script_log_lines {lines}): QRS calls of one waited request")
    print(table(["request", "calls", "requests (route)", "final", "tail lines"], daemon_calls(lines)))
    alone, during, downloads = latency_while_downloading(others)
    print(f"\nLatency of other requests (publish -> summary, {others} sequential start requests), alone and while the"
          f" logs of 20 failed reloads drip (downloads begun during the second series: {downloads}):")
    rows = [[name, f"{percentile(v, 50) * 1000:.1f}", f"{percentile(v, 95) * 1000:.1f}", f"{max(v) * 1000:.1f}"]
            for name, v in (("alone", alone), ("during 20 downloads", during))]
    print(table(["series", "p50 ms", "p95 ms", "max ms"], rows))


if __name__ == "__main__":
    options = main()
    daemon_main(options.lines, options.others)
