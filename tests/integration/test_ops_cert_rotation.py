"""Certificate rotation without a restart: on SIGHUP the daemon re-reads the QRS client
certificate, its key and qrs.ca, and the REST API's http.tls files; a file that does not load
keeps the ones in use and the log names its key (never its content). A daemon subprocess with
a config file, real signals, the QRS simulator over mutual TLS and trustme CAs."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.config import MqttConfig, QrsConfig
from butler_mqtt.errors import QrsTlsRejected
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.mosquitto import free_port
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess

T1 = "11111111-1111-4111-8111-111111111111"
TASKS = [SimTask(T1, "Rotated task")]


def replace(path: Path, data: bytes) -> None:
    """Atomically, as certificate tooling (certbot, an export script) would."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def start_config(tmp_path: Path, broker: Any, sim: Any, qrs: dict[str, str], **extra: Any) -> Path:
    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": f"rotate-{uuid.uuid4().hex[:8]}"},
        "qrs": {"host": "localhost", "port": sim.port, **qrs},
        "state_dir": str(tmp_path / "state"),
        "logging": {"level": "info", "format": "json"},
        **extra,
    }))
    return config


def sighup(d: DaemonProcess, event: str, about: str) -> dict[str, Any]:
    """SIGHUP, then that reload's `event` line about `about` (qrs, http.tls)."""
    first = len(d.events)
    d.signal(signal.SIGHUP)
    d.wait_log("config_reloaded", n=1 + sum(1 for e in d.events[:first] if e.get("event") == "config_reloaded"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for e in d.events[first:]:
            if e.get("event") == event and str(e.get("certificates", e.get("key"))).startswith(about):
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {event} line about {about}: " + d.log_text()[-3000:])


def sim_trusting_only(sim: Any, ca: trustme.CA) -> None:
    """From now on the simulator accepts only client certificates signed by `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sim.certs.server, sim.certs.server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(ctx)
    sim._ssl = ctx  # each new connection's handshake uses it


@pytest.fixture
def qrs_files(qrs_certs: Path, tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "qrs"
    d.mkdir()
    for name in ("client.pem", "client_key.pem"):
        shutil.copy(qrs_certs / name, d / name)
    return {"cert": d / "client.pem", "key": d / "client_key.pem", "ca": qrs_certs / "root.pem"}


def test_the_qrs_client_certificate_is_rotated_on_sighup(sim, broker, tmp_path, qrs_files):
    config = start_config(tmp_path, broker, sim, {k: str(v) for k, v in qrs_files.items()})
    d = DaemonProcess({}, config)
    requester = Requester(MqttConfig(host="127.0.0.1", port=broker.port))

    def start() -> str:
        events = requester.request({"requestId": uuid.uuid4().hex, "taskId": T1}, timeout=30)
        return str(events[-1].get("tasksStarted", events[-1]))

    try:
        d.wait_log("mqtt_subscribed")
        requester.connect()
        assert T1 in start()

        # A client certificate from a new CA, which QRS is told to trust (as after re-exporting
        # the certificates of a re-installed site), replaces the old files.
        new_ca = trustme.CA()
        leaf = new_ca.issue_cert("butler-mqtt-client")
        replace(qrs_files["cert"], leaf.cert_chain_pems[0].bytes())
        replace(qrs_files["key"], leaf.private_key_pem.bytes())
        assert sighup(d, "tls_reloaded", "qrs")["certificates"] == "qrs"
        sim_trusting_only(sim, new_ca)
        # The old certificate no longer gets in: a start that works now used the new one.
        old = QrsConfig(host="localhost", port=sim.port, cert=sim.certs.client, key=sim.certs.client_key,
                        ca=sim.certs.root, retries=0)
        with pytest.raises(QrsTlsRejected):
            QrsClient(old).about()
        assert T1 in start()

        # A broken key file: the reload names it, the certificate in use stays in use.
        secret_looking = b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
        replace(qrs_files["key"], secret_looking)
        failed = sighup(d, "tls_reload_failed", "qrs")
        assert failed["key"] == "qrs.key" and str(qrs_files["key"]) in failed["error"]
        assert "no PEM private key" in failed["error"]
        assert T1 in start()
        # A missing certificate file: the same.
        qrs_files["cert"].unlink()
        failed = sighup(d, "tls_reload_failed", "qrs")
        assert failed["key"] == "qrs.cert" and "cannot read" in failed["error"]
        assert T1 in start()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()
    finally:
        requester.close()
        d.stop()
    assert secret_looking.decode() not in d.log_text()


class RestTls:
    """The REST API's files, two server CAs and two client CAs (the second ones for the rotation)."""

    def __init__(self, d: Path) -> None:
        d.mkdir()
        self.server_cas = [trustme.CA(), trustme.CA()]
        self.client_cas = [trustme.CA(), trustme.CA()]
        self.cert, self.key, self.client_ca = d / "http_cert.pem", d / "http_key.pem", d / "client_ca.pem"
        self.servers = [ca.issue_cert("127.0.0.1") for ca in self.server_cas]
        self.clients = [ca.issue_cert("erp-caller") for ca in self.client_cas]
        self.use(0)

    def use(self, i: int) -> None:
        """Server certificate and client CA number i, written the way a rotation writes them."""
        replace(self.cert, self.servers[i].cert_chain_pems[0].bytes())
        replace(self.key, self.servers[i].private_key_pem.bytes())
        replace(self.client_ca, self.client_cas[i].cert_pem.bytes())

    def connect(self, port: int, client: int) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context()
        for ca in self.server_cas:
            ca.configure_trust(ctx)
        self.clients[client].configure_cert(ctx)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.connect()
        return conn


def served_cert(conn: http.client.HTTPSConnection) -> bytes:
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def healthz(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_the_rest_api_serves_a_rotated_certificate_and_client_ca_after_sighup(sim, broker, tmp_path, qrs_certs):
    files = RestTls(tmp_path / "https")
    port = free_port()
    qrs = {"cert": str(qrs_certs / "client.pem"), "key": str(qrs_certs / "client_key.pem"), "ca": str(qrs_certs / "root.pem")}
    config = start_config(tmp_path, broker, sim, qrs, http={
        "enabled": True, "host": "127.0.0.1", "port": port,
        "tls": {"cert": str(files.cert), "key": str(files.key), "client_ca": str(files.client_ca)},
    })
    # `check` says which files a running daemon re-reads.
    out = subprocess.run([sys.executable, "-m", "butler_mqtt", "check", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("[ok  ] certificate rotation: qrs.cert, qrs.key, qrs.ca, http.tls.cert, http.tls.key, http.tls.client_ca "
            "are re-read on SIGHUP (systemctl reload butler-mqtt)") in out.stdout, out.stdout
    d = DaemonProcess({}, config)
    try:
        d.wait_log("http_listening")
        before = files.connect(port, client=0)
        assert served_cert(before) == der(files.servers[0]) and healthz(before) in (200, 503)

        files.use(1)
        assert sighup(d, "tls_reloaded", "http.tls")["certificates"] == "http.tls"
        after = files.connect(port, client=1)
        assert served_cert(after) == der(files.servers[1]) and healthz(after) in (200, 503)
        # The client CA was rotated too: a certificate of the old client CA is refused now ...
        with pytest.raises(OSError):
            healthz(files.connect(port, client=0))
        # ... and a connection opened before the rotation goes on as it was.
        assert healthz(before) in (200, 503)

        # A broken certificate file keeps the one in use and names the key.
        replace(files.cert, b"not a certificate")
        failed = sighup(d, "tls_reload_failed", "http.tls")
        assert failed["key"] == "http.tls.cert", failed
        assert served_cert(files.connect(port, client=1)) == der(files.servers[1])
    finally:
        d.stop()
