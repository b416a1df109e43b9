"""The polling thread: ONE backend query per interval for every execution in flight across all
requests and the queue (QRS: `GET /qrs/executionresult/full?filter=executionID eq A or ...`,
chunked only when the filter gets too long).

Final states (qrs-api.md 6.4): Aborted, FinishedSuccess, FinishedFail, Skipped, Error, Reset;
Retry, Queued, AbortInitiated and Aborting are not final. An execution that cannot be followed
ends as `Unknown` with a reason: no result and no execution session after a grace period, or
`tracking.max_wait` reached. The same thread wakes the queue ticks and the lease maintenance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from butler_mqtt.backends.base import Backend, Execution
from butler_mqtt.config import TrackingConfig
from butler_mqtt.errors import QrsError, is_transient
from butler_mqtt.tracking.records import Pending
from butler_mqtt.tracking.timers import Timers
from butler_mqtt.tracking.waits import Waits

log = structlog.get_logger("butler_mqtt.tracking")

#: An execution ended: (execution id, final status, its times or None, reason or None).
Ended = Callable[[str, str, Mapping[str, Any] | None, str | None], None]


class QueueWork(Protocol):
    """What the poller runs for the queue (tracking/queue_ticks.py)."""

    def watched(self) -> dict[str, Pending]: ...

    def tick(self) -> None: ...


class Poller:
    """The tracker's thread. Thread-safe: `schedule` and `queue_changed` from anywhere."""

    QUEUE_TICK_S = 1.0

    def __init__(self, cfg: TrackingConfig, backend: Backend, waits: Waits, timers: Timers, lease_s: float) -> None:
        self.cfg = cfg
        self.backend = backend
        self.waits = waits
        self.timers = timers
        self._maintain_every = lease_s / 3
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._next_poll: float | None = None
        self._queue_due: float | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self.polls = 0
        self._refused_since: float | None = None
        self.grace_s = max(30.0, 3 * cfg.poll_interval)
        self._ended: Ended | None = None
        self._running: Callable[[str], None] | None = None
        self._queue: QueueWork | None = None
        self._maintain: Callable[[], None] | None = None

    def attach(self, ended: Ended, running: Callable[[str], None], queue: QueueWork, maintain: Callable[[], None]) -> None:
        """Where the poll's findings go, what runs the queue and the lease maintenance
        (runtime.build wires this once)."""
        self._ended, self._running, self._queue, self._maintain = ended, running, queue, maintain

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def schedule(self, delay: float) -> None:
        """Poll within `delay` seconds (sooner if already due)."""
        with self._lock:
            at = time.monotonic() + delay
            if self._next_poll is None or at < self._next_poll:
                self._next_poll = at
                self._wake.notify_all()

    def queue_changed(self) -> None:
        """Something was queued, a slot freed or a rerun became due: run the queue soon."""
        self.queue_in(0.0)

    def queue_in(self, delay: float) -> None:
        with self._lock:
            at = time.monotonic() + delay
            if self._queue_due is None or at < self._queue_due:
                self._queue_due = at
                self._wake.notify_all()

    def _wait(self, next_maintenance: float) -> tuple[bool, bool] | None:
        """Sleep until something is due; (poll due, queue due), None when stopping."""
        with self._lock:
            while not self._stop:
                now = time.monotonic()
                wakes = [t for t in (self._next_poll, self._queue_due, next_maintenance) if t is not None]
                if now >= min(wakes):
                    break
                self._wake.wait(min(wakes) - now)
            if self._stop:
                return None
            now = time.monotonic()
            due = self._next_poll is not None and now >= self._next_poll
            if due:
                self._next_poll = None
            queue_due = self._queue_due is not None and now >= self._queue_due
            if queue_due:
                self._queue_due = None
            return due, queue_due

    def _run(self) -> None:
        assert self._queue is not None and self._maintain is not None, "runtime.build attaches the poller"
        next_maintenance = time.monotonic() + self._maintain_every
        while True:
            woke = self._wait(next_maintenance)
            if woke is None:
                return
            due, queue_due = woke
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + self._maintain_every
                self._maintain()
            if queue_due:
                self.timers.submit(self._queue.tick)
            pending = {**self._queue.watched(), **self.waits.pending()} if due else {}
            if due and pending:
                try:
                    self._poll(pending)
                except Exception:  # never let one bad answer stop the tracking thread
                    log.exception("tracking_poll_failed")
                self.schedule(self.cfg.poll_interval)

    def _ask(self, pending: dict[str, Pending]) -> tuple[dict[str, Execution] | None, str | None]:
        """The backend's answer for every pending execution (None: it could not say), and
        why to give up on them all (it refused to tell for longer than the grace period)."""
        try:
            rows = self.backend.executions(list(pending))
            self._refused_since = None
            return rows, None
        except QrsError as exc:
            log.warning("tracking_poll_failed", error=str(exc), executions=len(pending))
            if not is_transient(exc):  # QRS refuses to tell: give up after the grace period
                self._refused_since = self._refused_since or time.monotonic()
                if time.monotonic() - self._refused_since > self.grace_s:
                    return None, f"QRS refuses to report executions: {exc}"
            return None, None

    def _poll(self, pending: dict[str, Pending]) -> None:
        assert self._ended is not None and self._running is not None
        self.polls += 1
        rows, refused = self._ask(pending)
        now = time.monotonic()
        for eid, p in pending.items():
            state = rows.get(eid) if rows is not None else None
            row = state.times() if state is not None else None
            if state is not None and state.final is not None:
                self._ended(eid, state.final, row, None)
            elif refused is not None:
                self._ended(eid, "Unknown", None, refused)
            elif now > p.mono_deadline:
                self._ended(eid, "Unknown", row, f"still not finished after tracking.max_wait ({self.cfg.max_wait:.0f} s)")
            elif rows is not None and row is None and now - p.mono_started > self.grace_s:
                # No result row yet: if the session is gone too, nobody can tell the outcome.
                try:
                    gone = not self.backend.execution_exists(eid)
                except QrsError:
                    gone = False
                if gone:
                    self._ended(eid, "Unknown", None, "the execution session ended and QRS has no result for it")
            else:
                self._running(eid)
