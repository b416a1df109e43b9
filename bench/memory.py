"""Memory: the daemon's resident set size (VmRSS of the daemon process) after 1k, 10k and 20k
single-task requests, every one answered. Target (issue 8): <= 80 MB, flat in the second half.

Requests go out in batches; each batch is waited for (every summary received) before the
next, so the figures are the daemon's steady state, not a backlog in its queue.

Run: .venv/bin/python bench/memory.py [--requests 20000] [--batch 500] [--at 1000,10000,20000]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from harness import Replies, Stack, machine, publisher, table

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask

TARGET_MB = 80.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500, help="requests published before waiting for their answers")
    ap.add_argument("--at", default="1000,2000,5000,10000,15000,20000", help="request counts at which RSS is read")
    args = ap.parse_args()
    n = args.requests
    marks = sorted({int(x) for x in args.at.split(",") if 0 < int(x) <= n} | {n})
    ids = [f"3e3c0000-0000-4000-8000-{i:012d}" for i in range(n)]
    stack = Stack([SimTask(t, f"Task {i}", run_seconds=0.05) for i, t in enumerate(ids)])
    replies = Replies(stack.broker.port)
    seen = replies.seen
    pub = publisher(stack.broker.port)
    run_id = uuid.uuid4().hex[:6]
    rows: list[list[object]] = [[0, f"{stack.rss_mb():.1f}", "", ""]]
    readings = {0: stack.rss_mb()}
    t0 = time.perf_counter()
    sent = 0
    try:
        while sent < n:
            upto = min(n, sent + args.batch, next(m for m in marks if m > sent))
            infos = [
                pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run_id}-{i}", "taskId": ids[i]}), qos=1)
                for i in range(sent, upto)
            ]
            for info in infos:
                wait_published(info, 60)
            if not replies.wait(lambda u=upto: len(seen) >= u, 300):
                raise RuntimeError(f"only {len(seen)} of {upto} requests answered; see {stack.work / 'daemon.log'}")
            sent = upto
            if sent in marks:
                rss = stack.rss_mb()
                readings[sent] = rss
                rows.append([sent, f"{rss:.1f}", f"{rss - readings[0]:+.1f}", f"{time.perf_counter() - t0:.0f}"])
        starts = [s.task_id for s in stack.sim.starts]
    finally:
        pub.loop_stop()
        replies.close()
        stack.close()
    half = min(marks, key=lambda m: abs(m - n / 2))
    growth = readings[n] - readings[half]
    flat = growth <= max(2.0, 0.03 * readings[half])
    peak = max(readings.values())
    print(f"# daemon RSS after N single-task requests (all answered), batches of {args.batch}\n# {machine()}\n")
    print(table(["requests", "daemon RSS MB", "vs idle MB", "elapsed s"], rows))
    print()
    print(f"- answered {len(seen)} of {n}; tasks started {len(set(starts))}, started twice {len(starts) - len(set(starts))}")
    print(f"- peak {peak:.1f} MB: {'within' if peak <= TARGET_MB else 'OVER'} the {TARGET_MB:.0f} MB target")
    print(f"- second half ({half} -> {n} requests): {growth:+.1f} MB: {'flat' if flat else 'NOT flat'} "
          f"(flat = at most +2 MB or +3 %)")


if __name__ == "__main__":
    main()
