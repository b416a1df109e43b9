"""Helpers for the operations tests (tests/integration/test_ops_*.py): a daemon subprocess with
its JSON log, a real sd_notify datagram socket, and MQTT probes for the retained status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; records messages."""

    def __init__(self) -> None:
        # sun_path is limited to 108 bytes: pytest's tmp_path can be longer, so a short dir.
        self.dir = Path(tempfile.mkdtemp(prefix="bm-notify-"))
        self.path = str(self.dir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def texts(self) -> list[str]:
        with self._cond:
            return [m for _, m in self.messages]

    def count(self, line: str) -> int:
        return sum(1 for m in self.texts() if line in m.splitlines())

    def wait_for(self, line: str, n: int = 1, timeout: float = 20.0) -> None:
        """Wait until `line` (e.g. "READY=1") arrived `n` times in total."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for _, m in self.messages if line in m.splitlines()) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{line} x{n} not received within {timeout} s; got {self.texts()[-10:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


class DaemonProcess:
    """`python -m butler_mqtt run` as a subprocess; its JSON log lines collected from stdout."""

    def __init__(
        self,
        env: dict[str, str],
        config: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
        *,
        cwd: Path = REPO,
        base_env: Mapping[str, str] = os.environ,
    ) -> None:
        """`env` on top of `base_env` (default: this process's environment), run in `cwd`."""
        args = [sys.executable, "-m", "butler_mqtt", "run"]
        if config is not None:
            args += ["--config", str(config)]
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**base_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = None
                if isinstance(ev, dict):
                    self.events.append(ev)
                self._cond.notify_all()

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, event: str, n: int = 1, timeout: float = 20.0) -> dict[str, Any]:
        """The n-th log line whose `event` is `event` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event]
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    raise AssertionError(f"no {event!r} log line within {timeout} s; log:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(min(left, 0.5))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._thread.join(5)
        return rc

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it hangs; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)


def daemon_env(qrs_certs: Path, qrs_port: int, broker_port: int, state_dir: Path, client_id: str, **extra: str) -> dict[str, str]:
    """BUTLER_MQTT__* overrides for a daemon subprocess talking to the simulator and a broker."""
    return {
        "BUTLER_MQTT__MQTT__HOST": "127.0.0.1",
        "BUTLER_MQTT__MQTT__PORT": str(broker_port),
        "BUTLER_MQTT__MQTT__CLIENT_ID": client_id,
        "BUTLER_MQTT__QRS__HOST": "localhost",
        "BUTLER_MQTT__QRS__PORT": str(qrs_port),
        "BUTLER_MQTT__QRS__CERT": str(qrs_certs / "client.pem"),
        "BUTLER_MQTT__QRS__KEY": str(qrs_certs / "client_key.pem"),
        "BUTLER_MQTT__QRS__CA": str(qrs_certs / "root.pem"),
        "BUTLER_MQTT__STATE_DIR": str(state_dir),
        "BUTLER_MQTT__LOGGING__FORMAT": "json",
        "BUTLER_MQTT__LOGGING__LEVEL": "info",
        **extra,
    }


def client(
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
    client_id: str | None = None,
) -> mqtt.Client:
    """An MQTT 5 test client (not yet connected)."""
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"ops-test-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    if username:
        c.username_pw_set(username, password)
    if ca is not None:
        c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    return c


def retained(port: int, topic: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any] | None:
    """The retained message on `topic` as a fresh subscriber sees it (JSON), or None."""
    got: list[Any] = []
    done = threading.Event()
    c = client(port, **kw)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append(msg)
        done.set()

    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    # A retained message is sent right after SUBACK; one more round trip makes sure it had the chance.
    c.on_subscribe = lambda cl, *_: cl.publish(f"ops-test/ping/{uuid.uuid4().hex}", b"", qos=1)
    c.on_publish = lambda *_: done.set()
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        done.wait(timeout)
        time.sleep(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
    msgs = [m for m in got if m.retain]
    if not msgs or not msgs[0].payload:
        return None
    return dict(json.loads(msgs[0].payload))


def wait_retained(
    port: int, topic: str, pred: Callable[[dict[str, Any] | None], bool], timeout: float = 20.0, **kw: Any
) -> dict[str, Any] | None:
    """Poll with fresh subscribers until the retained message satisfies `pred`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        last = retained(port, topic, **kw)
        if pred(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"retained message on {topic} never matched within {timeout} s; last: {last}")
