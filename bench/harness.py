"""Shared set-up for the benchmarks: simulator + private mosquitto + daemon (a subprocess).

Every benchmark prints plain tables; none passes or fails on time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from butler_mqtt.ops.mosquitto import Mosquitto  # noqa: E402
from butler_mqtt.sim import QrsSimulator, SimTask, ensure_certs  # noqa: E402


def machine() -> str:
    cpus = os.cpu_count()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    return f"{platform.system()} {platform.machine()}, {cpus} cores ({model}), Python {platform.python_version()}"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


class Stack:
    """Simulator (in this process), mosquitto and the daemon (subprocesses)."""

    def __init__(
        self, tasks: list[SimTask], latency_ms: float = 0, daemon_env: dict[str, str] | None = None, sim_process: bool = False,
        sim_cpu_ms: float = 0,
    ) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="butler-mqtt-bench-"))
        self.certs = ensure_certs(self.work / "certs")
        # sim_process: the stand-in in a process of its own (`butler-mqtt sim`), as an independent
        # QRS stand-in would be, not sharing this process's GIL with the load generators.
        self.sim: Any = (SimProcess(tasks, self.work, latency_ms, sim_cpu_ms) if sim_process
                         else QrsSimulator(tasks, certs_dir=self.work / "certs", latency_ms=latency_ms).start())
        self.broker = Mosquitto(self.work / "broker").start()
        self.client_id = f"bench-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
            "BUTLER_MQTT__MQTT__PORT": str(self.broker.port),
            "BUTLER_MQTT__MQTT__CLIENT_ID": self.client_id,
            "BUTLER_MQTT__QRS__HOST": "localhost",
            "BUTLER_MQTT__QRS__PORT": str(self.sim.port),
            "BUTLER_MQTT__QRS__CERT": str(self.certs.client),
            "BUTLER_MQTT__QRS__KEY": str(self.certs.client_key),
            "BUTLER_MQTT__QRS__CA": str(self.certs.root),
            "BUTLER_MQTT__STATE_DIR": str(self.work / "state"),
            "BUTLER_MQTT__LOGGING__LEVEL": "warning",
            **(daemon_env or {}),
        }
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "butler_mqtt", "run", "--config", str(self.work / "none.yaml")],
            cwd=REPO, env=env, stdout=open(self.work / "daemon.out", "wb") if os.environ.get("BENCH_KEEP_STDOUT") else subprocess.DEVNULL, stderr=open(self.work / "daemon.log", "wb"),  # noqa: SIM115
        )
        (self.work / "none.yaml").write_text("{}\n")
        self._wait_online()

    def _wait_online(self, timeout: float = 30) -> None:
        online = threading.Event()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            d = json.loads(msg.payload)
            if d.get("clientId") == self.client_id and d.get("status") == "online":
                online.set()

        c.on_connect = lambda cl, *_: cl.subscribe([("butler-mqtt/status", 1), ("butler-mqtt/status/+", 1)])
        c.on_message = on_message
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        ok = online.wait(timeout)
        c.disconnect()
        c.loop_stop()
        if not ok:
            raise RuntimeError(f"daemon did not come online; see {self.work / 'daemon.log'}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.daemon.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the daemon process has used so far."""
        return process_cpu_s(self.daemon.pid)

    def close(self) -> None:
        end_process(self.daemon)
        self.broker.stop()
        self.sim.stop()


class SimProcess:
    """`butler-mqtt sim` in a subprocess serving `tasks` (its starts are not visible here)."""

    starts: list[Any] | None = None

    def __init__(self, tasks: list[SimTask], work: Path, latency_ms: float = 0, cpu_ms: float = 0) -> None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        tasks_file = work / "tasks.json"
        tasks_file.write_text(json.dumps([{"id": t.id, "name": t.name, "tags": list(t.tags), "runSeconds": t.run_seconds}
                                          for t in tasks]))
        self.proc = subprocess.Popen(
            [sys.executable, *(["-m", "butler_mqtt"] if cpu_ms <= 0 else [str(REPO / "bench" / "slow_sim.py"), str(cpu_ms)]),
             "sim", "--tasks", str(tasks_file), "--port", str(self.port),
             "--certs", str(work / "certs"), "--latency-ms", str(latency_ms)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(work / "sim.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the simulator did not listen; see {work / 'sim.log'}")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        end_process(self.proc)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def tagged_tasks(counts: dict[str, int], run_seconds: float = 0.5) -> list[SimTask]:
    """`counts[tag]` tasks carrying each tag (distinct tasks per tag)."""
    tasks = []
    n = 0
    for tag, count in counts.items():
        for _ in range(count):
            tasks.append(SimTask(f"be7c0000-0000-4000-8000-{n:012d}", f"Task {n}", tags=[tag], run_seconds=run_seconds))
            n += 1
    return tasks


def wait_for(pred: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


class Replies:
    """Counts summary replies per requestId (and `online` statuses) on a private subscription."""

    def __init__(self, port: int, reply_topic: str = "qliksense/task/start/reply") -> None:
        from butler_mqtt.mqtt.listener import nodelay

        self.seen: set[str] = set()
        self.online: set[str] = set()
        self.cond = threading.Condition()
        ready = threading.Event()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_connect = lambda cl, *_: (nodelay(cl), cl.subscribe([(reply_topic, 1), ("butler-mqtt/status", 1), ("butler-mqtt/status/+", 1)]))
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        ready.wait(10)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        ev = json.loads(msg.payload)
        with self.cond:
            if msg.topic.startswith("butler-mqtt/status"):  # /<client id> with a shared group
                if ev.get("status") == "online":
                    self.online.add(ev["clientId"])
            elif ev.get("event") == "summary":
                self.seen.add(ev["requestId"])
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float) -> bool:
        with self.cond:
            return bool(self.cond.wait_for(pred, timeout=timeout))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publisher(port: int) -> mqtt.Client:
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(200)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    return pub
