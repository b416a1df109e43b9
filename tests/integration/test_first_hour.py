"""The way in for a new user (issue 12): one daemon per state dir, a per-instance status topic,
backing off when the session is taken over, a QRS warning at start, the http_listening line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from butler_mqtt.config import Config
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import REPO, DaemonProcess, daemon_env, retained, wait_retained

TASK = "0e9a3c33-2d3c-4b34-9b0e-6f1b7d6c1a01"
TASKS = [SimTask(TASK, "Reload first hour", tags=["first-hour"])]


def status_topic() -> str:
    return f"first-hour/{uuid.uuid4().hex[:8]}/status"


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "butler_mqtt", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **env},
    )


def test_second_run_with_the_same_state_dir_exits_2_and_the_first_keeps_its_session(qrs_certs, sim, broker, tmp_path):
    topic = status_topic()
    client_id = f"lock-{uuid.uuid4().hex[:8]}"
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", client_id, BUTLER_MQTT__MQTT__TOPICS__STATUS=topic)
    first = DaemonProcess(env)
    try:
        first.wait_log("mqtt_subscribed", timeout=30)
        second = run_cli("run", env=env, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"PID {first.proc.pid}" in second.stderr and "state_dir" in second.stderr, second.stderr
        assert "mqtt_connected" not in second.stdout  # refused before it touched the broker
        # The first one was never kicked off its session and still answers.
        cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "unused")
        with Requester(cfg.mqtt) as r:
            events = r.request({"requestId": f"lock-{uuid.uuid4().hex}", "taskId": TASK}, timeout=30)
        assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1
        assert "mqtt_disconnected" not in first.log_text() and "session_taken_over" not in first.log_text()
        assert len([e for e in first.events if e.get("event") == "mqtt_connected"]) == 1
    finally:
        first.stop()
    # The lock goes with the process: a new daemon on the same state dir starts normally.
    again = DaemonProcess(env)
    try:
        again.wait_log("mqtt_subscribed", timeout=30)
    finally:
        again.stop()


def test_shared_group_instances_each_have_their_own_status_topic(qrs_certs, sim, broker, tmp_path, start_daemon):
    base = status_topic()
    group = {"shared_group": f"g{uuid.uuid4().hex[:6]}", "client_id": "fh", "topics": {"status": base}}
    a = start_daemon(make_config(qrs_certs, sim.port, broker, tmp_path / "a", mqtt={**group, "instance_id": "a"}))
    b = start_daemon(make_config(qrs_certs, sim.port, broker, tmp_path / "b", mqtt={**group, "instance_id": "b"}))
    assert a.daemon.listener.client_id == "fh-a" and b.daemon.listener.client_id == "fh-b"
    wait_retained(broker.port, f"{base}/fh-a", lambda m: m is not None and m["status"] == "online")
    wait_retained(broker.port, f"{base}/fh-b", lambda m: m is not None and m["status"] == "online")
    a.stop()
    assert retained(broker.port, f"{base}/fh-a")["status"] == "offline"
    b_status = retained(broker.port, f"{base}/fh-b")
    assert b_status["status"] == "online" and b_status["clientId"] == "fh-b"  # not hidden by a's offline
    assert retained(broker.port, base) is None  # nothing on the shared bare topic


def test_without_shared_group_the_status_topic_is_the_configured_one(qrs_certs, sim, broker, tmp_path, start_daemon):
    topic = status_topic()
    d = start_daemon(make_config(qrs_certs, sim.port, broker, tmp_path / "s", mqtt={"topics": {"status": topic}}))
    assert d.daemon.listener.status_topic == topic
    wait_retained(broker.port, topic, lambda m: m is not None and m["status"] == "online")


def test_session_taken_over_is_logged_as_an_error_and_backed_off(qrs_certs, sim, broker, tmp_path):
    """Two daemons with one client id on two machines (here: two state dirs): Mosquitto 2.0
    closes the older connection without a reason code; the loser must see from the retained
    status that its session was taken, say so at error level and back off, not fight."""
    client_id = f"takeover-{uuid.uuid4().hex[:8]}"
    topic = status_topic()
    first = DaemonProcess(daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "one", client_id,
                                     BUTLER_MQTT__MQTT__TOPICS__STATUS=topic))
    second: DaemonProcess | None = None
    try:
        first.wait_log("mqtt_subscribed", timeout=30)
        second = DaemonProcess(daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "two", client_id,
                                          BUTLER_MQTT__MQTT__TOPICS__STATUS=topic))
        line = first.wait_log("mqtt_session_taken_over", timeout=30)
        assert line["level"] == "error" and line["retry_in_s"] >= 30, line
        assert "mqtt.client_id" in line["detail"] and line["other"]["pid"] == second.proc.pid

        def connects() -> int:
            assert second is not None
            return sum(1 for d in (first, second) for e in d.events if e.get("event") == "mqtt_connected")

        before = connects()
        time.sleep(6)  # fighting would reconnect every second; backing off waits >= 30 s
        assert connects() == before, first.log_text() + "\n" + second.log_text()
        assert retained(broker.port, topic)["pid"] == second.proc.pid  # the newcomer holds it
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_run_warns_at_start_when_qrs_cannot_be_reached(qrs_certs, broker, tmp_path):
    port = free_port()  # nothing listens there: connection refused
    env = daemon_env(qrs_certs, port, broker.port, tmp_path / "state", f"noqrs-{uuid.uuid4().hex[:8]}")
    daemon = DaemonProcess(env)
    try:
        line = daemon.wait_log("qrs_unreachable_at_start", timeout=30)
        assert line["level"] == "warning"
        assert "connection refused" in line["error"].lower() and "within" not in line["error"]
        daemon.wait_log("mqtt_subscribed", timeout=30)  # it still runs: requests wait for QRS
    finally:
        daemon.stop()


@pytest.mark.parametrize("token", [None, "s3cret-token"])
def test_http_listening_line_says_whether_a_token_is_set(qrs_certs, sim, broker, tmp_path, token):
    extra = {"BUTLER_MQTT__HTTP__ENABLED": "true", "BUTLER_MQTT__HTTP__PORT": "0"}
    if token:
        extra["BUTLER_MQTT__HTTP__TOKEN"] = token
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", f"tok-{uuid.uuid4().hex[:8]}", **extra)
    daemon = DaemonProcess(env)
    try:
        line = daemon.wait_log("http_listening", timeout=30)
    finally:
        daemon.stop()
    assert line["auth"] == ("bearer token" if token else "none")
    assert "s3cret-token" not in daemon.log_text()


def test_refused_qrs_port_says_connection_refused(qrs_certs):
    from butler_mqtt.backends.qrs.client import QrsClient
    from butler_mqtt.config import QrsConfig
    from butler_mqtt.errors import QrsUnreachable

    cfg = QrsConfig(
        host="localhost", port=free_port(), cert=Path(qrs_certs / "client.pem"),
        key=Path(qrs_certs / "client_key.pem"), ca=Path(qrs_certs / "root.pem"), retries=0,
    )
    c = QrsClient(cfg)
    try:
        with pytest.raises(QrsUnreachable) as info:
            c.about()
    finally:
        c.close()
    assert "Connection refused" in str(info.value) and "within" not in str(info.value)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_removes_its_work_folder_when_stopped(sig):
    """The folder holds generated private keys, the journal and broker data: nothing stays."""
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "demo"], cwd=REPO, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    work: Path | None = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("work folder"):
                work = Path(line.split()[2])
            if line.startswith("Try it yourself"):
                break
        assert work is not None and (work / "certs" / "client_key.pem").is_file(), "".join(lines)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, "".join(lines) + rest
    assert not work.exists(), f"{work} left behind"
    assert "Traceback" not in rest


def test_the_stopped_line_counts_mqtt_and_rest_requests(qrs_certs, sim, broker, tmp_path):
    """Issue 25: `stopped handled=N` counts every request answered, REST calls too."""
    import requests

    client_id = f"count-{uuid.uuid4().hex[:8]}"
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", client_id,
                     BUTLER_MQTT__HTTP__ENABLED="true", BUTLER_MQTT__HTTP__PORT="0",
                     BUTLER_MQTT__MQTT__TOPICS__STATUS=status_topic())
    daemon = DaemonProcess(env)
    try:
        url = daemon.wait_log("http_listening", timeout=30)["url"]
        daemon.wait_log("mqtt_subscribed", timeout=30)
        base = f"{url.rstrip('/')}/v4/reloadtask"
        assert requests.post(f"{base}/-/start", json={"tag": "first-hour"}, timeout=30).status_code == 200
        assert requests.post(f"{base}/-/start", json={"taskId": "not-a-guid"}, timeout=30).status_code == 400
        cfg = Config.model_validate({"mqtt": {"host": "127.0.0.1", "port": broker.port}})
        with Requester(cfg.mqtt) as r:
            assert r.request({"tag": "first-hour"}, timeout=30)[-1]["event"] == "summary"
    finally:
        daemon.stop()
    line = daemon.wait_log("stopped", timeout=30)
    assert (line["handled"], line["mqtt"], line["rest"]) == (3, 1, 2), line
