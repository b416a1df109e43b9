"""Throughput: single-task requests per second sustained, broker + simulator + daemon on this
machine, nothing lost (every request answered, every task started exactly once).

Run: .venv/bin/python bench/throughput.py [--requests N] [--profile]
`--profile` runs the daemon under cProfile and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import pstats
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from harness import Stack, machine, table
from paho.mqtt.enums import CallbackAPIVersion

from butler_mqtt.mqtt.listener import nodelay, wait_published
from butler_mqtt.sim import SimTask


def run(n: int, profile: str | None) -> list[object]:
    ids = [f"7a5c0000-0000-4000-8000-{i:012d}" for i in range(n)]
    env = {"BUTLER_MQTT_PROFILE": profile} if profile else {}
    stack = Stack([SimTask(t, f"Task {i}", run_seconds=0.05) for i, t in enumerate(ids)], daemon_env=env)
    done = threading.Event()
    seen: set[str] = set()
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        ev = json.loads(msg.payload)
        if ev.get("event") == "summary":
            with lock:
                seen.add(ev["requestId"])
                if len(seen) == n:
                    done.set()

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ready = threading.Event()
    sub.on_connect = lambda c, *_: (nodelay(c), c.subscribe("qliksense/task/start/reply", qos=1))
    sub.on_subscribe = lambda *_: ready.set()
    sub.on_message = on_message
    sub.connect("127.0.0.1", stack.broker.port)
    sub.loop_start()
    ready.wait(10)
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(200)
    pub.connect("127.0.0.1", stack.broker.port)
    pub.loop_start()
    rss0 = stack.rss_mb()
    run_id = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": t}), qos=1) for i, t in enumerate(ids)]
    for info in infos:
        wait_published(info, 60)
    t_pub = time.perf_counter() - t0
    ok = done.wait(600)
    elapsed = time.perf_counter() - t0
    starts = [s.task_id for s in stack.sim.starts]
    rss = stack.rss_mb()
    pub.loop_stop()
    sub.loop_stop()
    stack.close()
    if profile:
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)
    lost = n - len(seen)
    return [
        n, f"{t_pub:.2f}", f"{elapsed:.2f}", f"{n / elapsed:.0f}", lost if ok else f"{lost} (timeout)",
        len(starts) - len(set(starts)), len(set(starts)), f"{rss0:.0f} -> {rss:.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    row = run(args.requests, "/tmp/butler-mqtt-daemon.prof" if args.profile else None)
    print(f"# single-task requests, QRS latency 0, one daemon\n# {machine()}\n")
    print(table(["requests", "published in s", "all answered in s", "requests/s", "lost", "double starts", "tasks started", "daemon RSS MB"], [row]))


if __name__ == "__main__":
    main()
