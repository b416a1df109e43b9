"""What a claimed request records in the journal: intents before its starts, its replies, done.

Why: after a crash, a task with an intent and no recorded outcome is looked up in QRS (started
then, or started now, never twice), and a done request's replies are replayed to a duplicate.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from butler_mqtt.replies import Event

if TYPE_CHECKING:
    from butler_mqtt.journal import Journal
    from butler_mqtt.journal.backends import Cursor


#: Rows per INSERT statement: 4 values each, 800 bound parameters, under the lowest limit a
#: SQLite build may have (999 before 3.32; PostgreSQL allows 65535).
ROWS_PER_INSERT = 200


def insert_events(db: Cursor, rows: Sequence[tuple[str, str, str | None, str]]) -> None:
    """`events` rows (key, kind, task_id, body) in as few statements as possible: one per
    ROWS_PER_INSERT rows (every statement is a GIL release and reacquire under the journal's
    lock; a 24-task request's replies were 25 statements, now one)."""
    for i in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[i:i + ROWS_PER_INSERT]
        values = ", ".join(["(?, ?, ?, ?)"] * len(chunk))
        db.run(f"INSERT INTO events(key, kind, task_id, body) VALUES {values}", [v for row in chunk for v in row])  # noqa: S608


def _reply_row(key: str, event: Event) -> tuple[str, str, str | None, str]:
    return key, "reply", event.get("taskId"), json.dumps(event, separators=(",", ":"))


class Leases:
    """When this instance last set the lease of the requests it is handling, so that a stage's
    intents renew a lease unless it was set within the last RENEW_AFTER_S (a single-task
    request's intents follow its claim by milliseconds: renewing would be a statement for
    nothing, and the lease left is then within a second of a fresh one). In memory, bounded: a
    key forgotten here only costs one renewal."""

    MAX = 10_000
    #: A lease set this recently is not renewed by intents.
    RENEW_AFTER_S = 1.0

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._set: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, key: str, now: float) -> None:
        with self._lock:
            if len(self._set) >= self.MAX:
                self._set.clear()
            self._set[key] = now

    def due(self, key: str, now: float) -> bool:
        with self._lock:
            since = self._set.get(key)
        return since is None or now - since > min(self.RENEW_AFTER_S, self.lease_s / 30)

    def drop(self, key: str) -> None:
        with self._lock:
            self._set.pop(key, None)


class Records:
    """The `events` of a request and its done mark (Journal.intents, .reply, .finish delegate here).

    A write that is one statement runs without a transaction around it (atomic on its own):
    every statement releases the GIL while the journal's lock is held, so BEGIN and COMMIT
    around a lone INSERT made the lock wait twice more for the GIL, and the request workers
    queue behind that lock.
    """

    def __init__(self, journal: Journal) -> None:
        self.j = journal
        self.leases = Leases(journal.lease_s)

    def intents(self, key: str, task_ids: Sequence[str]) -> None:
        """Record, before any of their starts is sent, that these tasks are about to start.

        All the stage's intents at once (one statement, or one transaction when there are more
        rows than one statement takes or the lease is renewed with them: see Leases). After a crash, a task
        with an intent and no recorded outcome is looked up in QRS: started then, or started
        now, never twice.
        """
        now = time.time()
        rows = [(key, "intent", task_id, repr(now)) for task_id in task_ids]
        renew = self.leases.due(key, now)

        def record(db: Cursor) -> None:
            insert_events(db, rows)
            if renew:
                db.run("UPDATE requests SET lease_until = ? WHERE key = ?", (now + self.j.lease_s, key))

        with self.j._guard("write"):
            if renew or len(rows) > ROWS_PER_INSERT:
                self.j._db.transact(record)
            else:
                record(self.j._db)
        if renew:
            self.leases.note(key, now)

    def withdraw_intents(self, key: str, task_ids: Sequence[str]) -> None:
        """These starts were refused before anything ran (QRS answered 429): forget their
        intents, so that the request, handled again, starts them rather than asking QRS."""
        with self.j._guard("write"), self.j._db.tx() as db:
            for task_id in task_ids:
                db.run("DELETE FROM events WHERE key = ? AND kind = 'intent' AND task_id = ?", (key, task_id))

    def reply(self, key: str, event: Event) -> None:
        with self.j._guard("write"):
            insert_events(self.j._db, [_reply_row(key, event)])

    def finish(self, key: str, replies: Sequence[Event] = ()) -> None:
        """Record the replies of `key`, then mark it done.

        Two statements, each atomic, in this order: a crash between them leaves the request
        open with reply rows, which is what a crash before the done mark leaves anyway (the
        request is resumed, its reply rows are deleted and its replies sent again: see the
        claim). More rows than one statement takes: all in one transaction.
        """
        rows = [_reply_row(key, event) for event in replies]

        def record(db: Cursor) -> None:
            insert_events(db, rows)
            db.run("UPDATE requests SET state = 'done', updated = ? WHERE key = ?", (time.time(), key))

        with self.j._guard("write"):
            if len(rows) > ROWS_PER_INSERT:
                self.j._db.transact(record)
            else:
                record(self.j._db)
        self.leases.drop(key)
