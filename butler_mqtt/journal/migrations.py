"""Versioned schema migrations of the journal, per dialect ("sqlite", "postgresql"; "*" for both).

A newer schema than this code knows is refused (see `Journal._migrate`): never run an old
daemon on a journal an upgrade has changed.
"""

from __future__ import annotations

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
    # 2 is the run queue's (policies). 3: what the request history (journal/history.py) shows
    # beside the replies: where a request came from, the request itself (criteria, options;
    # JSON), and how often it was seen again as a duplicate.
    3: {
        "*": [
            "ALTER TABLE requests ADD COLUMN source TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE requests ADD COLUMN request TEXT",
            "ALTER TABLE requests ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE requests ADD COLUMN last_duplicate DOUBLE PRECISION",
            "CREATE INDEX IF NOT EXISTS events_task ON events(task_id)",
        ],
    },
}
SCHEMA_VERSION = max(MIGRATIONS)
