"""File descriptors and the REST server (issue 11, class 7): idle or slow REST clients can never
take the descriptors QRS and the broker need.

The daemon runs as a subprocess with RLIMIT_NOFILE 256 (soft and hard, so raising the soft
limit to the hard one cannot escape it), the REST API on, a real broker and the simulator over
mTLS. 400 idle TCP connections to the REST port are more than the process could hold; the
connection cap answers the surplus 503 and closes them unread, the request timeout closes the
rest, and an MQTT request is answered and started meanwhile.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import time
import uuid

import requests

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.fds import FD_RESERVE
from butler_mqtt.sim import SimTask
from tests.support.ops import DaemonProcess, daemon_env

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
TASKS = [SimTask(T1, "Finance daily"), SimTask(T2, "Sales daily")]

FD_LIMIT = 256
IDLE = 400
REQUEST_TIMEOUT_S = 5  # long enough that the 400 connects all land within it, even on a busy machine


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None while the connection is still open."""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return None
    chunks = []
    sock.settimeout(2)
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _wait_closed(socks: list[socket.socket], want: int, timeout: float) -> dict[int, bytes]:
    """Poll until `want` of `socks` were closed by the server; returns index -> bytes received."""
    closed: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < want and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i not in closed and (got := _closed_by_server(s)) is not None:
                closed[i] = got
        time.sleep(0.05)
    return closed


def test_idle_rest_connections_cannot_starve_mqtt_or_qrs(qrs_certs, sim, broker, tmp_path):
    topic = f"test/fds/{uuid.uuid4().hex}"
    env = daemon_env(
        qrs_certs,
        sim.port,
        broker.port,
        tmp_path / "state",
        f"fds-{uuid.uuid4().hex[:8]}",
        BUTLER_MQTT__MQTT__TOPICS__START=topic,
        BUTLER_MQTT__HTTP__ENABLED="true",
        BUTLER_MQTT__HTTP__PORT="0",
        BUTLER_MQTT__HTTP__REQUEST_TIMEOUT=str(REQUEST_TIMEOUT_S),
    )
    d = DaemonProcess(env, preexec_fn=_low_fd_limit)
    socks: list[socket.socket] = []
    try:
        assert d.wait_log("fd_limit")["limit"] == FD_LIMIT
        lowered = d.wait_log("http_max_connections_lowered")
        cap = (FD_LIMIT - FD_RESERVE) // 2
        assert lowered["used"] == cap and lowered["configured"] == 512
        port = int(d.wait_log("http_listening")["url"].rsplit(":", 1)[1])
        d.wait_log("mqtt_subscribed")

        for _ in range(IDLE):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # One slowloris client: half a request head, never finished.
        socks[0].sendall(b"POST /v4/reloadtask/-/start HTTP/1.1\r\nHost: x\r\nContent-Type: app")

        # Everything over the cap is answered 503 and closed without waiting for a request.
        refused = _wait_closed(socks, IDLE - cap, timeout=20)
        assert len(refused) >= IDLE - cap
        busy = [b for b in refused.values() if b.startswith(b"HTTP/1.1 503")]
        assert len(busy) >= IDLE - cap - 5, f"{len(busy)} of {len(refused)} closed connections got 503"
        assert json.loads(busy[0].split(b"\r\n\r\n", 1)[1])["error"] == "Too many connections"

        # With the REST API full, an MQTT request is still answered and its task started.
        mq = MqttConfig(host="127.0.0.1", port=broker.port, protocol="5")
        mq.topics.start = topic
        with Requester(mq) as r:
            events = r.request({"requestId": f"fd-{uuid.uuid4().hex}", "taskId": T1}, timeout=40)
        assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1
        assert [s.task_id for s in sim.starts] == [T1]

        # The request timeout closes the connections that never sent a request; the half head
        # gets a 408.
        closed = _wait_closed(socks, IDLE, timeout=REQUEST_TIMEOUT_S + 20)
        assert len(closed) == IDLE, f"{IDLE - len(closed)} idle connections still open"
        if 0 not in refused:  # it was among the accepted ones (the cap may also have refused it)
            assert closed[0].startswith(b"HTTP/1.1 408"), closed[0][:80]

        # And the REST API works again.
        resp = requests.post(f"http://127.0.0.1:{port}/v4/reloadtask/{T2}/start", timeout=30)
        assert resp.status_code == 200, resp.text
        assert [t["taskId"] for t in resp.json()["tasksStarted"]] == [T2]
        assert sorted(s.task_id for s in sim.starts) == sorted([T1, T2])

        log = d.log_text()
        assert "Too many open files" not in log, "EMFILE leaked into the log unnamed"
        accept_errors = [ln for ln in d.lines if "accept" in ln.lower() and "error" in ln.lower()]
        assert len(accept_errors) <= 3, accept_errors[:5]
        refusals = [e for e in d.events if e.get("event") == "http_connection_refused"]
        assert 1 <= len(refusals) <= 2  # rate-limited: once a minute, with a count
    finally:
        for s in socks:
            s.close()
        d.stop()
    assert d.proc.returncode == 0


