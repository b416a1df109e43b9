"""Several instances: MQTT 5 shared subscription on one Mosquitto, one PostgreSQL journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask
from tests.support.mqtt import publisher
from tests.support.ops import daemon_env
from tests.support.streams import Replies

REPO = Path(__file__).resolve().parents[2]
N = 600
IDS = [f"5ca1e000-0000-4000-8000-{i:012d}" for i in range(N)]
CHAIN_A = "5ca1e000-aaaa-4000-8000-000000000001"
CHAIN_B = "5ca1e000-aaaa-4000-8000-000000000002"
TASKS = [SimTask(t, f"Task {i}", run_seconds=0.05) for i, t in enumerate(IDS)]
TASKS += [SimTask(CHAIN_A, "Chain stage 0", tags=["stage0"], run_seconds=4), SimTask(CHAIN_B, "Chain stage 1", tags=["stage1"], run_seconds=0.2)]
SIM_OPTIONS = {"latency_ms": 2}


class Cluster:
    def __init__(self, sim, broker, certs: Path, pg: str, tmp: Path) -> None:
        self.env = {
            **os.environ,
            **daemon_env(  # each instance gets its own state_dir (start)
                certs, sim.port, broker.port, tmp, "butler",
                BUTLER_MQTT__MQTT__SHARED_GROUP="butlers",
                BUTLER_MQTT__JOURNAL__URL=pg,
                BUTLER_MQTT__JOURNAL__LEASE_SECONDS="3",
                BUTLER_MQTT__TRACKING__POLL_INTERVAL="0.3",
                BUTLER_MQTT__TRACKING__FIRST_POLL="0.2",
            ),
        }
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, name: str) -> None:
        env = {**self.env, "BUTLER_MQTT__MQTT__INSTANCE_ID": name, "BUTLER_MQTT__STATE_DIR": str(self.tmp / name)}
        out = open(self.log(name), "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env=env, stdout=out, stderr=out)
        out.close()

    def audits(self, name: str) -> list[dict]:
        lines = self.log(name).read_text(errors="replace").splitlines()
        return [json.loads(x) for x in lines if '"event": "audit"' in x or '"event":"audit"' in x]

    def handled_by(self, request_id: str) -> str | None:
        for name in self.procs:
            if any(a.get("requestId") == request_id for a in self.audits(name)):
                return name
        return None

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            p.wait(20)


@pytest.fixture
def cluster(sim, own_broker, qrs_certs, fresh_pg, tmp_path, listen):
    c = Cluster(sim, own_broker, qrs_certs, fresh_pg, tmp_path)
    status = listen("butler-mqtt/status/+", on=own_broker)  # one status topic per instance
    for name in ("n1", "n2", "n3"):
        c.start(name)
    for name in ("n1", "n2", "n3"):
        status.wait_for(lambda m, n=name: m.get("clientId") == f"butler-{n}" and m.get("status") == "online")
    c.status = status
    yield c
    c.stop_all()


def test_three_instances_share_600_requests_each_started_once(cluster, sim, own_broker):
    summaries = Replies(own_broker.port, "qliksense/task/start/reply")
    pub = publisher(own_broker.port, inflight=100)
    run = uuid.uuid4().hex[:6]
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run}-{i}", "taskId": t}), qos=1) for i, t in enumerate(IDS)]
    assert all(wait_published(i, 60) for i in infos)
    assert summaries.wait_count(N, 180) == N
    assert all(n == 1 for n in summaries.seen.values()), "a request was answered twice"
    starts = [s.task_id for s in sim.starts]
    assert len(starts) == len(set(starts)) == N
    deadline = time.monotonic() + 20  # the audit line is written just after the summary
    share = {}
    while sum(share.values()) < N and time.monotonic() < deadline:
        share = {name: len(cluster.audits(name)) for name in ("n1", "n2", "n3")}
        time.sleep(0.1)
    assert sum(share.values()) == N and min(share.values()) > 0, share
    pub.loop_stop()
    summaries.close()


def test_sigkill_one_instance_mid_stream_nothing_lost_nothing_doubled(cluster, sim, own_broker):
    summaries = Replies(own_broker.port, "qliksense/task/start/reply")
    pub = publisher(own_broker.port, inflight=100)
    run = uuid.uuid4().hex[:6]
    infos = [pub.publish("qliksense/task/start", json.dumps({"requestId": f"{run}-{i}", "taskId": t}), qos=1) for i, t in enumerate(IDS)]
    summaries.wait_count(N // 5, 60)
    cluster.procs["n2"].send_signal(signal.SIGKILL)
    cluster.procs["n2"].wait(10)
    assert all(wait_published(i, 60) for i in infos)
    # Its share stays queued in its persistent session until it returns (systemd restarts it).
    time.sleep(1)
    cluster.start("n2")
    assert summaries.wait_count(N, 180) == N
    starts = [s.task_id for s in sim.starts]
    assert len(starts) == len(set(starts)) == N, "lost or doubled starts"
    pub.loop_stop()
    summaries.close()


def test_chain_of_a_killed_instance_is_finished_by_another(cluster, sim, own_broker, listen):
    replies = listen("qliksense/task/start/reply", on=own_broker)
    pub = publisher(own_broker.port, inflight=100)
    pub.publish("qliksense/task/start", json.dumps({"requestId": "chain-x", "tag": "stage0", "then": {"tag": "stage1"}}), qos=1)
    replies.wait_for(lambda m: m.get("requestId") == "chain-x" and m["event"] == "summary")
    owner = None
    deadline = time.monotonic() + 20
    while owner is None and time.monotonic() < deadline:
        owner = cluster.handled_by("chain-x")
        time.sleep(0.1)
    assert owner is not None
    cluster.procs[owner].send_signal(signal.SIGKILL)  # stage 0 runs 4 s: killed while following it
    cluster.procs[owner].wait(10)
    last = replies.wait_for(lambda m: m.get("requestId") == "chain-x" and m["event"] == "requestFinished", timeout=60)
    assert last["finished"] == {"FinishedSuccess": 2} and last["stoppedAtStage"] is None
    assert sorted(s.task_id for s in sim.starts) == sorted([CHAIN_A, CHAIN_B])
    adopted = [n for n in cluster.procs if n != owner and any(
        '"tracking_resumed"' in x and "chain-x" in x for x in cluster.log(n).read_text().splitlines())]
    assert len(adopted) == 1
    pub.loop_stop()
