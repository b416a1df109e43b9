"""MQTT 3.1.1: was this request published with the retain flag?

With MQTT 5 the daemon subscribes with Retain As Published, so a retained request shows
`retain=1` however it arrives. MQTT 3.1.1 has no such option: the broker clears the flag on
every live delivery (3.1.1 section 3.3.1.3), so a retained request published while the daemon
is subscribed looks like any other. A retained request must never be acted on (it would fire
again on every resubscribe), so for 3.1.1 the daemon asks this probe before acting.

The probe is one extra clean-session client of ours (same credentials and TLS). A question is a
SUBSCRIBE for the request's exact topic with an UNSUBSCRIBE right behind it. A broker sends the
retained message of a new subscription before it handles the client's next packet (Mosquitto
queues it while handling the SUBSCRIBE), and answers in order, so everything that arrives
between the previous UNSUBACK and this question's UNSUBACK is this question's retained
message. Questions are therefore pipelined (no lock around the round trip) and attributed by
order. The request counts as retained when a retained message with the identical payload sits
on its topic.

Decisions:
* The question is sent as soon as the request arrives (`ask(job)`, from the network thread,
  non-blocking), not when a worker gets to it, so a retained request cleared or replaced by
  its publisher while it waited in the queue is still caught. The worker then only waits for
  the answer (`retained(job)`), normally long in.
* No answer within `timeout` (probe disconnected, broker stuck): `BrokerUnavailable`, which
  the daemon treats like an unavailable QRS: the request stays unacked and is retried with
  backoff. Guessing "not retained" could start a retained request; guessing "retained" would
  refuse a good one with a misleading error. Waiting is the answer that is never wrong.
* A non-retained request whose payload is identical to a retained message on the same topic
  is refused as retained: the retained copy would fire on the next resubscribe anyway, and the
  error tells the publisher to clear it.
* Only the length and SHA-256 of a retained message are kept, never the payload itself.
* Not detected: a retained request that its publisher cleared or replaced by another retained
  message within the round trip from broker to daemon and back (well under a millisecond on
  one host). Use MQTT 5, or Mosquitto's `retain_available false`, where that matters.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from butler_mqtt.config import MqttConfig
from butler_mqtt.errors import BrokerUnavailable
from butler_mqtt.mqtt.listener import Job, apply_credentials
from butler_mqtt.ops.ratelimit import RateLimiter

log = structlog.get_logger("butler_mqtt.mqtt")

PROBE_TIMEOUT_S = 5.0


def _fingerprint(payload: bytes) -> tuple[int, bytes]:
    return len(payload), hashlib.sha256(payload).digest()


class _Question:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.seen: list[tuple[int, bytes]] = []  # fingerprints of the topic's retained messages
        self.done = False
        self.failed: str | None = None
        self.answered = threading.Event()  # done or failed (one event each: no thundering herd)

    def matches(self, payload: bytes) -> bool:
        return any(n == len(payload) for n, _ in self.seen) and _fingerprint(payload) in self.seen


class RetainProbe:
    """`ask(job)` when a request arrives, `retained(job)` before acting on it; or
    `retained_now(topic, payload)` for a single blocking question. Thread-safe."""

    def __init__(self, cfg: MqttConfig, client_id: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.timeout = timeout
        self.client_id = f"{client_id}-retain-probe"[:128]
        self.connected = threading.Event()
        self._send = threading.Lock()  # keeps each SUBSCRIBE/UNSUBSCRIBE pair in queue order
        self._lock = threading.Lock()  # guards _pending and the questions in it
        self._pending: deque[_Question] = deque()  # sent, UNSUBACK not yet back; oldest first
        self._asked: dict[int, _Question] = {}  # id(job) -> its question, until used or the job is gone
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
        self._fail_pending("the retain check (MQTT 3.1.1) was stopped")

    # ------------------------------------------------------------------ questions

    def ask(self, job: Job) -> None:
        """Send the question for `job` now (non-blocking; called on arrival, network thread)."""
        if job.retained or not job.payload or not self.connected.is_set():
            return  # nothing to ask, or the worker asks itself once the probe is connected
        q = self._send_question(job.topic)
        if q.failed is None:
            key = id(job)
            self._asked[key] = q
            weakref.finalize(job, self._asked.pop, key, None)  # a job dropped unhandled

    def retained(self, job: Job) -> bool:
        """True when a retained message with exactly `job.payload` sat on its topic when the
        job arrived (or now, if it was not asked then). Raises BrokerUnavailable."""
        if not job.payload:
            return False
        q = self._asked.pop(id(job), None)
        if q is None or (q.failed is not None and not q.done):
            return self.retained_now(job.topic, job.payload)
        return self._answer(q, job.payload, time.monotonic() + self.timeout)

    def retained_now(self, topic: str, payload: bytes) -> bool:
        """Ask now and wait for the answer. Raises BrokerUnavailable."""
        deadline = time.monotonic() + self.timeout
        if not self.connected.wait(self.timeout):
            raise BrokerUnavailable("the retain check (MQTT 3.1.1) is not connected to the broker")
        return self._answer(self._send_question(topic), payload, deadline)

    def _send_question(self, topic: str) -> _Question:
        q = _Question(topic)
        with self._send:
            with self._lock:
                self._pending.append(q)  # before sending: the answer may come back at once
            sub_rc, _ = self._client.subscribe(topic, qos=0)
            unsub_rc, _ = self._client.unsubscribe(topic) if sub_rc == mqtt.MQTT_ERR_SUCCESS else (sub_rc, None)
            if sub_rc != mqtt.MQTT_ERR_SUCCESS:
                with self._lock:  # nothing was sent: the order of the others is unchanged
                    if q in self._pending:
                        self._pending.remove(q)
                    q.failed = "the retain check (MQTT 3.1.1) lost its broker connection"
                    q.answered.set()
            elif unsub_rc != mqtt.MQTT_ERR_SUCCESS:
                self._fail_pending("the retain check (MQTT 3.1.1) lost its broker connection")
        return q

    def _answer(self, q: _Question, payload: bytes, deadline: float) -> bool:
        if not q.answered.wait(max(0.0, deadline - time.monotonic())):
            raise BrokerUnavailable(f"the broker did not answer the retain check (MQTT 3.1.1) within {self.timeout:g} s")
        if not q.done:
            raise BrokerUnavailable(q.failed or "the retain check (MQTT 3.1.1) failed")
        return q.matches(payload)

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            for q in self._pending:
                q.failed = why
                q.answered.set()
            self._pending.clear()

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
        self._fail_pending("the retain check (MQTT 3.1.1) lost its broker connection")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.retain:
            return
        with self._lock:
            head = self._pending[0] if self._pending else None
            if head is not None and msg.topic == head.topic:
                head.seen.append(_fingerprint(bytes(msg.payload)))

    def _on_unsubscribe(self, _c: mqtt.Client, _u: Any, _mid: int, _rcs: Any, _p: Any) -> None:
        # Answers come back in the order the questions were sent: this one is the oldest's.
        with self._lock:
            q = self._pending.popleft() if self._pending else None
        if q is not None:
            q.done = True
            q.answered.set()
