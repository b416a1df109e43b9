"""The commands with `backend: cloud`, as a user runs them: `sim --cloud` (a subprocess printing its
credentials), `check` (a token obtained and the tenant called, one line each), `resolve` on
apps, `request` and `history`, `demo --cloud`; the backend's stop (cancel) and failure details
through the simulator over HTTPS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from butler_mqtt.ops.mosquitto import free_port, wait_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "butler_mqtt", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def cloud_process(tmp_path_factory):
    """`butler-mqtt sim --cloud` as the docs start it; its banner read for the credentials."""
    certs = tmp_path_factory.mktemp("cloud-certs")
    port = free_port()
    secret = "secret-" + uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "sim", "--cloud", "--port", str(port), "--certs", str(certs),
         "--client-secret", secret, "--run-seconds", "0.3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert wait_port(port, 20), "simulator did not start"
    banner = [proc.stdout.readline() for _ in range(5)] if proc.stdout else []
    yield port, certs, secret, "".join(banner)
    proc.terminate()
    assert proc.wait(10) == 0


def cloud_env(port: int, certs: Path, secret: str, broker_port: int, state: Path) -> dict[str, str]:
    return {
        "BUTLER_MQTT__BACKEND": "cloud",
        "BUTLER_MQTT__CLOUD__TENANT": f"https://127.0.0.1:{port}",
        "BUTLER_MQTT__CLOUD__CLIENT_ID": "sim-client",
        "BUTLER_MQTT__CLOUD__CLIENT_SECRET": secret,
        "BUTLER_MQTT__CLOUD__CA": str(certs / "root.pem"),
        "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
        "BUTLER_MQTT__MQTT__PORT": str(broker_port),
        "BUTLER_MQTT__STATE_DIR": str(state),
    }


def test_sim_cloud_prints_its_credentials_and_ca(cloud_process):
    port, certs, secret, banner = cloud_process
    assert f"cloud.tenant: https://127.0.0.1:{port}" in banner and f"cloud.client_secret: {secret}" in banner
    assert str(certs.resolve() / "root.pem") in banner and (certs / "root.pem").is_file()


def test_check_obtains_a_token_and_calls_the_tenant(cloud_process, broker, tmp_path):
    port, certs, secret, _ = cloud_process
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = cloud_env(port, certs, secret, broker.port, tmp_path / "state")
    out = cli("check", "--config", str(cfg), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("[ok  ] cloud:")]
    assert len(lines) == 2 and "access token obtained" in lines[0] and "answers" in lines[1], out.stdout
    assert secret not in out.stdout + out.stderr
    out = cli("check", "--config", str(cfg), env={**env, "BUTLER_MQTT__CLOUD__CLIENT_SECRET": "wrong-" + secret})
    assert out.returncode == 1 and "[FAIL] cloud:" in out.stdout and "cloud.client_secret" in out.stdout
    assert secret not in out.stdout + out.stderr
    out = cli("check", "--config", str(cfg), env={**env, "BUTLER_MQTT__CLOUD__API_KEY": "k" * 20})
    assert out.returncode == 2 and "cloud.api_key" in out.stdout, out.stdout


def test_resolve_request_and_history_on_apps(cloud_process, broker, tmp_path):
    port, certs, secret, _ = cloud_process
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = cloud_env(port, certs, secret, broker.port, tmp_path / "state")
    out = cli("resolve", "--config", str(cfg), "--tag", "nightly", "--space", "Finance", env=env)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert {t["appName"] for t in found["tasks"]} == {"Revenue", "Broken"} and found["total"] == 3
    assert all("taskId" not in t for t in found["tasks"])
    out = cli("resolve", "--config", str(cfg), "--custom-property", "a=b", env=env)
    assert out.returncode == 2 and "'tag'" in out.stderr
    daemon = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run", "--config", str(cfg)], cwd=REPO,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        out = cli("request", "--config", str(cfg), "--space", "Sales", "--wait", "--request-id", "cli-1",
                  "--timeout", "60", env=env, timeout=90)
        events = [json.loads(x) for x in out.stdout.splitlines()]
        assert out.returncode == 0, out.stdout + out.stderr
        assert {e["cloudStatus"] for e in events if e["event"] == "taskFinished"} == {"SUCCEEDED"}
        out = cli("history", "--config", str(cfg), "--request-id", "cli-1", "--json", env=env)
        record = json.loads(out.stdout.splitlines()[0])
        assert record["criteria"] == {"space": ["Sales"]} and len(record["tasks"]) == 2, record
    finally:
        daemon.terminate()
        log = daemon.communicate(timeout=30)[0]
    assert secret not in log and "cloud_reachable" in log


def test_demo_cloud_runs_end_to_end():
    out = cli("demo", "--cloud", "--once", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    events = [json.loads(line.split("<- ", 1)[1]) for line in out.stdout.splitlines() if "<- " in line]
    finished = [e for e in events if e["event"] == "taskFinished"]
    assert {e["cloudStatus"] for e in finished} == {"SUCCEEDED", "FAILED", "CANCELED"}  # CANCELED: the stop sample
    assert next(e for e in finished if e["cloudStatus"] == "FAILED")["status"] == "FinishedFail"
    assert any(e["event"] == "error" and "tag" in e["details"] for e in events)  # customProperty: use tag
    stop = next(e for e in events if e["event"] == "summary" and "tasksStopping" in e)  # the stop sample
    assert len(stop["tasksStopping"]) + len(stop["tasksNotRunning"]) == 2, stop  # two apps tagged hourly
    assert all("appId" in t for t in stop["tasksStopping"] + stop["tasksNotRunning"]), stop  # apps on the wire


def test_run_refuses_a_cloud_section_that_cannot_work_naming_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend: cloud\ncloud:\n  tenant: https://acme.eu.qlikcloud.com\n  client_id: abc\n")
    out = cli("run", "--config", str(cfg), env={"BUTLER_MQTT__STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 2 and "cloud.client_secret" in out.stderr, out.stderr
