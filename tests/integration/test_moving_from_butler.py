"""Moving from Butler, the way an admin does it (issue 16): import a realistic Butler config
(tests/data/butler/production.yaml, written from the sections of Butler's production template),
`check` the result, run the daemon from it, and start tasks the Butler way: a plain task GUID
on Butler's start topic, and Butler's REST call (over HTTPS, as Butler's restServerConfig.tls
had it) on the imported port. Real processes, a real Mosquitto, the QRS simulator over mTLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import requests
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess
from tests.support.pki import Pki

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "butler" / "production.yaml"
T1 = "11111111-1111-4111-8111-111111111111"  # allowed by ID in Butler's startTaskFilter
T2 = "22222222-2222-4222-8222-222222222222"  # tag startTask1: allowed
T3 = "33333333-3333-4333-8333-333333333333"  # on no allow-list
T5 = "55555555-5555-4555-8555-555555555555"  # custom property taskGroup=tasks1: allowed
TASKS = [
    SimTask(T1, "ERP staging"),
    SimTask(T2, "Finance daily", tags=["startTask1"]),
    SimTask(T3, "HR monthly", tags=["hr"]),
    SimTask(T5, "Sales hourly", custom_properties=[("taskGroup", "tasks1")]),
]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_MQTT") and k != "CREDENTIALS_DIRECTORY"}
    return env | {"PYTHONPATH": str(REPO)}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "butler_mqtt", *args], capture_output=True, text=True,
                          timeout=90, cwd=cwd, env=clean_env())


def wait_for(pred: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_import_butler_config_check_and_run_it(tmp_path, qrs_certs, sim, own_broker):
    # --- the admin's Butler install: its config and the certificate files it names
    certs = tmp_path / "butler" / "certs"
    certs.mkdir(parents=True)
    for name in ("client.pem", "client_key.pem", "root.pem"):
        shutil.copy(qrs_certs / name, certs / name)
    pki = Pki(tmp_path / "pki")
    for src in (pki.cert, pki.key, pki.server_ca):
        shutil.copy(src, certs / src.name)
    rest_port = free_port()
    text = FIXTURE.read_text()
    for key, value in {"QRS_PORT": sim.port, "BROKER_PORT": own_broker.port, "REST_PORT": rest_port, "CERTS": certs}.items():
        text = text.replace(f"__{key}__", str(value))
    butler_file = tmp_path / "butler" / "production.yaml"
    butler_file.write_text(text)
    work = tmp_path / "butler-mqtt"
    work.mkdir()

    # --- step 1: import
    out = cli("init", "--from-butler", str(butler_file), cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    written = work / "etc" / "butler.yaml"
    report = out.stdout
    assert f"wrote etc/butler.yaml from Butler's {butler_file}" in report
    assert "Butler.mqttConfig.taskStartTopic" in report and "-> mqtt.topics.start_plain: qliksense/start_task" in report
    assert f"-> http.port: {rest_port}" in report and "Butler.influxDb (22 keys)" in report
    assert "Butler.configQRS.rejectUnauthorized" in report and "-> qrs.verify: false" in report
    imported = yaml.safe_load(written.read_text())
    assert imported["qrs"]["verify"] is False and imported["http"]["tls"]["cert"] == str(certs / "http_cert.pem")
    assert "# WARNING: imported from Butler's configQRS.rejectUnauthorized: false" in written.read_text()
    before = written.read_text()
    again = cli("init", "--from-butler", str(butler_file), cwd=work)  # never overwrites
    assert again.returncode == 2 and "etc/butler.yaml: exists and is not overwritten" in again.stderr
    assert written.read_text() == before

    # --- step 2: check the result
    out = cli("check", "--config", "etc/butler.yaml", cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "[ok  ] config: etc/butler.yaml valid" in lines
    assert any(ln.startswith("[warn] qrs.verify: ") for ln in lines)  # carried from rejectUnauthorized: false
    assert any(ln.startswith("[ok  ] http.tls.cert: ") and "days left" in ln for ln in lines)
    assert any(ln.startswith(f"[ok  ] broker: connected to 127.0.0.1:{own_broker.port}") for ln in lines)
    assert any(ln.startswith("[ok  ] qrs: ") for ln in lines)

    # --- step 3: run it, and start tasks the Butler way
    daemon = DaemonProcess({}, Path("etc/butler.yaml"), cwd=work, base_env=clean_env())
    try:
        daemon.wait_log("mqtt_subscribed", timeout=30)
        listening = daemon.wait_log("http_listening", timeout=30)
        assert listening["url"] == f"https://127.0.0.1:{rest_port}" and listening["tls"] is True
        warned = [e for e in daemon.events if e.get("event") == "qrs_tls_verification_disabled"]
        assert warned and warned[0]["level"] == "warning"

        replies: list[dict[str, Any]] = []
        import paho.mqtt.client as mqtt

        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="admin-watch")
        ready = threading.Event()
        sub.on_connect = lambda c, *_: c.subscribe("qliksense/task/start/reply", qos=1)
        sub.on_subscribe = lambda *_: ready.set()
        sub.on_message = lambda _c, _u, m: replies.append(json.loads(m.payload))
        sub.connect("127.0.0.1", own_broker.port)
        sub.loop_start()
        assert ready.wait(10)

        # Butler's MQTT start: a plain task GUID on taskStartTopic
        mqtt_publish.single("qliksense/start_task", T1, qos=1, hostname="127.0.0.1", port=own_broker.port)
        wait_for(lambda: any(s.task_id == T1 for s in sim.starts), what="T1 started from the plain topic")
        wait_for(lambda: any(r.get("event") == "summary" for r in replies), what="the summary of the plain request")
        summary = next(r for r in replies if r["event"] == "summary")
        assert [t["taskId"] for t in summary["tasksStarted"]] == [T1] and summary["totalTasksStarted"] == 1

        # Butler's REST call on the imported port, over HTTPS: Butler's body and its answer
        https = requests.Session()
        https.trust_env = False
        https.verify = str(pki.server_ca)
        resp = https.put(f"https://127.0.0.1:{rest_port}/v4/reloadtask/-/start", timeout=30, json=[
            {"type": "starttasktag", "payload": {"tag": "startTask1"}},
            {"type": "starttaskid", "payload": {"taskId": T3}},
        ])
        assert resp.status_code == 200, resp.text
        res = resp.json()
        assert res["tasksTag"] == [{"taskId": T2, "taskName": "Finance daily"}]
        assert res["tasksId"]["denied"] == [{"taskId": T3, "taskName": "HR monthly"}]  # the allow-list came along
        # the seed's webhook form on the same port
        resp = https.post(f"https://127.0.0.1:{rest_port}/v4/reloadtask/start", timeout=30,
                          json={"customProperty": [{"name": "taskGroup", "value": "tasks1"}]})
        assert resp.status_code == 200 and resp.json()["totalTasksStarted"] == 1, resp.text
        https.close()  # an idle keep-alive connection would only hold the graceful shutdown
        sub.disconnect()
        sub.loop_stop()
    finally:
        rc = daemon.stop()
    assert rc == 0, "\n".join(daemon.lines[-20:])
    assert sorted(s.task_id for s in sim.starts) == [T1, T2, T5]
    assert (work / "state").is_dir()  # the journal lives where the admin ran it