def test_idle_tls_handshakes_count_against_the_cap_and_the_request_timeout(qrs_certs, sim, broker, tmp_path):
    """Over HTTPS, 400 TCP connections that never start their TLS handshake, with the open-file
    limit at 256: they count against http.max_connections from accept (the surplus is closed
    at once) and the handshake is part of http.request_timeout (the rest are closed by it, not
    by asyncio's 60 s handshake timeout); an MQTT request is answered meanwhile and an HTTPS
    start works after."""
    from tests.support.pki import Pki

    pki = Pki(tmp_path / "pki")
    topic = f"test/fds/{uuid.uuid4().hex}"
    env = daemon_env(
        qrs_certs,
        sim.port,
        broker.port,
        tmp_path / "state",
        f"fds-{uuid.uuid4().hex[:8]}",
        BUTLER_MQTT__MQTT__TOPICS__START=topic,
        BUTLER_MQTT__HTTP__ENABLED="true",
        BUTLER_MQTT__HTTP__PORT="0",
        BUTLER_MQTT__HTTP__REQUEST_TIMEOUT=str(REQUEST_TIMEOUT_S),
        BUTLER_MQTT__HTTP__TLS__CERT=str(pki.cert),
        BUTLER_MQTT__HTTP__TLS__KEY=str(pki.key),
    )
    d = DaemonProcess(env, preexec_fn=_low_fd_limit)
    socks: list[socket.socket] = []
    try:
        cap = (FD_LIMIT - FD_RESERVE) // 2
        assert d.wait_log("http_max_connections_lowered")["used"] == cap
        url = d.wait_log("http_listening")["url"]
        assert url.startswith("https://")
        port = int(url.rsplit(":", 1)[1])
        d.wait_log("mqtt_subscribed")

        for _ in range(IDLE):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # The surplus is closed at once, unanswered (a client before its handshake cannot read).
        refused = _wait_closed(socks, IDLE - cap, timeout=20)
        assert len(refused) >= IDLE - cap, f"only {len(refused)} of the {IDLE - cap} over the cap were closed"

        mq = MqttConfig(host="127.0.0.1", port=broker.port, protocol="5")
        mq.topics.start = topic
        with Requester(mq) as r:
            events = r.request({"requestId": f"fd-{uuid.uuid4().hex}", "taskId": T1}, timeout=40)
        assert events[-1]["event"] == "summary" and events[-1]["totalTasksStarted"] == 1

        # Generous, but far below asyncio's own 60 s handshake timeout.
        closed = _wait_closed(socks, IDLE, timeout=REQUEST_TIMEOUT_S + 20)
        assert len(closed) == IDLE, f"{IDLE - len(closed)} idle TLS connections still open"

        resp = requests.post(f"https://127.0.0.1:{port}/v4/reloadtask/{T2}/start", timeout=30, verify=str(pki.server_ca))
        assert resp.status_code == 200, resp.text
        assert sorted(s.task_id for s in sim.starts) == sorted([T1, T2])
        assert "Too many open files" not in d.log_text()
        timeouts = [e for e in d.events if e.get("event") == "http_request_timeout"]
        assert 1 <= len(timeouts) <= 2  # rate-limited: once a minute, with a count
    finally:
        for s in socks:
            s.close()
        d.stop()
    assert d.proc.returncode == 0


