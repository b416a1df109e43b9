"""Replies across broker restarts under CPU load (issue 11, class 9): a reproduction with figures.

Each run: a private Mosquitto (persistence on), the QRS simulator and a daemon in this process,
a persistent-session subscriber counting `summary` replies, and 200 QoS 1 requests published at
once. After `--restart-after` summaries the broker is restarted gracefully (SIGTERM, `--down` s
down, persistence on), `--restarts` times, while `--burners` busy-loop processes load the CPUs.

For every request whose summary never arrived it prints when that summary was published relative
to the restarts, the PUBACK reason code the broker sent for it, whether the daemon acked the
request, and session_present on every reconnect. Figures only: nothing passes or fails.

    .venv/bin/python bench/restart_replies.py --runs 12            # persistent subscriber
    .venv/bin/python bench/restart_replies.py --runs 6 --sub-clean --sub-expiry 0 --sub-delay 4
        # a requester back after the daemon: its replies get PUBACK 0x10 (resent since issue 11)
    .venv/bin/python bench/restart_replies.py --runs 3 --sub-expiry 0 --sub-delay 4
        # a requester without session expiry: Mosquitto 2.0 takes its replies (PUBACK success)
        # into the session it restored, then discards them when it reconnects (not detectable)

BENCH_LOG=debug shows the daemon's log (reply_resent, reply_unmatched, reply_refused).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from butler_mqtt.daemon import Daemon  # noqa: E402
from butler_mqtt.ops.logging import setup_logging  # noqa: E402
from butler_mqtt.ops.mosquitto import Mosquitto  # noqa: E402
from butler_mqtt.sim import QrsSimulator, SimTask  # noqa: E402
from tests.conftest import make_config  # noqa: E402

N = 200
TASK_IDS = [f"fa017000-0000-4000-8000-{i:012d}" for i in range(N)]
T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


class Subscriber:
    """Persistent-session subscriber: every reply event per requestId, with arrival times."""

    def __init__(self, port: int, topic: str, expiry: int = 3600, delay: float = 0.1, max_delay: float = 1.0,
                 clean: bool = False) -> None:
        self.events: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        self.connects: list[tuple[float, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sum-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.c.reconnect_delay_set(delay, max(max_delay, delay))
        ready = threading.Event()

        def on_connect(c: mqtt.Client, _u: Any, flags: Any, _rc: Any, _p: Any) -> None:
            self.connects.append((now(), bool(flags.session_present)))
            c.subscribe(topic, qos=1)

        self.c.on_connect = on_connect
        self.c.on_subscribe = lambda *_: ready.set()
        self.c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        self.c.connect("127.0.0.1", port, clean_start=clean, properties=props)
        self.c.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ev = json.loads(msg.payload)
        with self.lock:
            self.events[str(ev.get("requestId"))].append((now(), ev.get("event", "?")))

    def summaries(self) -> int:
        with self.lock:
            return sum(1 for evs in self.events.values() if any(e in ("summary", "error") for _, e in evs))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Probe:
    """Instruments one in-process daemon: every reply's mid, PUBACK reason code, acks, connects."""

    def __init__(self, d: Daemon) -> None:
        self.replies: dict[int, dict[str, Any]] = {}  # mid -> info (mids are reused: latest wins)
        self.by_request: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.acked: dict[str, float] = {}
        self.connects: list[tuple[float, bool]] = []
        self.rc_counts: collections.Counter[str] = collections.Counter()
        lst = d.listener
        client = lst.client
        orig_publish, orig_finish, orig_connect = lst.publish_event, d.handler._finish, client.on_connect
        orig_on_publish = client.on_publish  # the daemon's own (reason codes): chained, not replaced

        def publish_event(topic: str, corr: bytes | None, event: dict[str, Any]) -> mqtt.MQTTMessageInfo:
            info = orig_publish(topic, corr, event)
            rec = {
                "t": now(), "mid": info.mid, "event": event.get("event"), "rid": event.get("requestId"),
                "rc": int(info.rc), "connected": lst.connected.is_set(), "puback": None, "info": info,
            }
            self.replies[info.mid] = rec
            self.by_request[str(event.get("requestId"))].append(rec)
            return info

        def on_publish(c: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
            if orig_on_publish is not None:
                orig_on_publish(c, u, mid, rc, p)
            rec = self.replies.get(mid)
            name = f"{rc.value:#04x} {rc}" if hasattr(rc, "value") else str(rc)
            self.rc_counts[name] += 1
            if rec is not None and rec["puback"] is None:
                rec["puback"] = (now(), name)
                if rc.value:
                    self.rc_counts[f"  of which replies ({rec['event']}) {name}"] += 1

        def finish(job: Any, replies: list[Any]) -> None:
            orig_finish(job, replies)
            try:
                rid = json.loads(job.payload).get("requestId")
            except ValueError:
                rid = None
            self.acked[str(rid)] = now()

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
            self.connects.append((now(), bool(getattr(flags, "session_present", False))))
            if orig_connect is not None:
                orig_connect(c, u, flags, rc, p)

        lst.publish_event = publish_event  # type: ignore[method-assign]
        d.handler._finish = finish  # type: ignore[method-assign]
        client.on_publish = on_publish
        client.on_connect = on_connect


def one_run(args: argparse.Namespace, certs: Path, sim: QrsSimulator, k: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="restart-replies-"))
    broker = Mosquitto(work / "broker").start()
    cfg = make_config(certs, sim.port, broker, work / "state")
    d = Daemon(cfg)
    d.startup()
    loop = threading.Thread(target=d.main_loop, daemon=True)
    loop.start()
    assert d.listener.subscribed.wait(15), "daemon did not subscribe"
    probe = Probe(d)
    sub = Subscriber(broker.port, cfg.mqtt.topics.reply, args.sub_expiry, args.sub_delay, args.sub_max_delay, args.sub_clean)
    first_start = len(sim.starts)
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    pub.reconnect_delay_set(0.1, 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    pub.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    pub.loop_start()
    prefix = f"r{k}"
    for i in range(N):
        pub.publish(cfg.mqtt.topics.start, json.dumps({"requestId": f"{prefix}-{i}", "taskId": TASK_IDS[i]}), qos=1)
    restarts: list[tuple[float, float, float]] = []
    step = max(1, (N - args.restart_after) // max(1, args.restarts))
    for r in range(args.restarts):
        target = args.restart_after + r * step
        deadline = time.monotonic() + 60
        while sub.summaries() < target and time.monotonic() < deadline:
            time.sleep(0.005)
        t_stop = now()
        broker.stop()
        t_down = now()
        time.sleep(args.down)
        broker.start()
        restarts.append((t_stop, t_down, now()))
    deadline = time.monotonic() + args.wait
    while sub.summaries() < N and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    got = sub.summaries()
    started = [s.task_id for s in sim.starts[first_start:]]
    lost = [f"{prefix}-{i}" for i in range(N) if not any(e in ("summary", "error") for _, e in sub.events.get(f"{prefix}-{i}", []))]
    details = []
    for rid in lost:
        recs = probe.by_request.get(rid, [])
        summ = [r for r in recs if r["event"] in ("summary", "error")]
        s = summ[-1] if summ else None
        details.append({
            "rid": rid,
            "summary_published_at": round(s["t"], 3) if s else None,
            "publish_rc": s["rc"] if s else None,
            "connected_at_publish": s["connected"] if s else None,
            "puback": (round(s["puback"][0], 3), s["puback"][1]) if s and s["puback"] else None,
            "info_published": bool(s["info"]._published) if s else None,  # noqa: SLF001
            "acked_at": round(probe.acked[rid], 3) if rid in probe.acked else None,
            "events_seen": [e for _, e in sub.events.get(rid, [])],
        })
    # Jobs whose last reply was confirmed before an earlier one (acking on the last one's PUBACK
    # would then ack with a reply still unconfirmed)
    out_of_order = 0
    for recs in probe.by_request.values():
        times = [r["puback"][0] for r in recs if r["puback"]]
        if len(times) == len(recs) > 1 and max(times[:-1]) > times[-1]:
            out_of_order += 1
    d.should_exit.set()
    loop.join(5)
    d.shutdown(drain_timeout=5)
    pub.loop_stop()
    sub.close()
    broker.kill()
    return {
        "got": got, "lost": lost, "details": details, "restarts": restarts,
        "daemon_connects": probe.connects, "sub_connects": sub.connects,
        "starts": len(started), "unique_starts": len(set(started)), "rc_counts": dict(probe.rc_counts), "out_of_order": out_of_order,
        "work": str(work),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--restart-after", type=int, default=100, help="summaries seen before the first restart")
    ap.add_argument("--down", type=float, default=1.0, help="seconds the broker stays down")
    ap.add_argument("--burners", type=int, default=2, help="busy-loop processes during each run")
    ap.add_argument("--wait", type=float, default=40.0, help="seconds to wait for all summaries after the last restart")
    ap.add_argument("--sub-expiry", type=int, default=3600,
                    help="the reply subscriber's session expiry (0: its subscription ends with each connection)")
    ap.add_argument("--sub-delay", type=float, default=0.1, help="the reply subscriber's first reconnect delay, seconds")
    ap.add_argument("--sub-max-delay", type=float, default=1.0,
                    help="the reply subscriber's longest reconnect delay (paho's default is 120: 1, 2, 4 s...)")
    ap.add_argument("--sub-clean", action="store_true", help="the reply subscriber connects with clean start every time")
    ap.add_argument("--verbose", action="store_true", help="print every lost request")
    args = ap.parse_args()
    setup_logging(os.environ.get("BENCH_LOG", "error"), "console", stream=sys.stderr)
    certs = Path(tempfile.mkdtemp(prefix="restart-replies-certs-"))
    sim = QrsSimulator(tasks=[SimTask(t, f"Task {i}") for i, t in enumerate(TASK_IDS)], certs_dir=certs, latency_ms=3).start()
    total_lost = 0
    runs_with_loss = 0
    try:
        for k in range(args.runs):
            burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners)]
            try:
                res = one_run(args, certs, sim, k)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            lost = res["lost"]
            total_lost += len(lost)
            runs_with_loss += bool(lost)
            rs = ", ".join(f"stop {a:.2f} down {b:.2f} up {c:.2f}" for a, b, c in res["restarts"])
            print(f"run {k + 1}/{args.runs}: summaries {res['got']}/{N}, lost {len(lost)}, starts {res['starts']} "
                  f"(unique {res['unique_starts']}); restarts [{rs}]", flush=True)
            print(f"   daemon connects (t, session_present): {[(round(t, 2), s) for t, s in res['daemon_connects']]}")
            print(f"   subscriber connects: {[(round(t, 2), s) for t, s in res['sub_connects']]}")
            print(f"   PUBACK reason codes: {res['rc_counts']}")
            print(f"   requests whose last reply was confirmed before an earlier one: {res['out_of_order']}")
            if lost:
                by = collections.Counter(
                    (x["puback"][1] if x["puback"] else "no PUBACK", x["acked_at"] is not None) for x in res["details"]
                )
                print(f"   lost by (PUBACK reason, acked): {dict(by)}")
                for x in res["details"] if args.verbose else res["details"][:5]:
                    print(f"   lost {x}")
    finally:
        sim.stop()
    print(f"\n{args.runs} runs, {args.restarts} restart(s) each, {args.burners} CPU burners: "
          f"{runs_with_loss} runs lost summaries, {total_lost} summaries lost in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
