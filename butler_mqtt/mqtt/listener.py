"""The MQTT edge: one paho-mqtt 2.x client with a persistent session and manual acks.

Facts this relies on (research/peers-and-mqtt-practice.md part B, tested on Mosquitto 2.0):
* the session survives a daemon restart only with a stable client id and clean_start=False
  plus a session expiry (MQTT 5) or clean_session=False (3.1.1);
* with manual_ack, a request that is never acked is redelivered (dup=True) on reconnect;
* an exception escaping a callback silently kills paho's network thread, so every callback
  is guarded;
* Receive Maximum should make the broker stop sending once that many requests are unacked,
  but Mosquitto 2.0.11 keeps sending once the client acks: so the network thread itself
  bounds memory. A payload over the size limit is dropped at once (the job keeps its size
  only, and is answered "Payload too large"); a delivery that would push the hand-off queue
  over `mqtt.queue_bytes` is not taken: it stays unacked, and once the queue has drained the
  listener drops the connection so that the broker delivers it again (nothing lost);
* a packet id stays in use until we ack it, and an ack written just before the connection
  drops may never reach the broker, which then resends the delivery (dup): see "Three guards
  against a second handling" below;
* after a reconnect without the session, earlier packet ids mean nothing: jobs of the old
  session are not acked (their messages are gone from the broker or redelivered anew);
* plain disconnect() does not send the will, so "offline" is published by hand on shutdown;
* a PUBACK is not always "delivered": MQTT 5 brokers answer 0x10 No matching subscribers when
  nobody subscribes to the topic, e.g. a requester that has not re-subscribed yet after a
  broker restart (the reply is then dropped), and >= 0x80 when they refuse the message;
* after a reconnect paho resends unconfirmed messages only once the CONNACK arrives, while a
  worker's publish in the CONNECT/CONNACK window goes out at once: PUBACKs can then arrive out
  of publish order, so the last reply being confirmed says nothing about the earlier ones.

The network thread only parses and enqueues; all work happens in the daemon's workers.

The listener owns the session (connect, subscriptions, reconnects, a deliberate drop for a
redelivery) and hands the rest to small collaborators it creates: `deliveries.Deliveries`
(received messages -> Jobs, the in-flight registry and the answered memory below, acks),
`publishing.ReplyPublisher` (replies out and their PUBACKs), `status.Status` (the retained
status and its problems) and `takeover.SessionTakeover` (another client took our session).

Three guards against a second handling of one delivery. They look alike, but each covers a
window the others cannot see, so they stay three (unifying them would change what is answered):

* The in-flight registry (`_inflight`, packet id -> the Job being handled, this session): a
  redelivery that arrives while the first copy is still queued or in a worker (a reconnect
  with the session, e.g. a broker restart while QRS is down) is dropped unanswered, because
  the first copy's ack (the same packet id) acknowledges both. Only it can: the copy is not
  acked yet (so `_answered` does not know it) and may not be in the journal yet (so the
  journal would let a second worker answer it, or for an anonymous request start it again).
  It also holds what `ack` needs and what /healthz counts as unacked.
* The answered memory (`_answered`, the last ANSWERED_MEMORY acked packet ids with the
  delivery's fingerprint: payload, topic, packet id): a dup resend of a delivery we answered
  and acked, whose ack was lost with the connection, is acked again and nothing is
  published. It covers every delivery, also those the journal never records (invalid JSON,
  oversize, retained, expired, a bad response topic: without it, each resend would get a
  second error reply), and it spares keyed requests a replay of their replies. It is memory:
  gone with a restart, and cleared with a new broker session, whose packet ids mean nothing.
* The journal fingerprint (mqtt/handler.py: `journal.recent_hash`, for a dup request without
  requestId or correlation data): the same fingerprint, stored with the request's outcome.
  It is durable, so it holds across a daemon restart (the broker resends what the dead
  process never acked) and across instances sharing a journal; there the earlier outcome is
  replayed instead of starting anything again. Requests with a key need no fingerprint: the
  key itself finds them. It cannot replace the other two: it knows only valid requests that
  reached the journal, and it answers (replays) rather than staying silent.
"""


from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from butler_mqtt.callers import Subscription
from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.connection import apply_credentials, nodelay, wait_published
from butler_mqtt.mqtt.deliveries import DEFAULT_LIMITS, Deliveries, Job
from butler_mqtt.mqtt.gate import SendGate
from butler_mqtt.mqtt.publishing import ReplyPublisher
from butler_mqtt.mqtt.status import Status
from butler_mqtt.mqtt.takeover import SESSION_TAKEN_OVER, SessionTakeover
from butler_mqtt.replies import Event

# Re-exported: the rest of the MQTT edge, the tests and the benches import these from here.
__all__ = [
    "DEFAULT_LIMITS",
    "Job",
    "MqttListener",
    "apply_credentials",
    "nodelay",
    "wait_published",
]

log = structlog.get_logger("butler_mqtt.mqtt")

#: A deliberate reconnect (request_redelivery) first waits this long at most for the broker to
#: confirm our replies and for our acks to be written.
FLUSH_BEFORE_REDELIVERY_S = 5.0


