"""Versioned schema migrations of the journal, per dialect ("sqlite", "postgresql"; "*" for both).

A newer schema than this code knows is refused (see `migrate`): never run an old
daemon on a journal an upgrade has changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from butler_mqtt.errors import JournalError

if TYPE_CHECKING:
    from butler_mqtt.journal.backends import Postgres, Sqlite


def migrate(journal_db: Sqlite | Postgres) -> None:
    """Bring the journal's schema up to SCHEMA_VERSION (under an advisory lock on PostgreSQL)."""
    with journal_db.tx() as db:
        journal_db.advisory_lock()
        db.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = db.run("SELECT max(version) FROM schema_version")[0][0] or 0
        if current > SCHEMA_VERSION:
            raise JournalError(
                f"the journal has schema version {current}, newer than this butler-mqtt knows ({SCHEMA_VERSION}):"
                " run the newer version, or restore the journal backup taken before the upgrade"
            )
        for version in sorted(v for v in MIGRATIONS if v > current):
            steps = MIGRATIONS[version]
            for stmt in steps.get("*", []) + steps.get(journal_db.dialect, []):
                db.run(stmt)
            db.run("INSERT INTO schema_version(version) VALUES (?)", (version,))


_RUNQ = """CREATE TABLE IF NOT EXISTS runq (
    id {id},
    task_id TEXT NOT NULL,
    task_name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    after_execution TEXT,                   -- a rerun: due once this execution ended
    state TEXT NOT NULL,                    -- waiting | starting | done
    outcome TEXT,                           -- JSON, when done: status, executionId, reason
    needs_slot INTEGER NOT NULL,            -- counted against max_running
    owner TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
)"""

_RUNQ_INDEXES = [
    "CREATE INDEX IF NOT EXISTS runq_task ON runq(task_id, state)",
    "CREATE INDEX IF NOT EXISTS runq_state ON runq(state, priority, id)",
]

#: Each version: statements per dialect ("sqlite", "postgresql"); "*" for both.
MIGRATIONS: dict[int, dict[str, list[str]]] = {
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
    # The run queue and the running-slot count (journal/runq.py, contract section 7).
    2: {
        "*": [
            """CREATE TABLE IF NOT EXISTS runq_waiters (
                entry_id BIGINT NOT NULL,
                key TEXT NOT NULL,
                request_id TEXT,
                task_id TEXT NOT NULL,
                stage INTEGER NOT NULL,             -- -1: the request has no chain
                route TEXT NOT NULL,                -- {"topic": ..., "correlation": hex | null}
                matched_by TEXT NOT NULL,           -- JSON list
                attempt INTEGER,
                journaled INTEGER NOT NULL,
                notified INTEGER NOT NULL,
                PRIMARY KEY (key, task_id, stage)
            )""",
            "CREATE INDEX IF NOT EXISTS runq_waiters_entry ON runq_waiters(entry_id)",
            """CREATE TABLE IF NOT EXISTS runs (
                execution_id TEXT PRIMARY KEY,
                task_id TEXT NOT NULL,
                started DOUBLE PRECISION NOT NULL,
                owner TEXT NOT NULL,
                lease_until DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS runs_task ON runs(task_id)",
        ],
        "sqlite": [_RUNQ.format(id="INTEGER PRIMARY KEY AUTOINCREMENT"), *_RUNQ_INDEXES],
        "postgresql": [_RUNQ.format(id="BIGSERIAL PRIMARY KEY"), *_RUNQ_INDEXES],
    },
    # What the request history (journal/history.py) shows beside the replies: where a request
    # came from, the request itself (criteria, options; JSON), how often it came again as a duplicate.
    3: {
        "*": [
            "ALTER TABLE requests ADD COLUMN source TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE requests ADD COLUMN request TEXT",
            "ALTER TABLE requests ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE requests ADD COLUMN last_duplicate DOUBLE PRECISION",
            "CREATE INDEX IF NOT EXISTS events_task ON events(task_id)",
        ],
    },
    # Callers (contract section 10): whose request it was, for the history (`--caller`).
    4: {
        "*": [
            "ALTER TABLE requests ADD COLUMN caller TEXT",
            "CREATE INDEX IF NOT EXISTS requests_caller ON requests(caller, created)",
        ],
    },
}
SCHEMA_VERSION = max(MIGRATIONS)
