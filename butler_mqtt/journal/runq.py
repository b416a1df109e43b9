"""butler-mqtt's durable run queue and its running-slot count (contract section 7), in the journal.

Tables (migration 2):

* `runq`: one entry per task waiting to be started -- a *rerun* (`ifRunning: queue`: waits for
  `after_execution` to end) or a wait for a *slot* (`max_running`). At most one entry per task
  waits: later requests join it. States: `waiting` -> `starting` (claimed by one instance, which
  sends the start) -> `done` (with the start's outcome, or `expired` after `queue_timeout`).
* `runq_waiters`: the requests waiting on an entry (their reply route, stage, matchedBy). Any
  instance that starts or expires an entry publishes each waiter's `task` event itself, so a
  waiter never depends on the instance that queued it being alive.
* `runs`: reloads started by butler-mqtt and counted against `max_running`, until the tracker
  of the instance owning the row sees them end. Rows and `runq` entries carry an owner and a
  lease, like requests and waits: a surviving instance takes over those of a dead one.

Claims are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction advisory lock), so
two instances never hand out the same slot or start the same entry twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from butler_mqtt.model import Route

if TYPE_CHECKING:
    from butler_mqtt.journal import Journal

#: Key for `pg_advisory_xact_lock`: one claimer of queue entries and slots at a time.
_QUEUE_LOCK = 4242424243
_NO_STAGE = -1  # a NULL stage cannot be part of a primary key


@dataclass(frozen=True)
class Waiter:
    """One request waiting on a queue entry."""

    key: str
    request_id: str | None
    task_id: str
    stage: int | None
    route: Route
    matched_by: list[str] = field(default_factory=list)
    attempt: int | None = None
    journaled: bool = True  # False: the request has no journal key (its events are not recorded)


@dataclass(frozen=True)
class Wanted:
    """A task one request wants started through the queue."""

    task_id: str
    task_name: str
    priority: int
    waiter: Waiter
    after_execution: str | None = None  # rerun: wait for this execution to end


@dataclass(frozen=True)
class Queued:
    """Where a wanted task went: entry, joined an existing one?, position (1 = next)."""

    entry_id: int
    joined: bool
    position: int


@dataclass(frozen=True)
class Entry:
    id: int
    task_id: str
    task_name: str
    needs_slot: bool
    created: float


class _OnJournal:
    """A part of the run queue, on the journal's database."""

    def __init__(self, journal: Journal) -> None:
        self.j = journal

    def _lock(self) -> None:
        if self.j.dialect == "postgresql":
            self.j._db.run("SELECT pg_advisory_xact_lock(?)", (_QUEUE_LOCK,))


