"""The Mosquitto example of docs/deployment.md (docs/examples/mosquitto/), run for real.

The broker gets exactly the example mosquitto.conf, passwd (hashed with `mosquitto_passwd -U`
as the guide says) and acl. Only the listener port, the file locations and the TLS files
(generated with trustme) are adapted. It shows: the daemon's user connects over TLS and
subscribes, a listed publisher's request is answered, and an unlisted publisher's requests never
reach the daemon. Also `butler-mqtt check` against it, with right and wrong credentials.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.mosquitto import Mosquitto, find_mosquitto, free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import REPO, client, retained

EXAMPLE = REPO / "docs" / "examples" / "mosquitto"
NIGHTLY = "0e710000-0000-4000-8000-000000000001"  # tag "nightly": the listed publisher's request
SECRET = "0e710000-0000-4000-8000-000000000002"  # what the unlisted publisher tries to start
TASKS = [SimTask(NIGHTLY, "Nightly", tags=["nightly"]), SimTask(SECRET, "Secret", tags=["secret"])]


class ExampleBroker(Mosquitto):
    """Mosquitto running the example config verbatim (after `adapt`)."""

    def __init__(self, workdir: Path, conf: str, port: int) -> None:
        super().__init__(workdir, port)
        self.conf = conf

    def write_conf(self) -> None:
        self.conf_path.write_text(self.conf)


def adapt(conf: str, port: int, workdir: Path) -> str:
    """Only the port and the file locations change; each replaced text must be in the example."""
    for old, new in {
        "listener 8883\n": f"listener {port} 127.0.0.1\n",
        "/etc/mosquitto/": f"{workdir}/",
        "/var/lib/mosquitto/": f"{workdir}/",
    }.items():
        assert old in conf, f"the example no longer contains {old!r}: update this test"
        conf = conf.replace(old, new)
    return conf


@pytest.fixture(scope="module")
def acl_broker():
    if find_mosquitto() is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto and mosquitto_passwd not found: apt-get install mosquitto mosquitto-clients")
    # Run as root, mosquitto drops to user "mosquitto" before reading passwd and acl: they must be
    # in a directory it can reach (pytest's tmp dirs are 0700), and readable.
    wd = Path(tempfile.mkdtemp(prefix="butler-mqtt-acl-"))
    os.chmod(wd, 0o777)
    certs = wd / "certs"
    certs.mkdir()
    os.chmod(certs, 0o755)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server_key.pem"))
    shutil.copy(EXAMPLE / "passwd", wd / "passwd")
    subprocess.run(["mosquitto_passwd", "-U", str(wd / "passwd")], check=True, capture_output=True)
    shutil.copy(EXAMPLE / "acl", wd / "acl")
    for f in (certs / "ca.pem", certs / "server.pem", certs / "server_key.pem", wd / "passwd", wd / "acl"):
        os.chmod(f, 0o644)
    port = free_port()
    broker = ExampleBroker(wd, adapt((EXAMPLE / "mosquitto.conf").read_text(), port, wd), port).start()
    passwords = dict(line.split(":", 1) for line in (EXAMPLE / "passwd").read_text().split())
    broker.ca = certs / "ca.pem"  # type: ignore[attr-defined]
    broker.passwords = passwords  # type: ignore[attr-defined]
    yield broker
    broker.stop()
    shutil.rmtree(wd, ignore_errors=True)


def mqtt_cfg(broker: Any, user: str | None, password: str | None = None) -> dict[str, Any]:
    return {
        "host": "127.0.0.1", "port": broker.port, "username": user,
        "password": password if password is not None else broker.passwords.get(user),
        "tls": {"enabled": True, "ca": str(broker.ca)},
    }


def connect_reason(broker: Any, user: str | None, password: str | None) -> str:
    """The broker's answer to a CONNECT with these credentials."""
    answer: list[str] = []
    done = threading.Event()
    c = client(broker.port, username=user, password=password, ca=broker.ca)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        answer.append(str(rc))
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    return answer[0] if answer else "no answer"