# ----------------------------------------------------------------------------- in-process details


def _http_daemon(cfg, start_daemon, **http):
    cfg.http.enabled = True
    cfg.http.port = 0
    for k, v in http.items():
        setattr(cfg.http, k, v)
    return start_daemon(cfg).daemon.http_server.port


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks), time.monotonic() - t0


def test_connection_over_the_cap_gets_503_before_sending_anything(cfg, sim, start_daemon):
    port = _http_daemon(cfg, start_daemon, max_connections=3, request_timeout=30)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.3)  # accepted
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        got, _ = _read_until_closed(extra, 10)
        extra.close()
        assert got.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in got
        # The held ones still work: a request on one of them is served.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        held[0].settimeout(10)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 ")
    finally:
        for s in held:
            s.close()
    # Freed slots are usable again, and the refusal is counted.
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code in (200, 503)
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'butler_mqtt_http_connections_closed_total{reason="refused"} 1.0' in metrics


def test_request_timeout_closes_half_requests_and_keep_alive_closes_idle(cfg, sim, start_daemon):
    port = _http_daemon(cfg, start_daemon, request_timeout=1.5, keep_alive_timeout=1)
    # Half a body: 408, then closed.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v4/reloadtask/-/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ta")
    got, _ = _read_until_closed(s, 15)
    s.close()
    assert got.startswith(b"HTTP/1.1 408 ") and json.loads(got.split(b"\r\n\r\n", 1)[1])["error"] == "Request timeout"
    assert sim.starts == []

    # A complete request within the timeout, sent in slow pieces, is served; afterwards the idle
    # keep-alive connection is closed without another answer.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    for piece in (b"GET /heal", b"thz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
        s.sendall(piece)
        time.sleep(0.2)
    got, _ = _read_until_closed(s, 15)
    s.close()
    assert got.startswith(b"HTTP/1.1 ") and got.count(b"HTTP/1.1 ") == 1

    # A second request on a keep-alive connection has its own timeout: a half head after a
    # served request is closed too.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
    got, _ = _read_until_closed(s, 15)
    s.close()
    assert got.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 " in got
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'butler_mqtt_http_connections_closed_total{reason="timeout"} 2.0' in metrics


def test_accept_out_of_descriptors_is_named_and_logged_once(cfg, sim, start_daemon):
    """The process really runs out of descriptors while clients connect: asyncio's accept loop
    fails with EMFILE thousands of times a second; the log says so once, naming the fix."""
    import os

    from structlog.testing import capture_logs

    port = _http_daemon(cfg, start_daemon, max_connections=1000, request_timeout=30)
    clients = [socket.socket() for _ in range(30)]  # descriptors taken before the limit drops
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with capture_logs() as logs:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
            for c in clients:
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))  # completes in the kernel's backlog, no new fd here
            time.sleep(2.5)  # asyncio retries the accept every second
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            time.sleep(0.5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.close()
    out = [e for e in logs if e.get("event") == "http_out_of_file_descriptors"]
    assert len(out) == 1, [e.get("event") for e in logs][:20]
    assert out[0]["error"] == "too many open files (raise LimitNOFILE)" and out[0]["log_level"] == "error"
    # Served again once descriptors are free.
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code in (200, 503)
