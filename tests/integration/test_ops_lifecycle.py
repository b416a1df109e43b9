"""The daemon's lifecycle (daemon.py, as uvicorn's Server): a startup step that fails stops what
had started; a second SIGTERM during the drain exits at once; SIGHUP reloads one at a time."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from butler_mqtt.config import MqttConfig
from butler_mqtt.daemon import Daemon
from butler_mqtt.errors import ConfigError
from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import Inbox, publisher, wait_until
from tests.support.ops import DaemonProcess, daemon_env

T1 = "11111111-1111-4111-8111-111111111111"
TASKS = [SimTask(T1, "Lifecycle task")]
TOPICS = MqttConfig().topics


@pytest.fixture
def taken_port():
    """A port another process already listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_a_rest_port_already_taken_stops_everything_that_had_started(qrs_certs, sim, broker, tmp_path, taken_port):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": taken_port})
    before = set(threading.enumerate())
    d = Daemon(cfg)
    with pytest.raises(ConfigError) as err:
        d.serve()
    assert err.value.key == "http.port" and f"cannot listen on 127.0.0.1:{taken_port}" in err.value.reason
    # Everything startup() had started before the REST listener is stopped again.
    assert len(d.workers.threads) == cfg.mqtt.workers
    assert wait_until(lambda: not [t for t in threading.enumerate() if t not in before], 15), [
        t.name for t in threading.enumerate() if t not in before
    ]
    assert not d.listener.alive and not d.runtime.tracker.alive
    assert not any(t.is_alive() for t in d.workers.threads)
    with pytest.raises(Exception, match="closed"):
        d.runtime.journal.load("any")  # the journal was closed


def test_run_with_the_rest_port_taken_exits_2_naming_the_key(qrs_certs, sim, broker, tmp_path, taken_port):
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", f"taken-{uuid.uuid4().hex[:8]}",
                     BUTLER_MQTT__HTTP__ENABLED="true", BUTLER_MQTT__HTTP__PORT=str(taken_port))
    d = DaemonProcess(env)
    try:
        assert d.wait(60) == 2, d.log_text()
    finally:
        d.stop()
    assert f"configuration error: http.port (environment variable BUTLER_MQTT__HTTP__PORT): cannot listen on 127.0.0.1:{taken_port}" in d.log_text()
    names = [e.get("event") for e in d.events]
    # The parts started before the listener were stopped the clean way (the listener's offline status, the journal).
    assert "stopping" in names and names[-1] == "stopped", names


def _policies(pid: int) -> set[int]:
    """The scheduling policies of the threads of process `pid` (more than a handful: the daemon's)."""
    found: set[int] = set()
    threads = os.listdir(f"/proc/{pid}/task")
    assert len(threads) > 5, threads
    for tid in threads:
        try:
            found.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:  # a short-lived thread that ended meanwhile
            continue
    return found


