"""Issue 11, class 2: bounded memory under a flood, while the workers are busy.

The daemon runs as a subprocess (`python -m butler_mqtt run`) so that its peak resident memory
(VmHWM) can be read. Two workers are kept busy by slow QRS answers while the flood arrives;
the publisher waits for each PUBACK, so the test process itself stays small. Asserted: every
flooded message got exactly one reply, a valid request sent afterwards is answered and started
once, and the daemon's peak RSS stays under 150 MB. No timing assertions.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.ops.mosquitto import INSTALL_HINT, Mosquitto, find_mosquitto, free_port
from butler_mqtt.sim import SimTask
from tests.support.mqtt import Inbox, Sender, vm_hwm_mb, wait_until
from tests.support.ops import DaemonProcess, daemon_env

BUSY = ["b0000002-0000-4000-8000-000000000001", "b0000002-0000-4000-8000-000000000002"]
AFTER = "b0000002-0000-4000-8000-000000000003"
TASKS = [SimTask(BUSY[0], "Busy 1"), SimTask(BUSY[1], "Busy 2"), SimTask(AFTER, "After the flood")]
RSS_LIMIT_MB = 150


def _rig(qrs_certs: Path, sim: Any, broker: Any, tmp_path: Path, **extra: str) -> tuple[DaemonProcess, Inbox, Sender, dict[str, str]]:
    base = f"mem/{uuid.uuid4().hex[:8]}"
    t = {"start": f"{base}/start", "reply": f"{base}/reply", "status": f"{base}/status"}
    env = daemon_env(
        qrs_certs, sim.port, broker.port, tmp_path / "state", f"mem-{uuid.uuid4().hex[:8]}",
        BUTLER_MQTT__MQTT__TOPICS__START=t["start"],
        BUTLER_MQTT__MQTT__TOPICS__REPLY=t["reply"],
        BUTLER_MQTT__MQTT__TOPICS__STATUS=t["status"],
        BUTLER_MQTT__MQTT__WORKERS="2",
        BUTLER_MQTT__QRS__TIMEOUT="150",  # the held starts must not time out
        BUTLER_MQTT__LOGGING__LEVEL="warning",
        **extra,
    )
    status = Inbox(broker.port, t["status"])
    daemon = DaemonProcess(env)
    try:
        assert status.wait_count(lambda r: r.event.get("status") == "online", 1, 30) == 1, (
            "the daemon did not come online:\n" + daemon.log_text()
        )
    finally:
        status.close()
    return daemon, Inbox(broker.port, t["reply"]), Sender(broker.port, t["start"]), t


class HeldStarts:
    """Task starts that block in the simulator until released: each holds one daemon worker."""

    def __init__(self, sim: Any) -> None:
        self.entered = 0
        self.gate = threading.Event()
        self._lock = threading.Lock()
        original = sim.store.start

        def held(task_id: str) -> Any:
            if task_id.lower() in BUSY:
                with self._lock:
                    self.entered += 1
                self.gate.wait(120)
            return original(task_id)

        sim.store.start = held

    def release(self) -> None:
        self.gate.set()


def _keep_workers_busy(sim: Any, sender: Sender) -> HeldStarts:
    """Two valid requests whose starts QRS holds: both workers are busy until released."""
    held = HeldStarts(sim)
    for i, task in enumerate(BUSY):
        sender.send({"requestId": f"busy-{i}", "taskId": task}, confirm=True)
    assert wait_until(lambda: held.entered == 2, 30), "the two busy requests did not reach their starts"
    return held


def _valid_after(sim: Any, sender: Sender, inbox: Inbox) -> None:
    sender.send({"requestId": "after-flood", "taskId": AFTER}, confirm=True)
    final = inbox.wait_final(lambda r: r.event.get("requestId") == "after-flood", 60)
    assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
    assert [s.task_id for s in sim.starts].count(AFTER) == 1
    for i in range(len(BUSY)):
        busy = inbox.wait_final(lambda r, i=i: r.event.get("requestId") == f"busy-{i}", 60)
        assert busy.event["event"] == "summary", busy.event
    assert sorted(s.task_id for s in sim.starts) == sorted([*BUSY, AFTER]), "a task was started twice or not at all"


@pytest.fixture
def flood_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker without persistence: saving a gigabyte of queued flood every second
    would only test the disk."""
    if find_mosquitto() is None:
        pytest.fail(INSTALL_HINT)
    port = free_port()
    b = Mosquitto(tmp_path / "broker", port=port, extra_conf=f"persistence false\nlistener {port} 127.0.0.1\nallow_anonymous true")
    b.start()
    yield b
    b.kill()


