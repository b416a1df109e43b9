"""The commands as a user runs them: subprocesses, real simulator, real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
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
    assert out.returncode == 1 and "[FAIL] qrs:" in out.stdout and "Connection refused" in out.stdout


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


# ----------------------------------------------------------------------------- issue 12: the way in


def test_init_writes_the_starter_config_refuses_to_overwrite_and_check_reads_it(tmp_path):
    target = tmp_path / "new" / "dir" / "butler.yaml"
    out = cli("init", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_text(encoding="utf-8") == (REPO / "etc" / "butler.yaml").read_text(encoding="utf-8")
    assert f"check --config {target}" in out.stdout
    target.write_text("mqtt: {host: edited}\n")
    again = cli("init", str(target))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert target.read_text() == "mqtt: {host: edited}\n"  # untouched
    # Without PATH: $BUTLER_MQTT_CONFIG, else etc/butler.yaml (relative to the working directory).
    env_target = tmp_path / "from-env.yaml"
    out = cli("init", env={"BUTLER_MQTT_CONFIG": str(env_target)})
    assert out.returncode == 0 and env_target.is_file()


def test_a_missing_config_file_says_run_init(tmp_path):
    out = cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and f"butler-mqtt init {tmp_path / 'nope.yaml'}" in out.stderr
    out = cli("check", env={"BUTLER_MQTT_CONFIG": str(tmp_path / "nope.yaml")})
    assert out.returncode == 2 and "butler-mqtt init" in out.stdout


def test_config_errors_name_the_file_and_line_or_the_environment_variable(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  host: broker\n  port: not-a-number\n")
    out = cli("run", "--config", str(bad))
    assert out.returncode == 2 and f"mqtt.port ({bad}, line 3)" in out.stderr, out.stderr
    bad.write_text("qrs:\n  host: x\n  verfy: false\n")
    out = cli("check", "--config", str(bad))
    assert out.returncode == 2 and f"qrs.verfy ({bad}, line 3): unknown key" in out.stdout, out.stdout
    good = tmp_path / "good.yaml"
    good.write_text("{}\n")
    out = cli("run", "--config", str(good), env={"BUTLER_MQTT__MQTT__KEEPALIVE": "soon"})
    assert out.returncode == 2
    assert "mqtt.keepalive (environment variable BUTLER_MQTT__MQTT__KEEPALIVE)" in out.stderr, out.stderr
    out = cli("resolve", "--tag", "x", "--config", str(good), env={"BUTLER_MQTT__QRS__CERT": str(tmp_path / "no.pem")})
    assert out.returncode == 2 and "qrs.cert (environment variable BUTLER_MQTT__QRS__CERT): file not found" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("mqtt:\n  host: [unclosed\n")
    out = cli("run", "--config", str(broken))
    assert out.returncode == 2 and str(broken) in out.stderr and "not valid YAML at line" in out.stderr
    assert "<unicode string>" not in out.stderr


def test_help_describes_every_command_and_option():
    from butler_mqtt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"run", "check", "resolve", "request", "sim", "demo", "init", "history", "token"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    out = cli("request", "--help")
    assert out.returncode == 0 and "exit codes:" in out.stdout and "tasksNotFound" in out.stdout
    out = cli("demo", "--help")
    assert "Butler 5.0 demo" in out.stdout and "invalid task ID" in out.stdout
    out = cli("sim", "--help")
    assert "--latency-ms" in out.stdout and "unless --tasks" in out.stdout and "--demo" in out.stdout


def test_request_rejects_a_timeout_that_is_not_positive():
    for value in ("-1", "0", "nan", "soon"):
        out = cli("request", "--tag", "x", "--timeout", value)
        assert out.returncode == 2 and "--timeout" in out.stderr, (value, out.stderr)


def test_request_exit_codes_and_hints(sim_process, broker, tmp_path):
    """0 all started, 3 a criterion matched nothing, 4 denied, 1 no answer (with a hint)."""
    from butler_mqtt.sim.data import DEMO_FAILING_ID

    port, certs = sim_process
    tag = uuid.uuid4().hex[:8]
    topics = {
        "BUTLER_MQTT__MQTT__TOPICS__START": f"exit/{tag}/start",
        "BUTLER_MQTT__MQTT__TOPICS__START_PLAIN": "",
        "BUTLER_MQTT__MQTT__TOPICS__REPLY": f"exit/{tag}/reply",
        "BUTLER_MQTT__MQTT__TOPICS__STATUS": f"exit/{tag}/status",
    }
    env = qrs_env(
        port, certs,
        BUTLER_MQTT__MQTT__PORT=str(broker.port), BUTLER_MQTT__MQTT__HOST="127.0.0.1",
        BUTLER_MQTT__MQTT__CLIENT_ID=f"exit-{tag}", BUTLER_MQTT__STATE_DIR=str(tmp_path / "state"),
        **topics,
    )
    # No daemon at all yet: exit 1, and the hint says to look for the daemon.
    out = cli("request", "--tag", "startTask1", "--timeout", "2", env=env)
    assert out.returncode == 1
    assert f"sent to topic exit/{tag}/start on broker 127.0.0.1:{broker.port}" in out.stderr, out.stderr
    assert "is the daemon running" in out.stderr, out.stderr
    daemon = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_online(broker.port, f"exit/{tag}/status")
        assert cli("request", "--tag", "Butler 5.0 demo", "--dry-run", env=env).returncode == 0
        out = cli("request", "--tag", "no-such-tag", "--dry-run", env=env)
        assert out.returncode == 3 and json.loads(out.stdout.splitlines()[-1])["tasksNotFound"] == [{"tag": "no-such-tag"}]
        missing = str(uuid.uuid4())
        out = cli("request", "--task-id", DEMO_FAILING_ID, "--task-id", missing, "--all-task-ids-must-exist", "--dry-run", env=env)
        assert out.returncode == 4, out.stdout
        # The daemon listens on another topic than the one this request went to.
        out = cli("request", "--tag", "x", "--timeout", "2", env={**env, "BUTLER_MQTT__MQTT__TOPICS__START": "elsewhere/start"})
        assert out.returncode == 1 and f"listens on exit/{tag}/start, not on elsewhere/start" in out.stderr, out.stderr
    finally:
        daemon.terminate()
        daemon.wait(20)
    # Now it has said goodbye: the hint says it is offline.
    out = cli("request", "--tag", "x", "--timeout", "2", env=env)
    assert out.returncode == 1 and "is offline" in out.stderr, out.stderr


def test_request_names_the_broker_it_could_not_reach():
    out = cli("request", "--tag", "x", env={"BUTLER_MQTT__MQTT__HOST": "127.0.0.1", "BUTLER_MQTT__MQTT__PORT": str(free_port())})
    assert out.returncode == 1 and "cannot use the broker at 127.0.0.1:" in out.stderr


def wait_online(port: int, topic: str) -> None:
    from tests.support.ops import wait_retained

    wait_retained(port, topic, lambda m: m is not None and m.get("status") == "online", timeout=30)


def test_check_with_missing_certificate_files_fails_cleanly(tmp_path, broker):
    good = tmp_path / "c.yaml"
    good.write_text("{}\n")
    env = {"BUTLER_MQTT__QRS__CA": str(tmp_path / "no-root.pem"), "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
           "BUTLER_MQTT__MQTT__PORT": str(broker.port)}
    out = cli("check", "--config", str(good), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "[FAIL] qrs.ca (environment variable BUTLER_MQTT__QRS__CA)" in out.stdout, out.stdout
    assert "[FAIL] qrs: not tried" in out.stdout
