"""Fixtures and helpers for the Qlik Cloud simulator and client tests (imported by those modules)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from butler_mqtt.backends.cloud.client import CloudClient
from butler_mqtt.backends.cloud.settings import CloudSettings
from butler_mqtt.sim.cloud import CloudSimulator, demo_world

SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "cloud-schemas"


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of `<api>.<Schema>` (a file of tests/data/cloud-schemas)."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def assert_valid(name: str, payload: Any) -> None:
    errors = sorted(schema_validator(name).iter_errors(payload), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


@pytest.fixture(scope="module")
def cloud_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cloud-certs")


@pytest.fixture
def cloud_sim(cloud_certs: Path) -> Iterator[CloudSimulator]:
    with CloudSimulator(demo_world(), certs_dir=cloud_certs) as sim:
        yield sim


def settings_for(sim: CloudSimulator, **overrides: Any) -> CloudSettings:
    """Settings for `sim` with its OAuth client (or `api_key=...`), its CA and a short timeout."""
    values: dict[str, Any] = {
        "tenant": sim.base_url,
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "ca": sim.certs.root,
        "timeout": 5.0,
        "reloads_per_minute": 6000.0,
    }
    if "api_key" in overrides:
        values.pop("client_id")
        values.pop("client_secret")
    values.update(overrides)
    return CloudSettings(**values)


def client_for(sim: CloudSimulator, **overrides: Any) -> CloudClient:
    return CloudClient(settings_for(sim, **overrides))


class SilentServer:
    """A TCP server that accepts connections and never says anything (a hanging proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self.sock.close()
