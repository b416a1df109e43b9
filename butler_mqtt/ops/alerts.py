"""Alerts where people look: one message per failed start, failed reload (after its last
retry), overdue execution, expired queue entry, and QRS outage (its start and its end), on an
MQTT topic and/or a webhook (`alerts` in the config).

Where they come from. The `Alerter` watches two streams, and nothing else:

* every new reply event (it is a `StartService` observer: every ingress, every chain stage,
  the tracker's later events; a replayed duplicate is not seen again, so it raises nothing):
  `task` with status `failed` -> `failedStart`; `task` with status `expired` -> `queueExpired`;
  `taskFinished` with status FinishedFail, Aborted, Error or Reset and no `retryIn` (the last
  attempt; an attempt that will be retried carries `retryIn`) -> `reloadFailed`;
  `taskOverdue` -> `overdue`. A reload is only seen to end when it is followed (`wait`,
  `then`, `retry` or `deadline`). One execution followed for several requests (ifRunning
  attach) raises one `reloadFailed` and one `overdue`; a queue entry several requests wait on
  (a joined rerun) raises one `queueExpired` or `failedStart`, naming the first of them.
* every QRS call (the QrsClient's call observer). A call without an answer (refused, timeout,
  TLS failure) or answered 5xx is a failure, any other answer a success. A failure at least
  `alerts.qrs_outage_after` seconds after the first one, with no success in between, raises
  `qrsOutage` (once); the next success raises `qrsRecovered` with how long QRS was down. The
  gauge `butler_mqtt_qrs_outage` follows the same state. (Outages are seen through calls: an
  idle daemon makes none, and then nobody waits for QRS either.)

Every alert is counted (`butler_mqtt_alerts_total{alert}`) and logged (`alert` line), also
when no sink is configured.

The message (JSON; every key present, null when it does not apply; its schema is
`replies.types.AlertMessage`, the alerts channel of the AsyncAPI document):

    {"alert": "reloadFailed", "severity": "error", "time": "2024-05-01T10:30:00.123Z",
     "instance": "butler-mqtt", "requestId": "r1", "taskId": "...", "taskName": "Finance daily",
     "executionId": "...", "status": "FinishedFail", "reason": null, "stage": null,
     "attempt": null, "runningForMs": null, "durationMs": 5012, "qrs": "https://qlik:4242",
     "since": null, "downForMs": null, "text": "Reload of 'Finance daily' ended FinishedFail (request r1)"}

`severity` is error (failedStart, reloadFailed, qrsOutage), warning (overdue, queueExpired)
or info (qrsRecovered); `status` is the reply event's status; `text` is one line for people
(a Slack or Teams incoming webhook shows it as the message).

Delivery never blocks a request: `observe` only classifies and hands the message to each
sink's bounded queue (when full, the oldest waiting message is dropped, counted and logged).
Each sink has its own thread, and sends in order:

* MQTT: QoS 1, not retained, on `alerts.topic`, over the daemon's own broker connection
  (queued by the client while the broker is away).
* webhook: `POST` of the JSON, `Content-Type: application/json`, the configured headers. No
  answer, 408, 429 and 5xx are retried with backoff (`retry_delay`, doubling, at most 60 s)
  up to `attempts` tries in all, waiting at least a 429/503's `Retry-After`; any other answer but
  2xx gives up at once. Each POST has a TOTAL deadline of `timeout` seconds (connect, send and
  answer together, however slowly a server drips it: ops/outbound.py), and at most
  ANSWER_CAP bytes of the answer are read (the rest is never read: the connection is closed).
  The URL and the header values are secrets: log lines name only the URL's scheme, host and port.

At least once: after a crash, a request that is resumed may send an alert for an event that
was already alerted before.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog
import urllib3

from butler_mqtt import __version__
from butler_mqtt.config import AlertsConfig, WebhookConfig
from butler_mqtt.ops import retry
from butler_mqtt.ops.metrics import Metrics, Recent
from butler_mqtt.ops.outbound import deadline, read_capped, watched_pool_manager
from butler_mqtt.ops.ratelimit import RateLimiter
from butler_mqtt.replies import Event
from butler_mqtt.replies.types import (
    ALERT_FIELDS,
    ALERT_KINDS,
    ALERT_SEVERITY,
    FAILED_FINAL,
    AlertKind,
)

log = structlog.get_logger("butler_mqtt.alerts")

#: The alert kinds, their severities and the message keys are those of the schema
#: (replies.types.AlertMessage, in the AsyncAPI document), so the two cannot drift apart.
KINDS = ALERT_KINDS
SEVERITY = ALERT_SEVERITY
#: Alerts about one execution: raised once per execution, however many requests follow it.
PER_EXECUTION = ("reloadFailed", "overdue")
#: The message keys besides alert/severity/time/instance/text, in order.
FIELDS = ALERT_FIELDS
RETRYABLE_STATUS = (408, 429)
#: Bytes of a webhook's answer read at most (only its status matters).
ANSWER_CAP = 64 * 1024
STOP_TIMEOUT_S = 5.0
#: Alerts waiting for the MQTT sink (it only hands them to the broker connection).
MQTT_QUEUE = 1000

PublishMqtt = Callable[[str, dict[str, Any]], None]


def alert_kind(ev: Event) -> AlertKind | None:
    """Which alert a reply event raises, if any (pure)."""
    kind, status = ev.get("event"), ev.get("status")
    if kind == "task":
        task_kinds: dict[str, AlertKind] = {"failed": "failedStart", "expired": "queueExpired"}
        return task_kinds.get(str(status))
    if kind == "taskFinished" and status in FAILED_FINAL and "retryIn" not in ev:
        return "reloadFailed"
    if kind == "taskOverdue":
        return "overdue"
    return None


def iso_now(now: float | None = None) -> str:
    t = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def message(alert: AlertKind, instance: str, fields: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The alert message (module docstring): every field present, `text` last."""
    msg: dict[str, Any] = {"alert": alert, "severity": SEVERITY[alert], "time": iso_now(now), "instance": instance}
    msg.update({f: fields.get(f) for f in FIELDS})
    msg["text"] = _text(msg)
    return msg


