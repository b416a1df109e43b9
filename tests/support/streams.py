"""Shared by the fault tests: persistent-session MQTT clients that survive broker restarts, a
collector of reply events (by requestId, with a count of final replies), and the daemon's
deferral count."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
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


FINAL = ("summary", "error")


class Replies:
    """Every reply event on a topic, by requestId, on a persistent session (QoS 1) that
    survives broker restarts; `seen` counts each request's final replies (summary or error)."""

    def __init__(self, port: int, topic: str) -> None:
        self.by_id: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
        self.seen: dict[str | None, int] = {}  # requestId -> final replies received
        self.cond = threading.Condition()
        self.client = persistent_client(port, f"replies-{uuid.uuid4().hex[:8]}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.loop_start()
        assert ready.wait(10), "reply listener could not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        ev = json.loads(msg.payload)
        observe(ev)
        rid = ev.get("requestId")
        with self.cond:
            self.by_id[rid].append(ev)
            if ev.get("event") in FINAL:
                self.seen[rid] = self.seen.get(rid, 0) + 1
            self.cond.notify_all()

    def finals(self, rid: str | None) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.by_id.get(rid, []) if e.get("event") in FINAL]

    def tasks(self, rid: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.by_id.get(rid, []) if e.get("event") == "task"]

    def unanswered(self, rids: Iterable[str]) -> set[str]:
        with self.cond:
            return {r for r in rids if r not in self.seen}

    def wait_answered(self, rids: Iterable[str], timeout: float) -> set[str]:
        """The requestIds still without a summary or error reply after at most `timeout` s."""
        rids = list(rids)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                missing = {r for r in rids if r not in self.seen}
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self.cond.wait(min(left, 1.0))

    def wait_count(self, n: int, timeout: float) -> int:
        """How many requests have a final reply, once `n` have or after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n and time.monotonic() < deadline:
                self.cond.wait(1)
            return len(self.seen)

    def count(self, pred: Callable[[dict[str, Any]], bool]) -> int:
        with self.cond:
            return sum(1 for evs in self.by_id.values() for e in evs if pred(e))

    def wait_events(self, pred: Callable[[dict[str, Any]], bool], n: int, timeout: float) -> int:
        """How many events match `pred`, once `n` do or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.count(pred)
            if got >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def deferred(running: Any) -> float:
    return running.daemon.runtime.metrics.registry.get_sample_value("butler_mqtt_requests_deferred_total") or 0.0
