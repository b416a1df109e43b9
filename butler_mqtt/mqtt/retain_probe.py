"""MQTT 3.1.1: was this request published with the retain flag?

With MQTT 5 the daemon subscribes with Retain As Published, so a retained request shows
`retain=1` however it arrives. MQTT 3.1.1 has no such option: the broker clears the flag on
every live delivery (3.1.1 section 3.3.1.3), so a retained request published while the daemon
is subscribed looks like any other. A retained request must never be acted on (it would fire
again on every resubscribe), so for 3.1.1 a worker asks this probe before acting.

The probe is one extra clean-session client of ours (same credentials and TLS). For each
question it sends SUBSCRIBE for the request's exact topic and, right behind it, UNSUBSCRIBE.
A broker sends the retained message for a new subscription before it handles the next packet
of that client (Mosquitto queues it while handling the SUBSCRIBE), so once the UNSUBACK is
back every retained message of the subscription has been seen. The request counts as retained
when a retained message with the identical payload sits on its topic.

Decisions:
* One question at a time (a lock): two SUBSCRIBE/UNSUBSCRIBE pairs on one topic must not
  interleave. The cost is one loopback round trip to the broker per 3.1.1 request.
* No answer within `timeout` (probe disconnected, broker stuck): `BrokerUnavailable`, which
  the daemon treats like an unavailable QRS: the request stays unacked and is retried with
  backoff. Guessing "not retained" could start a retained request; guessing "retained" would
  refuse a good one with a misleading error. Waiting is the answer that is never wrong.
* A non-retained request whose payload is identical to a retained message on the same topic
  is refused as retained: the retained copy would fire on the next resubscribe anyway, and the
  error tells the publisher to clear it.
* Not detected: a retained request that a *different* retained message on the same topic
  replaced before the worker asked (a gap of milliseconds). Use MQTT 5, or Mosquitto's
  `retain_available false`, where that matters.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from butler_mqtt.config import MqttConfig
from butler_mqtt.errors import BrokerUnavailable
from butler_mqtt.mqtt.listener import apply_credentials
from butler_mqtt.ops.ratelimit import RateLimiter

log = structlog.get_logger("butler_mqtt.mqtt")

PROBE_TIMEOUT_S = 5.0


class _Question:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload
        self.found = False


class RetainProbe:
    """`retained(topic, payload)`: does a retained message with this payload sit on `topic`?
    Thread-safe; one broker round trip per call."""

    def __init__(self, cfg: MqttConfig, client_id: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.timeout = timeout
        self.client_id = f"{client_id}-retain-probe"[:128]
        self.connected = threading.Event()
        self._ask = threading.Lock()  # one question at a time
        self._cond = threading.Condition()
        self._question: _Question | None = None
        self._answered: set[int] = set()  # UNSUBACK mids seen since the current question began
        self._connects = 0  # bumped on every disconnect, so a question spanning one fails
        self._errors = RateLimiter(60.0)
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,  # nothing to keep: no subscription outlives its question
        )
        c.suppress_exceptions = True
        apply_credentials(c, cfg)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_unsubscribe = self._on_unsubscribe
        self._client = c
        self._host, self._port, self._keepalive = cfg.host, cfg.port, cfg.keepalive

    def start(self) -> RetainProbe:
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------------ the question

    def retained(self, topic: str, payload: bytes) -> bool:
        """True when a retained message with exactly `payload` sits on `topic` now.

        Raises BrokerUnavailable when the broker does not answer within `timeout`.
        """
        deadline = time.monotonic() + self.timeout
        with self._ask:
            if not self.connected.wait(max(0.0, deadline - time.monotonic())):
                raise BrokerUnavailable("the retain check (MQTT 3.1.1) is not connected to the broker")
            q = _Question(topic, payload)
            with self._cond:
                self._question = q
                self._answered.clear()
                generation = self._connects
            try:
                sub_rc, _ = self._client.subscribe(topic, qos=0)
                unsub_rc, mid = self._client.unsubscribe(topic)
                if sub_rc != mqtt.MQTT_ERR_SUCCESS or unsub_rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
                    raise BrokerUnavailable("the retain check (MQTT 3.1.1) lost its broker connection")
                with self._cond:
                    while mid not in self._answered:
                        left = deadline - time.monotonic()
                        if self._connects != generation:
                            raise BrokerUnavailable("the retain check (MQTT 3.1.1) lost its broker connection")
                        if left <= 0:
                            raise BrokerUnavailable(
                                f"the broker did not answer the retain check (MQTT 3.1.1) within {self.timeout:g} s"
                            )
                        self._cond.wait(left)
                    return q.found
            finally:
                with self._cond:
                    self._question = None

    # ------------------------------------------------------------------ network thread

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            ok, suppressed = self._errors.allow(("connect", str(rc)))
            if ok:
                log.error(
                    "retain_probe_connect_refused",
                    reason=str(rc),
                    client_id=self.client_id,
                    repeated=suppressed or None,
                    detail="MQTT 3.1.1 requests wait unacked until this second client of the daemon may connect "
                    "(same credentials; allow its client id in the broker)",
                )
            return
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: ReasonCode, _p: Any) -> None:
        self.connected.clear()
        with self._cond:
            self._connects += 1
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        q = self._question
        if q is not None and msg.retain and msg.topic == q.topic and msg.payload == q.payload:
            q.found = True

    def _on_unsubscribe(self, _c: mqtt.Client, _u: Any, mid: int, _rcs: Any, _p: Any) -> None:
        with self._cond:
            self._answered.add(mid)
            self._cond.notify_all()
