"""Run a private Mosquitto on a free loopback port (demo, tests, benchmarks).

Each instance has its own config and persistence directory, so it can be restarted (sessions
and queued messages survive, like a production broker with `persistence true`) or killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "mosquitto not found on PATH: install it (Debian/Ubuntu: apt-get install mosquitto mosquitto-clients)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Mosquitto:
    """A broker process: `start()`, `stop()` (clean, persists), `kill()` (SIGKILL), `restart()`."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, extra_conf: str = "") -> None:
        exe = find_mosquitto()
        if exe is None:
            raise RuntimeError(INSTALL_HINT)
        self.exe = exe
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="butler-mqtt-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Started as root, mosquitto drops to user "mosquitto": its files must be writable.
        os.chmod(self.workdir, 0o777)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_conf(self) -> None:
        self.conf_path.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    "persistence true",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 1",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "max_queued_messages 100000",
                    "set_tcp_nodelay true",  # Nagle + delayed ACK would add ~40 ms per reply burst
                    # As root, mosquitto drops to user "mosquitto", which cannot reach a workdir
                    # under a 0700 parent (pytest's tmp_path): persistence then fails silently
                    # and a restart loses every session and queued message. Stay root here.
                    "user root" if hasattr(os, "geteuid") and os.geteuid() == 0 else "",
                    self.extra_conf if self.extra_conf else f"listener {self.port} 127.0.0.1\nallow_anonymous true",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.write_conf()
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        # Own session: a Ctrl-C meant for the demo must not kill the broker before the daemon.
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf_path)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        if not wait_port(self.port, timeout):
            self.kill()
            raise RuntimeError(f"mosquitto did not listen on {self.port}; see {self.workdir / 'mosquitto.log'}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
