"""`butler-mqtt sim` failure, script-log and stop options, run as a real process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.sim.data import DEMO_FAILING_ID, DEMO_FAILURE_MESSAGE
from tests.integration.test_sim_app import KEY, ROOT, Qrs, run_sim_command
from tests.support.mqtt import wait_until

SALES = "52bc35f3-2826-4691-890f-6d540124f7fb"


def get(qrs: Qrs, path: str, **params: str) -> Any:
    return qrs.session.get(
        f"{qrs.base_url}{path}",
        params={**params, "xrfkey": KEY},
        headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_api"},
        timeout=10,
    )


def test_sim_command_failure_log_and_stop_options_reach_the_simulator(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    proc = run_sim_command(
        "--certs", str(certs),
        "--run-seconds", "0.1",
        "--task-run-seconds", "Reload Sales dashboard=60",
        "--failure-message", "Reload Data quality check=Table 'Orders' not found (x=1)",
        "--log-encoding", f"{DEMO_FAILING_ID}=utf-16-le",
        "--log-fault", "scriptlogfile=404",
        "--stop-seconds", "0.1,0.1",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        match = re.search(r"(https://\S+)/qrs ", proc.stdout.readline())
        assert match
        qrs = Qrs(match.group(1), certs)
        assert qrs.call("POST", f"/qrs/task/{DEMO_FAILING_ID}/start").status_code == 204
        assert wait_until(lambda: qrs.last_status(DEMO_FAILING_ID) == 8, 20)
        last = qrs.call("GET", f"/qrs/reloadtask/{DEMO_FAILING_ID}").json()["operational"]["lastExecutionResult"]
        assert [d["message"] for d in last["details"] if d["detailsType"] == 0] == ["Table 'Orders' not found (x=1)"]
        route = f"/qrs/reloadtask/{DEMO_FAILING_ID}"
        assert get(qrs, f"{route}/scriptlogfile", executionresultid=last["id"]).status_code == 404
        ticket = get(qrs, f"{route}/scriptlog", filereferenceid=last["fileReferenceID"]).json()["value"]
        log = get(qrs, f"/qrs/download/reloadtask/{ticket}/scriptlog.txt").content
        assert log.startswith(b"\xff\xfe") and "Error: Table 'Orders' not found (x=1)\r\n" in log[2:].decode("utf-16-le")
        assert qrs.call("POST", f"/qrs/task/{SALES}/start").status_code == 204
        assert wait_until(lambda: qrs.last_status(SALES) == 2, 20)
        assert qrs.call("POST", f"/qrs/task/{SALES}/stop").status_code == 204
        assert wait_until(lambda: qrs.last_status(SALES) == 6, 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_demo_failing_task_has_a_meaningful_message() -> None:
    from butler_mqtt.sim import demo_tasks

    (task,) = [t for t in demo_tasks() if t.id == DEMO_FAILING_ID]
    assert task.outcome == "fail" and task.failure_message == DEMO_FAILURE_MESSAGE == "Field 'Amount' not found"


def test_sim_command_rejects_a_bad_log_fault(tmp_path: Path) -> None:
    proc = run_sim_command("--certs", str(tmp_path / "certs"), "--log-fault", "download=explode")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--log-fault download=explode" in err


def test_sim_command_failure_options_parse_with_documented_defaults() -> None:
    from butler_mqtt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sim"])
    assert (args.failure_message, args.log_bytes, args.log_encoding, args.log_fault) == ([], [], [], [])
    assert (args.stop_seconds, args.no_file_references) == (None, False)
    args = parser.parse_args(["sim", "--failure-message", "A=x=y", "--stop-seconds", "2", "--log-bytes", "B=10"])
    assert args.failure_message == [("A", "x=y")] and args.stop_seconds == (2.0, 2.0) and args.log_bytes == [("B", 10)]
    for bad in (["--stop-seconds", "x"], ["--log-bytes", "B=-1"], ["--failure-message", "=x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["sim", *bad])
    out = subprocess.run(
        [sys.executable, "-m", "butler_mqtt", "sim", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    help_text = " ".join(out.stdout.split())
    for documented in ("--log-fault ROUTE=FAULT", "(default 0.5,1.0)", "--failure-message NAME=TEXT"):
        assert documented in help_text, documented
