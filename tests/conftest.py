"""Shared fixtures: real Mosquitto brokers, the QRS simulator over mTLS, in-process daemons."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from butler_mqtt.config import Config, deep_merge
from butler_mqtt.ops.mosquitto import INSTALL_HINT, Mosquitto, find_mosquitto
from tests.support import asyncapi_check
from tests.support.mqtt import Inbox


@pytest.fixture(scope="session")
def qrs_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qlik-named certificate files from a trustme CA (root, server, client)."""
    d = tmp_path_factory.mktemp("qrs-certs")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("QlikClient")
    ca.cert_pem.write_to_path(str(d / "root.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server_key.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client_key.pem"))
    return d


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.fail(INSTALL_HINT)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for tests that do not restart it."""
    _need_mosquitto()
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker this test may restart or kill."""
    _need_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


def make_config(qrs_certs: Path, qrs_port: int, broker: Mosquitto, state_dir: Path, **sections: Any) -> Config:
    """A Config pointing at the simulator and the broker; `sections` override (nested dicts)."""
    base: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": f"test-{uuid.uuid4().hex[:10]}"},
        "qrs": {
            "host": "localhost",
            "port": qrs_port,
            "cert": str(qrs_certs / "client.pem"),
            "key": str(qrs_certs / "client_key.pem"),
            "ca": str(qrs_certs / "root.pem"),
            "timeout": 5,
            "retries": 1,
        },
        "logging": {"level": "info", "format": "console"},
        "state_dir": str(state_dir),
        "tracking": {"poll_interval": 0.2, "first_poll": 0.1},
    }
    return Config.model_validate(deep_merge(base, sections))  # the config loader's own merge


class RunningDaemon:
    """A Daemon in this process, in its own thread, ready once subscribed."""

    def __init__(self, cfg: Config) -> None:
        from butler_mqtt.daemon import Daemon

        self.cfg = cfg
        self.daemon = Daemon(cfg)
        self.daemon.startup()
        self.thread = threading.Thread(target=self.daemon.main_loop, daemon=True)
        self.thread.start()
        if not self.daemon.listener.subscribed.wait(15):
            self.stop()
            raise RuntimeError("daemon did not subscribe within 15 s")

    stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.daemon.should_exit.set()
        self.thread.join(10)
        self.daemon.shutdown(drain_timeout=10)


@pytest.fixture
def start_daemon() -> Iterator[Callable[[Config], RunningDaemon]]:
    running: list[RunningDaemon] = []

    def start(cfg: Config) -> RunningDaemon:
        d = RunningDaemon(cfg)
        running.append(d)
        return d

    yield start
    for d in running:
        try:
            d.stop()
        except Exception:  # already stopped by the test
            pass


@pytest.fixture
def listen(broker: Mosquitto) -> Iterator[Callable[..., Inbox]]:
    """`listen(topic, on=broker)`: an Inbox (tests/support/mqtt.py) collecting the JSON
    messages on a topic filter, e.g. the default reply topic or the status topic."""
    made: list[Inbox] = []

    def make(topic: str, on: Mosquitto | None = None) -> Inbox:
        inbox = Inbox((on or broker).port, topic)
        made.append(inbox)
        return inbox

    yield make
    for inbox in made:
        inbox.close()


PG_ADMIN_URL = os.environ.get("BUTLER_MQTT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import psycopg

    name = f"butler_mqtt_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL not reachable at {PG_ADMIN_URL} ({exc}): start it (scripts/setup starts a local "
            "cluster, or set BUTLER_MQTT_TEST_PG to an admin URL)"
        )
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def fresh_pg(pg_url: str) -> str:
    """The session database emptied, for tests that need a clean journal."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as c:
        for table in ("requests", "events", "waits", "runq", "runq_waiters", "runs", "schema_version"):
            c.execute(f"DROP TABLE IF EXISTS {table}")
    return pg_url


@pytest.fixture
def sim(qrs_certs: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The simulator over mTLS, serving the requesting module's `TASKS` (fresh copies).

    Keyword arguments of QrsSimulator (max_concurrent, queue_timeout, already_running,
    latency_ms, ...) come from the module's `SIM_OPTIONS` dict, overridden per test by
    `@pytest.mark.sim_options(...)`. All of them can also be set on the running simulator
    (`sim.max_concurrent = 2`); per-task knobs (run_seconds, outcome, fail_first,
    max_retries) are SimTask fields, changed later with `sim.store.replace_task`.
    `SIM_CERTS`, beside `TASKS`, names a fixture giving the certificate folder to use instead
    of `qrs_certs` (e.g. an empty one the simulator generates its own certificates into).
    """
    from butler_mqtt.sim import QrsSimulator, SimTask

    module = request.module
    certs = request.getfixturevalue(module.SIM_CERTS) if hasattr(module, "SIM_CERTS") else qrs_certs
    tasks = [SimTask(**vars(t)) for t in module.TASKS]
    options = dict(getattr(module, "SIM_OPTIONS", {}))
    for marker in reversed(list(request.node.iter_markers("sim_options"))):
        options.update(marker.kwargs)
    s = QrsSimulator(tasks=tasks, certs_dir=certs, **options).start()
    yield s
    s.stop()


@pytest.fixture
def cfg(qrs_certs: Path, sim: Any, broker: Mosquitto, tmp_path: Path) -> Config:
    return make_config(qrs_certs, sim.port, broker, tmp_path / "state")


@pytest.fixture
def requester(cfg: Config) -> Iterator[Any]:
    from butler_mqtt.mqtt.requester import Requester

    with Requester(cfg.mqtt) as r:
        yield r


class _LogStream:
    """Where in-process log lines go: the running test's captured stdout (shown when it fails),
    or, for a line a lingering thread writes between tests, a file instead of the terminal."""

    def __init__(self, late: Path) -> None:
        self.late = late
        self.current: Any = None

    def write(self, text: str) -> int:
        if self.current is not None:
            try:
                return int(self.current.write(text))
            except ValueError:  # that test's capture is already closed
                pass
        with self.late.open("a", encoding="utf-8") as f:
            return f.write(text)

    def flush(self) -> None:
        if self.current is not None:
            try:
                self.current.flush()
            except ValueError:
                pass

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="session")
def _log_stream(tmp_path_factory: pytest.TempPathFactory) -> _LogStream:
    from butler_mqtt.ops.logging import setup_logging

    stream = _LogStream(tmp_path_factory.getbasetemp() / "late-log-lines.txt")
    setup_logging("info", "console", stream=stream)
    return stream


@pytest.fixture(autouse=True)
def _replies_match_the_asyncapi_document(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every reply and status message a test receives is validated against the AsyncAPI document."""
    yield from asyncapi_check.guard(monkeypatch)


@pytest.fixture(autouse=True)
def _route_logs(_log_stream: _LogStream) -> Iterator[None]:
    import sys

    _log_stream.current = sys.stdout
    yield
    _log_stream.current = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sim_options(**kwargs): QrsSimulator keyword arguments for the `sim` fixture"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ carries the `integration` marker (real broker, real
    TLS simulator): `pytest -m "not integration"` runs the fast pure tests alone."""
    for item in items:
        if "/tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)
