"""`serve`, the blocking entry point behind `butler-mqtt sim`, run as a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import requests

from butler_mqtt.sim import demo_tasks

ROOT = Path(__file__).resolve().parents[2]
KEY = "Ab3dEf6hIj9lMn0p"
SERVE = (
    "import sys; from pathlib import Path; from butler_mqtt.sim import serve; "
    "tasks = Path(sys.argv[2]) if len(sys.argv) > 2 else None; "
    "sys.exit(serve('127.0.0.1', 0, Path(sys.argv[1]), tasks, 0, False))"
)


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
        session = requests.Session()
        session.trust_env = False
        response = session.get(
            f"{match.group(1)}/qrs/reloadtask/count?xrfkey={KEY}",
            headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_api"},
            cert=(str(certs / "client.pem"), str(certs / "client_key.pem")),
            verify=str(certs / "root.pem"),
            timeout=10,
        )
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
