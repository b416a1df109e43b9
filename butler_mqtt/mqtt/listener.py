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

import functools
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from butler_mqtt import __version__, keys
from butler_mqtt.callers import Subscription
from butler_mqtt.config import MqttConfig
from butler_mqtt.model import MAX_PAYLOAD_BYTES, MAX_PLAIN_PAYLOAD_BYTES
from butler_mqtt.replies import Event

log = structlog.get_logger("butler_mqtt.mqtt")

NO_MATCHING_SUBSCRIBERS = 0x10
#: For this long after each reconnect, a reply the broker dropped for want of a subscriber
#: (PUBACK 0x10) is published again: after a broker restart a requester without a restored
#: subscription re-subscribes only once it is back too, possibly after the daemon.
REPLY_RESEND_WINDOW_S = 20.0
_PUBACKS_KEPT = 1024  # non-success PUBACKs remembered for the workers (bounded)

#: MQTT 5 DISCONNECT reason 0x8E: another connection with our client id took the session.
SESSION_TAKEN_OVER = 0x8E
#: Reconnect delay after a takeover: doubles per takeover in a row, capped.
TAKEOVER_BACKOFF_S, TAKEOVER_BACKOFF_MAX_S = 30, 600
#: A connection that lasted this long ends a series of takeovers.
TAKEOVER_RESET_S = 600.0


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
#: A deliberate reconnect (request_redelivery) first waits this long at most for the broker to
#: confirm our replies and for our acks to be written.
FLUSH_BEFORE_REDELIVERY_S = 5.0


def _fingerprint(payload: bytes, topic: str, mid: int, oversize: int) -> str:
    return keys.delivery_fingerprint(payload if not oversize else b"oversize:%d" % oversize, topic, mid)



