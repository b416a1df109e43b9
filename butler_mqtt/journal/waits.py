"""The chains being followed (`waits`), in the journal: saved, dropped, and taken over by lease.

A wait carries an owner and a lease like a request: the instance following a chain renews it;
a surviving instance takes over the waits of one whose lease expired.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from butler_mqtt.journal import Journal


class StoredWaits:
    """The `waits` table, on the journal's database (Journal.save_wait & co. delegate here)."""

    def __init__(self, journal: Journal) -> None:
        self.j = journal

    def save(self, key: str, body: str) -> None:
        now = time.time()
        with self.j._guard("write"):
            self.j._db.run(
                "INSERT INTO waits(key, body, updated, owner, lease_until) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET body = excluded.body, updated = excluded.updated,"
                " owner = excluded.owner, lease_until = excluded.lease_until",
                (key, body, now, self.j.owner, now + self.j.lease_s),
            )

    def drop(self, key: str) -> None:
        with self.j._guard("write"):
            self.j._db.run("DELETE FROM waits WHERE key = ?", (key,))

    def claim(self) -> list[tuple[str, str]]:
        """Take every wait that is ours (a previous run) or whose owner's lease expired.

        Returns (key, body) of the waits newly taken. Atomic per row: of several surviving
        instances, one takes each orphaned chain.
        """
        now = time.time()
        with self.j._guard("claim"):
            return [
                (str(k), str(b))
                for k, b in self.j._db.run(
                    "UPDATE waits SET owner = ?, lease_until = ? WHERE owner <> ? AND lease_until < ?"
                    " RETURNING key, body",
                    (self.j.owner, now + self.j.lease_s, self.j.owner, now),
                )
            ]

    def own(self) -> list[tuple[str, str]]:
        with self.j._guard("read"):
            return [(str(k), str(b)) for k, b in self.j._db.run("SELECT key, body FROM waits WHERE owner = ?", (self.j.owner,))]

    def renew(self) -> None:
        """Extend the lease of every wait this instance follows (called at least every lease/3)."""
        with self.j._guard("write"):
            self.j._db.run("UPDATE waits SET lease_until = ? WHERE owner = ?", (time.time() + self.j.lease_s, self.j.owner))
