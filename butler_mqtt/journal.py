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
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from butler_mqtt.errors import JournalError


def _log_error(event: str, detail: str) -> None:
    import structlog

    structlog.get_logger("butler_mqtt.journal").error(event, detail=detail)

#: Each version: statements per dialect ("sqlite", "postgresql"); "*" for both.
_MIGRATIONS: dict[int, dict[str, list[str]]] = {
    1: {
        "*": [
            """CREATE TABLE IF NOT EXISTS requests (
                key TEXT PRIMARY KEY,
                state TEXT NOT NULL,                 -- open | done
                ingress TEXT NOT NULL,
                payload_hash TEXT,
                created DOUBLE PRECISION NOT NULL,
                updated DOUBLE PRECISION NOT NULL,
                owner TEXT NOT NULL DEFAULT '',
                lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX IF NOT EXISTS requests_created ON requests(created)",
            "CREATE INDEX IF NOT EXISTS requests_hash ON requests(payload_hash, created)",
            """CREATE TABLE IF NOT EXISTS waits (
                key TEXT PRIMARY KEY,
                body TEXT NOT NULL,                  -- tracking.Waited as JSON
                updated DOUBLE PRECISION NOT NULL,
                owner TEXT NOT NULL DEFAULT '',
                lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
            )""",
        ],
        "sqlite": [
            """CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                key TEXT NOT NULL,
                kind TEXT NOT NULL,                  -- reply | intent
                task_id TEXT,
                body TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS events_key ON events(key, id)",
        ],
        "postgresql": [
            """CREATE TABLE IF NOT EXISTS events (
                id BIGSERIAL PRIMARY KEY,
                key TEXT NOT NULL,
                kind TEXT NOT NULL,
                task_id TEXT,
                body TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS events_key ON events(key, id)",
        ],
    },
}
SCHEMA_VERSION = max(_MIGRATIONS)


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


class _Cursor(Protocol):
    def run(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class _Sqlite:
    """SQLite in WAL mode. The file is watched: deleted or replaced under the running daemon,
    the journal refuses every operation (JournalError: deliveries stay unacked) until the file
    is back, instead of silently forgetting which requests were handled.

    A marker beside it (`<name>.created`) remembers that a journal existed: a daemon started
    when the file is gone but the marker is there refuses to start rather than run on an empty
    journal (which would start earlier requestIds again)."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.marker = path.with_name(path.name + ".created")
        if not path.exists() and self.marker.exists():
            raise JournalError(
                f"the journal {path} is missing, but {self.marker} says one existed: restore the journal from a backup,"
                f" or delete {self.marker} to start with an empty journal (requestIds seen before may then start again)"
            )
        self._lock = threading.RLock()
        self._open()
        self.marker.touch()
        self.problem: str | None = None

    def _open(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def check_file(self) -> None:
        """Raise JournalError while the journal file is not the one we opened."""
        try:
            st = os.stat(self.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity == self._identity:
            if self.problem is not None:
                self.problem = None
            return
        if identity is not None and self.problem is not None:
            # Put back (e.g. restored from a backup): use it from now on.
            with self._lock:
                self._db.close()
                self._open()
            self.problem = None
            _log_error("journal_reopened", f"the journal file {self.path} is back; using it again")
            return
        what = "deleted" if identity is None else "replaced by another file"
        if self.problem is None:
            _log_error(
                "journal_file_lost",
                f"the journal file {self.path} was {what} while the daemon runs: requests are kept unacked until it is"
                " restored (put the file back) or the daemon is restarted",
            )
        self.problem = f"the journal file {self.path} was {what}"
        raise JournalError(self.problem)

    def run(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, tuple(args)).fetchall())

    @contextmanager
    def tx(self) -> Iterator[_Cursor]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def advisory_lock(self) -> None:
        pass  # BEGIN IMMEDIATE already serialises writers

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Postgres:
    """A small pool of autocommit connections: worker threads do not queue behind one socket."""

    dialect = "postgresql"
    POOL = 8

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - installed with the package
            raise JournalError("journal.url is PostgreSQL but psycopg is not installed: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self._url = url
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.POOL)
        self._tx = threading.local()  # the connection of this thread's open transaction
        self._release(self._connect())  # fail fast on a bad URL

    def _connect(self) -> Any:
        return self._psycopg.connect(self._url, autocommit=True, connect_timeout=10)

    def _release(self, conn: Any) -> None:
        self._idle.put(conn)

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        current = getattr(self._tx, "conn", None)
        if current is not None:  # inside tx(): the same connection
            yield current
            return
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            if conn.closed or conn.broken:
                conn = self._connect()
            try:
                yield conn
            finally:
                if conn.broken or conn.closed:
                    conn.close()
                else:
                    self._release(conn)

    def run(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            cur = conn.execute(sql.replace("?", "%s"), tuple(args))
            return list(cur.fetchall()) if cur.description is not None else []

    @contextmanager
    def tx(self) -> Iterator[_Cursor]:
        with self._conn() as conn, conn.transaction():
            self._tx.conn = conn
            try:
                yield self
            finally:
                self._tx.conn = None

    def advisory_lock(self) -> None:
        self.run("SELECT pg_advisory_xact_lock(4242424242)")  # one migrator at a time

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_DbError: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


def _db_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg

        return (*_DbError, psycopg.Error)
    except ImportError:  # pragma: no cover
        return _DbError


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
        self._errors = _db_errors()
        where = url.split("@")[-1] if url else str(path)  # never log a password from the URL
        try:
            self._db: _Sqlite | _Postgres = _Postgres(url) if url else _Sqlite(path or Path("journal.sqlite3"))
            self._migrate()
        except JournalError:
            raise
        except self._errors as exc:
            raise JournalError(f"cannot open the journal at {where}: {exc}") from None
        self.dialect = self._db.dialect

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

    def _migrate(self) -> None:
        with self._db.tx() as db:
            self._db.advisory_lock()
            db.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = db.run("SELECT max(version) FROM schema_version")[0][0] or 0
            if current > SCHEMA_VERSION:
                raise JournalError(
                    f"the journal has schema version {current}, newer than this butler-mqtt knows ({SCHEMA_VERSION}):"
                    " run the newer version, or restore the journal backup taken before the upgrade"
                )
            for version in sorted(v for v in _MIGRATIONS if v > current):
                steps = _MIGRATIONS[version]
                for stmt in steps.get("*", []) + steps.get(self._db.dialect, []):
                    db.run(stmt)
                db.run("INSERT INTO schema_version(version) VALUES (?)", (version,))

    def schema_version(self) -> int:
        return int(self._db.run("SELECT max(version) FROM schema_version")[0][0] or 0)

    def close(self) -> None:
        self._db.close()

    def healthy(self) -> bool:
        """False while the journal cannot be used (its file deleted or replaced)."""
        if isinstance(self._db, _Sqlite):
            try:
                self._db.check_file()
            except JournalError:
                return False
        return True

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Database errors become JournalError (the caller then does not ack)."""
        if isinstance(self._db, _Sqlite):
            self._db.check_file()
        try:
            yield
        except self._errors as exc:
            raise JournalError(f"journal {what} failed: {exc}") from None

    @staticmethod
    def _prior(state: str, rows: list[tuple[Any, ...]]) -> Prior:
        prior = Prior(state=state)
        for kind, task_id, body in rows:
            if kind == "intent":
                prior.intents[task_id] = float(body or 0)
            else:
                prior.replies.append(json.loads(body))
        return prior

    # ------------------------------------------------------------------ requests

    def begin(self, key: str, ingress: str, payload_hash: str | None = None, wait_s: float = 120.0) -> Prior | None:
        """Claim `key`. None: a new request, now ours. Else what was recorded before.

        When another live instance holds the key (its lease runs), wait for it to finish (up
        to `wait_s`), then return its outcome; a lease that expires meanwhile is taken over.
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._guard("claim"):
                outcome = self._try_claim(key, ingress, payload_hash)
            if outcome != "busy":
                return outcome  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise JournalError(f"request {key!r} is still being handled by another instance")
            time.sleep(0.05)

    def _try_claim(self, key: str, ingress: str, payload_hash: str | None) -> Prior | None | str:
        now = time.time()
        with self._db.tx() as db:
            won = db.run(
                "INSERT INTO requests(key, state, ingress, payload_hash, created, updated, owner, lease_until)"
                " VALUES (?, 'open', ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING key",
                (key, ingress, payload_hash, now, now, self.owner, now + self.lease_s),
            )
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
                    " owner = ?, lease_until = ? WHERE key = ?",
                    (ingress, payload_hash, now, now, self.owner, now + self.lease_s, key),
                )
                db.run("DELETE FROM events WHERE key = ?", (key,))
                return None
            if state == "open" and owner != self.owner and lease_until > now:
                return "busy"  # another live instance is handling it right now
            events = db.run("SELECT kind, task_id, body FROM events WHERE key = ? ORDER BY id", (key,))
            prior = self._prior(state, events)
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
        return self._prior(rows[0][0], events)

    def recent_hash(self, payload_hash: str, within_s: float) -> str | None:
        """Key of a request with this payload hash handled within `within_s` seconds."""
        with self._guard("read"):
            rows = self._db.run(
                "SELECT key FROM requests WHERE payload_hash = ? AND created >= ? ORDER BY created DESC LIMIT 1",
                (payload_hash, time.time() - within_s),
            )
        return None if not rows else str(rows[0][0])

    def intents(self, key: str, task_ids: Sequence[str]) -> None:
        """Record, before any of their starts is sent, that these tasks are about to start.

        One transaction for the whole stage. After a crash, a task with an intent and no
        recorded outcome is looked up in QRS: started then, or started now, never twice.
        """
        now = time.time()
        with self._guard("write"), self._db.tx() as db:
            for task_id in task_ids:
                db.run("INSERT INTO events(key, kind, task_id, body) VALUES (?, 'intent', ?, ?)", (key, task_id, repr(now)))
            db.run("UPDATE requests SET lease_until = ? WHERE key = ?", (now + self.lease_s, key))

    def reply(self, key: str, event: dict[str, Any]) -> None:
        with self._guard("write"):
            self._db.run(
                "INSERT INTO events(key, kind, task_id, body) VALUES (?, 'reply', ?, ?)",
                (key, event.get("taskId"), json.dumps(event, separators=(",", ":"))),
            )

    def finish(self, key: str, replies: Sequence[dict[str, Any]] = ()) -> None:
        """Mark `key` done, recording its replies in the same transaction."""
        with self._guard("write"), self._db.tx() as db:
            for event in replies:
                db.run(
                    "INSERT INTO events(key, kind, task_id, body) VALUES (?, 'reply', ?, ?)",
                    (key, event.get("taskId"), json.dumps(event, separators=(",", ":"))),
                )
            db.run("UPDATE requests SET state = 'done', updated = ? WHERE key = ?", (time.time(), key))

    def forget(self, key: str) -> None:
        """Drop a claim whose request never started anything (so a retry is handled anew)."""
        with self._guard("write"), self._db.tx() as db:
            db.run("DELETE FROM requests WHERE key = ?", (key,))
            db.run("DELETE FROM events WHERE key = ?", (key,))

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
            return len(gone)

    # ------------------------------------------------------------------ waits (tracking)

    def save_wait(self, key: str, body: str) -> None:
        now = time.time()
        with self._guard("write"):
            self._db.run(
                "INSERT INTO waits(key, body, updated, owner, lease_until) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET body = excluded.body, updated = excluded.updated,"
                " owner = excluded.owner, lease_until = excluded.lease_until",
                (key, body, now, self.owner, now + self.lease_s),
            )

    def drop_wait(self, key: str) -> None:
        with self._guard("write"):
            self._db.run("DELETE FROM waits WHERE key = ?", (key,))

    def claim_waits(self) -> list[tuple[str, str]]:
        """Take every wait that is ours (a previous run) or whose owner's lease expired.

        Returns (key, body) of the waits newly taken. Atomic per row: of several surviving
        instances, one takes each orphaned chain.
        """
        now = time.time()
        with self._guard("claim"):
            return [
                (str(k), str(b))
                for k, b in self._db.run(
                    "UPDATE waits SET owner = ?, lease_until = ? WHERE owner <> ? AND lease_until < ?"
                    " RETURNING key, body",
                    (self.owner, now + self.lease_s, self.owner, now),
                )
            ]

    def own_waits(self) -> list[tuple[str, str]]:
        with self._guard("read"):
            return [(str(k), str(b)) for k, b in self._db.run("SELECT key, body FROM waits WHERE owner = ?", (self.owner,))]

    def renew_waits(self) -> None:
        """Extend the lease of every wait this instance follows (called at least every lease/3)."""
        with self._guard("write"):
            self._db.run("UPDATE waits SET lease_until = ? WHERE owner = ?", (time.time() + self.lease_s, self.owner))
