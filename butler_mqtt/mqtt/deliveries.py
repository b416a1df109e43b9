"""Deliveries in: what the network thread makes of a received message (a Job for the workers),
and the bookkeeping of the deliveries being handled and those answered, for acks and
redeliveries (the in-flight registry and the answered memory: see mqtt/listener.py's docstring,
"Three guards against a second handling")."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import structlog

from butler_mqtt import keys
from butler_mqtt.config import MqttConfig
from butler_mqtt.model import MAX_PAYLOAD_BYTES, MAX_PLAIN_PAYLOAD_BYTES

log = structlog.get_logger("butler_mqtt.mqtt")


@dataclass
class Job:
    """One received request, handed from the network thread to a worker."""

    ingress: str  # "mqtt" (JSON topic), "mqtt-plain" (Butler's GUID topic) or "mqtt-stop" (topics.stop)
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    response_topic: str | None
    correlation_data: bytes | None
    expires_at: float | None  # time.monotonic() deadline from MQTT 5 Message Expiry
    retained: bool = False
    oversize: int = 0  # > 0: the payload had this many bytes and was dropped unread
    epoch: int = 0  # the broker session this delivery belongs to (see MqttListener.ack)
    #: When the delivery arrived (wall clock): the request history's RECEIVED, also when QRS
    #: made it wait and it was handled later.
    received: float = field(default_factory=time.time)


#: Size limits applied in the network thread, before a payload is kept: (JSON topic, plain topic),
#: the request model's own.
DEFAULT_LIMITS = (MAX_PAYLOAD_BYTES, MAX_PLAIN_PAYLOAD_BYTES)

#: How many acked packet ids of the session are remembered (see the module docstring). Brokers
#: hand out packet ids in sequence (Mosquitto: 1..65535 per client), so one is not reused
#: within this window.
ANSWERED_MEMORY = 4096


def _fingerprint(payload: bytes, topic: str, mid: int, oversize: int) -> str:
    return keys.delivery_fingerprint(payload if not oversize else b"oversize:%d" % oversize, topic, mid)


class Session(Protocol):
    """What the deliveries read of the listener's connection."""

    paused: bool  # set on shutdown: new deliveries are left unacked for the next run



def _is_stop(topic: str, stop: str) -> bool:
    """topics.stop, or a caller's `<topics.stop>/<level>` (contract section 10): a stop request,
    never parsed as a start."""
    return topic == stop or topic.startswith(stop + "/")

class Deliveries:
    """The deliveries of one client: taken from the network thread, handed to the workers,
    tracked until acked or released (the listener owns one)."""

    def __init__(
        self,
        cfg: MqttConfig,
        on_job: Callable[[Job], bool | None],
        limits: tuple[int, int],
        v5: bool,
        session: Session,
    ) -> None:
        self.cfg = cfg
        self._on_job = on_job
        self.limits = limits
        self.v5 = v5
        self.session = session
        self._inflight_lock = threading.Lock()
        self._inflight: dict[int, Job] = {}  # packet id -> delivery being handled (this epoch)
        self._answered: OrderedDict[int, str] = OrderedDict()  # packet id -> fingerprint, acked
        self.epoch = 0
        self.refused = 0  # deliveries not taken (queue full) since the last redelivery

    def new_session(self) -> None:
        """The broker has no session for us (any more): packet ids of the old one mean nothing."""
        with self._inflight_lock:
            self.epoch += 1  # packet ids of the old session mean nothing now
            self._inflight.clear()
            self._answered.clear()
            self.refused = 0

    def take_refused(self) -> bool:
        """Were deliveries refused since the last call? (request_redelivery: reconnect if so)"""
        with self._inflight_lock:
            if not self.refused:
                return False
            self.refused = 0
        return True

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.session.paused:
            return  # shutting down: left unacked, redelivered to the next run
        plain = self._is_plain(msg.topic)
        with self._inflight_lock:
            if msg.qos > 0 and msg.mid in self._inflight:
                # The broker resent a message we are still handling (after a reconnect, with the
                # session): the packet id is the same, so the first copy's ack covers both.
                log.info("mqtt_redelivery_in_progress", mid=msg.mid, topic=msg.topic)
                return
            epoch = self.epoch
            answered = self._answered.get(msg.mid) if msg.qos > 0 else None
            if answered is not None and not msg.dup:
                del self._answered[msg.mid]  # the id is in use again: the broker had our ack
        size = len(msg.payload)
        oversize = size if size > self.limits[1 if plain else 0] else 0
        kept = b"" if oversize else bytes(msg.payload)  # never keep an oversize payload
        if answered is not None and msg.dup and answered == _fingerprint(kept, msg.topic, msg.mid, oversize):
            # Answered and acked already; the ack was lost with the connection.
            log.info("mqtt_redelivery_already_answered", mid=msg.mid, topic=msg.topic)
            client.ack(msg.mid, msg.qos)
            return
        props = msg.properties if self.v5 else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        now = time.monotonic()
        job = Job(
            ingress="mqtt-plain" if plain else ("mqtt-stop" if _is_stop(msg.topic, self.cfg.topics.stop) else "mqtt"),
            topic=msg.topic,
            payload=kept,
            mid=msg.mid,
            qos=msg.qos,
            dup=bool(msg.dup),
            response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
            correlation_data=getattr(props, "CorrelationData", None) if props is not None else None,
            expires_at=now + expiry if expiry is not None else None,
            # A retained "start" would re-fire on every (re)subscribe: never acted on. With
            # MQTT 5, retain-as-published shows live retained publishes too.
            retained=bool(msg.retain),
            oversize=oversize,
            epoch=epoch,
        )
        if msg.qos > 0:
            with self._inflight_lock:
                self._inflight[msg.mid] = job
        if self._on_job(job) is False:  # the hand-off queue is full: leave it to the broker
            with self._inflight_lock:
                if self._inflight.get(msg.mid) is job:
                    del self._inflight[msg.mid]
                self.refused += 1

    def _is_plain(self, topic: str) -> bool:
        return self.cfg.topics.start_plain is not None and topic == self.cfg.topics.start_plain

    def ack(self, job: Job) -> bool:
        """Forget a delivery as being handled and remember it as answered. True: ack it on the
        wire (once). A job of an earlier broker session is not acked: its packet id may by now
        belong to another message of the new session."""
        fingerprint = _fingerprint(job.payload, job.topic, job.mid, job.oversize) if job.qos > 0 else ""
        with self._inflight_lock:
            current = job.epoch == self.epoch
            if self._inflight.get(job.mid) is job:
                del self._inflight[job.mid]
            if job.qos > 0 and current:
                self._answered[job.mid] = fingerprint
                self._answered.move_to_end(job.mid)
                while len(self._answered) > ANSWERED_MEMORY:
                    self._answered.popitem(last=False)
        return job.qos > 0 and current

    def release(self, job: Job) -> None:
        """Give a delivery back to the broker without acking it (it is redelivered later)."""
        with self._inflight_lock:
            if self._inflight.get(job.mid) is job:
                del self._inflight[job.mid]

    @property
    def unacked(self) -> int:
        """Deliveries taken and not yet acked (each holds one of the broker's in-flight slots)."""
        with self._inflight_lock:
            return len(self._inflight)
