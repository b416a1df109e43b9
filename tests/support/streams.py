"""Shared by the fault tests: persistent-session MQTT clients that survive broker restarts, a
counter of summary replies, and the daemon's deferral count."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.asyncapi_check import observe


def persistent_client(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(0.1, 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    return c


class Summaries:
    """Counts summary replies per requestId on a persistent session (survives broker restarts)."""

    def __init__(self, port: int, topic: str) -> None:
        self.seen: dict[str, int] = {}
        self.cond = threading.Condition()
        self.client = persistent_client(port, f"summaries-{uuid.uuid4().hex[:8]}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c, _u, msg) -> None:
        ev = json.loads(msg.payload)
        observe(ev)
        if ev.get("event") in ("summary", "error"):
            with self.cond:
                self.seen[ev["requestId"]] = self.seen.get(ev["requestId"], 0) + 1
                self.cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n and time.monotonic() < deadline:
                self.cond.wait(1)
            return len(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def deferred(running: Any) -> float:
    return running.daemon.metrics.registry.get_sample_value("butler_mqtt_requests_deferred_total") or 0.0
