"""What a claimed request records in the journal: intents before its starts, its replies, done.

Why: after a crash, a task with an intent and no recorded outcome is looked up in QRS (started
then, or started now, never twice), and a done request's replies are replayed to a duplicate.
"""

from __future__ import annotations

import json
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


class Records:
    """The `events` of a request and its done mark (Journal.intents, .reply, .finish delegate here)."""

    def __init__(self, journal: Journal) -> None:
        self.j = journal

    def intents(self, key: str, task_ids: Sequence[str]) -> None:
        """Record, before any of their starts is sent, that these tasks are about to start.

        One transaction for the whole stage. After a crash, a task with an intent and no
        recorded outcome is looked up in QRS: started then, or started now, never twice.
        """
        now = time.time()
        rows = [(key, "intent", task_id, repr(now)) for task_id in task_ids]

        def record(db: Cursor) -> None:
            insert_events(db, rows)
            db.run("UPDATE requests SET lease_until = ? WHERE key = ?", (now + self.j.lease_s, key))

        with self.j._guard("write"):
            self.j._db.transact(record)

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
        """Mark `key` done, recording its replies in the same transaction."""
        rows = [_reply_row(key, event) for event in replies]

        def record(db: Cursor) -> None:
            insert_events(db, rows)
            db.run("UPDATE requests SET state = 'done', updated = ? WHERE key = ?", (time.time(), key))

        with self.j._guard("write"):
            self.j._db.transact(record)
