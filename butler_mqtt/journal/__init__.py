"""The durable request journal: requestId -> what was started and what was replied.

Why: QoS 1 redelivers a request whose ack was lost, a publisher may retry, and the daemon may
be killed mid-request. Starting a reload is not idempotent, so before starting anything the
journal is asked whether this key was seen in the last `retention` hours:

* done   -> the earlier replies are published again; nothing is started;
* open   -> being handled: by this instance's previous run (crashed) or by an instance whose
            lease expired -> resumed (tasks already started are reported from the journal,
            uncertain starts are checked with QRS); by another live instance -> wait for it;
* absent -> claimed atomically by this instance: a new request.

Backends: SQLite in WAL mode (`state_dir`, one instance) or PostgreSQL (`journal.url:
postgresql://...`, several instances sharing one journal). The claim is one atomic
`INSERT ... ON CONFLICT DO NOTHING`, so exactly one instance wins a requestId. Requests being
handled and chains being followed (`waits`) carry an owner and a lease: a surviving instance
takes over what a dead one held once its lease expired. The owner name is the instance's
MQTT client id, stable across restarts, so a restarted instance resumes its own work at once.

Schema migrations are versioned and run at start (under an advisory lock on PostgreSQL).
A write that fails raises JournalError; the caller then does not ack, so nothing is lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from butler_mqtt import replies
from butler_mqtt.errors import JournalError
from butler_mqtt.journal.backends import (
    Cursor,
    Postgres,
    Sqlite,
    data_errors,
    db_errors,
    unstorable,
)
from butler_mqtt.journal.history import HistoryQuery, read_history
from butler_mqtt.journal.migrations import SCHEMA_VERSION, migrate
from butler_mqtt.journal.records import Records
from butler_mqtt.journal.runq import RunQueue
from butler_mqtt.journal.waits import StoredWaits
from butler_mqtt.redaction import redact_url
from butler_mqtt.replies import Event

__all__ = ["SCHEMA_VERSION", "HistoryQuery", "Journal", "JournalError", "Prior"]


_COLUMNS = "key, state, ingress, payload_hash, created, updated, owner, lease_until, source, request, caller"
#: The claim: exactly one instance's INSERT of a key wins.
_CLAIM = f"INSERT INTO requests({_COLUMNS}) VALUES (?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING"
#: The claim of a key with no events under it, on its own (no transaction needed).
_CLAIM_NEW = (
    f"INSERT INTO requests({_COLUMNS}) SELECT ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?"  # noqa: S608
    " WHERE NOT EXISTS (SELECT 1 FROM events WHERE key = ?) ON CONFLICT (key) DO NOTHING RETURNING key"
)


@dataclass
class Prior:
    """What the journal knows about a key seen before."""

    state: str
    replies: list[Event] = field(default_factory=list)
    intents: dict[str, float] = field(default_factory=dict)  # task id -> when its start was sent

    @property
    def done(self) -> bool:
        return self.state == "done"

    def task_event(self, task_id: str, stage: int | None, attempt: int | None = None) -> Event | None:
        """The recorded `task` event of this task in this stage (of this retry `attempt`: 2, 3, ...;
        else of its first start)."""
        wanted = (attempt,) if attempt is not None and attempt > 1 else (None, 1)
        for ev in replies.task_events(self.replies):
            if ev.get("taskId") == task_id and ev.get("stage") == stage and ev.get("attempt") in wanted:
                return ev
        return None


    @classmethod
    def from_rows(cls, state: str, rows: list[tuple[Any, ...]]) -> Prior:
        """From the `events` rows of a request (kind, task_id, body), in journal order."""
        prior = cls(state=state)
        for kind, task_id, body in rows:
            if kind == "intent":
                prior.intents[task_id] = float(body or 0)
            else:
                prior.replies.append(json.loads(body))
        return prior


class Journal:
    """Thread-safe journal over SQLite or PostgreSQL."""

    def __init__(
        self,
        path: Path | None = None,
        retention_hours: float = 24,
        *,
        url: str | None = None,
        owner: str = "butler-mqtt",
        lease_s: float = 30.0,
    ) -> None:
        self.retention = retention_hours * 3600
        self.owner = owner
        self.lease_s = lease_s
        self._errors = db_errors()
        self._data_errors = data_errors()
        where = redact_url(url) if url else str(path)  # never a password or token from the URL
        try:
            self._db: Sqlite | Postgres = Postgres(url) if url else Sqlite(path or Path("journal.sqlite3"))
            migrate(self._db)
        except JournalError:
            raise
        except self._errors as exc:
            raise JournalError(f"cannot open the journal at {where}: {exc}") from None
        self.dialect = self._db.dialect
        self.runq = RunQueue(self)
        self.records = Records(self)
        self.waits = StoredWaits(self)

    @classmethod
    def from_config(
        cls, state_dir: Path, url: str | None, retention_hours: float, owner: str = "butler-mqtt", lease_s: float = 30.0
    ) -> Journal:
        if url is None:
            return cls(state_dir / "journal.sqlite3", retention_hours, owner=owner, lease_s=lease_s)
        if url.startswith("sqlite:///"):
            return cls(Path(url[len("sqlite:///") :]), retention_hours, owner=owner, lease_s=lease_s)
        if url.startswith(("postgresql://", "postgres://")):
            return cls(None, retention_hours, url=url, owner=owner, lease_s=lease_s)
        raise JournalError(f"journal.url: unsupported scheme {url.split(':', 1)[0]!r} (sqlite:///path or postgresql://...)")

    # ------------------------------------------------------------------ plumbing

    def schema_version(self) -> int:
        return int(self._db.run("SELECT max(version) FROM schema_version")[0][0] or 0)

    def close(self) -> None:
        self._db.close()

    def healthy(self) -> bool:
        """False while the journal cannot be used (its file deleted or replaced)."""
        if isinstance(self._db, Sqlite):
            try:
                self._db.check_file()
            except JournalError:
                return False
        return True

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Database errors become JournalError (the caller then does not ack); a value the
        database can never store becomes UnstorableValue (permanent: a bad request)."""
        if isinstance(self._db, Sqlite):
            self._db.check_file()
        try:
            yield
        except self._data_errors as exc:
            raise unstorable(exc) from None
        except self._errors as exc:
            raise JournalError(f"journal {what} failed: {exc}") from None

    # ------------------------------------------------------------------ requests

    def begin(
        self,
        key: str,
        ingress: str,
        payload_hash: str | None = None,
        wait_s: float = 120.0,
        *,
        source: str = "",
        request: dict[str, Any] | None = None,
        received: float | None = None,
        caller: str | None = None,
    ) -> Prior | None:
        """Claim `key`. None: a new request, now ours. Else what was recorded before.

        When another live instance holds the key (its lease runs), wait for it to finish (up
        to `wait_s`), then return its outcome; a lease that expires meanwhile is taken over.
        `source`, `request` (the request as JSON) and `caller` (its name; None: anonymous) are
        kept for the history; a done key seen again counts as a duplicate there. `received`
        (time.time() when the request arrived; default: now) is the history's received time.
        """
        deadline = time.monotonic() + wait_s
        about = (source, json.dumps(request, separators=(",", ":")) if request is not None else None, caller)
        while True:
            with self._guard("claim"):
                outcome = self._try_claim(key, ingress, payload_hash, about, received)
            if outcome != "busy":
                return outcome  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise JournalError(f"request {key!r} is still being handled by another instance")
            time.sleep(0.05)

    def _try_claim(
        self, key: str, ingress: str, payload_hash: str | None,
        about: tuple[str, str | None, str | None] = ("", None, None), received: float | None = None,
    ) -> Prior | None | str:
        now = time.time()
        arrived = min(received, now) if received is not None else now  # the history's received time
        # A new key (nearly always) is one statement, atomic on its own: no transaction around it.
        # Each statement releases the GIL under the journal's lock, and waiting to take it back
        # is what made the journal the request path's queue. A key taken, or with events of an
        # earlier use left under it (never by this code: they go with their request), goes the
        # transaction's way, which deletes them in the same transaction.
        won = self._db.run(
            _CLAIM_NEW, (key, ingress, payload_hash, arrived, now, self.owner, now + self.lease_s, *about, key)
        )
        if won:
            self.records.leases.note(key, now)
            return None
        return self._db.transact(lambda db: self._claim_in(db, key, ingress, payload_hash, about, now, arrived))

    def _claim_in(
        self, db: Cursor, key: str, ingress: str, payload_hash: str | None,
        about: tuple[str, str | None, str | None], now: float, arrived: float,
    ) -> Prior | None | str:
        """`_try_claim`'s statements, in the transaction `db` (perhaps shared: group commit)."""
        won = db.run(_CLAIM + " RETURNING key", (key, ingress, payload_hash, arrived, now, self.owner, now + self.lease_s, *about))
        if won:
            db.run("DELETE FROM events WHERE key = ?", (key,))
            return None
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        rows = db.run(f"SELECT state, created, owner, lease_until FROM requests WHERE key = ?{lock}", (key,))
        if not rows:
            return "busy"  # deleted between the two statements: try again
        state, created, owner, lease_until = rows[0]
        if now - created > self.retention:  # expired: a new request under an old key
            db.run(
                "UPDATE requests SET state = 'open', ingress = ?, payload_hash = ?, created = ?, updated = ?,"
                " owner = ?, lease_until = ?, source = ?, request = ?, caller = ?, duplicates = 0, last_duplicate = NULL"
                " WHERE key = ?",
                (ingress, payload_hash, arrived, now, self.owner, now + self.lease_s, *about, key),
            )
            db.run("DELETE FROM events WHERE key = ?", (key,))
            return None
        if state == "open" and owner != self.owner and lease_until > now:
            return "busy"  # another live instance is handling it right now
        events = db.run("SELECT kind, task_id, body FROM events WHERE key = ? ORDER BY id", (key,))
        prior = Prior.from_rows(state, events)
        if state == "done":  # a duplicate: its earlier outcome is replayed (counted for the history)
            db.run("UPDATE requests SET duplicates = duplicates + 1, last_duplicate = ? WHERE key = ?", (now, key))
        if state == "open":
            # Ours from a previous run, or a dead instance's: take it over and resume. The
            # replies are sent again (and re-recorded) by the resumed run; intents stay.
            db.run("UPDATE requests SET owner = ?, lease_until = ? WHERE key = ?", (self.owner, now + self.lease_s, key))
            db.run("DELETE FROM events WHERE key = ? AND kind = 'reply'", (key,))
        return prior

    def load(self, key: str) -> Prior | None:
        """What is recorded for `key`, without claiming it (resuming a chain stage)."""
        with self._guard("read"):
            rows = self._db.run("SELECT state FROM requests WHERE key = ?", (key,))
            if not rows:
                return None
            events = self._db.run("SELECT kind, task_id, body FROM events WHERE key = ? ORDER BY id", (key,))
        return Prior.from_rows(rows[0][0], events)

    def recent_hash(self, payload_hash: str, within_s: float) -> str | None:
        """Key of a request with this payload hash handled within `within_s` seconds."""
        with self._guard("read"):
            rows = self._db.run(
                "SELECT key FROM requests WHERE payload_hash = ? AND created >= ? ORDER BY created DESC LIMIT 1",
                (payload_hash, time.time() - within_s),
            )
        return None if not rows else str(rows[0][0])

    def intents(self, key: str, task_ids: Sequence[str]) -> None:
        self.records.intents(key, task_ids)

    def withdraw_intents(self, key: str, task_ids: Sequence[str]) -> None:
        self.records.withdraw_intents(key, task_ids)

    def reply(self, key: str, event: Event) -> None:
        self.records.reply(key, event)

    def finish(self, key: str, replies: Sequence[Event] = ()) -> None:
        self.records.finish(key, replies)

    def forget(self, key: str) -> None:
        """Drop a claim whose request never started anything (so a retry is handled anew)."""
        with self._guard("write"), self._db.tx() as db:
            db.run("DELETE FROM requests WHERE key = ?", (key,))
            db.run("DELETE FROM events WHERE key = ?", (key,))
        self.records.leases.drop(key)

    def purge(self) -> int:
        """Delete entries older than the retention period. Returns how many requests went."""
        cutoff = time.time() - self.retention
        with self._guard("purge"), self._db.tx() as db:
            db.run(
                "DELETE FROM events WHERE key IN (SELECT key FROM requests WHERE created < ?)"
                " AND key NOT IN (SELECT key FROM waits)",
                (cutoff,),
            )
            gone = db.run(
                "DELETE FROM requests WHERE created < ? AND key NOT IN (SELECT key FROM waits) RETURNING key", (cutoff,)
            )
        self.runq.purge(cutoff)
        return len(gone)

    def history(self, query: HistoryQuery) -> list[dict[str, Any]]:
        """The requests of the last `retention` hours matching `query` (journal/history.py)."""
        with self._guard("read"):
            return read_history(self._db, query, self.retention)

    def request_of(self, key: str) -> dict[str, Any] | None:
        """The request as received under `key` (defaults left out); None when none is recorded."""
        with self._guard("read"):
            rows = self._db.run("SELECT request FROM requests WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    # ------------------------------------------------------------------ waits (tracking)

    def save_wait(self, key: str, body: str) -> None:
        self.waits.save(key, body)

    def drop_wait(self, key: str) -> None:
        self.waits.drop(key)

    def claim_waits(self) -> list[tuple[str, str]]:
        return self.waits.claim()

    def own_waits(self) -> list[tuple[str, str]]:
        return self.waits.own()

    def renew_waits(self) -> None:
        self.waits.renew()
