"""Latency: publish -> summary, p50/p95/p99, for 1, 24 and 200 selected tasks at QRS latency
0 and 20 ms (start_concurrency 8). Run: .venv/bin/python bench/latency.py [--requests N]"""

from __future__ import annotations

import argparse
import time

from harness import Stack, machine, percentile, table, tagged_tasks

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester


def measure(latency_ms: float, sizes: list[int], n: int) -> list[list[object]]:
    tasks = tagged_tasks({f"size-{s}": s for s in sizes}, run_seconds=0.05)
    stack = Stack(tasks, latency_ms=latency_ms)
    rows = []
    try:
        cfg = MqttConfig(host="127.0.0.1", port=stack.broker.port)
        with Requester(cfg) as r:
            for size in sizes:
                r.request({"tag": f"size-{size}"}, timeout=60)  # warm-up (connections, caches)
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    events = r.request({"tag": f"size-{size}"}, timeout=120)
                    samples.append((time.perf_counter() - t0) * 1000)
                    summary = events[-1]
                    assert summary["event"] == "summary", summary
                    confirmed = sum(1 for e in events if e["event"] == "task" and e["status"] == "started")
                    assert confirmed == size, f"{confirmed} of {size} starts confirmed"
                qrs_calls = len([x for x in stack.sim.request_log if x.path.startswith("/qrs/")]) / (n + 1)
                stack.sim.clear_log()
                rows.append([
                    f"{latency_ms:g} ms", size, n, f"{percentile(samples, 50):.1f}", f"{percentile(samples, 95):.1f}",
                    f"{percentile(samples, 99):.1f}", f"{qrs_calls:.0f}",
                ])
    finally:
        stack.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=50, help="requests per row (default 50)")
    args = ap.parse_args()
    rows = []
    for latency in (0, 20):
        rows += measure(latency, [1, 24, 200], args.requests)
    print(f"# publish -> summary latency (every start confirmed by QRS)\n# {machine()}\n")
    print(table(["QRS latency", "tasks", "requests", "p50 ms", "p95 ms", "p99 ms", "QRS calls/request"], rows))


if __name__ == "__main__":
    main()
