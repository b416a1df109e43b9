"""systemd integration: the unit file passes `systemd-analyze verify`, and the daemon speaks the
sd_notify protocol on a real datagram socket (READY after subscribe, WATCHDOG while healthy,
STOPPING on SIGTERM). No timing assertions: only waits with generous limits."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import REPO, DaemonProcess, NotifySocket, client, daemon_env

UNIT = REPO / "systemd" / "butler-mqtt.service"
REAL_EXEC = "/opt/butler-mqtt/venv/bin/butler-mqtt"
TASK = "5e7a0000-0000-4000-8000-000000000001"
INSTALL = "systemd-analyze not found: install it (Debian/Ubuntu: apt-get install systemd)"
TASKS = [SimTask(TASK, "Notify task", tags=["notify"])]


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# ----------------------------------------------------------------------------- the unit file


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(INSTALL)
    # `verify` checks that ExecStart's binary exists. The copy differs from the real unit only in
    # that path, which points at this checkout's venv instead of /opt/butler-mqtt/venv.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={REAL_EXEC} ") == 1
    local = REPO / ".venv" / "bin" / "butler-mqtt"
    assert local.exists(), "the venv has no butler-mqtt console script: pip install -e ."
    copy = tmp_path / "butler-mqtt.service"
    copy.write_text(text.replace(f"ExecStart={REAL_EXEC} ", f"ExecStart={local} "))
    out = subprocess.run([exe, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values; it only prints them: no output at all.
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
    # The hardening keeps the exposure score low (0 = locked down, 10 = unprotected).
    sec = subprocess.run(
        [exe, "security", "--offline=yes", "--threshold=20", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr


def test_the_documented_unit_check_works_in_the_clone(tmp_path: Path) -> None:
    """docs/operating/install.md "Checking the unit file" (issue 25): its commands, run as written
    in the clone (only /tmp replaced by this test's folder), pass before anything is installed."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(INSTALL)
    page = (REPO / "docs" / "operating" / "install.md").read_text(encoding="utf-8")
    part = page[page.index("**Checking the unit file.**"):]
    block = part[part.index("```sh\n") + 6:part.index("```", part.index("```sh\n") + 6)]
    assert "systemd-analyze verify" in block
    script = block.replace("/tmp/", f"{tmp_path}/")
    out = subprocess.run(["bash", "-ec", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
    # and the plain check of the shipped file fails here, as the page says
    plain = subprocess.run([exe, "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert REAL_EXEC in plain.stdout + plain.stderr


def test_unit_file_settings() -> None:
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] and one["Restart"] == "on-failure"
    assert "StartLimitBurst" in one and "StartLimitIntervalSec" in one
    assert one["ExecStart"] == f"{REAL_EXEC} run --config /etc/butler-mqtt/butler.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["DynamicUser"] == "yes" and one["StateDirectory"] == "butler-mqtt"
    assert "BUTLER_MQTT__STATE_DIR=%S/butler-mqtt" in s["Environment"]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges"):
        assert one[key] in ("yes", "strict"), key
    assert one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    creds = {c.split(":", 1)[0] for c in s["LoadCredential"]}
    # the names butler_mqtt.config reads from $CREDENTIALS_DIRECTORY
    assert creds == {"qrs_client.pem", "qrs_client_key.pem", "qrs_root.pem", "mqtt_password"}


# ----------------------------------------------------------------------------- sd_notify


def test_notify_ready_after_subscribe_watchdog_stopping(qrs_certs, sim, broker, tmp_path) -> None:
    notify = NotifySocket()
    client_id = f"notify-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    env = daemon_env(
        qrs_certs, sim.port, broker.port, tmp_path / "state", client_id,
        NOTIFY_SOCKET=notify.path,
        WATCHDOG_USEC="400000",  # a ping every 0.2 s
        BUTLER_MQTT__METRICS__PORT=str(metrics_port),  # REST API off, metrics on
    )
    replies: list[dict] = []
    pub = client(broker.port)
    pub.on_message = lambda _c, _u, m: replies.append(json.loads(m.payload))
    subscribed = threading.Event()
    pub.on_subscribe = lambda *_: subscribed.set()
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    pub.subscribe(f"ops-test/{client_id}/reply", qos=1)
    assert subscribed.wait(10)
    daemon = DaemonProcess(env)
    try:
        notify.wait_for("READY=1", timeout=30)
        # READY means subscribed: a request published right now must be answered. The daemon's
        # client id is new, so a request sent before its subscription would be lost.
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"ops-test/{client_id}/reply"
        info = pub.publish("qliksense/task/start", json.dumps({"requestId": client_id, "tag": "notify"}), qos=1, properties=props)
        assert wait_published(info, 10)
        deadline = time.monotonic() + 30
        while not any(r.get("event") == "summary" for r in replies) and time.monotonic() < deadline:
            time.sleep(0.05)
        summary = next(r for r in replies if r.get("event") == "summary")
        assert summary["requestId"] == client_id and summary["totalTasksStarted"] == 1
        assert [s.task_id for s in sim.starts] == [TASK]

        # Watchdog pings keep coming while the daemon is healthy.
        before = notify.count("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1", n=before + 3, timeout=30)

        # metrics.port without the REST API: /metrics and /healthz on loopback.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert b"butler_mqtt_mqtt_connected 1.0" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log_text()
        notify.wait_for("STOPPING=1", timeout=5)
    finally:
        daemon.stop()
        pub.disconnect()
        pub.loop_stop()
        notify.close()
    texts = notify.texts()
    ready = next(i for i, m in enumerate(texts) if "READY=1" in m.splitlines())
    stopping = next(i for i, m in enumerate(texts) if "STOPPING=1" in m.splitlines())
    assert ready < stopping == len(texts) - 1, texts  # STOPPING is the last message
    assert sum(1 for m in texts[ready:stopping] if m == "WATCHDOG=1") >= 3
    assert texts.count("READY=1\nSTATUS=connected and subscribed") == 1  # not repeated
    # The log agrees: subscribed before READY could be sent.
    assert "mqtt_subscribed" in daemon.log_text()


def test_watchdog_stops_when_a_thread_dies(qrs_certs, sim, broker, tmp_path, start_daemon, monkeypatch) -> None:
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        running = start_daemon(make_config(qrs_certs, sim.port, broker, tmp_path / "state"))
        d = running.daemon
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", n=notify.count("WATCHDOG=1") + 3)

        def assert_silent() -> None:
            time.sleep(0.5)  # a ping decided just before the thread died may still be on its way
            n = notify.count("WATCHDOG=1")
            time.sleep(2.0)  # twenty ping intervals
            assert notify.count("WATCHDOG=1") == n, "watchdog pinged for a dead thread"

        # 1. The MQTT network thread dies: no more pings, so systemd would restart the daemon.
        d.listener.client.loop_stop()
        assert not d.listener.alive and not d.healthy_threads()
        assert_silent()
        # ... and they resume when the thread runs again (nothing else was wrong).
        d.listener.client.loop_start()
        assert d.healthy_threads()
        notify.wait_for("WATCHDOG=1", n=notify.count("WATCHDOG=1") + 3)

        # 2. A worker of the pool dies: same.
        d.workers.jobs.put(None)  # the shutdown sentinel ends exactly one worker
        deadline = time.monotonic() + 10
        while d.healthy_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not d.healthy_threads()
        assert_silent()
    finally:
        notify.close()
