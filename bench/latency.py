"""Latency: publish -> summary, p50/p95/p99, for 1, 24 and 200 selected tasks at QRS latency
0 and 20 ms (start_concurrency 8). With `--callers N`, the daemon has N callers configured
(contract section 10; each allowed every task by tag, the first with a requests_per_minute) and
the requests come on the first caller's topic: the request path with callers against none.
Run: .venv/bin/python bench/latency.py [--requests N] [--callers N] [--sizes 1,24,200] [--latencies 0,20]"""

from __future__ import annotations

import argparse
import json
import time

from harness import Stack, machine, percentile, table, tagged_tasks

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester


def callers_env(n: int, sizes: list[int]) -> dict[str, str]:
    """N callers in the daemon's environment; each may start every benchmark task (by tag)."""
    if not n:
        return {}
    tags = [f"size-{s}" for s in sizes]
    callers = [{"name": f"c{i}", "tokens_sha256": [f"{i:064x}"], "allow": {"tags": tags},
                **({"requests_per_minute": 100_000} if i == 0 else {})} for i in range(n)]
    return {"BUTLER_MQTT__CALLERS": json.dumps(callers)}


def measure(latency_ms: float, sizes: list[int], n: int, callers: int = 0) -> list[list[object]]:
    tasks = tagged_tasks({f"size-{s}": s for s in sizes}, run_seconds=0.05)
    stack = Stack(tasks, latency_ms=latency_ms, daemon_env=callers_env(callers, sizes))
    rows = []
    try:
        cfg = MqttConfig(host="127.0.0.1", port=stack.broker.port)
        topic = f"{cfg.topics.start}/c0" if callers else None
        with Requester(cfg) as r:
            for size in sizes:
                r.request({"tag": f"size-{size}"}, timeout=60, topic=topic)  # warm-up (connections, caches)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    events = r.request({"tag": f"size-{size}"}, timeout=120, topic=topic)
                    samples.append((time.perf_counter() - t0) * 1000)
                    summary = events[-1]
                    assert summary["event"] == "summary", summary
                    confirmed = sum(1 for e in events if e["event"] == "task" and e["status"] == "started")
                    assert confirmed == size, f"{confirmed} of {size} starts confirmed"
                qrs_calls = len([x for x in stack.sim.request_log if x.path.startswith("/qrs/")]) / (n + 1)
                stack.sim.clear_log()
                rows.append([
                    f"{latency_ms:g} ms", callers, size, n, f"{percentile(samples, 50):.1f}", f"{percentile(samples, 95):.1f}",
                    f"{percentile(samples, 99):.1f}", f"{qrs_calls:.0f}",
                ])
    finally:
        stack.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=50, help="requests per row (default 50)")
    ap.add_argument("--callers", type=int, default=0, help="callers configured; requests on the first one's topic")
    ap.add_argument("--sizes", default="1,24,200", help="selected tasks per request (default 1,24,200)")
    ap.add_argument("--latencies", default="0,20", help="QRS latencies in ms (default 0,20)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    for latency in (float(x) for x in args.latencies.split(",")):
        rows += measure(latency, sizes, args.requests, args.callers)
    print(f"# publish -> summary latency (every start confirmed by QRS)\n# {machine()}\n")
    print(table(["QRS latency", "callers", "tasks", "requests", "p50 ms", "p95 ms", "p99 ms", "QRS calls/request"], rows))


if __name__ == "__main__":
    main()
