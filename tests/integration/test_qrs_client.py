"""The QRS edge over real mTLS against the simulator: certificates, xrfkey, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import trustme

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import QrsRefused, QrsTlsRejected, QrsUnreachable, is_transient
from butler_mqtt.model import EMPTY_GUID, StartRequest
from butler_mqtt.service import StartService
from butler_mqtt.sim import SimTask
from tests.conftest import make_config

IDS = [f"c0ffee00-0000-4000-8000-{i:012d}" for i in range(8)]
TASKS = [
    SimTask(IDS[0], "a", tags=["t1"]),
    SimTask(IDS[1], "b", tags=["t2", "t3"]),
    SimTask(IDS[2], "c", custom_properties=[("group", "g1")]),
    SimTask(IDS[3], "d", custom_properties=[("group", "g2"), ("other", "g1")]),
    SimTask(IDS[4], "e"),
    SimTask(IDS[5], "f"),
    SimTask(IDS[6], "disabled", enabled=False),
]


def qrs_cfg(qrs_certs: Path, port: int, **kw) -> QrsConfig:
    base = {
        "host": "localhost", "port": port, "cert": qrs_certs / "client.pem", "key": qrs_certs / "client_key.pem",
        "ca": qrs_certs / "root.pem", "timeout": 5, "retries": 1,
    }
    return QrsConfig.model_validate({**base, **kw})


def test_seven_criteria_cost_exactly_one_get(qrs_certs, sim, broker, tmp_path):
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path)
    qrs = QrsClient(cfg.qrs)
    service = StartService(cfg, QrsBackend(qrs))
    sim.clear_log()
    req = StartRequest(
        taskId=[IDS[4], IDS[5]],
        tag=["t1", "t2", "t3"],
        customProperty=[{"name": "group", "value": "g1"}, {"name": "group", "value": "g2"}],
    )
    selection = service.resolve(req)
    assert sorted(selection.task_ids) == sorted(IDS[:6])
    assert [(r.method, r.path) for r in sim.request_log] == [("GET", "/qrs/reloadtask/full")]
    service.close()
    qrs.close()


def test_xrfkey_is_fresh_and_in_header_and_query(qrs_certs, sim):
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port))
    qrs.about()
    qrs.about()
    keys = [r.query["xrfkey"] for r in sim.request_log]
    assert len(keys) == 2 and keys[0] != keys[1] and all(len(k) == 16 and k.isalnum() for k in keys)
    assert all(r.status == 200 for r in sim.request_log)  # the simulator checked header == query
    qrs.close()


def test_start_sync_gives_execution_id_and_empty_guid_for_disabled(qrs_certs, sim):
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port))
    assert qrs.start_synchronous(IDS[0]) == sim.starts[0].execution_id
    assert qrs.start_synchronous(IDS[6]) == EMPTY_GUID
    qrs.close()


def test_server_certificate_from_another_ca_is_refused(qrs_certs, sim, tmp_path):
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-root.pem"))
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, ca=tmp_path / "other-root.pem", retries=0))
    with pytest.raises(QrsTlsRejected, match="not trusted.*qrs.ca") as caught:
        qrs.about()
    assert not is_transient(caught.value)  # waiting does not fix a certificate
    qrs.close()


def test_client_certificate_from_another_ca_is_refused(qrs_certs, sim, tmp_path):
    other = trustme.CA()
    leaf = other.issue_cert("QlikClient")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, cert=tmp_path / "c.pem", key=tmp_path / "k.pem", retries=0))
    with pytest.raises(QrsTlsRejected, match="client certificate.*qrs.cert") as caught:
        qrs.about()
    assert not is_transient(caught.value)
    qrs.close()
    with pytest.raises(requests.exceptions.RequestException):  # and with no certificate at all
        requests.get(f"{sim.base_url}/qrs/about", verify=str(qrs_certs / "root.pem"), timeout=5)


def test_errors_map_to_the_hierarchy(qrs_certs, sim):
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, retries=0))
    sim.fault = "error500"
    with pytest.raises(QrsRefused) as info:
        qrs.about()
    assert info.value.status == 500
    sim.fault = None
    sim.stop()
    with pytest.raises(QrsUnreachable):
        qrs.about()
    qrs.close()


def test_a_get_is_retried_after_a_5xx_but_a_start_is_not(qrs_certs, sim):
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, retries=2))
    sim.fault, sim.fault_paths = "error500", r"/qrs/about"
    with pytest.raises(QrsRefused):
        qrs.about()
    assert len([r for r in sim.request_log if r.path == "/qrs/about"]) == 3
    sim.fault_paths = r"/start"
    sim.clear_log()
    with pytest.raises(QrsRefused):
        qrs.start_synchronous(IDS[0])
    assert len(sim.request_log) == 1
    qrs.close()


def test_a_plain_http_server_on_the_qrs_port_is_a_clear_permanent_error(qrs_certs, tmp_path):
    import http.server
    import threading

    from butler_mqtt.errors import QrsTlsRejected as Rejected

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        qrs = QrsClient(qrs_cfg(qrs_certs, srv.server_address[1], retries=0))
        with pytest.raises(Rejected, match="does not speak TLS.*qrs.port") as caught:
            qrs.about()
        assert not is_transient(caught.value)
        qrs.close()
    finally:
        srv.shutdown()


def test_a_qrs_answer_dripping_byte_by_byte_is_cut_at_the_total_timeout(qrs_certs, sim):
    """QRS sends its head, then one body byte every 0.2 s: every read is well inside
    `qrs.timeout`, but the call ends at `qrs.timeout` in all (a transient `QrsUnreachable`);
    the next call on the same client is unaffected."""
    import threading

    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, retries=0, timeout=1))
    sim.fault, sim.fault_paths = "drip", r"/qrs/about"
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            qrs.about()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(60)  # generous: the answer would take 2.4 days to arrive
    assert not t.is_alive(), "a dripping QRS answer held the call"
    (exc,) = outcome
    assert isinstance(exc, QrsUnreachable) and is_transient(exc) and "in all" in str(exc), exc
    sim.fault = None
    assert qrs.about()["schemaPath"] == "About"
    qrs.close()


def test_a_429_is_retried_after_its_retry_after_and_a_start_refused_429_did_not_run(qrs_certs, sim):
    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, retries=1))
    sim.rate_limit(calls=2, retry_after="1", paths=r"/start")
    with pytest.raises(QrsRefused) as info:
        qrs.start_synchronous(IDS[0])
    assert info.value.status == 429 and info.value.retry_after == 1.0 and is_transient(info.value)
    assert sim.starts == []  # refused: nothing ran
    sim.rate_limit(calls=1, retry_after="Wed, 21 Oct 2015 07:28:00 GMT", paths=r"/qrs/about")  # a date in the past
    assert qrs.about()["schemaPath"] == "About"
    assert [r.status for r in sim.request_log if r.path == "/qrs/about"] == [429, 200]
    qrs.close()


def test_a_start_does_not_sleep_out_a_long_retry_after(qrs_certs, sim):
    """A Retry-After longer than the start's budget (10 s) is not slept out inside the start
    (its journal lease would run out): the 429 is raised with the hint at once, and the next
    start is refused without being sent until the time has passed."""
    import threading

    qrs = QrsClient(qrs_cfg(qrs_certs, sim.port, retries=3))
    sim.rate_limit(calls=1, retry_after="60", paths=r"/start")
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            qrs.start_synchronous(IDS[0])
        except QrsRefused as exc:
            outcome.append(exc)

    for _ in range(2):
        t = threading.Thread(target=start, daemon=True)
        t.start()
        t.join(30)  # generous, far below the 60 s asked for
        assert not t.is_alive(), "the start slept out the Retry-After"
    assert [e.status for e in outcome] == [429, 429] and all(e.retry_after and e.retry_after > 30 for e in outcome)
    assert len([r for r in sim.request_log if r.method == "POST"]) == 1  # the second was never sent
    assert sim.starts == []
    qrs.close()