class RunQueue(_OnJournal):
    """The queue operations, on the journal's database: asking, queueing, dispatching, waiters.
    Its upkeep (expiry, leases, take-over, purge) is `QueueUpkeep`; the methods here delegate."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.upkeep = QueueUpkeep(journal)

    # ------------------------------------------------------------------ asking

    def state_of(self, task_ids: Sequence[str]) -> tuple[dict[str, str], dict[str, int]]:
        """(task -> execution id started by butler-mqtt and not seen end, task -> waiting entry)."""
        if not task_ids:
            return {}, {}
        marks = ",".join("?" * len(task_ids))
        with self.j._guard("read"):
            runs = self.j._db.run(f"SELECT task_id, execution_id FROM runs WHERE task_id IN ({marks})", tuple(task_ids))
            entries = self.j._db.run(
                f"SELECT task_id, id FROM runq WHERE state IN ('waiting', 'starting') AND task_id IN ({marks})",
                tuple(task_ids),
            )
        return {str(t): str(e) for t, e in runs}, {str(t): int(i) for t, i in entries}

    def counts(self) -> tuple[int, int, int]:
        """(entries waiting, requests waiting on them, butler-mqtt's reloads running) for /metrics."""
        with self.j._guard("read"):
            waiting = self.j._db.run("SELECT count(*) FROM runq WHERE state = 'waiting'")[0][0]
            waiters = self.j._db.run(
                "SELECT count(*) FROM runq_waiters w JOIN runq q ON q.id = w.entry_id WHERE q.state = 'waiting'"
            )[0][0]
            running = self.j._db.run("SELECT count(*) FROM runs")[0][0]
        return int(waiting), int(waiters), int(running)

    def watched(self) -> list[str]:
        """Executions this instance must follow for the queue: its counted runs, and what its
        reruns wait for."""
        with self.j._guard("read"):
            rows = self.j._db.run("SELECT execution_id FROM runs WHERE owner = ?", (self.j.owner,))
            rows += self.j._db.run(
                "SELECT DISTINCT after_execution FROM runq WHERE state = 'waiting' AND after_execution IS NOT NULL"
                " AND owner = ?",
                (self.j.owner,),
            )
        return [str(r[0]) for r in rows]

    def outcomes(self, entry_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Outcomes of entries that are done (for the tracker of a waiting request)."""
        ids = list(entry_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self.j._guard("read"):
            rows = self.j._db.run(
                f"SELECT id, outcome, task_name FROM runq WHERE state = 'done' AND id IN ({marks})", tuple(ids)
            )
        return {int(i): {**json.loads(o), "taskName": str(n)} for i, o, n in rows}

    def pending_work(self) -> bool:
        with self.j._guard("read"):
            return bool(self.j._db.run("SELECT 1 FROM runq WHERE state <> 'done' LIMIT 1"))

    # ------------------------------------------------------------------ queueing

    def enqueue(self, wanted: Sequence[Wanted], queue_timeout: float, needs_slot: bool) -> list[Queued]:
        """Add each task (joining the entry already waiting for it), in one transaction."""
        now = time.time()
        out: list[Queued] = []
        with self.j._guard("write"), self.j._db.tx() as db:
            self._lock()
            for w in wanted:
                # An entry whose start is being sent right now is joined too: its execution
                # starts after this request arrived, so it serves this request as well.
                rows = db.run(
                    "SELECT id, priority, state FROM runq WHERE state IN ('waiting', 'starting') AND task_id = ?"
                    " ORDER BY id", (w.task_id,),
                )
                if rows:
                    entry_id, joined = int(rows[0][0]), True
                    if w.priority > int(rows[0][1]) and rows[0][2] == "waiting":
                        db.run("UPDATE runq SET priority = ? WHERE id = ?", (w.priority, entry_id))
                else:
                    entry_id, joined = self._insert(db, w, now, queue_timeout, needs_slot), False
                self._add_waiter(db, entry_id, w.waiter)
                out.append(Queued(entry_id, joined, self._position(db, entry_id)))
        return out

    def _insert(self, db: Any, w: Wanted, now: float, queue_timeout: float, needs_slot: bool) -> int:
        rows = db.run(
            "INSERT INTO runq(task_id, task_name, priority, created, expires, after_execution, state, needs_slot,"
            " owner, lease_until, updated) VALUES (?, ?, ?, ?, ?, ?, 'waiting', ?, ?, ?, ?) RETURNING id",
            (w.task_id, w.task_name, w.priority, now, now + queue_timeout, w.after_execution, int(needs_slot),
             self.j.owner, now + self.j.lease_s, now),
        )
        return int(rows[0][0])

    @staticmethod
    def _add_waiter(db: Any, entry_id: int, w: Waiter) -> None:
        route = json.dumps({"topic": w.route.topic, "correlation": w.route.correlation})
        stage = _NO_STAGE if w.stage is None else w.stage
        db.run(
            "INSERT INTO runq_waiters(entry_id, key, request_id, task_id, stage, route, matched_by, attempt, journaled,"
            " notified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (key, task_id, stage) DO NOTHING",
            (entry_id, w.key, w.request_id, w.task_id, stage, route, json.dumps(w.matched_by), w.attempt, int(w.journaled)),
        )

    @staticmethod
    def _position(db: Any, entry_id: int) -> int:
        """1 = next: entries waiting ahead (priority, then arrival) + 1; 1 for one being started."""
        rows = db.run(
            "SELECT count(*) FROM runq a, runq b WHERE b.id = ? AND a.state = 'waiting' AND b.state = 'waiting'"
            " AND (a.priority > b.priority OR (a.priority = b.priority AND a.id < b.id))",
            (entry_id,),
        )
        return int(rows[0][0]) + 1

    def positions(self, entry_ids: Iterable[int]) -> dict[int, int]:
        """Where these entries stand now (1 = next), e.g. after some were claimed."""
        with self.j._guard("read"):
            return {i: self._position(self.j._db, i) for i in entry_ids}

    # ------------------------------------------------------------------ dispatching

    def claim(self, max_running: int, only: set[int] | None = None) -> list[Entry]:
        """Mark the entries that may start now `starting` (ours): priority, then arrival; within
        the free slots when `max_running` > 0. `only`: claim only these of the entries due (a
        request starting its own tasks inline leaves the others to the queue runner)."""
        now = time.time()
        with self.j._guard("claim"), self.j._db.tx() as db:
            self._lock()
            sql = ("SELECT id, task_id, task_name, needs_slot, created FROM runq WHERE state = 'waiting'"
                   " AND after_execution IS NULL AND expires >= ? ORDER BY priority DESC, id")
            due = [Entry(int(i), str(t), str(n), bool(s), float(c)) for i, t, n, s, c in db.run(sql, (now,))]
            if max_running > 0:
                busy = db.run("SELECT count(*) FROM runs")[0][0]
                busy += db.run("SELECT count(*) FROM runq WHERE state = 'starting' AND needs_slot = 1")[0][0]
                due = due[: max(0, max_running - int(busy))]
            if only is not None:
                due = [e for e in due if e.id in only]
            for e in due:
                db.run(
                    "UPDATE runq SET state = 'starting', owner = ?, lease_until = ?, updated = ? WHERE id = ?",
                    (self.j.owner, now + self.j.lease_s, now, e.id),
                )
        return due

    def started(self, done: Sequence[tuple[Entry, dict[str, Any], str | None]]) -> None:
        """Record claimed entries' start outcomes (one transaction); a started reload of an entry
        that needed a slot holds it. The waiter named with each (the request that started it
        inline) is told."""
        now = time.time()
        with self.j._guard("write"), self.j._db.tx() as db:
            for entry, outcome, told in done:
                db.run(
                    "UPDATE runq SET state = 'done', outcome = ?, updated = ? WHERE id = ?",
                    (json.dumps(outcome, separators=(",", ":")), now, entry.id),
                )
                eid = outcome.get("executionId")
                if entry.needs_slot and outcome.get("status") == "started" and eid:
                    self._add_run(db, str(eid), entry.task_id, now)
                if told is not None:
                    db.run("UPDATE runq_waiters SET notified = 1 WHERE entry_id = ? AND key = ?", (entry.id, told))

    def _add_run(self, db: Any, execution_id: str, task_id: str, now: float) -> None:
        db.run(
            "INSERT INTO runs(execution_id, task_id, started, owner, lease_until) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (execution_id) DO NOTHING",
            (execution_id, task_id, now, self.j.owner, now + self.j.lease_s),
        )

    def expire(self) -> list[Entry]:
        return self.upkeep.expire()

    def ended(self, execution_ids: Iterable[str]) -> bool:
        """Executions seen at their end: free their slots, make the reruns waiting for them due.
        True when something changed (the queue runner should look again)."""
        ids = list(execution_ids)
        if not ids:
            return False
        marks = ",".join("?" * len(ids))
        with self.j._guard("write"), self.j._db.tx() as db:
            freed = db.run(f"DELETE FROM runs WHERE execution_id IN ({marks}) RETURNING execution_id", tuple(ids))
            due = db.run(
                f"UPDATE runq SET after_execution = NULL WHERE state = 'waiting' AND after_execution IN ({marks})"
                " RETURNING id",
                tuple(ids),
            )
        return bool(freed or due)

    # ------------------------------------------------------------------ waiters

    def waiters(self, entry_id: int) -> list[Waiter]:
        with self.j._guard("read"):
            rows = self.j._db.run(
                "SELECT key, request_id, task_id, stage, route, matched_by, attempt, journaled FROM runq_waiters"
                " WHERE entry_id = ? AND notified = 0",
                (entry_id,),
            )
        out = []
        for key, request_id, task_id, stage, route, matched_by, attempt, journaled in rows:
            r = json.loads(route)
            out.append(Waiter(str(key), request_id, str(task_id), None if stage == _NO_STAGE else int(stage),
                              Route(r["topic"], r.get("correlation")), list(json.loads(matched_by)),
                              None if attempt is None else int(attempt), bool(journaled)))
        return out

    def notified(self, entry_id: int, keys: Iterable[str] | None = None) -> None:
        """Mark the waiters of an entry (or only those of `keys`) as told."""
        with self.j._guard("write"):
            if keys is None:
                self.j._db.run("UPDATE runq_waiters SET notified = 1 WHERE entry_id = ?", (entry_id,))
                return
            for key in keys:
                self.j._db.run("UPDATE runq_waiters SET notified = 1 WHERE entry_id = ? AND key = ?", (entry_id, key))

    def unnotified(self) -> list[int]:
        """Done entries with waiters not yet told (an instance stopped in between)."""
        with self.j._guard("read"):
            rows = self.j._db.run(
                "SELECT DISTINCT q.id FROM runq q JOIN runq_waiters w ON w.entry_id = q.id"
                " WHERE q.state = 'done' AND w.notified = 0"
            )
        return [int(r[0]) for r in rows]

    # ------------------------------------------------------------------ upkeep (QueueUpkeep)

    def renew(self) -> None:
        self.upkeep.renew()

    def take_over(self, include_own: bool = False) -> list[Entry]:
        return self.upkeep.take_over(include_own)

    def purge(self, cutoff: float) -> None:
        self.upkeep.purge(cutoff)


class QueueUpkeep(_OnJournal):
    """The run queue's upkeep: entries past their timeout expire, leases are renewed, the runs
    and entries of a dead instance taken over, old entries purged."""

    def expire(self) -> list[Entry]:
        """Give up waiting entries past `queue_timeout`: done, outcome `expired`."""
        now = time.time()
        outcome = json.dumps({"status": "expired"})
        with self.j._guard("write"), self.j._db.tx() as db:
            self._lock()
            rows = db.run(
                "UPDATE runq SET state = 'done', outcome = ?, updated = ? WHERE state = 'waiting' AND expires < ?"
                " RETURNING id, task_id, task_name, needs_slot, created",
                (outcome, now, now),
            )
        return [Entry(int(i), str(t), str(n), bool(s), float(c)) for i, t, n, s, c in rows]

    # ------------------------------------------------------------------ leases

    def renew(self) -> None:
        now = time.time()
        with self.j._guard("write"), self.j._db.tx() as db:
            db.run("UPDATE runs SET lease_until = ? WHERE owner = ?", (now + self.j.lease_s, self.j.owner))
            db.run("UPDATE runq SET lease_until = ? WHERE owner = ? AND state <> 'done'", (now + self.j.lease_s, self.j.owner))

    def take_over(self, include_own: bool = False) -> list[Entry]:
        """Take the runs and entries of instances whose lease expired (and, at start,
        `include_own`: this instance's from its previous run). Returns the entries that were
        `starting` (their start may or may not have reached QRS: the caller checks)."""
        now = time.time()
        lease = now + self.j.lease_s
        with self.j._guard("claim"), self.j._db.tx() as db:
            self._lock()
            db.run("UPDATE runs SET owner = ?, lease_until = ? WHERE owner <> ? AND lease_until < ?",
                   (self.j.owner, lease, self.j.owner, now))
            db.run("UPDATE runq SET owner = ?, lease_until = ? WHERE state = 'waiting' AND owner <> ? AND lease_until < ?",
                   (self.j.owner, lease, self.j.owner, now))
            rows = db.run(
                "UPDATE runq SET owner = ?, lease_until = ? WHERE state = 'starting'"
                " AND ((owner = ? AND ? = 1) OR (owner <> ? AND lease_until < ?))"
                " RETURNING id, task_id, task_name, needs_slot, updated",
                (self.j.owner, lease, self.j.owner, int(include_own), self.j.owner, now),
            )
        return [Entry(int(i), str(t), str(n), bool(s), float(u)) for i, t, n, s, u in rows]

    def purge(self, cutoff: float) -> None:
        with self.j._guard("purge"), self.j._db.tx() as db:
            db.run("DELETE FROM runq_waiters WHERE entry_id IN (SELECT id FROM runq WHERE state = 'done' AND updated < ?)",
                   (cutoff,))
            db.run("DELETE FROM runq WHERE state = 'done' AND updated < ?", (cutoff,))
