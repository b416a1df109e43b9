"""The waited requests of this instance: held in memory, saved to the journal on each change,
taken over after a restart (our own records) or from an instance that died (its orphans)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from butler_mqtt.errors import ButlerError
from butler_mqtt.journal import Journal
from butler_mqtt.tracking.records import Pending, Waited, bound

log = structlog.get_logger("butler_mqtt.tracking")


class Waits:
    """Thread-safe. Change a record only inside `locked()`, then `save` it there."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.RLock()
        self._waited: dict[str, Waited] = {}

    @contextmanager
    def locked(self) -> Iterator[dict[str, Waited]]:
        with self._lock:
            yield self._waited

    def get(self, key: str) -> Waited | None:
        with self._lock:
            return self._waited.get(key)

    def add(self, w: Waited) -> None:
        with self._lock:
            self._waited[w.key] = w
            self.save(w)

    def drop(self, w: Waited) -> None:
        with self._lock:
            self._waited.pop(w.key, None)
        try:
            self.journal.drop_wait(w.key)
        except ButlerError as exc:
            with bound(w):
                log.error("journal_write_failed", error=str(exc))

    def save(self, w: Waited) -> None:
        try:
            self.journal.save_wait(w.key, w.to_json())
        except ButlerError as exc:
            with bound(w):  # whichever thread saves it (the poller checking deadlines, too)
                log.error("wait_record_not_saved", error=str(exc))

    def pending(self) -> dict[str, Pending]:
        """Every execution a waited request follows."""
        with self._lock:
            return {eid: p for w in self._waited.values() for eid, p in w.pending.items()}

    def following(self) -> int:
        with self._lock:
            return sum(len(w.pending) for w in self._waited.values())

    def running_tasks(self) -> dict[str, str]:
        """Task id -> execution id of what is followed and has not been seen to end."""
        with self._lock:
            return {p.task_id: eid for w in self._waited.values() for eid, p in w.pending.items()}

    def following_execution(self, eid: str) -> list[Waited]:
        with self._lock:
            return [w for w in self._waited.values() if eid in w.pending]

    def queued_entries(self) -> dict[int, str]:
        """Queue entry id -> the key of the waited request whose task waits on it."""
        with self._lock:
            return {int(e): w.key for w in self._waited.values() for e in w.queued}

    def any_queued(self) -> bool:
        with self._lock:
            return any(w.queued for w in self._waited.values())

    def adopt(self, records: list[tuple[str, str]], resume: Callable[[Waited], None]) -> None:
        """Take these stored records (ours after a restart, or a dead instance's) and `resume` each."""
        for key, text in records:
            with self._lock:
                if key in self._waited:
                    continue
            try:
                w = Waited.from_json(text)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("wait_record_unreadable", key=key, error=str(exc))
                continue
            with self._lock:
                self._waited[w.key] = w
            resume(w)