def from_event(alert: AlertKind, ev: Event, instance: str, qrs: str, caller: str | None = None) -> dict[str, Any]:
    return message(alert, instance, {**{f: ev.get(f) for f in FIELDS}, "qrs": qrs, "caller": caller or None})


def _minutes(ms: Any) -> str:
    seconds = int(ms or 0) // 1000
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{int(ms or 0) / 1000:.1f} s"


def _text(m: dict[str, Any]) -> str:
    task = f"'{m['taskName']}'" if m.get("taskName") else f"task {m.get('taskId')}"
    request = f" (request {m['requestId']})" if m.get("requestId") else ""
    reason = f": {m['reason']}" if m.get("reason") else ""
    alert = m["alert"]
    if alert == "failedStart":
        return f"Start of {task} failed{reason}{request}"
    if alert == "reloadFailed":
        attempt = f" after {m['attempt']} attempts" if m.get("attempt") else ""
        return f"Reload of {task} ended {m.get('status')}{attempt}{reason}{request}"
    if alert == "overdue":
        return f"Reload of {task} still running after {_minutes(m.get('runningForMs'))}{request}"
    if alert == "queueExpired":
        return f"{task[0].upper()}{task[1:]} waited too long in butler-mqtt's queue and was given up{reason}{request}"
    if alert == "qrsOutage":
        return f"QRS at {m.get('qrs')} is not answering since {m.get('since')}{reason}"
    return f"QRS at {m.get('qrs')} answers again after {_minutes(m.get('downForMs'))}"


class QrsOutage:
    """Outage start and end from the outcomes of QRS calls (module docstring). Thread-safe."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._lock = threading.Lock()
        self._first: tuple[float, float] | None = None  # first failure since the last success: (monotonic, wall)
        self._down: tuple[float, float] | None = None  # the outage raised: (monotonic, wall) of its first failure

    @property
    def down(self) -> bool:
        return self._down is not None

    def observe(self, status: int | None, route: str = "") -> tuple[AlertKind, dict[str, Any]] | None:
        """One call's outcome -> ("qrsOutage" | "qrsRecovered", fields) on a change, else None."""
        now = time.monotonic()
        with self._lock:
            if status is not None and status < 500:
                self._first, down = None, self._down
                self._down = None
                if down is None:
                    return None
                return "qrsRecovered", {"since": iso_now(down[1]), "downForMs": int((now - down[0]) * 1000)}
            if self._first is None:
                self._first = (now, time.time())
            if self._down is not None or now - self._first[0] < self.after_s:
                return None
            self._down = self._first
            what = "no answer (connection refused, timeout or TLS failure)" if status is None else f"HTTP {status}"
            return "qrsOutage", {"since": iso_now(self._first[1]), "reason": f"{what} on {route}" if route else what}