def _is_stop(topic: str, stop: str) -> bool:
    """topics.stop, or a caller's `<topics.stop>/<level>` (contract section 10): a stop request,
    never parsed as a start."""
    return topic == stop or topic.startswith(stop + "/")

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
        self._on_job = on_job
        self.limits = limits
        #: The caller topics (contract section 10, callers.caller_subscriptions): subscribed
        #: beside the bare topics, already under the share with shared_group.
        self.extra = tuple(extra)
        self._inflight_lock = threading.Lock()
        self._inflight: dict[int, Job] = {}  # packet id -> delivery being handled (this epoch)
        self._answered: OrderedDict[int, str] = OrderedDict()  # packet id -> fingerprint, acked
        self._publish_lock = threading.Lock()  # replies and acks vs. a deliberate reconnect
        self.epoch = 0
        self.refused = 0  # deliveries not taken (queue full) since the last redelivery
        self.problems: dict[str, str] = {}
        self._own_drop = False  # the next disconnect is our own (request_redelivery)
        self.v5 = cfg.protocol == "5"
        self.client_id = client_id or cfg.client_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.paused = False  # set on shutdown: new deliveries are left unacked for the next run
        self.started_at = time.time()
        self.connects = 0
        self.connected_at = 0.0  # time.monotonic() of the last successful connect
        # mid -> (PUBACK reason code, topic, the message if it may be resent); not success
        self._pubacks: OrderedDict[int, tuple[int, str | None, mqtt.MQTTMessage | None]] = OrderedDict()
        self._pubacks_lock = threading.Lock()
        self._sub_mids: set[int] = set()
        self.on_subscribed: Callable[[], object] | None = None
        self.takeovers = 0  # session takeovers in a row (see _on_disconnect)
        # With a shared group every instance has its own retained status (contract section 2),
        # so one instance's "offline" never hides a healthy one.
        self.status_topic = f"{cfg.topics.status}/{self.client_id}" if cfg.shared_group else cfg.topics.status
        self.instance = uuid.uuid4().hex[:12]  # tells this process's status from another's with our id

        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            "manual_ack": True,
        }
        if not self.v5:
            kwargs["clean_session"] = False
        c = mqtt.Client(**kwargs)
        c.suppress_exceptions = True  # belt and braces: callbacks are guarded anyway
        apply_credentials(c, cfg)
        c.will_set(self.status_topic, self.status_payload("offline"), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = self._guard(self._on_connect)
        c.on_disconnect = self._guard(self._on_disconnect)
        c.on_message = self._guard(self._on_message)
        c.on_subscribe = self._guard(self._on_subscribe)
        c.on_publish = self._guard(self._on_publish)
        self.client = c

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

    def set_problem(self, name: str, text: str | None) -> None:
        """Show (or clear) a standing problem, e.g. QRS refusing for good, on the status topic."""
        with self._inflight_lock:
            if self.problems.get(name) == text:
                return
            if text is None:
                self.problems.pop(name, None)
            else:
                self.problems[name] = text
        if self.connected.is_set():
            self.client.publish(self.status_topic, self.status_payload("online"), qos=1, retain=True)

    def status_payload(self, state: str) -> str:
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

    # ------------------------------------------------------------------ callbacks

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:  # never let one bad message stop the network thread
                log.exception("mqtt_callback_failed", callback=fn.__name__)

        return wrapped

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("mqtt_connect_refused", reason=str(rc), host=self.cfg.host, port=self.cfg.port)
            return
        self.connects += 1
        self.connected_at = time.monotonic()
        if self.takeovers:
            client.reconnect_delay_set(min_delay=1, max_delay=30)
        nodelay(client)
        session_present = bool(getattr(flags, "session_present", False))
        if not session_present:
            with self._inflight_lock:
                self.epoch += 1  # packet ids of the old session mean nothing now
                self._inflight.clear()
                self._answered.clear()
                self.refused = 0
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
            log.info("mqtt_subscribed", topics=self.subscriptions())
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
        holder = {"reason": "broker: Session taken over"} if rc.value == SESSION_TAKEN_OVER else self._other_holder()
        if holder is not None:
            self._taken_over(client, holder)
            return
        log.warning("mqtt_disconnected", reason=str(rc), reconnecting=True)

    def _other_holder(self, wait: float = 1.5) -> dict[str, Any] | None:
        """After losing the connection: is our client id now online from another process?

        Read from our retained status with a throwaway client (another id, same credentials):
        an "online" with our client id but another `instance` is the connection that took our
        session. None when there is none, or the broker cannot be asked.
        """
        found: dict[str, Any] = {}
        done = threading.Event()
        probe = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id}-probe-{uuid.uuid4().hex[:6]}"[:128],
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        apply_credentials(probe, self.cfg)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            if rc.is_failure:
                done.set()
            else:
                c.subscribe(self.status_topic, qos=1)

        own = threading.Event()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                data = json.loads(msg.payload)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("instance") == self.instance:
                # Still our own status: the newcomer's "online" may be a moment behind its
                # connect (it publishes after its CONNACK). Keep listening until `wait` ends.
                own.set()
                return
            if isinstance(data, dict):
                found.clear()
                found.update(data)
            done.set()

        probe.on_connect = on_connect
        probe.on_message = on_message
        # A retained message comes right after the SUBACK: with none at all, give up soon.
        probe.on_subscribe = lambda *_a: threading.Timer(0.5, lambda: None if own.is_set() else done.set()).start()
        try:
            probe.connect(self.cfg.host, self.cfg.port, keepalive=10)
        except (OSError, ValueError):
            return None
        probe.loop_start()
        try:
            done.wait(wait)
        finally:
            probe.disconnect()
            probe.loop_stop()
        mine = found.get("clientId") == self.client_id and found.get("instance") != self.instance
        return found if found.get("status") == "online" and mine else None

    def _taken_over(self, client: mqtt.Client, holder: dict[str, Any]) -> None:
        """Another client connected with our id. Reconnecting at once would take the session
        back, and the two would kick each other off forever: back off, loudly."""
        if time.monotonic() - self.connected_at > TAKEOVER_RESET_S:
            self.takeovers = 0
        self.takeovers += 1
        delay = min(TAKEOVER_BACKOFF_S * 2 ** (self.takeovers - 1), TAKEOVER_BACKOFF_MAX_S)
        # paho waits min_delay before the first reconnect attempt, then doubles to max_delay.
        client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, TAKEOVER_BACKOFF_MAX_S))
        log.error(
            "mqtt_session_taken_over",
            client_id=self.client_id,
            other={k: holder.get(k) for k in ("reason", "host", "pid", "startedAt") if holder.get(k) is not None},
            takeovers=self.takeovers,
            retry_in_s=delay,
            detail=f"another client connected to {self.cfg.host}:{self.cfg.port} with client id "
            f"{self.client_id}: a second butler-mqtt with the same mqtt.client_id (and no shared_group)? "
            "Give each daemon its own client id; this one backs off instead of taking the session back",
        )

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        """Remember a PUBACK that is not plain success, for `confirm`. Runs before paho marks
        the message published and drops it, so the message is still at hand for a resend."""
        code = int(getattr(rc, "value", 0) or 0)
        with self._pubacks_lock:
            self._pubacks.pop(mid, None)  # the mid's previous use, if any
            if code == 0:
                return
            msg = client._out_messages.get(mid)  # noqa: SLF001
            topic = msg.topic if msg is not None else None
            self._pubacks[mid] = (code, topic, msg if code == NO_MATCHING_SUBSCRIBERS else None)
            while len(self._pubacks) > _PUBACKS_KEPT:
                self._pubacks.popitem(last=False)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.paused:
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

    # ------------------------------------------------------------------ worker side

    def ack(self, job: Job) -> None:
        """Ack a delivery, once. A job of an earlier broker session is not acked: its packet id
        may by now belong to another message of the new session."""
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
        if job.qos > 0 and current:
            with self._publish_lock:
                self.client.ack(job.mid, job.qos)

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

    def request_redelivery(self) -> None:
        """Drop the connection so that the broker sends again what we left unacked (deliveries
        refused while the queue was full). paho reconnects by itself, with the session."""
        with self._inflight_lock:
            if not self.refused:
                return
            self.refused = 0
        log.warning("mqtt_redelivery_requested", detail="reconnecting so the broker resends the deliveries left unacked")
        # Everything sent so far reaches the broker first, and nothing new is sent meanwhile: a
        # reply whose PUBACK is lost with the connection is sent again by paho (a second copy
        # for the subscriber); an ack lost makes the broker resend a delivery already answered.
        with self._publish_lock:
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
                window_end = self.connected_at + REPLY_RESEND_WINDOW_S if self.connects > 1 else 0.0
                if time.monotonic() + delay > min(window_end, deadline):
                    if window_end:
                        log.info("reply_unmatched", topic=topic, detail="no client subscribed to the reply topic in time")
                    break  # nobody listens (fire and forget): the reply is not needed
                if self.paused:
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
        with self._publish_lock:
            return self.client.publish(topic, body, qos=1, retain=False, properties=self._reply_properties(correlation))


