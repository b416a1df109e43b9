"""The package as a user installs it: a built wheel in a fresh venv, no extras.

`pip install butler-mqtt` must run every feature that works on one machine (REST API,
/metrics, /healthz, /docs), `init` and `check` included; the PostgreSQL driver is an extra.
No network: the fresh venv gets the wheel with `--no-deps`, and the distributions the wheel
declares (base requirements and theirs, never an extra) are linked in from this venv, so a
dependency missing from pyproject.toml is missing there too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.support.ops import daemon_env

REPO = Path(__file__).resolve().parents[2]
TASK = "5e0c7a3e-9d1b-4f7e-8a42-3b6f1c2d9e10"
TASKS = [SimTask(TASK, "Reload from the wheel", tags=["wheel"])]


def _fail(step: str, proc: subprocess.CompletedProcess[str]) -> None:
    pytest.fail(f"{step} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _closure(names: list[Requirement]) -> set[str]:
    """Distributions needed by these requirements (markers evaluated, extras as asked)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a dependency of the wheel) is not installed in {sys.prefix}: run scripts/setup")
        seen.add(key)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return seen


def _link_distribution(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    base = Path(str(dist.locate_file("")))
    for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        src, dst = base / top, site / top
        if src.exists() and not dst.exists() and top != "__pycache__":
            dst.symlink_to(src)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=180,
    )
    if build.returncode != 0:
        _fail("building the wheel (needs setuptools>=77 in this venv: scripts/setup)", build)
    assert "BuildBackendWarning" not in build.stdout + build.stderr, "the build warns:\n" + build.stderr
    wheel = next((work / "dist").glob("butler_mqtt-*.whl"))
    venv = work / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        _fail("python -m venv (install python3-venv)", made)
    py = venv / "bin" / "python"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=180,
    )
    if inst.returncode != 0:
        _fail("installing the wheel into the fresh venv", inst)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile_metadata(wheel) as reqs:
        declared = [r for r in reqs if r.marker is None]  # the wheel's base requirements, no extra
    for name in _closure(declared):
        _link_distribution(name, site)
    return venv


class zipfile_metadata:
    """The Requires-Dist lines of a wheel, as requirements."""

    def __init__(self, wheel: Path) -> None:
        import zipfile

        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(name).decode()
        self.reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]

    def __enter__(self) -> list[Requirement]:
        return self.reqs

    def __exit__(self, *exc: object) -> None:
        return None


def venv_cli(venv: Path, *args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "butler-mqtt"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **env})


def test_the_wheel_has_no_extras_installed(fresh_venv):
    py = fresh_venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import psycopg"], capture_output=True, text=True, cwd=fresh_venv)
    assert probe.returncode != 0 and "No module named 'psycopg'" in probe.stderr
    where = subprocess.run([str(py), "-c", "import butler_mqtt; print(butler_mqtt.__file__)"],
                           capture_output=True, text=True, cwd=fresh_venv)
    assert str(fresh_venv) in where.stdout, where.stdout + where.stderr  # not this checkout


def test_run_with_rest_and_metrics_from_the_wheel(fresh_venv, qrs_certs, sim, broker, tmp_path):
    http_port, metrics_port = free_port(), free_port()
    runs = {
        "rest": {"BUTLER_MQTT__HTTP__ENABLED": "true", "BUTLER_MQTT__HTTP__PORT": str(http_port)},
        "metrics": {"BUTLER_MQTT__METRICS__PORT": str(metrics_port)},
    }
    procs: dict[str, subprocess.Popen[str]] = {}
    assert venv_cli(fresh_venv, "init", env={}, cwd=tmp_path).returncode == 0  # etc/butler.yaml, then env overrides
    try:
        for name, extra in runs.items():
            env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / name, f"wheel-{name}-{uuid.uuid4().hex[:6]}",
                             BUTLER_MQTT__MQTT__TOPICS__START=f"wheel/{uuid.uuid4().hex[:6]}/start", **extra)
            procs[name] = subprocess.Popen([str(fresh_venv / "bin" / "butler-mqtt"), "run"], cwd=tmp_path,
                                           env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rest, metrics = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}"
        assert _healthy(rest, procs["rest"]) and _healthy(metrics, procs["metrics"])
        started = requests.post(f"{rest}/v4/reloadtask/{TASK}/start", json={"requestId": f"w-{uuid.uuid4().hex}"}, timeout=30)
        assert started.status_code == 200, started.text
        assert started.json()["totalTasksStarted"] == 1 and [s.task_id for s in sim.starts] == [TASK]
        for base in (rest, metrics):
            assert "butler_mqtt" in requests.get(f"{base}/metrics", timeout=10).text
        docs = requests.get(f"{rest}/docs", timeout=10)
        assert docs.status_code == 200 and not re.search(r"https?://", docs.text)
        assert requests.get(f"{rest}/docs/assets/swagger-ui-bundle.js", timeout=10).status_code == 200
    finally:
        logs = {}
        for name, p in procs.items():
            p.terminate()
            logs[name] = p.communicate(timeout=30)[0]
    for name, p in procs.items():
        assert p.returncode == 0, logs[name]
        assert "Traceback" not in logs[name] and "ModuleNotFoundError" not in logs[name], logs[name]


def _healthy(base: str, proc: subprocess.Popen[str], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"butler-mqtt run from the wheel exited {proc.returncode}:\n{proc.communicate()[0]}")
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    return False


def test_init_then_check_from_the_wheel(fresh_venv, qrs_certs, sim, broker, tmp_path):
    out = venv_cli(fresh_venv, "init", env={}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = tmp_path / "etc" / "butler.yaml"
    assert written.read_text(encoding="utf-8") == (REPO / "etc" / "butler.yaml").read_text(encoding="utf-8")
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", "wheel-check")
    out = venv_cli(fresh_venv, "check", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[ok  ] config: etc/butler.yaml valid" in out.stdout and "[ok  ] qrs:" in out.stdout
    # The PostgreSQL journal without its extra: a config error saying what to install.
    pg = {**env, "BUTLER_MQTT__JOURNAL__URL": "postgresql://butler@127.0.0.1/butler"}
    out = venv_cli(fresh_venv, "check", env=pg, cwd=tmp_path)
    assert out.returncode == 2 and 'pip install "butler-mqtt[postgres]"' in out.stdout, out.stdout
    out = venv_cli(fresh_venv, "run", env=pg, cwd=tmp_path)
    assert out.returncode == 2 and "journal.url (environment variable BUTLER_MQTT__JOURNAL__URL)" in out.stderr
    assert 'butler-mqtt[postgres]' in out.stderr
