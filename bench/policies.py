"""Run policies (contract section 7): what `ifRunning: queue` and `max_running` cost per request,
and what they do to a burst.

1. Latency, publish -> summary, p50/p95, QRS calls per request, for 1 and 24 selected (idle)
   tasks at a QRS latency of 20 ms: the defaults (`if_running: start`, `max_running: 0`) next
   to `if_running: queue` (the running check and the queue lookup run for every task) and to
   `max_running: 1000` (a cap never reached: every start goes through the journal's queue and
   slot count). Policies must add no QRS round trip.
2. A burst: N single-task requests over 20 tasks that each reload for 1 s, published at once
   (tracking.poll_interval 1 s), with `ifRunning: queue` and `max_running: 8` next to the
   defaults: requests answered per second (summaries), starts QRS received, the most of our
   reloads running at once, and when the last start (the reruns included) happened.

Run: .venv/bin/python bench/policies.py [--requests N] [--burst N]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from harness import Replies, Stack, machine, percentile, publisher, table, tagged_tasks

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask

QUEUE = {"BUTLER_MQTT__POLICIES__IF_RUNNING": "queue"}
CAP = {"BUTLER_MQTT__POLICIES__MAX_RUNNING": "1000"}
BURST_POLL = {"BUTLER_MQTT__TRACKING__POLL_INTERVAL": "1"}


def latency_rows(name: str, env: dict[str, str], n: int) -> list[list[object]]:
    stack = Stack(tagged_tasks({"size-1": 1, "size-24": 24}, run_seconds=0.01), latency_ms=20, daemon_env=env)
    rows = []
    try:
        with Requester(MqttConfig(host="127.0.0.1", port=stack.broker.port)) as r:
            for size in (1, 24):
                r.request({"tag": f"size-{size}"}, timeout=60)  # warm-up
                time.sleep(0.1)
                stack.sim.clear_log()
                samples = []
                for _ in range(n):
                    time.sleep(0.2)  # the 10 ms reloads end: every request finds its tasks idle
                    t0 = time.perf_counter()
                    events = r.request({"tag": f"size-{size}"}, timeout=120)
                    samples.append((time.perf_counter() - t0) * 1000)
                    started = sum(1 for e in events if e["event"] == "task" and e["status"] == "started")
                    assert started == size, events[-1]
                calls = len([x for x in stack.sim.request_log if x.path.startswith("/qrs/") and "executionresult" not in x.path])
                rows.append([name, size, n, f"{percentile(samples, 50):.1f}", f"{percentile(samples, 95):.1f}",
                             f"{calls / n:.2f}"])
    finally:
        stack.close()
    return rows


def burst_row(name: str, env: dict[str, str], n: int) -> list[object]:
    ids = [f"7b5c0000-0000-4000-8000-{i:012d}" for i in range(20)]
    stack = Stack([SimTask(t, f"Task {i}", run_seconds=1.0) for i, t in enumerate(ids)], daemon_env=env)
    replies = Replies(stack.broker.port)
    pub = publisher(stack.broker.port)
    run_id = uuid.uuid4().hex[:6]
    try:
        t0 = time.perf_counter()
        infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": ids[i % 20]}),
                             qos=1) for i in range(n)]
        for info in infos:
            wait_published(info, 60)
        wall0 = time.time()
        ok = replies.wait(lambda: len(replies.seen) == n, 600)
        elapsed = time.perf_counter() - t0
        quiet_since = time.monotonic()
        count = len(stack.sim.starts)
        while time.monotonic() - quiet_since < 4:  # until no start came for 4 s (queue drained)
            time.sleep(0.2)
            if len(stack.sim.starts) != count:
                count, quiet_since = len(stack.sim.starts), time.monotonic()
        starts = stack.sim.starts
        spans = [(s.at, s.at + 1.0) for s in starts]
        peak = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans) if spans else 0
        last = max(s.at for s in starts) - wall0 if starts else 0.0
        return [name, n, f"{elapsed:.2f}", f"{n / elapsed:.0f}", "" if ok else "timeout", len(starts), peak,
                f"{last:.1f}"]
    finally:
        pub.loop_stop()
        replies.close()
        stack.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=40, help="requests per latency row (default 40)")
    ap.add_argument("--burst", type=int, default=1000, help="requests in the burst (default 1000)")
    args = ap.parse_args()
    rows = (latency_rows("defaults", {}, args.requests) + latency_rows("if_running queue", QUEUE, args.requests)
            + latency_rows("max_running 1000", CAP, args.requests))
    print(f"# publish -> summary at QRS latency 20 ms\n# {machine()}\n")
    print(table(["policies", "tasks", "requests", "p50 ms", "p95 ms", "QRS calls/request (no polls)"], rows))
    burst = [
        burst_row("defaults", BURST_POLL, args.burst),
        burst_row("queue + max_running 8", {**BURST_POLL, "BUTLER_MQTT__POLICIES__IF_RUNNING": "queue",
                                            "BUTLER_MQTT__POLICIES__MAX_RUNNING": "8"}, args.burst),
    ]
    print(f"\n# a burst of single-task requests over 20 tasks (1 s reloads), QRS latency 0\n# {machine()}\n")
    print(table(["policies", "requests", "answered in s", "requests/s", "", "starts QRS got", "most running at once",
                 "last start after s"], burst))


if __name__ == "__main__":
    main()
