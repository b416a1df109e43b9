"""The commands as a user runs them: subprocesses, real simulator, real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from butler_mqtt.ops.mosquitto import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "butler_mqtt", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def sim_process(tmp_path_factory):
    """`butler-mqtt sim --demo` exactly as the README starts it, certificates generated."""
    certs = tmp_path_factory.mktemp("sim-certs")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "sim", "--demo", "--port", str(port), "--certs", str(certs)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert wait_port(port, 20), "simulator did not start"
    yield port, certs
    proc.terminate()
    assert proc.wait(10) == 0


def qrs_env(port: int, certs: Path, **extra: str) -> dict[str, str]:
    return {
        "BUTLER_MQTT__QRS__PORT": str(port),
        "BUTLER_MQTT__QRS__CERT": str(certs / "client.pem"),
        "BUTLER_MQTT__QRS__KEY": str(certs / "client_key.pem"),
        "BUTLER_MQTT__QRS__CA": str(certs / "root.pem"),
        **extra,
    }


def test_resolve_demo_tag_prints_the_four_tasks(sim_process):
    port, certs = sim_process
    out = cli("resolve", "--tag", "Butler 5.0 demo", env=qrs_env(port, certs))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["total"] == 4 and len(result["tasks"]) == 4
    assert all(t["matchedBy"] == ["tag:Butler 5.0 demo"] for t in result["tasks"])


def test_resolve_rejects_a_bad_guid_with_exit_2(sim_process):
    port, certs = sim_process
    out = cli("resolve", "--task-id", "nope", env=qrs_env(port, certs))
    assert out.returncode == 2 and "Task ID must be a valid GUID" in out.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  port: not-a-number\n")
    out = cli("run", "--config", str(bad))
    assert out.returncode == 2 and "mqtt.port" in out.stderr
    out = cli("resolve", "--tag", "x", env={"BUTLER_MQTT__QRS__CERT": str(tmp_path / "missing.pem")})
    assert out.returncode == 2 and "qrs.cert" in out.stderr


def test_check_passes_then_names_the_broken_part(sim_process, broker):
    port, certs = sim_process
    env = qrs_env(port, certs, BUTLER_MQTT__MQTT__PORT=str(broker.port), BUTLER_MQTT__MQTT__HOST="127.0.0.1")
    out = cli("check", env=env)
    assert out.returncode == 0, out.stdout
    assert "[ok  ] qrs:" in out.stdout and "[ok  ] broker:" in out.stdout and "days left" in out.stdout
    out = cli("check", env={**env, "BUTLER_MQTT__QRS__PORT": str(free_port())})
    assert out.returncode == 1 and "[FAIL] qrs:" in out.stdout


def test_request_command_prints_replies_and_exit_codes(sim_process, broker, tmp_path, listen):
    port, certs = sim_process
    env = qrs_env(
        port, certs,
        BUTLER_MQTT__MQTT__PORT=str(broker.port), BUTLER_MQTT__MQTT__HOST="127.0.0.1",
        BUTLER_MQTT__MQTT__CLIENT_ID="cli-test-daemon", BUTLER_MQTT__STATE_DIR=str(tmp_path / "state"),
        BUTLER_MQTT__LOGGING__FORMAT="json",
    )
    daemon = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = listen("butler-mqtt/status")
    try:
        status.wait_for(lambda m: m.get("clientId") == "cli-test-daemon" and m.get("status") == "online")
        out = cli("request", "--tag", "startTask1", "--timeout", "30", env=env)
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert lines[-1]["event"] == "summary"
        assert {e["status"] for e in lines if e["event"] == "task"} == {"started", "notStarted"}
        assert out.returncode == 0, out.stderr
        out = cli("request", "--task-id", "not-a-guid", env=env)
        assert out.returncode == 2
        out = cli("request", "--tag", "Butler 5.0 demo", "--wait", "--timeout", "60", env=env)
        events = [json.loads(x) for x in out.stdout.splitlines()]
        assert events[-1]["event"] == "requestFinished"
        assert out.returncode == 1  # one of the demo tasks fails: the caller must know
    finally:
        daemon.terminate()
        rc = daemon.wait(20)
        log = daemon.stdout.read() if daemon.stdout else ""
    assert rc == 0, log
    audit = [json.loads(x) for x in log.splitlines() if '"audit"' in x]
    assert audit and all("requestId" in a for a in audit)


def test_demo_runs_end_to_end(tmp_path):
    """`butler-mqtt demo --once`, as the README's first command runs it (with --once)."""
    out = cli("demo", "--once", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    events = [json.loads(line.split("<- ", 1)[1]) for line in out.stdout.splitlines() if "<- " in line]
    kinds = [e["event"] for e in events]
    assert "requestFinished" in kinds and "summary" in kinds and "error" in kinds
    finished = next(e for e in events if e["event"] == "requestFinished")
    assert finished["finished"] == {"FinishedSuccess": 3, "FinishedFail": 1}
    work = Path(next(x for x in out.stdout.splitlines() if x.startswith("work folder")).split()[2])
    assert not work.exists(), f"the demo left {work} behind"


def test_unreadable_journal_exits_1_with_a_message(sim_process, tmp_path):
    port, certs = sim_process
    (tmp_path / "journal.sqlite3").write_text("not a database")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    out = cli("run", "--config", str(cfg), env=qrs_env(port, certs, BUTLER_MQTT__STATE_DIR=str(tmp_path)))
    assert out.returncode == 1 and "cannot open the journal" in out.stderr
