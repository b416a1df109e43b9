"""`serve`, the blocking entry point behind `butler-mqtt sim`, run as a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from butler_mqtt.sim import demo_tasks
from tests.support.mqtt import wait_until

ROOT = Path(__file__).resolve().parents[2]
KEY = "Ab3dEf6hIj9lMn0p"
SERVE = (
    "import sys; from pathlib import Path; from butler_mqtt.sim import serve; "
    "tasks = Path(sys.argv[2]) if len(sys.argv) > 2 else None; "
    "sys.exit(serve('127.0.0.1', 0, Path(sys.argv[1]), tasks, 0, False))"
)


class Qrs:
    """A minimal QRS client for the simulator's generated certificates."""

    def __init__(self, base_url: str, certs: Path) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.cert = (str(certs / "client.pem"), str(certs / "client_key.pem"))
        self.session.verify = str(certs / "root.pem")

    def call(self, method: str, path: str) -> requests.Response:
        return self.session.request(
            method,
            f"{self.base_url}{path}?xrfkey={KEY}",
            headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_api"},
            timeout=10,
        )

    def last_status(self, task_id: str) -> int:
        task = self.call("GET", f"/qrs/reloadtask/{task_id}").json()
        status: int = task["operational"]["lastExecutionResult"]["status"]
        return status


def run_serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_prints_its_url_serves_the_demo_set_and_stops_on_sigterm(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    proc = run_serve(str(certs))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(https://\S+)/qrs .*certificates in (\S+), (\d+) tasks", line)
        assert match, line
        assert Path(match.group(2)) == certs.resolve()
        assert int(match.group(3)) == len(demo_tasks())
        response = Qrs(match.group(1), certs).call("GET", "/qrs/reloadtask/count")
        assert response.json() == {"value": sum(t.task_type == 0 for t in demo_tasks())}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_serve_rejects_a_bad_tasks_file(tmp_path: Path) -> None:
    bad = tmp_path / "tasks.json"
    bad.write_text('[{"tags": []}]', encoding="utf-8")
    proc = run_serve(str(tmp_path / "certs"), str(bad))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "'name'" in err


def run_sim_command(*args: str) -> subprocess.Popen[str]:
    """`butler-mqtt sim ARGS` as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "sim", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SALES, INVENTORY = "52bc35f3-2826-4691-890f-6d540124f7fb", "dc012120-0c75-40e2-9afc-14f05e326b35"
FINANCE, WEB = "c753bc11-1dc6-4592-b4bc-a535f0861837", "e44bb164-187b-467a-91aa-f8bd9720925a"


def test_sim_command_scheduler_and_task_options_reach_the_simulator(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    proc = run_sim_command(
        "--certs", str(certs),
        "--max-concurrent", "2",
        "--queue-timeout", "600",
        "--already-running", "409",
        "--run-seconds", "120",
        "--task-run-seconds", "reload inventory=0",
        "--fail-first", f"{INVENTORY.upper()}=1",
        "--max-retries", "Reload Sales dashboard=2",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "scheduler: max 2 concurrent reloads, queue timeout 600 s" in line, line
        match = re.search(r"(https://\S+)/qrs ", line)
        assert match, line
        qrs = Qrs(match.group(1), certs)
        assert qrs.call("GET", f"/qrs/reloadtask/{SALES}").json()["maxRetries"] == 2
        assert qrs.call("POST", f"/qrs/task/{SALES}/start").status_code == 204  # runs 120 s
        assert qrs.call("POST", f"/qrs/task/{INVENTORY}/start").status_code == 204  # runs 0 s
        assert wait_until(lambda: qrs.last_status(INVENTORY) == 8, 20)  # its first run fails
        assert qrs.call("POST", f"/qrs/task/{FINANCE}/start").status_code == 204  # second slot
        assert qrs.call("POST", f"/qrs/task/{WEB}/start").status_code == 204  # no slot left
        assert wait_until(lambda: qrs.last_status(WEB) == 3, 20)
        assert qrs.last_status(SALES) == 2 and qrs.last_status(FINANCE) == 2
        again = qrs.call("POST", f"/qrs/task/{WEB}/start")
        assert (again.status_code, again.text) == (409, "Conflict")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_sim_command_names_an_unknown_task(tmp_path: Path) -> None:
    proc = run_sim_command("--certs", str(tmp_path / "certs"), "--fail-first", "No such task=1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "--fail-first No such task=1: no task has that name or id" in err


def test_sim_command_options_parse_with_documented_defaults() -> None:
    from butler_mqtt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sim"])
    assert (args.max_concurrent, args.queue_timeout, args.already_running, args.run_seconds) == (0, 0.0, "same", None)
    assert (args.task_run_seconds, args.fail_first, args.max_retries) == ([], [], [])
    args = parser.parse_args(
        ["sim", "--task-run-seconds", "a=b=1.5", "--fail-first", "X=2", "--fail-first", "Y=0", "--queue-timeout", "30"]
    )
    assert args.task_run_seconds == [("a=b", 1.5)] and args.fail_first == [("X", 2), ("Y", 0)]
    assert args.queue_timeout == 30.0
    for bad in (["--max-concurrent", "-1"], ["--fail-first", "X"], ["--fail-first", "X=1.5"], ["--already-running", "no"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["sim", *bad])
        assert exit_info.value.code == 2
    out = subprocess.run(
        [sys.executable, "-m", "butler_mqtt", "sim", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    help_text = " ".join(out.stdout.split())
    for documented in ("--max-concurrent N", "QRS's own default is 4", "QRS's own default is 1800",
                       "--fail-first NAME=K", "--task-run-seconds NAME=SECONDS", "(default same)"):
        assert documented in help_text, documented