def _guard_callback(fn: Callable[..., None]) -> Callable[..., None]:
    def wrapped(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # never let one bad message stop the network thread
            log.exception("mqtt_callback_failed", callback=fn.__name__)

    return wrapped


def _session_client(cfg: MqttConfig, client_id: str, v5: bool) -> mqtt.Client:
    """The listener's paho client: a persistent session, manual acks, our credentials."""
    kwargs: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": client_id,
        "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        "manual_ack": True,
    }
    if not v5:
        kwargs["clean_session"] = False
    c = mqtt.Client(**kwargs)
    c.suppress_exceptions = True  # belt and braces: callbacks are guarded anyway
    apply_credentials(c, cfg)
    return c


class MqttListener:
    def __init__(
        self,
        cfg: MqttConfig,
        on_job: Callable[[Job], bool | None],
        client_id: str | None = None,
        limits: tuple[int, int] = DEFAULT_LIMITS,
        extra: Sequence[Subscription] = (),
    ) -> None:
        self.cfg = cfg
        self.limits = limits
        #: The caller topics (contract section 10, callers.caller_subscriptions): subscribed
        #: beside the bare topics, already under the share with shared_group.
        self.extra = tuple(extra)
        self._gate = SendGate()  # replies and acks vs. a deliberate reconnect
        self._own_drop = False  # the next disconnect is our own (request_redelivery)
        self.v5 = cfg.protocol == "5"
        self.client_id = client_id or cfg.client_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.paused = False  # set on shutdown: new deliveries are left unacked for the next run
        self.connects = 0
        self.connected_at = 0.0  # time.monotonic() of the last successful connect
        self._sub_mids: set[int] = set()
        self.on_subscribed: Callable[[], object] | None = None
        # The collaborators: the retained status, the deliveries in (acks, redeliveries), a
        # session taken over by another client, the replies out (created with the client).
        self.status = Status(cfg, self.client_id)
        self.status_topic = self.status.topic
        self.deliveries = Deliveries(cfg, on_job, limits, self.v5, self)
        self.takeover = SessionTakeover(cfg, self.client_id, self.v5, self.status.topic, self.status.instance)

        c = _session_client(cfg, self.client_id, self.v5)
        c.will_set(self.status_topic, self.status_payload("offline"), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = self._guard(self._on_connect)
        c.on_disconnect = self._guard(self._on_disconnect)
        c.on_message = self._guard(self.deliveries._on_message)
        c.on_subscribe = self._guard(self._on_subscribe)
        self.client = c
        self.replies = ReplyPublisher(c, self.v5, self._gate, self)
        c.on_publish = self._guard(self.replies._on_publish)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry
            props.ReceiveMaximum = self.cfg.receive_maximum
            self.client.connect_async(
                self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained offline status, disconnect cleanly, stop the network thread."""
        self.paused = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, self.status_payload("offline"), qos=1, retain=True)
            wait_published(info, timeout)
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def alive(self) -> bool:
        """The network thread is running (paho's thread dies silently on a callback error)."""
        t = getattr(self.client, "_thread", None)
        return t is not None and t.is_alive()

    # ------------------------------------------------------------------ topics

    def _sub_topic(self, topic: str) -> str:
        if self.cfg.shared_group:
            return f"$share/{self.cfg.shared_group}/{topic}"
        return topic

    def topics(self) -> list[str]:
        t = [self.cfg.topics.start]
        if self.cfg.topics.start_plain:
            t.append(self.cfg.topics.start_plain)
        t.append(self.cfg.topics.stop)
        return t

    def subscriptions(self) -> list[str]:
        """Every topic filter subscribed to, as sent to the broker (share prefix included)."""
        return [self._sub_topic(t) for t in self.topics()] + [s.topic for s in self.extra]

    # ------------------------------------------------------------------ status (mqtt/status.py)

    @property
    def problems(self) -> dict[str, str]:
        return self.status.problems

    def set_problem(self, name: str, text: str | None) -> None:
        """Show (or clear) a standing problem, e.g. QRS refusing for good, on the status topic."""
        if self.status.set_problem(name, text) and self.connected.is_set():
            self.client.publish(self.status_topic, self.status_payload("online"), qos=1, retain=True)

    def status_payload(self, state: str) -> str:
        return self.status.payload(state)

    # ------------------------------------------------------------------ callbacks

    _guard = staticmethod(_guard_callback)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("mqtt_connect_refused", reason=str(rc), host=self.cfg.host, port=self.cfg.port)
            return
        self.connects += 1
        self.connected_at = time.monotonic()
        if self.takeover.count:
            client.reconnect_delay_set(min_delay=1, max_delay=30)
        nodelay(client)
        session_present = bool(getattr(flags, "session_present", False))
        if not session_present:
            self.deliveries.new_session()
        self.connected.set()
        log.info(
            "mqtt_connected",
            host=self.cfg.host,
            port=self.cfg.port,
            session_present=session_present,
            client_id=self.client_id,
        )
        # Subscribe on every connect: shared subscriptions are not restored by Mosquitto 2.0.
        subs: list[tuple[str, Any]] = []
        for topic in self.topics():
            opts: Any = SubscribeOptions(
                qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
            ) if self.v5 else 1
            subs.append((self._sub_topic(topic), opts))
        for extra in self.extra:
            # No Local: the daemon's own replies and alerts can be under <topics.start>/+.
            opts = SubscribeOptions(
                qos=1, noLocal=extra.no_local, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
            ) if self.v5 else 1
            subs.append((extra.topic, opts))
        _rc, mid = client.subscribe(subs)
        if mid is not None:
            self._sub_mids.add(mid)
        client.publish(self.status_topic, self.status_payload("online"), qos=1, retain=True)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        subscribed = self.subscriptions()
        refused = [t for t, r in zip(subscribed, rcs, strict=False) if r.is_failure]
        if refused == [self.cfg.topics.stop]:  # an ACL from before topics.stop: starts still work
            log.error("mqtt_subscribe_refused", reasons=[str(r) for r in rcs if r.is_failure], topics=refused,
                      detail="stop requests are not received: grant the daemon read on mqtt.topics.stop")
        elif refused or any(r.is_failure for r in rcs):
            log.error("mqtt_subscribe_refused", reasons=[str(r) for r in rcs if r.is_failure], topics=subscribed)
            return
        if mid in self._sub_mids:
            self._sub_mids.discard(mid)
            self.subscribed.set()
            log.info("mqtt_subscribed", topics=subscribed)
            if self.on_subscribed is not None:
                self.on_subscribed()

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self.paused:
            return
        # MQTT 5 brokers may say so (reason 0x8E); Mosquitto 2.0 just closes the socket, so the
        # other holder is looked for in our retained status topic.
        if self._own_drop:  # we dropped the connection ourselves (request_redelivery)
            self._own_drop = False
            log.info("mqtt_reconnecting_for_redelivery")
            return
        holder = {"reason": "broker: Session taken over"} if rc.value == SESSION_TAKEN_OVER else self.takeover.other_holder()
        if holder is not None:
            self.takeover.taken_over(client, holder, self.connected_at)
            return
        log.warning("mqtt_disconnected", reason=str(rc), reconnecting=True)

    # ------------------------------------------------------------------ worker side

    def ack(self, job: Job, wait: bool = True) -> bool:
        """Ack a delivery, once. A job of an earlier broker session is not acked: its packet id
        may by now belong to another message of the new session. `wait=False` (paho's network
        thread, mqtt/acking.py): while the send gate is closed, False and nothing done."""
        if wait:
            self._gate.enter()
        elif not self._gate.try_enter():
            return False
        try:
            if self.deliveries.ack(job):
                self.client.ack(job.mid, job.qos)
        finally:
            self._gate.leave()
        return True

    def release(self, job: Job) -> None:
        """Give a delivery back to the broker without acking it (it is redelivered later)."""
        self.deliveries.release(job)

    @property
    def unacked(self) -> int:
        """Deliveries taken and not yet acked (each holds one of the broker's in-flight slots)."""
        return self.deliveries.unacked

    @property
    def refused(self) -> int:
        """Deliveries not taken (queue full) since the last redelivery."""
        return self.deliveries.refused

    @refused.setter
    def refused(self, value: int) -> None:
        self.deliveries.refused = value

    def request_redelivery(self) -> None:
        """Drop the connection so that the broker sends again what we left unacked (deliveries
        refused while the queue was full). paho reconnects by itself, with the session."""
        if not self.deliveries.take_refused():
            return
        log.warning("mqtt_redelivery_requested", detail="reconnecting so the broker resends the deliveries left unacked")
        # Everything sent so far reaches the broker first, and nothing new is sent meanwhile: a
        # reply whose PUBACK is lost with the connection is sent again by paho (a second copy
        # for the subscriber); an ack lost makes the broker resend a delivery already answered.
        with self._gate.closed():
            deadline = time.monotonic() + FLUSH_BEFORE_REDELIVERY_S
            while self.connected.is_set() and self._sending() and time.monotonic() < deadline:
                time.sleep(0.005)
            sock = self.client.socket()
            try:
                if sock is not None:
                    self._own_drop = True
                    sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
            except OSError:
                self._own_drop = False

    def _sending(self) -> bool:
        """paho still has replies the broker has not confirmed, or packets (acks) not yet written."""
        c = self.client
        return bool(getattr(c, "_out_messages", None)) or bool(getattr(c, "_out_packet", None))

    # ------------------------------------------------------------------ replies (mqtt/publishing.py)

    def confirm(self, replies: list[mqtt.MQTTMessageInfo], timeout: float) -> bool:
        """Wait until the broker has taken every reply (ReplyPublisher.confirm)."""
        return self.replies.confirm(replies, timeout)

    def publish_event(self, topic: str, correlation: bytes | None, event: Event) -> mqtt.MQTTMessageInfo:
        """A reply event as JSON, QoS 1, with the request's correlation data (MQTT 5)."""
        return self.replies.publish_event(topic, correlation, event)