def test_300_payloads_of_5_mb_while_workers_are_busy(qrs_certs, sim, flood_broker, tmp_path):
    """The workers are held for the first 100 payloads (the broker stops at Receive Maximum,
    the daemon queues small error jobs), then work while the other 200 stream in."""
    n, size = 300, 5 * 1024 * 1024
    daemon, inbox, sender, _t = _rig(qrs_certs, sim, flood_broker, tmp_path)
    try:
        held = _keep_workers_busy(sim, sender)
        big = b'{"requestId": "big", "tag": ["' + b"x" * size + b'"]}'  # invalid: too large
        for i in range(n):
            if i == 100:
                held.release()
            sender.send(big, confirm=True)
        del big
        too_large = lambda r: r.event.get("event") == "error" and r.event.get("error") == "Payload too large"  # noqa: E731
        got = inbox.wait_count(too_large, n, 90)
        assert got == n, f"{n - got} of {n} oversize payloads got no 'Payload too large' reply"
        _valid_after(sim, sender, inbox)
        assert inbox.wait_count(too_large, n + 1, 1) == n, "an oversize payload was answered twice"
        assert daemon.proc.poll() is None, "the daemon died:\n" + daemon.log_text()
        peak = vm_hwm_mb(daemon.proc.pid)
        print(f"5 MB flood: daemon peak RSS {peak:.1f} MB")
        assert peak < RSS_LIMIT_MB, f"daemon peak RSS {peak:.0f} MB (limit {RSS_LIMIT_MB} MB)"
    finally:
        sender.close()
        inbox.close()
        daemon.stop()


def test_flood_just_under_the_limit_through_a_small_queue(qrs_certs, sim, flood_broker, tmp_path):
    """60 KB payloads (the limit is 64 KiB) through a 1 MiB hand-off queue: deliveries beyond
    it are left to the broker and redelivered; each still gets exactly one reply."""
    n = 200
    daemon, inbox, sender, _t = _rig(
        qrs_certs, sim, flood_broker, tmp_path, BUTLER_MQTT__MQTT__QUEUE_BYTES=str(1024 * 1024)
    )
    try:
        held = _keep_workers_busy(sim, sender)
        pad = "x" * 60_000
        for i in range(n):  # invalid (unknown field), so each is answered with an error
            sender.send({"requestId": f"fill-{i}", "padding": pad})
        sender.confirm_all(120)
        held.release()
        ids = {f"fill-{i}" for i in range(n)}
        final_fill = lambda r: r.event.get("event") in ("summary", "error") and r.event.get("requestId") in ids  # noqa: E731
        answered = lambda: {r.event["requestId"] for r in inbox.select(final_fill)}  # noqa: E731
        wait_until(lambda: answered() == ids, 120, step=0.2)
        assert answered() == ids, f"{len(ids - answered())} of {n} payloads were never answered: {sorted(ids - answered())[:10]}"
        _valid_after(sim, sender, inbox)
        counts: dict[str, int] = {}
        for r in inbox.select(final_fill):
            counts[r.event["requestId"]] = counts.get(r.event["requestId"], 0) + 1
        doubled = {k: v for k, v in counts.items() if v != 1}
        assert not doubled, f"answered more than once: {sorted(doubled)[:10]}"
        assert all(r.event["event"] == "error" for r in inbox.select(final_fill))
        # The queue bound was really hit: deliveries were left to the broker and fetched again.
        assert any(e.get("event") == "mqtt_redelivery_requested" for e in daemon.events), (
            "the 1 MiB queue never filled: the test did not exercise the bound"
        )
        assert daemon.proc.poll() is None, "the daemon died:\n" + daemon.log_text()
        peak = vm_hwm_mb(daemon.proc.pid)
        print(f"60 KB flood: daemon peak RSS {peak:.1f} MB")
        assert peak < RSS_LIMIT_MB, f"daemon peak RSS {peak:.0f} MB (limit {RSS_LIMIT_MB} MB)"
    finally:
        sender.close()
        inbox.close()
        daemon.stop()


def test_flood_on_unknown_caller_topics(qrs_certs, sim, flood_broker, tmp_path):
    """Callers (contract section 10): 3,000 requests, each on a caller level no caller has (all
    different, 100 characters): each answered `Unknown caller` once and acked, nothing started,
    the daemon's peak RSS bounded; a caller's valid request afterwards is served."""
    import json

    n = 3000
    callers = [{"name": f"c{i}", "allow": {"task_ids": [AFTER]}} for i in range(10)]
    daemon, inbox, sender, t = _rig(qrs_certs, sim, flood_broker, tmp_path, BUTLER_MQTT__CALLERS=json.dumps(callers))
    try:
        for i in range(n):
            sender.send({"requestId": f"u-{i}", "taskId": AFTER}, topic=f"{t['start']}/u{i:05d}-{'z' * 94}")
        sender.confirm_all(120)
        unknown = lambda r: r.event.get("event") == "error" and r.event.get("error") == "Unknown caller"  # noqa: E731
        got = inbox.wait_count(unknown, n, 120)
        assert got == n, f"{n - got} of {n} unknown-caller requests got no 'Unknown caller' reply"
        assert sim.starts == []
        sender.send({"requestId": "after-flood", "taskId": AFTER}, topic=f"{t['start']}/c3", confirm=True)
        final = inbox.wait_final(lambda r: r.event.get("requestId") == "after-flood", 60)
        assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
        assert inbox.wait_count(unknown, n + 1, 1) == n, "an unknown-caller request was answered twice"
        assert daemon.proc.poll() is None, "the daemon died:\n" + daemon.log_text()
        peak = vm_hwm_mb(daemon.proc.pid)
        print(f"unknown-caller flood: daemon peak RSS {peak:.1f} MB")
        assert peak < RSS_LIMIT_MB, f"daemon peak RSS {peak:.0f} MB (limit {RSS_LIMIT_MB} MB)"
    finally:
        sender.close()
        inbox.close()
        daemon.stop()