def _unacked(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("butler_mqtt_unacked_deliveries "):
                return float(line.split()[1])
    return 0.0


def test_a_second_sigterm_during_the_drain_exits_at_once(qrs_certs, sim, broker, tmp_path):
    metrics_port = free_port()
    client_id = f"force-{uuid.uuid4().hex[:8]}"
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", client_id,
                     BUTLER_MQTT__QRS__TIMEOUT="600", BUTLER_MQTT__METRICS__PORT=str(metrics_port))
    d = DaemonProcess(env)
    pub = publisher(broker.port)
    replies = Inbox(broker.port, TOPICS.reply)
    try:
        d.wait_log("mqtt_subscribed")
        d.wait_log("http_listening")
        # cpu_scheduling's default: every thread of the running daemon is SCHED_BATCH (ops/scheduling.py).
        assert d.wait_log("cpu_scheduling")["policy"] == "batch"
        assert _policies(d.proc.pid) == {os.SCHED_BATCH}
        sim.latency_ms = 600_000  # QRS holds every call: the request stays in flight
        pub.publish(TOPICS.start, json.dumps({"requestId": "held", "taskId": T1}), qos=1).wait_for_publish(10)
        assert wait_until(lambda: _unacked(metrics_port) == 1, 20)
        for path in (f"/v4/reloadtask/{T1}/start", "/v4/reloadtask/start"):  # metrics only: no start fast path
            req = urllib.request.Request(f"http://127.0.0.1:{metrics_port}{path}", data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=5)
            assert err.value.code == 404
        d.signal(signal.SIGTERM)
        assert d.wait_log("stopping")["in_flight"] == 1  # a clean stop would wait up to 30 s for it
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 128 + signal.SIGTERM, d.log_text()
        forced = d.wait_log("forced_exit")
        assert forced["signal"] == "SIGTERM" and forced["in_flight"] == 1
        assert "stopped" not in [e.get("event") for e in d.events]
        assert sim.starts == []  # it did not wait for QRS's answer

        # Nothing is lost: the next run gets the delivery again and answers it.
        sim.latency_ms = 0
        d = DaemonProcess(env)
        summary = replies.wait_for(lambda m: m.get("event") == "summary", timeout=30)
        assert summary["requestId"] == "held" and [s.task_id for s in sim.starts] == [T1]
    finally:
        sim.latency_ms = 0
        pub.disconnect()
        pub.loop_stop()
        replies.close()
        d.stop()


def test_reloads_run_one_at_a_time_and_a_burst_is_coalesced(cfg, start_daemon, monkeypatch):
    d = start_daemon(cfg).daemon
    lock, gate = threading.Lock(), threading.Event()
    running: list[int] = [0]
    seen: list[int] = []  # how many reloads ran at once, at each start
    done: list[int] = []

    def slow_reload() -> None:
        with lock:
            running[0] += 1
            seen.append(running[0])
        gate.wait(10)  # the first one is held until the burst has arrived
        with lock:
            running[0] -= 1
            done.append(1)

    monkeypatch.setattr(d.reloader, "reload", slow_reload)
    d.reloader.request()
    assert wait_until(lambda: seen == [1], 10)
    burst = [threading.Thread(target=lambda: [d.reloader.request() for _ in range(50)]) for _ in range(4)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    gate.set()
    # The 200 requests that arrived during the first reload are served by one more reload.
    assert wait_until(lambda: len(done) == 2, 10)
    assert wait_until(lambda: d.reloader._requests.empty(), 5)
    assert seen == [1, 1] and len(done) == 2


def test_a_burst_of_real_sighups_reloads_one_at_a_time(qrs_certs, sim, broker, tmp_path):
    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": f"burst-{uuid.uuid4().hex[:8]}"},
        "qrs": {"host": "localhost", "port": sim.port, "cert": str(qrs_certs / "client.pem"),
                "key": str(qrs_certs / "client_key.pem"), "ca": str(qrs_certs / "root.pem")},
        "state_dir": str(tmp_path / "state"),
        "logging": {"level": "info", "format": "json"},
        "start_filter": {"enabled": True, "allow": {"tags": ["a", "b"]}},
    }))
    d = DaemonProcess({}, config)
    try:
        d.wait_log("mqtt_subscribed")
        for _ in range(30):
            d.signal(signal.SIGHUP)
        d.wait_log("config_reloaded")
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()
    finally:
        d.stop()
    # Each reload ends (config_reloaded, then its certificates) before the next one begins.
    steps = [e["event"] for e in d.events if e.get("event") in ("reloading", "config_reloaded", "tls_reloaded")]
    assert steps and len(steps) % 3 == 0, steps
    assert all(steps[i:i + 3] == ["reloading", "config_reloaded", "tls_reloaded"] for i in range(0, len(steps), 3)), steps
    assert 1 <= len(steps) // 3 <= 30
    assert all(e["allow_tags"] == 2 for e in d.events if e.get("event") == "config_reloaded")