class Outbox:
    """A bounded queue drained in order by one thread calling `send`. Thread-safe; `put` never
    waits: when full, the oldest message is dropped (counted and logged)."""

    def __init__(
        self,
        name: str,
        size: int,
        send: Callable[[dict[str, Any]], None],
        metrics: Metrics,
        stopping: threading.Event | None = None,
    ) -> None:
        self.name = name
        self._send = send
        self._metrics = metrics
        # Each message with the logging context it was raised in: the sink thread's lines about
        # it carry the request's requestId (ops/logging.py).
        self._items: deque[tuple[dict[str, Any], contextvars.Context]] = deque()
        self._size = size
        self._cond = threading.Condition()
        self._busy = False
        self.stopping = stopping or threading.Event()  # set: stop (a retrying sender gives up)
        self._limiter = RateLimiter(60.0)
        self._thread = threading.Thread(target=self._run, name=f"alerts-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, msg: dict[str, Any]) -> None:
        with self._cond:
            if len(self._items) >= self._size:
                dropped, context = self._items.popleft()
                context.run(self._dropped, dropped)
            self._items.append((msg, contextvars.copy_context()))
            self._cond.notify()

    def _dropped(self, msg: dict[str, Any]) -> None:
        self._metrics.alert_deliveries.labels(self.name, "dropped").inc()
        ok, repeated = self._limiter.allow("dropped")
        if ok:
            log.error("alert_dropped", sink=self.name, alert=msg.get("alert"), repeated=repeated,
                      detail="too many alerts waiting for this sink: the oldest was dropped")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self.stopping.is_set():
                    self._cond.wait()
                if not self._items:
                    return
                msg, context = self._items.popleft()
                self._busy = True
            try:
                context.run(self._deliver, msg)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, msg: dict[str, Any]) -> None:
        try:
            self._send(msg)
        except Exception:  # noqa: BLE001 - the sink thread lives on
            log.exception("alert_send_failed", sink=self.name, alert=msg.get("alert"))

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for the queue to empty, then stop. Returns how many were left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._items or self._busy) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            left = len(self._items) + (1 if self._busy else 0)
            self.stopping.set()
            self._cond.notify_all()
        self._thread.join(1.0)
        return left


class Webhook:
    """POSTs one alert, retried (module docstring). Runs on its Outbox's thread."""

    def __init__(self, cfg: WebhookConfig, metrics: Metrics, stopping: threading.Event) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self._url = cfg.url.get_secret_value()
        u = urllib3.util.parse_url(self._url)
        self.where = f"{u.scheme}://{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"  # never the rest
        candidates = (self._url, u.request_uri, u.auth, *(v.get_secret_value() for v in cfg.headers.values()))
        self._secrets = sorted({s for s in candidates if s and s != "/"}, key=len, reverse=True)
        self._metrics = metrics
        self._stopping = stopping
        self._backoff = replace(retry.WEBHOOK, first=cfg.retry_delay)
        self._headers = {"Content-Type": "application/json", "User-Agent": f"butler-mqtt/{__version__}"}
        self._headers.update({k: v.get_secret_value() for k, v in cfg.headers.items()})
        self._pool = watched_pool_manager(
            timeout=urllib3.Timeout(connect=cfg.timeout, read=cfg.timeout),
            retries=False,
            cert_reqs="CERT_REQUIRED" if cfg.verify else "CERT_NONE",
            ca_certs=str(cfg.ca) if cfg.ca is not None else None,
        )
        self._limiter = RateLimiter(60.0)

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        for attempt in range(self.cfg.attempts):
            problem, retryable, hint = self._post(body)
            if problem is None:
                self._metrics.alert_deliveries.labels("webhook", "sent").inc()
                return
            last = attempt + 1 == self.cfg.attempts
            if not retryable or last or self._stopping.is_set():
                break
            delay = self._backoff.delay(attempt, hint)
            self._metrics.alert_deliveries.labels("webhook", "retried").inc()
            ok, repeated = self._limiter.allow(("retry", problem[:100]))
            if ok:
                log.warning("alert_webhook_retry", webhook=self.where, alert=msg["alert"], error=problem,
                            attempt=attempt + 1, retry_in_s=delay, repeated=repeated)
            if self._stopping.wait(delay):
                break
        self._metrics.alert_deliveries.labels("webhook", "failed").inc()
        log.error("alert_webhook_failed", webhook=self.where, alert=msg["alert"], error=problem,
                  attempts=attempt + 1, text=msg.get("text"))

    def _post(self, body: bytes) -> tuple[str | None, bool, float | None]:
        """(None, _, _) when delivered; else (what went wrong, worth retrying?, Retry-After s)."""
        late = f"no complete answer within alerts.webhook.timeout ({self.cfg.timeout:g} s in all)"
        with deadline(self.cfg.timeout) as d:
            try:
                resp = self._pool.request(
                    "POST", self._url, body=body, headers=self._headers, redirect=False, preload_content=False
                )
                _, more = read_capped(resp, ANSWER_CAP)  # only the status matters; never the whole answer
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                return (late if d.expired else f"{type(exc).__name__}: {self._scrub(str(exc))}"), True, None
        if d.expired:  # cut mid-answer: what was parsed (even a status) is not an answer
            resp.close()
            return late, True, None
        if more:
            resp.close()  # the rest is never read
        else:
            resp.release_conn()
        if 200 <= resp.status < 300:
            return None, False, None
        retryable = resp.status >= 500 or resp.status in RETRYABLE_STATUS
        return f"HTTP {resp.status}", retryable, retry.retry_after_seconds(resp.headers.get("Retry-After"))

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    def close(self) -> None:
        self._pool.clear()


