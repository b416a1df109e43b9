"""One daemon per state_dir: an exclusive lock taken before the broker is touched.

Two daemons with one config would take the broker session from each other and share one
SQLite journal. The lock is an OS file lock (flock; on Windows msvcrt.locking) on
`<state_dir>/butler-mqtt.lock`, so it is released whenever the process ends, even by SIGKILL:
a stale file never blocks a restart. The file holds the holder's PID and client id, for the
second one's error message.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

from butler_mqtt.errors import ConfigError

LOCK_NAME = "butler-mqtt.lock"


class StateDirLock:
    """Held for the life of the process (or until `release`)."""

    def __init__(self, state_dir: Path, client_id: str) -> None:
        self.path = state_dir / LOCK_NAME
        self.client_id = client_id
        self._file: IO[str] | None = None

    def acquire(self) -> StateDirLock:
        """Take the lock, or raise ConfigError (exit 2) naming the daemon that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
        except OSError as exc:
            raise ConfigError("state_dir", f"cannot create {self.path}: {exc.strerror or exc}") from None
        if not _try_lock(f):
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise ConfigError(
                "state_dir",
                f"another butler-mqtt is running with state dir {self.path.parent.resolve()} ({holder}); "
                "stop it first, or give this daemon its own state_dir and mqtt.client_id",
            )
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "clientId": self.client_id}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"PID {int(info['pid'])}, client id {info.get('clientId')}"
    except (ValueError, KeyError, TypeError):
        return "PID unknown"


if sys.platform == "win32":
    import msvcrt

    def _try_lock(f: IO[str]) -> bool:
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

else:
    import fcntl

    def _try_lock(f: IO[str]) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
