"""Fixtures and helpers for the Qlik Cloud simulator and client tests (imported by those modules)."""

from __future__ import annotations

import contextlib
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
from butler_mqtt.sim.cloud import CloudSimulator, World, demo_world

SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "cloud-schemas"


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of `<api>.<Schema>` (a file of tests/data/cloud-schemas)."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def assert_valid(name: str, payload: Any) -> None:
    errors = sorted(schema_validator(name).iter_errors(payload), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


_ERRORS = {"oauth": "oauth.Errors", "items": "items.ErrorResponseBody", "collections": "items.ErrorResponseBody",
           "spaces": "spaces.Errors", "reloads": "reloads.Errors"}


def schema_for(method: str, path: str, status: int) -> str | None:
    """The schema (tests/data/cloud-schemas) of the simulator's answer to `method path`, or
    None for answers no schema describes (the apps API declares no error bodies)."""
    parts = path.strip("/").split("/")
    if parts == ["oauth", "token"]:
        return "oauth.oauth-token-response" if status == 200 else "oauth.Errors"
    if parts[:2] != ["api", "v1"] or len(parts) < 3:
        return None
    api, rest = parts[2], parts[3:]
    if status >= 400:
        return _ERRORS.get(api)
    ok = {
        ("GET", "items", 0): "items.ItemsListItemsResponseBody",
        ("GET", "collections", 0): "collections.CollectionsListCollectionsResponseBody",
        ("GET", "spaces", 0): "spaces.Spaces",
        ("GET", "spaces", 1): "spaces.Space",
        ("GET", "apps", 1): "apps.NxApp",
        ("GET", "reloads", 0): "reloads.Reloads",
        ("GET", "reloads", 1): "reloads.Reload",
        ("POST", "reloads", 0): "reloads.Reload",
        ("POST", "reloads", 3): "reloads.ReloadStatus",
    }
    return ok.get((method, api, len(rest)))


class ReplyChecker:
    """A simulator `reply_hook` validating every JSON answer against Qlik's schemas."""

    def __init__(self) -> None:
        self.checked = 0
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, status: int, body: bytes) -> None:
        name = schema_for(method, path, status)
        if name is None:
            return
        payload = json.loads(body)
        errors = [f"{list(e.path)}: {e.message}" for e in schema_validator(name).iter_errors(payload)]
        with self._lock:
            self.checked += 1
            self.problems += [f"{method} {path} {status} ({name}): {e}" for e in errors[:3]]

    def assert_clean(self) -> None:
        assert not self.problems, "\n".join(self.problems[:10])


def checked(sim: CloudSimulator) -> CloudSimulator:
    """`sim` with a ReplyChecker as its reply hook (`sim.reply_hook`)."""
    sim.reply_hook = ReplyChecker()
    return sim


@contextlib.contextmanager
def running(world: World, certs_dir: Path, **kw: Any) -> Iterator[CloudSimulator]:
    """A started simulator of `world` whose every JSON answer is validated; fails the test on
    the first answer that does not match Qlik's schema."""
    with checked(CloudSimulator(world, certs_dir=certs_dir, **kw)) as sim:
        yield sim
        hook = sim.reply_hook
        assert isinstance(hook, ReplyChecker)
        hook.assert_clean()


@pytest.fixture(scope="module")
def cloud_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cloud-certs")


@pytest.fixture
def cloud_sim(cloud_certs: Path) -> Iterator[CloudSimulator]:
    """The demo tenant; every JSON answer it gives during the test is validated (ReplyChecker)."""
    with running(demo_world(), cloud_certs) as sim:
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


class ConnectProxy:
    """A minimal HTTP CONNECT proxy (what HTTPS_PROXY points at): tunnels to the target and
    relays bytes both ways. `required_auth`: the exact `Proxy-Authorization` value to demand
    (407 otherwise). Records each CONNECT target and the Proxy-Authorization seen."""

    def __init__(self, required_auth: str | None = None) -> None:
        self.required_auth = required_auth
        self.connects: list[str] = []
        self.auth_seen: list[str | None] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.connects.append(target)
        self.auth_seen.append(headers.get("proxy-authorization"))
        if method != "CONNECT" or (self.required_auth and headers.get("proxy-authorization") != self.required_auth):
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
