"""The upstream side: publish one start request and collect its replies.

Used by `butler-mqtt request`, the demo, the tests and the benchmarks. With MQTT 5 the replies
come on a private response topic with correlation data; with 3.1.1 they are picked out of
`topics.reply` by requestId.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from butler_mqtt import replies
from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.listener import apply_credentials, nodelay
from butler_mqtt.replies import Event


class Requester:
    """A connected MQTT client for sending requests; reusable for many requests."""

    def __init__(self, cfg: MqttConfig, client_id: str | None = None) -> None:
        self.cfg = cfg
        self.v5 = cfg.protocol == "5"
        self.reply_base = f"butler-mqtt/client/{uuid.uuid4().hex}"
        self._inbox: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        #: Retained daemon status messages seen (topic -> JSON), see `daemon_statuses`.
        self.statuses: dict[str, dict[str, Any]] = {}
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"butler-mqtt-request-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        apply_credentials(c, cfg)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subscribed.set()
        self.client = c

    def connect(self, timeout: float = 10.0) -> Requester:
        self.client.connect(self.cfg.host, self.cfg.port, keepalive=30)
        self.client.loop_start()
        if not (self._connected.wait(timeout) and self._subscribed.wait(timeout)):
            self.close()
            raise TimeoutError(f"could not connect and subscribe to {self.cfg.host}:{self.cfg.port} within {timeout} s")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Requester:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        nodelay(client)
        topic = f"{self.reply_base}/#" if self.v5 else self.cfg.topics.reply
        client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            event = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        status = self.cfg.topics.status
        if msg.retain and (msg.topic == status or msg.topic.startswith(status + "/")):
            with self._lock:
                self.statuses[msg.topic] = event
            return
        if self.v5:
            corr = getattr(msg.properties, "CorrelationData", None)
            token = corr.decode(errors="replace") if isinstance(corr, bytes) else None
        else:
            token = event.get("requestId")
        with self._lock:
            box = self._inbox.get(str(token))
        if box is not None:
            box.put(event)

    def send(self, request: dict[str, Any] | bytes, topic: str | None = None) -> tuple[str, queue.Queue[dict[str, Any]]]:
        """Publish a request; returns (token, queue receiving its replies)."""
        if isinstance(request, dict):
            request = dict(request)
            if not self.v5:
                request.setdefault("requestId", uuid.uuid4().hex)
            payload = json.dumps(request).encode()
            token = uuid.uuid4().hex if self.v5 else str(request["requestId"])
        else:
            payload, token = request, uuid.uuid4().hex
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._inbox[token] = box
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"{self.reply_base}/{token}"
            props.CorrelationData = token.encode()
        self.client.publish(topic or self.cfg.topics.start, payload, qos=1, properties=props)
        return token, box

    def daemon_statuses(self, wait: float = 1.5) -> dict[str, dict[str, Any]]:
        """The retained status of every daemon on this broker (`topics.status`, and
        `topics.status/<client id>` of instances in a shared group)."""
        status = self.cfg.topics.status
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe([(status, 1), (f"{status}/+", 1)])
        done.wait(wait)
        time.sleep(min(wait, 0.5))  # retained messages follow the SUBACK
        with self._lock:
            return dict(self.statuses)

    def request(
        self,
        request: dict[str, Any],
        timeout: float = 30.0,
        on_event: Callable[[Event], None] | None = None,
        topic: str | None = None,
    ) -> list[Event]:
        """Send (on `topic`, default topics.start; a caller's: `<topics.start>/<level>`) and
        collect replies up to the last one; raises TimeoutError when it never comes."""
        waits = bool(request.get("wait") or request.get("then"))
        token, box = self.send(request, topic)
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no final reply within {timeout} s ({len(events)} replies so far)")
                try:
                    ev = box.get(timeout=left)
                except queue.Empty:
                    continue
                events.append(ev)
                if on_event is not None:
                    on_event(ev)
                if replies.kind(ev) == replies.ERROR or (
                    any(replies.ends_request(e, waits) for e in events) and not replies.still_queued(events)
                ):
                    return events
        finally:
            with self._lock:
                self._inbox.pop(token, None)


def no_answer_hint(requester: Requester, cfg: MqttConfig, timeout: float) -> str:
    """What to check when no final reply came: judged from the daemons' retained status."""
    statuses = requester.daemon_statuses()
    where = f"{cfg.host}:{cfg.port}"
    if not statuses:
        return (
            f"no butler-mqtt daemon has announced itself at {where} (no retained status on "
            f"{cfg.topics.status}): is the daemon running (`butler-mqtt run`, systemctl status butler-mqtt), "
            "and does its config name this broker (mqtt.host, mqtt.port) and this status topic?"
        )
    online = {t: s for t, s in statuses.items() if s.get("status") == "online"}
    if not online:
        ids = ", ".join(str(s.get("clientId")) for s in statuses.values())
        return (
            f"the butler-mqtt daemon at {where} is offline (client id {ids}, retained status on "
            f"{cfg.topics.status}): start it (`butler-mqtt run`, systemctl start butler-mqtt); "
            "the broker keeps the request for it if the daemon's session has not expired"
        )
    listening = {str((s.get("topics") or {}).get("start")) for s in online.values()}
    if cfg.topics.start not in listening:
        return (
            f"a daemon is online at {where} but listens on {', '.join(sorted(listening))}, not on "
            f"{cfg.topics.start}: set mqtt.topics.start (BUTLER_MQTT__MQTT__TOPICS__START) to its topic"
        )
    ids = ", ".join(str(s.get("clientId")) for s in online.values())
    return (
        f"the daemon ({ids}) is online at {where} and listens on {cfg.topics.start}, but sent no final "
        f"reply within {timeout:g} s: QRS may be slow or unreachable (see the daemon's log), the broker's "
        "ACL may not let it publish the replies, or the reloads take longer (raise --timeout)"
    )
