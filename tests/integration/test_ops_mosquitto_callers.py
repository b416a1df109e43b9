"""The broker's half of callers (contract section 10, issue 24 item 5), on a real Mosquitto.

The broker runs the example mosquitto.conf (docs/examples/mosquitto/, adapted only in port,
paths and TLS files like test_ops_mosquitto_acl.py) with the callers ACL and password file of
docs/examples/mosquitto/callers/ verbatim: a caller publishing on another caller's topic is
dropped by the broker (the daemon's user, subscribed to exactly the filters
`caller_subscriptions` returns, never receives it), and on its own topic it is delivered.
The dynamic-security plugin's equivalent (callers/dynamic-security.json) is run the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt.callers import caller_subscriptions
from butler_mqtt.config import Config
from butler_mqtt.ops.mosquitto import Mosquitto, find_mosquitto, free_port
from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.ops import REPO, client

EXAMPLE = REPO / "docs" / "examples" / "mosquitto"
CALLERS = EXAMPLE / "callers"
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
#: The callers of butler.yaml that go with the example ACL (broker users erp and svc-dwh-loader).
CFG = Config.model_validate({"callers": [{"name": "erp"}, {"name": "dwh"}]})
NA, OK = "Not authorized", "Success"


class ExampleBroker(Mosquitto):
    """Mosquitto running a given config text verbatim."""

    def __init__(self, workdir: Path, conf: str, port: int) -> None:
        super().__init__(workdir, port)
        self.conf = conf
        self.ca: Path = workdir / "certs" / "ca.pem"
        self.passwords: dict[str, str] = {}

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


def workdir_with_certs() -> Path:
    # As root, mosquitto drops to user "mosquitto" before reading passwd and acl: they must be
    # in a directory it can reach (pytest's tmp dirs are 0700), and readable.
    wd = Path(tempfile.mkdtemp(prefix="butler-mqtt-callers-"))
    os.chmod(wd, 0o777)
    certs = wd / "certs"
    certs.mkdir()
    os.chmod(certs, 0o755)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server_key.pem"))
    for f in certs.iterdir():
        os.chmod(f, 0o644)
    return wd


def need(tool: str) -> None:
    if shutil.which(tool) is None and not (tool == "mosquitto" and find_mosquitto()):
        pytest.fail(f"{tool} not found: apt-get install mosquitto mosquitto-clients")


#: Users that are not in the example, added to the broker's password file only to show that a
#: user name holding a wildcard gets nothing from the `pattern` lines (Mosquitto refuses them).
HOSTILE_USERS = {"+": "hostile-plus", "x#": "hostile-hash"}  # ("#" first would be a comment line)


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[ExampleBroker]:
    need("mosquitto")
    need("mosquitto_passwd")
    wd = workdir_with_certs()
    example = (CALLERS / "passwd").read_text()
    hostile = "".join(f"{u}:{p}\n" for u, p in HOSTILE_USERS.items())
    (wd / "passwd").write_text(example + hostile)
    subprocess.run(["mosquitto_passwd", "-U", str(wd / "passwd")], check=True, capture_output=True)
    shutil.copy(CALLERS / "acl", wd / "acl")
    for f in (wd / "passwd", wd / "acl"):
        os.chmod(f, 0o644)
    port = free_port()
    broker = ExampleBroker(wd, adapt((EXAMPLE / "mosquitto.conf").read_text(), port, wd), port).start()
    broker.passwords = dict(line.split(":", 1) for line in example.split()) | HOSTILE_USERS
    yield broker
    broker.stop()
    shutil.rmtree(wd, ignore_errors=True)


class Daemon:
    """A subscriber as the daemon's broker user, on the filters butler-mqtt subscribes to with
    callers (and the bare topics): records every message the broker routes to it."""

    def __init__(self, broker: ExampleBroker, user: str = "butler-mqtt") -> None:
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        filters = [s.topic for s in caller_subscriptions(CFG.mqtt, CFG.callers)]
        assert filters == ["qliksense/task/start/+", "qliksense/task/stop/+"]
        subscribed = threading.Event()
        self.granted: list[str] = []
        self.c = client(broker.port, username=user, password=broker.passwords[user], ca=broker.ca)

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            c.subscribe([(f, 1) for f in [*filters, "qliksense/task/start", "qliksense/task/stop"]])

        def on_subscribe(_c: Any, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
            self.granted = [str(r) for r in rcs]
            subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self.cond:
                self.got.append((msg.topic, msg.payload))
                self.cond.notify_all()

        self.c.on_connect, self.c.on_subscribe, self.c.on_message = on_connect, on_subscribe, on_message
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert subscribed.wait(10), "the daemon's user could not subscribe"

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes]]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(p == payload for _, p in self.got), 10), self.got
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish(broker: ExampleBroker, user: str, messages: list[tuple[str, bytes]], *, v311: bool = False) -> list[str]:
    """Publish at QoS 1 as `user`; the PUBACK reason codes (MQTT 5), in order."""
    reasons: list[str] = []
    cond = threading.Condition()
    if v311:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.username_pw_set(user, broker.passwords[user])
        c.tls_set(ca_certs=str(broker.ca))
    else:
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
            assert cond.wait_for(lambda: len(reasons) == len(messages), 10), reasons
    finally:
        c.disconnect()
        c.loop_stop()
    return reasons


START, STOP = "qliksense/task/start", "qliksense/task/stop"


def matrix(broker: ExampleBroker, daemon: Daemon) -> None:
    """Each caller is delivered on its own topics and dropped on the other's; the bare topics
    and a user without a grant are dropped. The last message of each publisher is one that is
    delivered: once it arrived, anything routed before it would have arrived too."""
    assert publish(broker, "erp", [
        (f"{START}/dwh", b"erp-as-dwh"), (f"{STOP}/dwh", b"erp-stops-dwh"), (START, b"erp-bare"),
        (f"{START}/svc-dwh-loader", b"erp-as-loader"), (f"{START}/erp", b"erp-start"), (f"{STOP}/erp", b"erp-stop"),
    ]) == [NA, NA, NA, NA, OK, OK]
    assert publish(broker, "svc-dwh-loader", [
        (f"{START}/erp", b"dwh-as-erp"), (f"{STOP}/erp", b"dwh-stops-erp"), (f"{START}/dwh", b"dwh-start"),
        (f"{STOP}/dwh", b"dwh-stop"),
    ]) == [NA, NA, OK, OK]
    assert publish(broker, "monitoring", [(f"{START}/erp", b"mon-as-erp"), (f"{START}/dwh", b"mon-as-dwh")]) == [NA, NA]
    got = daemon.wait_for(b"dwh-stop")
    daemon.wait_for(b"erp-stop")
    assert sorted(got) == sorted([
        (f"{START}/erp", b"erp-start"), (f"{STOP}/erp", b"erp-stop"),
        (f"{START}/dwh", b"dwh-start"), (f"{STOP}/dwh", b"dwh-stop"),
    ])


def test_a_caller_topic_belongs_to_one_broker_user(acl_broker):
    daemon = Daemon(acl_broker)
    try:
        assert daemon.granted == ["Granted QoS 1"] * 4
        matrix(acl_broker, daemon)
    finally:
        daemon.close()


def test_mqtt_311_publishers_are_dropped_silently_on_another_callers_topic(acl_broker):
    daemon = Daemon(acl_broker)
    try:
        # 3.1.1 has no reason codes: the PUBACK comes, the message goes nowhere.
        publish(acl_broker, "erp", [(f"{START}/dwh", b"311-erp-as-dwh"), (f"{START}/erp", b"311-erp")], v311=True)
        assert daemon.wait_for(b"311-erp") == [(f"{START}/erp", b"311-erp")]
    finally:
        daemon.close()


def test_user_names_holding_wildcards_get_nothing_from_the_patterns(acl_broker):
    daemon = Daemon(acl_broker)
    try:
        for user in HOSTILE_USERS:  # pattern "qliksense/task/start/%u" must not become ".../+" or ".../#"
            assert publish(acl_broker, user, [(f"{START}/erp", b"w1"), (f"{STOP}/dwh", b"w2")]) == [NA, NA]
        publish(acl_broker, "erp", [(f"{START}/erp", b"sentinel")])
        assert daemon.wait_for(b"sentinel") == [(f"{START}/erp", b"sentinel")]
    finally:
        daemon.close()


def test_a_callers_private_replies_reach_no_other_caller(acl_broker):
    """The daemon's replies on qliksense/task/start/reply/<caller>/...: the broker delivers
    them to that caller only (Mosquitto grants the SUBSCRIBE, then checks read access on each
    delivery)."""
    got: list[str] = []
    cond = threading.Condition()
    subscribed = threading.Event()
    c = client(acl_broker.port, username="svc-dwh-loader", password=acl_broker.passwords["svc-dwh-loader"], ca=acl_broker.ca)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with cond:
            got.append(msg.topic)
            cond.notify_all()

    c.on_message = on_message
    c.on_subscribe = lambda *_a: subscribed.set()
    c.connect("127.0.0.1", acl_broker.port)
    c.loop_start()
    try:
        c.subscribe([("qliksense/task/start/reply/erp/#", 1), ("qliksense/task/start/reply/dwh/#", 1),
                     ("qliksense/task/start/reply/#", 1)])
        assert subscribed.wait(10)
        assert publish(acl_broker, "butler-mqtt", [
            ("qliksense/task/start/reply/erp/r1", b"{}"), ("qliksense/task/start/reply", b"{}"),
            ("qliksense/task/start/reply/dwh/r2", b"{}"),
        ]) == [OK, OK, OK]
        with cond:
            assert cond.wait_for(lambda: "qliksense/task/start/reply/dwh/r2" in got, 10), got
    finally:
        c.disconnect()
        c.loop_stop()
    # Its own, once per matching subscription at most; never erp's, nor the shared reply topic.
    assert set(got) == {"qliksense/task/start/reply/dwh/r2"}


# -- the dynamic-security plugin ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dynsec_broker() -> Iterator[ExampleBroker]:
    """A broker with the dynamic-security plugin instead of password_file and acl_file: the
    plugin's file is `mosquitto_ctrl dynsec init` plus the example's roles and clients; the
    passwords are set with mosquitto_ctrl, as docs/callers.md says."""
    need("mosquitto")
    need("mosquitto_ctrl")
    if not Path(DYNSEC_PLUGIN).is_file():
        pytest.fail(f"{DYNSEC_PLUGIN} not found: apt-get install mosquitto (2.0 or later)")
    wd = workdir_with_certs()
    state = wd / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(state), "admin", "admin-pw"], check=True, capture_output=True)
    merged = json.loads(state.read_text())
    example = json.loads((CALLERS / "dynamic-security.json").read_text())
    merged["clients"] += example["clients"]
    merged["roles"] += example["roles"]
    merged["defaultACLAccess"] = example["defaultACLAccess"]
    state.write_text(json.dumps(merged))
    os.chmod(state, 0o666)
    conf = adapt((EXAMPLE / "mosquitto.conf").read_text(), free_port(), wd)
    conf = conf.replace(f"password_file {wd}/passwd\n", "").replace(f"acl_file {wd}/acl\n", "")
    conf += f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {state}\n"
    port = int(conf.split("listener ")[1].split()[0])
    broker = ExampleBroker(wd, conf, port).start()
    broker.passwords = {"butler-mqtt": "daemon-pw", "erp": "erp-pw", "svc-dwh-loader": "dwh-pw", "monitoring": "mon-pw"}
    for user, pw in broker.passwords.items():
        subprocess.run(_ctrl(broker, "setClientPassword", user, pw), check=True, capture_output=True, timeout=30)
    yield broker
    broker.stop()
    shutil.rmtree(wd, ignore_errors=True)


def _ctrl(broker: ExampleBroker, *args: str) -> list[str]:
    return ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(broker.ca),
            "-u", "admin", "-P", "admin-pw", "dynsec", *args]


def test_dynamic_security_gives_each_caller_its_own_topics(dynsec_broker):
    daemon = Daemon(dynsec_broker)
    try:
        assert daemon.granted == ["Granted QoS 1"] * 4
        matrix(dynsec_broker, daemon)
    finally:
        daemon.close()


# -- a real daemon behind the ACL ---------------------------------------------------------------

ERP_TASK = "e1e1e1e1-1111-4111-8111-111111111111"
DWH_TASK = "d1d1d1d1-3333-4333-8333-333333333333"
#: The simulator's tasks (the `sim` fixture reads them from this module).
TASKS = [SimTask(ERP_TASK, "ERP orders", tags=["erp"]), SimTask(DWH_TASK, "DWH load", tags=["dwh"])]


def ask_as(broker: ExampleBroker, user: str, caller_level: str, request_id: str, task_id: str,
           wait: float = 15.0) -> tuple[str, list[dict[str, Any]]]:
    """Publish a start request as broker user `user` on `<start>/<caller_level>` with a Response
    Topic under the user's own reply subtree; (PUBACK reason, the replies that came in `wait`)."""
    got: list[dict[str, Any]] = []
    cond = threading.Condition()
    subscribed = threading.Event()
    reasons: list[str] = []
    reply_topic = f"{START}/reply/{caller_level if user != 'svc-dwh-loader' else 'dwh'}/{request_id}"
    c = client(broker.port, username=user, password=broker.passwords[user], ca=broker.ca)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with cond:
            got.append(json.loads(msg.payload))
            cond.notify_all()

    def on_publish(_c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        with cond:
            reasons.append(str(rc))
            cond.notify_all()

    c.on_message, c.on_publish = on_message, on_publish
    c.on_subscribe = lambda *_a: subscribed.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.subscribe(reply_topic, qos=1)
        assert subscribed.wait(10)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        c.publish(f"{START}/{caller_level}", json.dumps({"requestId": request_id, "taskId": [task_id]}), qos=1,
                  properties=props)
        with cond:
            cond.wait_for(lambda: bool(reasons) and any(e.get("event") in ("summary", "error") for e in got), wait)
            return (reasons[0] if reasons else "no PUBACK"), list(got)
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_real_daemon_serves_a_caller_on_its_own_topic_and_the_broker_drops_the_others(
    acl_broker, sim, qrs_certs, tmp_path, start_daemon
):
    mqtt_cfg = {"host": "127.0.0.1", "port": acl_broker.port, "username": "butler-mqtt",
                "password": acl_broker.passwords["butler-mqtt"], "tls": {"enabled": True, "ca": str(acl_broker.ca)}}
    callers = [{"name": "erp", "allow": {"tags": ["erp"]}}, {"name": "dwh", "allow": {"task_ids": [DWH_TASK]}}]
    cfg = make_config(qrs_certs, sim.port, acl_broker, tmp_path / "state", mqtt=mqtt_cfg, callers=callers,
                      callers_only=True)
    start_daemon(cfg)
    # Served: erp on its own topic, its reply on its own reply subtree.
    reason, events = ask_as(acl_broker, "erp", "erp", "own-1", ERP_TASK)
    assert reason == OK
    assert [(e["event"], e.get("status")) for e in events] == [("task", "started"), ("summary", None)]
    # Dropped by the broker: erp on dwh's topic (Not authorized), nothing reaches the daemon.
    reason, events = ask_as(acl_broker, "erp", "dwh", "other-1", DWH_TASK, wait=2.0)
    assert reason == NA and events == []
    # dwh's broker user on its own topic: served, and its allow-list is dwh's.
    reason, events = ask_as(acl_broker, "svc-dwh-loader", "dwh", "own-2", ERP_TASK)
    assert reason == OK and [e.get("status") for e in events if e["event"] == "task"] == ["denied"]
    assert [s.task_id for s in sim.starts] == [ERP_TASK]
