"""The retained status topic: `online` (version, start time, topics) on every connect, `offline`
on a clean shutdown and, through the Last Will, when the daemon dies without saying goodbye.

Each test uses its own status topic, so daemons of other tests cannot interfere."""

from __future__ import annotations

import datetime as dt
import signal
import uuid

from butler_mqtt import __version__
from butler_mqtt.mqtt.listener import wait_published
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import DaemonProcess, client, daemon_env, retained, wait_retained

TASKS: list[SimTask] = []  # the shared `sim` fixture serves no tasks


def status_topic() -> str:
    return f"ops-test/{uuid.uuid4().hex[:8]}/status"


def is_status(state: str, client_id: str):
    return lambda m: m is not None and m.get("status") == state and m.get("clientId") == client_id


def test_online_retained_with_version_start_time_topics_then_offline(qrs_certs, sim, broker, tmp_path, start_daemon):
    topic = status_topic()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", mqtt={"topics": {"status": topic}})
    running = start_daemon(cfg)
    online = wait_retained(broker.port, topic, is_status("online", cfg.mqtt.client_id))
    assert online["version"] == __version__
    started = dt.datetime.strptime(online["startedAt"], "%Y-%m-%dT%H:%M:%SZ")
    assert started.year >= 2024
    assert online["topics"] == {
        "start": cfg.mqtt.topics.start,
        "startPlain": cfg.mqtt.topics.start_plain,
        "reply": cfg.mqtt.topics.reply,
    }
    running.stop()  # clean shutdown publishes the retained offline status itself
    offline = retained(broker.port, topic)
    assert is_status("offline", cfg.mqtt.client_id)(offline), offline
    assert offline["startedAt"] == online["startedAt"] and offline["version"] == __version__


def test_online_published_again_after_a_broker_restart(qrs_certs, sim, own_broker, tmp_path, start_daemon):
    topic = status_topic()
    cfg = make_config(qrs_certs, sim.port, own_broker, tmp_path / "state", mqtt={"topics": {"status": topic}})
    d = start_daemon(cfg).daemon
    online = wait_retained(own_broker.port, topic, is_status("online", cfg.mqtt.client_id))
    # Clear the retained status, so only a new publish can bring "online" back.
    c = client(own_broker.port)
    c.connect("127.0.0.1", own_broker.port)
    c.loop_start()
    assert wait_published(c.publish(topic, b"", qos=1, retain=True), 10)
    c.disconnect()
    c.loop_stop()
    assert retained(own_broker.port, topic) is None
    assert d.listener.connects == 1
    own_broker.restart()
    again = wait_retained(own_broker.port, topic, is_status("online", cfg.mqtt.client_id), timeout=60)
    assert d.listener.connects >= 2
    assert again["startedAt"] == online["startedAt"]  # the same process: reconnected, not restarted


def test_offline_by_last_will_after_sigkill(qrs_certs, sim, broker, tmp_path):
    """SIGKILL gives the daemon no chance to publish anything: the broker sends its will when
    the TCP connection drops. The will has no Will Delay Interval, so the MQTT 5 session expiry
    (86400 s) does not hold it back: the will goes out at the earlier of the two."""
    topic = status_topic()
    client_id = f"will-{uuid.uuid4().hex[:8]}"
    env = daemon_env(qrs_certs, sim.port, broker.port, tmp_path / "state", client_id, BUTLER_MQTT__MQTT__TOPICS__STATUS=topic)
    daemon = DaemonProcess(env)
    try:
        online = wait_retained(broker.port, topic, is_status("online", client_id), timeout=30)
        daemon.signal(signal.SIGKILL)
        assert daemon.wait(10) == -signal.SIGKILL
        offline = wait_retained(broker.port, topic, is_status("offline", client_id), timeout=30)
    finally:
        daemon.stop()
    assert offline["startedAt"] == online["startedAt"]
    assert "stopping" not in daemon.log_text()  # it really died: no clean shutdown ran
