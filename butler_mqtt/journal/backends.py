"""The two journal backends: SQLite in WAL mode (one instance) and PostgreSQL (several
instances sharing one journal). Both offer `run(sql, args)`, `tx()` and `advisory_lock()`."""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from butler_mqtt.errors import JournalError, UnstorableValue
from butler_mqtt.journal.groupcommit import GroupCommit

T = TypeVar("T")


def _log_error(event: str, detail: str) -> None:
    import structlog

    structlog.get_logger("butler_mqtt.journal").error(event, detail=detail)

#: Each version: statements per dialect ("sqlite", "postgresql"); "*" for both.

class Cursor(Protocol):
    def run(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class Sqlite:
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
        self.group = GroupCommit(self._lock, lambda: self._db.execute("BEGIN IMMEDIATE"),
                                 lambda: self._db.execute("COMMIT"), lambda: self._db.execute("ROLLBACK"))

    def _open(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def check_file(self) -> None:
        """Raise JournalError while the journal file is not the one we opened (one stat, about
        2 microseconds, before every operation: a request must never be journaled into a file
        that is already gone)."""
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
    def tx(self) -> Iterator[Cursor]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def transact(self, fn: Callable[[Cursor], T]) -> T:
        """`fn` inside a transaction, perhaps one shared with other threads' (group commit: see
        journal/groupcommit.py). `fn` may run twice (its batch rolled back): only SQL in it."""
        return self.group.transact(lambda: fn(self))

    def advisory_lock(self) -> None:
        pass  # BEGIN IMMEDIATE already serialises writers

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Postgres:
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
    def tx(self) -> Iterator[Cursor]:
        with self._conn() as conn, conn.transaction():
            self._tx.conn = conn
            try:
                yield self
            finally:
                self._tx.conn = None

    def transact(self, fn: Callable[[Cursor], T]) -> T:
        """`fn` inside a transaction of its own (a pool of connections: no queue to group)."""
        with self.tx() as db:
            return fn(db)

    def advisory_lock(self) -> None:
        self.run("SELECT pg_advisory_xact_lock(4242424242)")  # one migrator at a time

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


def data_errors() -> tuple[type[BaseException], ...]:
    """The drivers' errors for a value that can never be stored, whatever the database's state:
    psycopg's DataError (U+0000 in text, a value out of range) and SQLite's, and the
    UnicodeEncodeError both drivers raise for a lone surrogate. Permanent, never transient."""
    found: tuple[type[BaseException], ...] = (sqlite3.DataError, UnicodeEncodeError)
    try:
        import psycopg

        return (*found, psycopg.DataError)
    except ImportError:  # pragma: no cover
        return found


def unstorable(exc: BaseException) -> UnstorableValue:
    """The permanent error for a driver's data error (its text says which value; no secret:
    drivers never echo the value itself)."""
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return UnstorableValue(f"a value cannot be stored in the journal: {reason}")


def db_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg

        return (*_DB_ERRORS, psycopg.Error)
    except ImportError:  # pragma: no cover
        return _DB_ERRORS


