"""The MQTT edge's worker pool: deliveries from paho's network thread to the request handler.

Workers take jobs from a queue fed by the network thread (`enqueue`); each job is acked only
after its replies were accepted by the broker (mqtt/handler.py). A request QRS cannot resolve
(outage, 5xx) or the journal cannot record is kept unacked and retried with backoff: it is
never dropped and never answered with a guess.

The queue is never bounded by blocking: a full queue would block paho's network thread, which
must keep reading PUBACKs for the replies the workers wait on (a deadlock). It is bounded in
bytes instead (`mqtt.queue_bytes`): a delivery beyond it is left unacked and the broker sends
it again once the queue has drained (`MqttListener.request_redelivery`). The broker bounds the
rest: Receive Maximum, and its per-client queue (`max_queued_messages`). Measured on Mosquitto
2.0.11: Receive Maximum is not enforced any more once the client acks.

Each job runs in a fresh `contextvars.Context`: what the handler binds for one request (its
`requestId`) is on every log line of that request and on none of the next one's.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time

import structlog

from butler_mqtt.mqtt.handler import RequestHandler
from butler_mqtt.mqtt.listener import Job, MqttListener
from butler_mqtt.mqtt.retain_probe import RetainProbe

log = structlog.get_logger("butler_mqtt.mqtt.workers")


class WorkerPool:
    """`size` threads handling the jobs `enqueue` takes; `drain` ends them at shutdown."""

    def __init__(
        self, handler: RequestHandler, listener: MqttListener, queue_bytes: int, retain_probe: RetainProbe | None = None
    ) -> None:
        self.handler = handler
        self.listener = listener
        self.queue_bytes = queue_bytes
        self.retain_probe = retain_probe
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.busy = 0  # jobs being handled right now
        self.queued_bytes = 0  # payload bytes taken and not yet handled

    def start(self, size: int) -> None:
        for i in range(size):
            t = threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    @property
    def alive(self) -> bool:
        """Every worker thread runs (gates the systemd watchdog)."""
        return all(t.is_alive() for t in self.threads)

    def idle(self) -> bool:
        """No job queued or being handled."""
        return self.busy == 0 and self.jobs.empty()

    def enqueue(self, job: Job) -> bool:
        """Called in paho's network thread: never blocks. False: not taken (queue full)."""
        size = len(job.payload)
        with self._lock:
            if self.queued_bytes + size > self.queue_bytes and self.queued_bytes > 0:
                return False
            self.queued_bytes += size
        if self.retain_probe is not None:
            self.retain_probe.ask(job)  # 3.1.1: ask on arrival, while a retained copy is surely there
        self.jobs.put(job)
        return True

    def drain(self, deadline: float) -> int:
        """Drop what is queued (unacked: the broker redelivers it to the next run), end every
        worker once its job is done, waiting until `deadline` (monotonic) at most. Returns how
        many jobs were still being handled then."""
        try:
            while True:
                self.jobs.get_nowait()
        except queue.Empty:
            pass
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.busy

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                self.busy += 1
                self.queued_bytes -= len(job.payload)
            try:
                contextvars.Context().run(self._handle, job)
            finally:
                with self._lock:
                    self.busy -= 1
                    drained = self.queued_bytes < self.queue_bytes // 2
            if drained and self.listener.refused:
                self.listener.request_redelivery()

    def _handle(self, job: Job) -> None:
        try:
            self.handler.deliver(job)
        except Exception as exc:  # deliver answers everything; this is the last resort
            try:
                self.handler.last_resort(job, exc)
            except Exception:  # noqa: BLE001 - the worker must live on
                # Not even the ack could be sent (the broker is gone): left for redelivery.
                log.exception("worker_error_unanswered", topic=job.topic)
                self.listener.release(job)
                self.listener.request_redelivery()
