"""The durable request journal: requestId -> what was started and what was replied.

Why: QoS 1 redelivers a request whose ack was lost, a publisher may retry, and the daemon may
be killed mid-request. Starting a reload is not idempotent, so before starting anything the
journal is asked whether this key was seen in the last `retention` hours:

* done   -> the earlier replies are published again; nothing is started;
* open   -> the daemon stopped while handling it: tasks already started are reported from
            the journal, the rest are started now (a task whose start was sent but whose answer
            was never recorded is reported as failed, never started twice);
* absent -> a new request.

Storage is SQLite in WAL mode (one writer, many instances need `journal.url` PostgreSQL: see
docs/scaling.md). A write that fails raises JournalError, and the caller then does not ack the
message, so nothing is lost silently.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from butler_mqtt.errors import JournalError

SCHEMA_VERSION = 2

_MIGRATIONS = {
    1: [
        """CREATE TABLE IF NOT EXISTS requests (
            key TEXT PRIMARY KEY,
            state TEXT NOT NULL,              -- open | done
            ingress TEXT NOT NULL,
            payload_hash TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS requests_created ON requests(created)",
        "CREATE INDEX IF NOT EXISTS requests_hash ON requests(payload_hash, created)",
        """CREATE TABLE IF NOT EXISTS events (
            key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,               -- reply | intent
            task_id TEXT,
            body TEXT NOT NULL,
            PRIMARY KEY (key, seq)
        )""",
    ],
    2: [
        """CREATE TABLE IF NOT EXISTS waits (
            key TEXT PRIMARY KEY,
            body TEXT NOT NULL,              -- tracking.Waited as JSON
            updated REAL NOT NULL
        )""",
    ],
}


@dataclass
class Prior:
    """What the journal knows about a key seen before."""

    state: str
    replies: list[dict[str, Any]] = field(default_factory=list)
    intents: dict[str, float] = field(default_factory=dict)  # task id -> when its start was sent

    @property
    def done(self) -> bool:
        return self.state == "done"

    def task_event(self, task_id: str, stage: int | None) -> dict[str, Any] | None:
        for ev in self.replies:
            if ev.get("event") == "task" and ev.get("taskId") == task_id and ev.get("stage") == stage:
                return ev
        return None


