"""Queue ticks: run the queue runner (queueing.py) about once a second while the queue holds
anything, follow the executions it started (slots, reruns), free a slot when one ends, and tell
waited requests what became of their queued tasks (started by any instance)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from butler_mqtt.errors import ButlerError
from butler_mqtt.journal import Journal
from butler_mqtt.queueing import QueueRunner
from butler_mqtt.tracking.polling import Poller
from butler_mqtt.tracking.records import Pending
from butler_mqtt.tracking.waits import Waits

log = structlog.get_logger("butler_mqtt.tracking")

#: A waited request's queued task is done: (its key, the queue entry id, the entry's outcome).
QueuedDone = Callable[[str, str, dict[str, Any]], None]


class QueueTicks:
    """Thread-safe; one tick at a time (the runner skips a tick while one runs)."""

    def __init__(self, runner: QueueRunner, journal: Journal, waits: Waits, poller: Poller, max_wait: float) -> None:
        self.runner = runner
        self.journal = journal
        self.waits = waits
        self.poller = poller
        self.max_wait = max_wait
        self._lock = threading.Lock()
        self._watched: set[str] = set()  # executions the queue needs (slots, reruns) beyond the waits
        self._watch_started: dict[str, float] = {}
        self._done: QueuedDone | None = None

    def attach(self, done: QueuedDone) -> None:
        self._done = done

    def watched(self) -> dict[str, Pending]:
        with self._lock:
            return {eid: Pending(eid, "", "", None, self._watch_started.get(eid, time.time()),
                                 self._watch_started.get(eid, time.time()) + self.max_wait) for eid in self._watched}

    def set_watched(self, watched: set[str]) -> None:
        with self._lock:
            new = watched - self._watched
            now = time.time()
            for eid in new:
                self._watch_started.setdefault(eid, now)
            self._watched = watched
            for eid in list(self._watch_started):
                if eid not in watched:
                    del self._watch_started[eid]
        if new:
            self.poller.schedule(self.poller.cfg.first_poll)

    def recover(self) -> None:
        """At start: the entries whose start was being sent (QRS is asked; never started twice)."""
        try:
            self.runner.recover()
        except ButlerError as exc:
            log.warning("queue_recovery_failed", error=str(exc))

    def maintain(self) -> None:
        """Renew the queue's leases, take over a dead instance's, see what to follow (raises ButlerError)."""
        self.runner.maintain()
        self.set_watched(set(self.journal.runq.watched()) if self.runner.active else set())

    def ended(self, eid: str) -> None:
        """A followed execution ended: free its slot (if the queue holds one for it)."""
        with self._lock:
            watched = eid in self._watched
            self._watched.discard(eid)
        if watched or self.runner.active:
            try:
                if self.journal.runq.ended([eid]):
                    self.poller.queue_changed()
            except ButlerError as exc:
                log.warning("queue_slot_not_freed", executionId=eid, error=str(exc))

    def tick(self) -> None:
        self.runner.tick()
        try:
            watched = set(self.journal.runq.watched())
            more = self.journal.runq.pending_work()
        except ButlerError as exc:
            log.warning("queue_watch_failed", error=str(exc))
            with self._lock:
                watched, more = set(self._watched), True
        self.set_watched(watched)
        self._collect_queued()
        if more or self.waits.any_queued():
            self.poller.queue_in(self.poller.QUEUE_TICK_S)

    def _collect_queued(self) -> None:
        """Waited requests learn what became of their queued tasks (started by any instance)."""
        asked = self.waits.queued_entries()
        if not asked or self._done is None:
            return
        try:
            outcomes = self.journal.runq.outcomes(asked)
        except ButlerError as exc:
            log.warning("queue_outcomes_failed", error=str(exc))
            return
        for entry_id, outcome in outcomes.items():
            self._done(asked[entry_id], str(entry_id), outcome)
