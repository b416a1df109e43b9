"""The REST API served on a Runtime alone: no broker, no MQTT listener, no daemon."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.config import Config
from butler_mqtt.http.server import start_http
from butler_mqtt.journal import Journal
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.runtime import Runtime, build_tracker
from butler_mqtt.service import StartService
from butler_mqtt.sim import SimTask

T1 = "11111111-1111-4111-8111-111111111111"
TASKS = [SimTask(T1, "Load", tags=["load"])]


@dataclass
class NoBroker:
    mqtt_connected: bool = False
    unacked: int = 0
    qrs_problem: str | None = None

    def waiting(self) -> tuple[int, float | None]:
        return 0, None


def test_rest_starts_a_task_and_reports_health_without_any_broker(qrs_certs: Path, sim: Any, tmp_path: Path):
    cfg = Config.model_validate({
        "qrs": {"host": "localhost", "port": sim.port, "cert": str(qrs_certs / "client.pem"),
                "key": str(qrs_certs / "client_key.pem"), "ca": str(qrs_certs / "root.pem"), "retries": 0},
        "http": {"enabled": True, "port": 0},
        "state_dir": str(tmp_path),
    })
    metrics = Metrics()
    journal = Journal(tmp_path / "journal.sqlite3")
    qrs = QrsBackend(QrsClient(cfg.qrs, observer=metrics.observe_qrs))
    service = StartService(cfg, qrs, journal)
    published: list[dict[str, Any]] = []
    tracker = build_tracker(cfg, qrs, service, journal, lambda _route, ev: published.append(ev), None)
    server = start_http(Runtime(cfg, service, tracker, journal, qrs, metrics, NoBroker()))
    try:
        base = f"http://127.0.0.1:{server.port}"
        resp = requests.post(f"{base}/v4/reloadtask/start", json={"requestId": "rt", "tag": "load"}, timeout=10)
        assert resp.status_code == 200 and resp.json()["totalTasksStarted"] == 1
        assert [s.task_id for s in sim.starts] == [T1]
        health = requests.get(f"{base}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["mqtt"] == "disconnected" and health.json()["qrs"] == "ok"
    finally:
        server.stop()
        service.close()
        qrs.close()
        journal.close()
