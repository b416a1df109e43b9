"""Replies out: publishing a reply event (QoS 1, MQTT 5 properties built once), and waiting
until the broker has taken each one (PUBACK by PUBACK, resending within a window after a
reconnect what it dropped for want of a subscriber)."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from butler_mqtt.mqtt.connection import wait_published
from butler_mqtt.mqtt.gate import SendGate
from butler_mqtt.replies import Event

log = structlog.get_logger("butler_mqtt.mqtt")

NO_MATCHING_SUBSCRIBERS = 0x10
#: For this long after each reconnect, a reply the broker dropped for want of a subscriber
#: (PUBACK 0x10) is published again: after a broker restart a requester without a restored
#: subscription re-subscribes only once it is back too, possibly after the daemon.
REPLY_RESEND_WINDOW_S = 20.0
_PUBACKS_KEPT = 1024  # non-success PUBACKs remembered for the workers (bounded)


class PubackListener(Protocol):
    """Told of every PUBACK of a reply (mqtt/acking.py: deliveries acked after their replies)."""

    def on_puback(self, info: mqtt.MQTTMessageInfo, mid: int, code: int) -> None: ...


class Session(Protocol):
    """What the publisher reads of the listener's connection."""

    connects: int
    connected_at: float  # time.monotonic() of the last successful connect
    paused: bool  # stopping


class ReplyPublisher:
    """Publishes the replies of one client and confirms them (the listener owns one)."""

    def __init__(self, client: mqtt.Client, v5: bool, gate: SendGate, session: Session) -> None:
        self.client = client
        self.v5 = v5
        self._gate = gate  # replies and acks vs. a deliberate reconnect
        self.session = session
        # mid -> (PUBACK reason code, topic, the message if it may be resent); not success
        self._pubacks: OrderedDict[int, tuple[int, str | None, mqtt.MQTTMessage | None]] = OrderedDict()
        self._pubacks_lock = threading.Lock()
        self.acks: PubackListener | None = None  # set by the request handler (mqtt/acking.py)

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        """Remember a PUBACK that is not plain success, for `confirm`. Runs before paho marks
        the message published and drops it, so the message is still at hand for a resend.
        Then tell `acks` (the deliveries acked after their replies: mqtt/acking.py)."""
        code = int(getattr(rc, "value", 0) or 0)
        msg = client._out_messages.get(mid)  # noqa: SLF001
        with self._pubacks_lock:
            self._pubacks.pop(mid, None)  # the mid's previous use, if any
            if code != 0:
                topic = msg.topic if msg is not None else None
                self._pubacks[mid] = (code, topic, msg if code == NO_MATCHING_SUBSCRIBERS else None)
                while len(self._pubacks) > _PUBACKS_KEPT:
                    self._pubacks.popitem(last=False)
        if self.acks is not None and msg is not None:
            self.acks.on_puback(msg.info, mid, code)

    def settled_now(self, codes: list[tuple[int, int]]) -> bool:
        """True when the PUBACKs (mid, code) of a delivery's replies settle it with nothing to
        do: success, or no subscriber before any reconnect (nobody asked for the replies: no
        resend is due and `confirm` would say nothing). Anything else (a refusal to log, a resend
        that may be due) is left to `confirm`, which runs off paho's network thread. A code of -1
        (not known to the caller) is looked up among the remembered ones."""
        unusual = [(mid, code) for mid, code in codes if code != 0]
        if not unusual:
            return True
        with self._pubacks_lock:
            known = [code if code >= 0 else self._pubacks.get(mid, (0,))[0] for mid, code in unusual]
            if self.session.connects > 1 or any(code not in (0, NO_MATCHING_SUBSCRIBERS) for code in known):
                return False
            for mid, _ in unusual:
                self._pubacks.pop(mid, None)
        return True

    def confirm(self, replies: list[mqtt.MQTTMessageInfo], timeout: float) -> bool:
        """Wait until the broker has taken every reply: each one, since PUBACK order is not
        publish order after a reconnect. Within REPLY_RESEND_WINDOW_S of a reconnect, a reply
        the broker dropped for want of a subscriber (0x10) is published again until a requester
        is back to take it or the window closes. False (leave the request unacked: redelivered
        and replayed from the journal) if a PUBACK did not come in time or we are stopping."""
        deadline = time.monotonic() + timeout
        for info in replies:
            delay = 0.25
            while True:
                if not wait_published(info, max(0.0, deadline - time.monotonic())):
                    return False
                with self._pubacks_lock:
                    code, topic, msg = self._pubacks.pop(info.mid, (0, None, None))
                if code == 0:
                    break
                if code != NO_MATCHING_SUBSCRIBERS or msg is None:
                    log.error("reply_refused", topic=topic, reason=_reason(code), detail="the broker refused the reply")
                    break
                window_end = self.session.connected_at + REPLY_RESEND_WINDOW_S if self.session.connects > 1 else 0.0
                if time.monotonic() + delay > min(window_end, deadline):
                    if window_end:
                        log.info("reply_unmatched", topic=topic, detail="no client subscribed to the reply topic in time")
                    break  # nobody listens (fire and forget): the reply is not needed
                if self.session.paused:
                    return False
                log.debug("reply_resent", topic=topic, reason=_reason(code), retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                info = self.client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain, properties=msg.properties)
        return True

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one listener per daemon; bounded
    def _reply_properties(self, correlation: bytes | None) -> Properties | None:
        """MQTT 5 properties of a reply, built once per correlation value: paho's Properties
        constructor costs more than the JSON of a reply. Never mutated after creation."""
        if not self.v5:
            return None
        props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/json"
        if correlation is not None:
            props.CorrelationData = correlation
        return props

    def publish_event(self, topic: str, correlation: bytes | None, event: Event) -> mqtt.MQTTMessageInfo:
        """A reply event as JSON, QoS 1, with the request's correlation data (MQTT 5)."""
        try:
            body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (e.g. in a task name from QRS): ASCII escapes
            body = json.dumps(event, separators=(",", ":")).encode("ascii")
        props = self._reply_properties(correlation)
        self._gate.enter()
        try:
            return self.client.publish(topic, body, qos=1, retain=False, properties=props)
        finally:
            self._gate.leave()


class _PackedOnce(Properties):
    """Reply properties, never changed once built: packed once, not on every publish (paho's
    `pack` walks every property name; it was about 4 % of the daemon's CPU per request)."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed", packed)
        return packed


def _reason(code: int) -> str:
    try:
        return f"{code:#04x} {ReasonCode(PacketTypes.PUBACK, identifier=code)}"
    except Exception:  # not a PUBACK reason code paho knows
        return f"{code:#04x}"