def publish_reasons(broker: Any, user: str, messages: list[tuple[str, bytes]]) -> list[str]:
    """Publish at QoS 1 and return the PUBACK reason codes (MQTT 5)."""
    reasons: list[str] = []
    cond = threading.Condition()
    c = client(broker.port, username=user, password=broker.passwords[user], ca=broker.ca)

    def on_publish(_c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        with cond:
            reasons.append(str(rc))
            cond.notify_all()

    c.on_publish = on_publish
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        for topic, payload in messages:
            c.publish(topic, payload, qos=1)
        with cond:
            cond.wait_for(lambda: len(reasons) == len(messages), 10)
    finally:
        c.disconnect()
        c.loop_stop()
    return reasons


def test_only_listed_publishers_can_start_tasks(acl_broker, sim, qrs_certs, tmp_path, start_daemon):
    b = acl_broker
    cfg = make_config(qrs_certs, sim.port, b, tmp_path / "state", mqtt=mqtt_cfg(b, "butler-mqtt"))
    running = start_daemon(cfg)  # waits until the daemon's user is connected over TLS and subscribed
    assert running.daemon.listener.subscribed.is_set()

    # No anonymous clients, no wrong passwords.
    assert connect_reason(b, None, None) == "Not authorized"
    assert connect_reason(b, "etl-scheduler", "wrong") == "Not authorized"

    # An authenticated user without a write grant: the broker drops both start topics' messages.
    reasons = publish_reasons(b, "monitoring", [
        ("qliksense/task/start", b'{"requestId": "sneaky", "taskId": "%s"}' % SECRET.encode()),
        ("qliksense/start_task", SECRET.encode()),
    ])
    assert reasons == ["Not authorized", "Not authorized"]
    # It may still read the status topic.
    status = retained(b.port, "butler-mqtt/status", username="monitoring", password=b.passwords["monitoring"], ca=b.ca)
    assert status is not None and status["status"] == "online"

    # A listed publisher's request is answered (on a private response topic the ACL allows).
    with Requester(MqttConfig.model_validate(mqtt_cfg(b, "etl-scheduler"))) as r:
        events = r.request({"requestId": "etl-1", "tag": "nightly"}, timeout=30)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["totalTasksStarted"] == 1
    # The dropped requests were acknowledged (PUBACK) before this one was sent: had they been
    # routed, the daemon would have had them first. Only the listed publisher's task started.
    assert [s.task_id for s in sim.starts] == [NIGHTLY]


def test_an_acl_without_the_stop_topic_still_serves_starts(acl_broker, sim, qrs_certs, tmp_path, start_daemon):
    """An ACL written before mqtt.topics.stop existed: the daemon comes online and starts are
    served (Mosquitto grants the subscription and delivers nothing on it; a broker that refuses
    it in its SUBACK gets the same: the listener logs the fix and goes on with the start topics)."""
    b = acl_broker
    mqtt = {**mqtt_cfg(b, "butler-mqtt"), "topics": {"stop": "qliksense/task/stop-not-granted"}}
    cfg = make_config(qrs_certs, sim.port, b, tmp_path / "state", mqtt=mqtt)
    running = start_daemon(cfg)
    assert running.daemon.listener.subscribed.is_set()
    with Requester(MqttConfig.model_validate(mqtt_cfg(b, "etl-scheduler"))) as r:
        events = r.request({"requestId": "etl-2", "tag": "nightly"}, timeout=30)
    assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1


def write_check_config(path: Path, broker: Any, sim_port: int, qrs_certs: Path, password: str, ca: Path) -> Path:
    data = {
        "mqtt": {**mqtt_cfg(broker, "butler-mqtt", password), "tls": {"enabled": True, "ca": str(ca)}},
        "qrs": {"host": "localhost", "port": sim_port, "cert": str(qrs_certs / "client.pem"),
                "key": str(qrs_certs / "client_key.pem"), "ca": str(qrs_certs / "root.pem")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "butler_mqtt", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if not k.startswith("BUTLER_MQTT")})


def test_check_names_the_fix_for_wrong_broker_credentials_and_tls(acl_broker, sim, qrs_certs, tmp_path):
    b = acl_broker
    good = check(write_check_config(tmp_path / "good.yaml", b, sim.port, qrs_certs, b.passwords["butler-mqtt"], b.ca))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "[ok  ] broker: connected to 127.0.0.1:" in good.stdout and "as user butler-mqtt" in good.stdout
    assert "[ok  ] start topic: qliksense/task/start subscribable" in good.stdout

    bad = check(write_check_config(tmp_path / "bad.yaml", b, sim.port, qrs_certs, "not-the-password", b.ca))
    assert bad.returncode == 1
    line = next(x for x in bad.stdout.splitlines() if x.startswith("[FAIL] broker:"))
    assert "Not authorized" in line and "mqtt.password" in line and "mqtt_password" in line, line
    assert "[ok  ] qrs:" in bad.stdout  # the other checks still run and pass

    # A CA that did not sign the broker's certificate.
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    tls = check(write_check_config(tmp_path / "tls.yaml", b, sim.port, qrs_certs, b.passwords["butler-mqtt"], other_ca))
    assert tls.returncode == 1
    line = next(x for x in tls.stdout.splitlines() if x.startswith("[FAIL] broker:"))
    assert "TLS" in line and "mqtt.tls.ca" in line, line
