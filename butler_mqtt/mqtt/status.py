"""The retained status of one daemon on the broker (contract section 2): online/offline, its
standing problems, who it is (host, pid, instance) and its topics."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from butler_mqtt import __version__
from butler_mqtt.config import MqttConfig


class Status:
    """The status topic's payload and the standing problems shown in it."""

    def __init__(self, cfg: MqttConfig, client_id: str) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._lock = threading.Lock()
        self.problems: dict[str, str] = {}
        self.started_at = time.time()
        # With a shared group every instance has its own retained status (contract section 2),
        # so one instance's "offline" never hides a healthy one.
        self.topic = f"{cfg.topics.status}/{client_id}" if cfg.shared_group else cfg.topics.status
        self.instance = uuid.uuid4().hex[:12]  # tells this process's status from another's with our id

    def set_problem(self, name: str, text: str | None) -> bool:
        """Show (or clear) a standing problem. True when it changed (the status is to be published)."""
        with self._lock:
            if self.problems.get(name) == text:
                return False
            if text is None:
                self.problems.pop(name, None)
            else:
                self.problems[name] = text
        return True

    def payload(self, state: str) -> str:
        extra: dict[str, Any] = {"problems": dict(self.problems)} if self.problems and state == "online" else {}
        return json.dumps(
            {
                **extra,
                "status": state,
                "version": __version__,
                "clientId": self.client_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "instance": self.instance,
                "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
                "topics": {
                    "start": self.cfg.topics.start,
                    "startPlain": self.cfg.topics.start_plain,
                    "reply": self.cfg.topics.reply,
                },
            }
        )
