"""Restarts under load: the broker restarted, the daemon SIGKILLed. Every request handled, every
task started exactly once. No timing assertions: only waits with generous limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import publisher
from tests.support.ops import daemon_env
from tests.support.streams import Replies, persistent_client

REPO = Path(__file__).resolve().parents[2]
N = 200
TASK_IDS = [f"fa017000-0000-4000-8000-{i:012d}" for i in range(N)]
TASKS = [SimTask(t, f"Task {i}") for i, t in enumerate(TASK_IDS)]
SIM_OPTIONS = {"latency_ms": 3}


def publish_all(port: int, topic: str, prefix: str) -> list[mqtt.MQTTMessageInfo]:
    pub = persistent_client(port, f"pub-{uuid.uuid4().hex[:8]}")
    pub.loop_start()
    infos = [
        pub.publish(topic, json.dumps({"requestId": f"{prefix}-{i}", "taskId": TASK_IDS[i]}), qos=1)
        for i in range(N)
    ]
    return infos, pub


def assert_each_started_once(sim) -> None:
    ids = [s.task_id for s in sim.starts]
    assert len(ids) == len(set(ids)), "a task was started twice"
    assert sorted(ids) == sorted(TASK_IDS), f"{N - len(set(ids))} tasks never started"


def test_broker_restart_while_requests_stream_in(qrs_certs, sim, own_broker, tmp_path, start_daemon):
    cfg = make_config(qrs_certs, sim.port, own_broker, tmp_path / "state")
    start_daemon(cfg)
    summaries = Replies(own_broker.port, cfg.mqtt.topics.reply)
    infos, pub = publish_all(own_broker.port, cfg.mqtt.topics.start, "br")
    summaries.wait_count(N // 4, 60)
    own_broker.restart()  # clean restart: sessions and queued messages are persisted
    for info in infos:
        assert wait_published(info, 60), "the publisher could not deliver a request"
    assert summaries.wait_count(N, 120) == N
    assert_each_started_once(sim)
    pub.loop_stop()
    summaries.close()


def test_daemon_sigkill_and_restart_mid_stream(qrs_certs, sim, own_broker, tmp_path, listen):
    env = {
        **os.environ,
        **daemon_env(qrs_certs, sim.port, own_broker.port, tmp_path / "state", "sigkill-daemon",
                     BUTLER_MQTT__LOGGING__LEVEL="warning"),
    }
    status = listen("butler-mqtt/status", on=own_broker)

    def start() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return p

    first = start()
    status.wait_for(lambda m: m.get("clientId") == "sigkill-daemon" and m.get("status") == "online")
    summaries = Replies(own_broker.port, "qliksense/task/start/reply")
    infos, pub = publish_all(own_broker.port, "qliksense/task/start", "kill")
    summaries.wait_count(N // 4, 60)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert summaries.wait_count(N, 1) < N, "killed too late to test anything"
    second = start()
    try:
        assert summaries.wait_count(N, 120) == N
        assert_each_started_once(sim)
    finally:
        second.terminate()
        assert second.wait(20) == 0  # clean exit on SIGTERM
        pub.loop_stop()
        summaries.close()
    # The broker holds the will: the killed daemon was reported offline, the new one online.
    assert any(m.get("status") == "offline" for m in status.messages)


@pytest.fixture
def cpu_burner():
    """A busy-looping process for the duration of the test: the daemon, the broker and the
    clients compete for the (2 shared) cores, which widens every race in a reconnect."""
    p = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    yield p
    p.kill()
    p.wait()


def test_five_broker_restarts_under_cpu_load_every_request_answered(
    qrs_certs, sim, own_broker, tmp_path, start_daemon, cpu_burner
):
    """Issue 11 class 9: requests stream in while the broker is restarted 5 times (SIGTERM,
    persistence on) and a CPU burner runs. Every request gets its summary, every task starts
    once. Each wave's restart happens while that wave is still being answered."""
    cfg = make_config(qrs_certs, sim.port, own_broker, tmp_path / "state")
    d = start_daemon(cfg)
    summaries = Replies(own_broker.port, cfg.mqtt.topics.reply)
    pub = persistent_client(own_broker.port, f"pub-{uuid.uuid4().hex[:8]}")
    pub.loop_start()
    waves, per_wave = 5, N // 5
    infos = []
    try:
        for w in range(waves):
            connects = d.daemon.listener.connects
            for i in range(w * per_wave, (w + 1) * per_wave):
                body = json.dumps({"requestId": f"five-{i}", "taskId": TASK_IDS[i]})
                infos.append(pub.publish(cfg.mqtt.topics.start, body, qos=1))
            summaries.wait_count(w * per_wave + 5, 30)
            own_broker.restart()
            # the daemon is back before the next wave: each restart hits a wave in progress
            deadline = time.monotonic() + 30
            while d.daemon.listener.connects == connects and time.monotonic() < deadline:
                time.sleep(0.05)
            assert d.daemon.listener.connects > connects, "the daemon did not reconnect within 30 s"
        for info in infos:
            assert wait_published(info, 60), "the publisher could not deliver a request"
        got = summaries.wait_count(N, 60)
        missing = sorted(f"five-{i}" for i in range(N) if f"five-{i}" not in summaries.seen)
        assert got == N, f"{len(missing)} requests never got their summary: {missing[:10]}"
        assert_each_started_once(sim)
    finally:
        pub.loop_stop()
        summaries.close()


def test_reply_dropped_for_want_of_subscriber_after_reconnect_is_resent(
    qrs_certs, sim, own_broker, tmp_path, start_daemon, listen
):
    """After a broker restart the daemon may be back before the requester has re-subscribed:
    the broker then drops the reply with PUBACK 0x10 (No matching subscribers). Within the
    resend window the daemon publishes it again, so the requester still gets its summary."""
    cfg = make_config(qrs_certs, sim.port, own_broker, tmp_path / "state")
    d = start_daemon(cfg)
    own_broker.restart()
    deadline = time.monotonic() + 30
    while not (d.daemon.listener.connects >= 2 and d.daemon.listener.subscribed.is_set()):
        assert time.monotonic() < deadline, "the daemon did not reconnect within 30 s"
        time.sleep(0.05)
    reply_topic = f"late/{uuid.uuid4().hex[:8]}"
    pub = publisher(own_broker.port)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    body = json.dumps({"requestId": "late-1", "taskId": TASK_IDS[0]})
    assert wait_published(pub.publish(cfg.mqtt.topics.start, body, qos=1, properties=props), 10)
    # the summary is published (and dropped) before anyone listens on the reply topic
    deadline = time.monotonic() + 20
    while not sim.starts:
        assert time.monotonic() < deadline, "the task was not started"
        time.sleep(0.05)
    time.sleep(1.0)
    requester = listen(reply_topic, on=own_broker)
    summary = requester.wait_for(lambda m: m.get("event") == "summary", timeout=15)
    assert summary["requestId"] == "late-1"
    assert [s.task_id for s in sim.starts] == [TASK_IDS[0]]
    pub.loop_stop()