class _PackedOnce(Properties):
    """Reply properties, never changed once built: packed once, not on every publish (paho's
    `pack` walks every property name; it was about 4 % of the daemon's CPU per request)."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed", packed)
        return packed


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS from the config; every client of ours connects the same way."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
    if cfg.tls.enabled:
        client.tls_set(
            ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
            certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
            keyfile=str(cfg.tls.key) if cfg.tls.key else None,
            cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
        )
        if not cfg.tls.verify:
            client.tls_insecure_set(True)


def nodelay(client: mqtt.Client) -> None:
    """Disable Nagle's algorithm (paho does not): replies go out in bursts of small packets,
    and Nagle plus the peer's delayed ACK would hold each burst's second packet ~40 ms."""
    setsockopt = getattr(client.socket(), "setsockopt", None)
    try:
        if setsockopt is not None:
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket: nothing to tune


def _reason(code: int) -> str:
    try:
        return f"{code:#04x} {ReasonCode(PacketTypes.PUBACK, identifier=code)}"
    except Exception:  # not a PUBACK reason code paho knows
        return f"{code:#04x}"


def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    """Wait for the broker's PUBACK. Survives reconnects: paho resends queued QoS 1 messages
    after a reconnect but leaves `rc` at NO_CONN, so `wait_for_publish` would give up early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if info._published:  # noqa: SLF001 - see docstring
            return True
        time.sleep(0.002)
    return bool(info._published)  # noqa: SLF001