class Journal:
    """Thread-safe SQLite journal."""

    def __init__(self, path: Path, retention_hours: float = 24) -> None:
        self.path = path
        self.retention = retention_hours * 3600
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"cannot open the journal at {path}: {exc}") from None
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}

    @classmethod
    def from_config(cls, state_dir: Path, url: str | None, retention_hours: float) -> Journal:
        if url is None:
            return cls(state_dir / "journal.sqlite3", retention_hours)
        if url.startswith("sqlite:///"):
            return cls(Path(url[len("sqlite:///") :]), retention_hours)
        raise JournalError(f"journal.url: unsupported scheme in {url.split(':', 1)[0]!r} (use sqlite:///path)")

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version in sorted(v for v in _MIGRATIONS if v > current):
            self._db.execute("BEGIN IMMEDIATE")
            for stmt in _MIGRATIONS[version]:
                self._db.execute(stmt)
            self._db.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from None

    def begin(self, key: str, ingress: str, payload_hash: str | None = None) -> Prior | None:
        """Claim `key`. Returns None for a new request, else what was recorded before."""
        now = time.time()
        try:
            with self._lock:
                row = self._db.execute("SELECT state, created FROM requests WHERE key = ?", (key,)).fetchone()
                if row is not None and now - row[1] <= self.retention:
                    prior = Prior(state=row[0])
                    seq = 0
                    for kind, task_id, body, s in self._db.execute(
                        "SELECT kind, task_id, body, seq FROM events WHERE key = ? ORDER BY seq", (key,)
                    ):
                        seq = max(seq, s)
                        if kind == "intent":
                            prior.intents[task_id] = float(body or 0)
                        else:
                            prior.replies.append(json.loads(body))
                    self._seq[key] = seq
                    if not prior.done:
                        # Resuming: the replies are sent again (and re-recorded) by the resumed
                        # run; only the start intents must survive.
                        self._db.execute("DELETE FROM events WHERE key = ? AND kind = 'reply'", (key,))
                    return prior
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM events WHERE key = ?", (key,))
                self._db.execute(
                    "INSERT OR REPLACE INTO requests(key, state, ingress, payload_hash, created, updated)"
                    " VALUES (?, 'open', ?, ?, ?, ?)",
                    (key, ingress, payload_hash, now, now),
                )
                self._db.execute("COMMIT")
                self._seq[key] = 0
                return None
        except sqlite3.Error as exc:
            self._rollback()
            raise JournalError(f"journal write failed: {exc}") from None

    def _rollback(self) -> None:
        try:
            with self._lock:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def load(self, key: str) -> Prior | None:
        """What is recorded for `key`, without claiming it (resuming a chain stage)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM requests WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            prior = Prior(state=row[0])
            for kind, task_id, body in self._db.execute(
                "SELECT kind, task_id, body FROM events WHERE key = ? ORDER BY seq", (key,)
            ):
                if kind == "intent":
                    prior.intents[task_id] = float(body or 0)
                else:
                    prior.replies.append(json.loads(body))
            seq = self._db.execute("SELECT max(seq) FROM events WHERE key = ?", (key,)).fetchone()[0]
            self._seq[key] = seq or 0
        return prior

    def save_wait(self, key: str, body: str) -> None:
        self._write("INSERT OR REPLACE INTO waits(key, body, updated) VALUES (?, ?, ?)", (key, body, time.time()))

    def drop_wait(self, key: str) -> None:
        self._write("DELETE FROM waits WHERE key = ?", (key,))

    def load_waits(self) -> list[str]:
        with self._lock:
            return [str(r[0]) for r in self._db.execute("SELECT body FROM waits ORDER BY updated")]

    def recent_hash(self, payload_hash: str, within_s: float) -> str | None:
        """Key of a request with this payload hash handled within `within_s` seconds."""
        with self._lock:
            row = self._db.execute(
                "SELECT key FROM requests WHERE payload_hash = ? AND created >= ? ORDER BY created DESC LIMIT 1",
                (payload_hash, time.time() - within_s),
            ).fetchone()
        return None if row is None else str(row[0])

    def _next(self, key: str) -> int:
        """Next event number of `key` (caller holds the lock)."""
        if key not in self._seq:
            row = self._db.execute("SELECT max(seq) FROM events WHERE key = ?", (key,)).fetchone()
            self._seq[key] = row[0] or 0
        self._seq[key] += 1
        return self._seq[key]

    def intent(self, key: str, task_id: str) -> None:
        """Record, before the start is sent, that `task_id` is about to be started."""
        with self._lock:
            seq = self._next(key)
        self._write(
            "INSERT INTO events(key, seq, kind, task_id, body) VALUES (?, ?, 'intent', ?, ?)",
            (key, seq, task_id, repr(time.time())),
        )

    def reply(self, key: str, event: dict[str, Any]) -> None:
        with self._lock:
            seq = self._next(key)
        self._write(
            "INSERT INTO events(key, seq, kind, task_id, body) VALUES (?, ?, 'reply', ?, ?)",
            (key, seq, event.get("taskId"), json.dumps(event, separators=(",", ":"))),
        )

    def finish(self, key: str) -> None:
        self._write("UPDATE requests SET state = 'done', updated = ? WHERE key = ?", (time.time(), key))
        with self._lock:
            self._seq.pop(key, None)

    def forget(self, key: str) -> None:
        """Drop a claim whose request never started anything (so a retry is handled anew)."""
        self._write("DELETE FROM requests WHERE key = ?", (key,))
        self._write("DELETE FROM events WHERE key = ?", (key,))
        with self._lock:
            self._seq.pop(key, None)

    def purge(self) -> int:
        """Delete entries older than the retention period. Returns how many requests went."""
        cutoff = time.time() - self.retention
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM events WHERE key IN (SELECT key FROM requests WHERE created < ?)", (cutoff,))
                n = self._db.execute("DELETE FROM requests WHERE created < ?", (cutoff,)).rowcount
                self._db.execute("COMMIT")
                return int(n)
        except sqlite3.Error as exc:
            self._rollback()
            raise JournalError(f"journal purge failed: {exc}") from None
