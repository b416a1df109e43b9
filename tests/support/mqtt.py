"""MQTT probes for the hostile-delivery tests (tests/integration/test_hostile_*.py,
test_clock_skew.py, test_fuzz_mqtt.py): a publisher that can set every MQTT 5 property a
hostile client might, and an inbox that records replies with their topic and correlation data;
and the plain connected publisher every other test uses."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt.mqtt.listener import wait_published
from tests.support.asyncapi_check import observe
from tests.support.waiting import first_match

FINAL = ("summary", "error")


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@dataclass
class Received:
    topic: str
    correlation: bytes | None
    event: dict[str, Any]
    message: Any = None  # paho's MQTTMessage
    parsed: bool = True  # the payload was a JSON object (else `event` only marks it)


class Inbox:
    """Every JSON message on `topic_filter` (QoS 1), with its topic and correlation data; also
    the `listen` fixture's collector (tests/conftest.py): `messages`, `raw`, `wait_for`.

    `persistent`: a session the broker keeps (and persists) across a broker restart, so that
    nothing published while the inbox reconnects is missed."""

    def __init__(self, port: int, topic_filter: str, client_id: str | None = None, persistent: bool = False) -> None:
        self.items: list[Received] = []
        self.cond = threading.Condition()
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"inbox-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        c.reconnect_delay_set(0.1, 1)
        ready = threading.Event()
        c.on_connect = lambda cl, *_: cl.subscribe(topic_filter, qos=1)
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = self._on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        c.loop_start()
        if not ready.wait(10):
            raise RuntimeError(f"inbox could not subscribe to {topic_filter}")
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            ev = json.loads(msg.payload)
        except (ValueError, RecursionError):
            ev = None
        parsed = isinstance(ev, dict)
        if not parsed:
            ev = {"event": None, "raw": bytes(msg.payload[:200])}  # not a reply of ours: kept, marked
        else:
            observe(ev)
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties is not None else None
        with self.cond:
            self.items.append(Received(msg.topic, corr, ev, msg, parsed))
            self.cond.notify_all()

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The JSON objects received so far, in arrival order."""
        with self.cond:
            return [r.event for r in self.items if r.parsed]

    @property
    def raw(self) -> list[Any]:
        """paho's messages behind `messages`, in the same order."""
        with self.cond:
            return [r.message for r in self.items if r.parsed]

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """The first JSON object that satisfies `pred` (waits for it)."""
        return first_match(self.cond, lambda: self.messages, pred, timeout, "message")

    def select(self, pred: Callable[[Received], bool]) -> list[Received]:
        with self.cond:
            return [r for r in self.items if pred(r)]

    def count_all(self) -> int:
        with self.cond:
            return len(self.items)

    def finals(self, pred: Callable[[Received], bool] = lambda _r: True) -> list[Received]:
        return self.select(lambda r: r.event.get("event") in FINAL and pred(r))

    def wait_count(self, pred: Callable[[Received], bool], n: int, timeout: float) -> int:
        """How many messages match `pred` once `n` did, or after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = sum(1 for r in self.items if pred(r))
                left = deadline - time.monotonic()
                if got >= n or left <= 0:
                    return got
                self.cond.wait(min(left, 0.5))

    def wait_final(self, pred: Callable[[Received], bool], timeout: float = 30.0) -> Received:
        if self.wait_count(lambda r: r.event.get("event") in FINAL and pred(r), 1, timeout) < 1:
            with self.cond:
                tail = [(r.topic, r.event) for r in self.items[-5:]]
            raise AssertionError(f"no final reply within {timeout} s; last messages: {tail}")
        return self.finals(pred)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Sender:
    """An MQTT 5 publisher that sets whatever a (hostile) client may set."""

    def __init__(self, port: int, topic: str, client_id: str | None = None, inflight: int = 1000) -> None:
        self.topic = topic
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sender-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 1)
        connected = threading.Event()
        self.disconnects: list[Any] = []  # the broker refusing what we sent shows here
        c.on_connect = lambda *_: connected.set()
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.append(rc)
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not connected.wait(10):
            raise RuntimeError("sender could not connect")
        self.client = c
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(
        self,
        payload: bytes | str | dict[str, Any],
        *,
        topic: str | None = None,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        content_type: str | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        confirm: bool = False,
    ) -> mqtt.MQTTMessageInfo:
        """Publish one message; `confirm`: wait for the broker's PUBACK (QoS 1)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        props: Properties | None = None
        if response_topic is not None or correlation is not None or content_type is not None or user_properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if content_type is not None:
                props.ContentType = content_type
            if user_properties:
                props.UserProperty = user_properties
        info = self.client.publish(topic or self.topic, payload, qos=qos, retain=retain, properties=props)
        if qos > 0:
            self.infos.append(info)
            if confirm:
                assert wait_published(info, 60), "the broker did not accept a message"
                self.infos.remove(info)
        return info

    def confirm_all(self, timeout: float = 60.0) -> None:
        for info in self.infos:
            assert wait_published(info, timeout), "the broker did not accept a message"
        self.infos.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(port: int, protocol: int = mqtt.MQTTv5, inflight: int | None = None) -> mqtt.Client:
    """A plain test publisher (clean session), connected and looping."""
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=protocol
    )
    if inflight is not None:
        c.max_inflight_messages_set(inflight)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def idle(daemon: Any) -> bool:
    """An in-process Daemon has nothing to do: no delivery unacked, no job queued or running."""
    return bool(daemon.listener.unacked == 0 and daemon.workers.busy == 0 and daemon.workers.jobs.empty())


def record_deliveries(daemon: Any) -> list[tuple[str, int, bool]]:
    """(topic, packet id, dup) of every delivery the daemon's MQTT client receives from now on."""
    seen: list[tuple[str, int, bool]] = []
    client = daemon.listener.client
    original = client.on_message

    def recording(c: Any, u: Any, msg: Any) -> None:
        seen.append((msg.topic, msg.mid, bool(msg.dup)))
        original(c, u, msg)

    client.on_message = recording
    return seen