class Alerter:
    """Turns reply events and QRS call outcomes into alerts; hands them to the sinks."""

    def __init__(
        self, cfg: AlertsConfig, metrics: Metrics, *, instance: str, qrs: str, publish: PublishMqtt | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.instance = instance
        self.qrs = qrs
        self.outage = QrsOutage(cfg.qrs_outage_after)
        self._seen = Recent()
        self.outboxes: list[Outbox] = []
        self.webhook: Webhook | None = None
        for kind in KINDS:
            metrics.alerts.labels(kind)
        if cfg.topic is not None and publish is not None:
            topic = cfg.topic

            def to_mqtt(msg: dict[str, Any]) -> None:
                publish(topic, msg)
                metrics.alert_deliveries.labels("mqtt", "sent").inc()

            self.outboxes.append(Outbox("mqtt", MQTT_QUEUE, to_mqtt, metrics))
        if cfg.webhook.url is not None:
            stopping = threading.Event()
            self.webhook = Webhook(cfg.webhook, metrics, stopping)
            self.outboxes.append(Outbox("webhook", cfg.webhook.queue, self.webhook.send, metrics, stopping))

    def start(self) -> Alerter:
        for box in self.outboxes:
            box.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Send what is waiting (up to `timeout` s in all), then stop the sink threads."""
        deadline = time.monotonic() + timeout
        for box in self.outboxes:
            left = box.drain(max(0.0, deadline - time.monotonic()))
            if left:
                log.warning("alerts_not_sent", sink=box.name, count=left, detail="the daemon stopped before they were sent")
        if self.webhook is not None:
            self.webhook.close()

    def observe(self, ev: Event) -> None:
        """A StartService observer: one new reply event."""
        kind = alert_kind(ev)
        if kind is None:
            return
        if kind in PER_EXECUTION and ev.get("executionId") and not self._seen.first((kind, ev["executionId"])):
            return  # the same execution, followed for another request too (ifRunning attach)
        # The caller of the work on this thread (bound by the use case and the tracker).
        caller = structlog.contextvars.get_contextvars().get("caller")
        self.raise_alert(from_event(kind, ev, self.instance, self.qrs, str(caller) if caller else None))

    def observe_qrs(self, method: str, route: str, status: int | None, seconds: float) -> None:
        """A QrsClient call observer (same signature as Metrics.observe_qrs)."""
        change = self.outage.observe(status, f"{method} {route}")
        if change is None:
            return
        kind, fields = change
        self.metrics.qrs_outage.set(1 if kind == "qrsOutage" else 0)
        self.raise_alert(message(kind, self.instance, {**fields, "qrs": self.qrs}))

    def raise_alert(self, msg: dict[str, Any]) -> None:
        self.metrics.alerts.labels(msg["alert"]).inc()
        level = log.info if msg["severity"] == "info" else log.warning
        level("alert", alert=msg["alert"], requestId=msg["requestId"], taskId=msg["taskId"],
              executionId=msg["executionId"], text=msg["text"])
        for box in self.outboxes:
            box.put(msg)


def observers(*fns: Callable[[str, str, int | None, float], None]) -> Callable[[str, str, int | None, float], None]:
    """Several QRS call observers as one (QrsClient takes one)."""

    def each(method: str, route: str, status: int | None, seconds: float) -> None:
        for fn in fns:
            fn(method, route, status, seconds)

    return each


__all__ = ["KINDS", "Alerter", "QrsOutage", "alert_kind", "message", "observers"]
