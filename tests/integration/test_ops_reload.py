"""SIGHUP reloads the start_filter and the log level of a running daemon (a subprocess with a
config file, as under systemd's `ExecReload=/bin/kill -HUP $MAINPID`)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import yaml

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess

ALPHA = "a1fa0000-0000-4000-8000-000000000001"
BETA = "be7a0000-0000-4000-8000-000000000002"
TASKS = [SimTask(ALPHA, "Alpha task", tags=["alpha"]), SimTask(BETA, "Beta task", tags=["beta"])]


def write_config(path: Path, base: dict, tags: list[str], task_ids: list[str] | None = None, **extra) -> None:
    data = {**base, **extra, "start_filter": {"enabled": True, "allow": {"tags": tags, "task_ids": task_ids or []}}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)  # atomic, as an editor or config management would


def test_sighup_changes_the_allow_list_of_a_running_daemon(qrs_certs, sim, broker, tmp_path):
    client_id = f"reload-{uuid.uuid4().hex[:8]}"
    base = {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": client_id},
        "qrs": {
            "host": "localhost", "port": sim.port, "cert": str(qrs_certs / "client.pem"),
            "key": str(qrs_certs / "client_key.pem"), "ca": str(qrs_certs / "root.pem"),
        },
        "state_dir": str(tmp_path / "state"),
        "logging": {"level": "info", "format": "json"},
    }
    config = tmp_path / "butler.yaml"
    write_config(config, base, ["alpha"])
    daemon = DaemonProcess({}, config)
    requester = Requester(MqttConfig(host="127.0.0.1", port=broker.port))

    def start_beta() -> dict:
        events = requester.request({"requestId": uuid.uuid4().hex, "tag": "beta"}, timeout=30)
        return next(e for e in events if e["event"] == "task")

    try:
        daemon.wait_log("mqtt_subscribed")
        requester.connect()
        assert start_beta()["status"] == "denied"
        assert sim.starts == []

        # Allow beta too: no restart, just SIGHUP.
        write_config(config, base, ["alpha", "beta"])
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_log("config_reloaded")
        assert reloaded["allow_tags"] == 2 and reloaded["start_filter"] is True
        assert start_beta()["status"] == "started"
        assert [s.task_id for s in sim.starts] == [BETA]

        # An invalid file is refused and the running configuration kept.
        write_config(config, base, ["alpha"], task_ids=["not-a-guid"])
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert "start_filter.allow.task_ids" in failed["error"]
        assert start_beta()["status"] == "started"  # beta still allowed (not "denied")
        # The audit line follows the replies (it is written once the outcome is recorded): wait
        # for it, or it could land after the level change below and be counted as the next one's.
        daemon.wait_log("audit", n=3)

        # Back to alpha only, the log level raised to warning and a key that needs a restart:
        # the reload is still logged, and the change that was not applied is named.
        write_config(config, {**base, "mqtt": {**base["mqtt"], "keepalive": 30}}, ["alpha"],
                     logging={"level": "warning", "format": "json"})
        daemon.signal(signal.SIGHUP)
        again = daemon.wait_log("config_reloaded", n=2)
        assert again["log_level"] == "warning" and again["allow_tags"] == 1
        assert daemon.wait_log("reload_needs_restart")["changed"] == ["mqtt"]
        audits = len([e for e in daemon.events if e.get("event") == "audit"])
        starts = len(sim.starts)
        assert start_beta()["status"] == "denied"
        assert len(sim.starts) == starts
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log_text()
    finally:
        requester.close()
        daemon.stop()
    # At level warning the info-level audit line of the last request is not written.
    assert len([e for e in daemon.events if e.get("event") == "audit"]) == audits
