"""Throughput: single-task requests per second sustained, broker + simulator + daemon on this
machine, nothing lost (every request answered, every task started exactly once).

Run: .venv/bin/python bench/throughput.py [--requests N] [--profile] [--log-level info]
`--profile` runs the daemon under cProfile and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import pstats
import time
import uuid

from harness import Replies, Stack, machine, publisher, table

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask


def run(n: int, profile: str | None, log_level: str = "warning") -> list[object]:
    ids = [f"7a5c0000-0000-4000-8000-{i:012d}" for i in range(n)]
    env = {"BUTLER_MQTT_PROFILE": profile} if profile else {}
    env["BUTLER_MQTT__LOGGING__LEVEL"] = log_level  # info: the daemon's default, every line rendered
    stack = Stack([SimTask(t, f"Task {i}", run_seconds=0.05) for i, t in enumerate(ids)], daemon_env=env)
    replies = Replies(stack.broker.port)
    pub = publisher(stack.broker.port)
    rss0 = stack.rss_mb()
    cpu0, here0 = stack.cpu_s(), time.process_time()
    run_id = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": t}), qos=1) for i, t in enumerate(ids)]
    for info in infos:
        wait_published(info, 60)
    t_pub = time.perf_counter() - t0
    ok = replies.wait(lambda: len(replies.seen) == n, 600)
    elapsed = time.perf_counter() - t0
    starts = [s.task_id for s in stack.sim.starts]
    rss = stack.rss_mb()
    cpu, here = (stack.cpu_s() - cpu0) * 1000 / n, (time.process_time() - here0) * 1000 / n
    pub.loop_stop()
    replies.close()
    stack.close()
    if profile:
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)
    lost = n - len(replies.seen)
    return [
        n, f"{t_pub:.2f}", f"{elapsed:.2f}", f"{n / elapsed:.0f}", lost if ok else f"{lost} (timeout)",
        len(starts) - len(set(starts)), len(set(starts)), f"{rss0:.0f} -> {rss:.0f}", f"{cpu:.2f}", f"{here:.2f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--log-level", default="warning", help="the daemon's logging.level (its default is info)")
    args = ap.parse_args()
    row = run(args.requests, "/tmp/butler-mqtt-daemon.prof" if args.profile else None, args.log_level)
    print(f"# single-task requests, QRS latency 0, one daemon, logging.level {args.log_level}\n# {machine()}\n")
    print(table(["requests", "published in s", "all answered in s", "requests/s", "lost", "double starts", "tasks started", "daemon RSS MB",
                "daemon CPU ms/request", "simulator+clients CPU ms/request"], [row]))


if __name__ == "__main__":
    main()
