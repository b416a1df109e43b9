"""The journal on both backends: atomic claims, replay, resume, leases, migrations."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from butler_mqtt.errors import JournalError
from butler_mqtt.journal import SCHEMA_VERSION, Journal
from butler_mqtt.journal.records import ROWS_PER_INSERT


@pytest.fixture(params=["sqlite", "postgresql"])
def make(request, tmp_path: Path):
    made: list[Journal] = []
    url = request.getfixturevalue("fresh_pg") if request.param == "postgresql" else None

    def make(owner: str = "a", lease_s: float = 30.0) -> Journal:
        j = Journal(tmp_path / "j.sqlite3", url=url, owner=owner, lease_s=lease_s)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()


def test_migrations_run_once_and_are_versioned(make):
    a = make()
    b = make("b")  # a second instance on the same database: no error, same version
    assert a.schema_version() == b.schema_version() == SCHEMA_VERSION


def test_new_done_and_replay(make):
    j = make()
    assert j.begin("k", "mqtt") is None
    j.reply("k", {"event": "task", "taskId": "t1"})
    j.reply("k", {"event": "summary"})
    j.finish("k")
    prior = j.begin("k", "mqtt")
    assert prior is not None and prior.done
    assert [e["event"] for e in prior.replies] == ["task", "summary"]


def test_many_intents_and_replies_are_kept_whole_and_in_order(make):
    """Intents and replies go in as multi-row INSERTs of at most ROWS_PER_INSERT rows: more rows
    than that (a 1201-task request) are all kept, in the order given, on both databases."""
    n = 2 * ROWS_PER_INSERT + 201
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]
    j = make()
    assert j.begin("big", "mqtt") is None
    j.intents("big", ids)
    j.finish("big", [{"event": "task", "taskId": t, "n": i} for i, t in enumerate(ids)] + [{"event": "summary"}])
    prior = j.begin("big", "mqtt")
    assert prior is not None and prior.done
    assert list(prior.intents) == ids
    assert [e.get("n") for e in prior.replies[:-1]] == list(range(n))
    assert [e.get("taskId") for e in prior.replies[:-1]] == ids and prior.replies[-1] == {"event": "summary"}


def test_exactly_one_of_many_concurrent_claims_wins(make):
    instances = [make(f"i{n}") for n in range(4)]
    results: list[object] = []
    barrier = threading.Barrier(len(instances))

    def claim(j: Journal) -> None:
        barrier.wait()
        try:
            results.append(j.begin("race", "mqtt", wait_s=0.5))
        except JournalError:
            results.append("busy")

    threads = [threading.Thread(target=claim, args=(j,)) for j in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == 1  # one winner; the others waited for it and gave up


def test_waiting_instance_gets_the_winners_outcome(make):
    a, b = make("a"), make("b")
    assert a.begin("k", "mqtt") is None
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(b.begin("k", "mqtt", wait_s=30)))
    t.start()
    a.reply("k", {"event": "summary", "requestId": "k"})
    a.finish("k")
    t.join(30)
    assert got and got[0].done and got[0].replies == [{"event": "summary", "requestId": "k"}]


def test_dead_owner_is_taken_over_after_its_lease(make):
    a = make("a", lease_s=2)
    b = make("b", lease_s=2)
    assert a.begin("k", "mqtt") is None
    a.intents("k", ["task-1"])
    prior = b.begin("k", "mqtt", wait_s=30)  # waits for a's lease to run out, then resumes
    assert prior is not None and not prior.done and "task-1" in prior.intents


def test_own_open_request_resumed_at_once_after_restart(make):
    a = make("same-client-id", lease_s=600)
    assert a.begin("k", "mqtt") is None
    a.intents("k", ["t1"])
    a2 = make("same-client-id", lease_s=600)
    prior = a2.begin("k", "mqtt", wait_s=0.1)
    assert prior is not None and "t1" in prior.intents


def test_waits_are_leased_and_adopted(make):
    a = make("a", lease_s=2)
    b = make("b", lease_s=2)
    a.save_wait("w1", '{"x": 1}')
    assert b.claim_waits() == []  # a is alive (lease runs)
    a.renew_waits()
    assert a.own_waits() == [("w1", '{"x": 1}')]
    import time

    time.sleep(2.2)  # a stops renewing: it died
    assert b.claim_waits() == [("w1", '{"x": 1}')]
    assert b.claim_waits() == []  # taken once
    assert a.own_waits() == []


def test_purge_keeps_what_is_still_followed(make):
    j = make()
    j.retention = 0
    j.begin("old", "mqtt")
    j.begin("followed", "mqtt")
    j.save_wait("followed", "{}")
    assert j.purge() == 1
    assert j.load("followed") is not None and j.load("old") is None


def test_a_newer_schema_is_refused_not_silently_used(make):
    j = make()
    j._db.run("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(JournalError, match="newer"):
        make("b")


@pytest.mark.parametrize("bad", ["nul\u0000id", "lone\ud800surrogate"])
def test_a_value_the_journal_cannot_store_is_a_bad_request_not_an_outage(make, bad):
    """The second line of defence behind ingress validation: the driver's data error (U+0000 in
    PostgreSQL text, a lone surrogate anywhere) is permanent, never "journal unavailable"."""
    from butler_mqtt.errors import UnstorableValue, is_transient

    j = make()
    if bad.startswith("nul") and j.dialect == "sqlite":
        assert j.begin(f"id:{bad}", "mqtt") is None  # SQLite holds U+0000; ingress refuses it for both
        return
    with pytest.raises(UnstorableValue) as caught:
        j.begin(f"id:{bad}", "mqtt")
    assert not is_transient(caught.value) and caught.value.error == "Invalid request"
    assert j.begin("id:fine", "mqtt") is None  # the journal is not wedged by it


def test_a_fresh_claim_clears_events_left_under_its_key(make):
    """The claim of a new key is one statement; events an earlier use of the key left behind
    (a journal edited by hand, an older version) are still deleted, never read as this request's."""
    j = make()
    j._db.run("INSERT INTO events(key, kind, task_id, body) VALUES ('k', 'intent', 't-old', '0')")
    assert j.begin("k", "mqtt") is None
    j.finish("k", [{"event": "summary"}])
    prior = j.begin("k", "mqtt")
    assert prior is not None and prior.done and list(prior.intents) == []
    assert prior.replies == [{"event": "summary"}]


def _lease(j: Journal, key: str) -> float:
    return float(j._db.run("SELECT lease_until FROM requests WHERE key = ?", (key,))[0][0])


def test_intents_renew_the_lease_unless_it_was_set_within_a_second(make, monkeypatch):
    """Right after the claim the lease is fresh (no renewal statement); a later stage's intents,
    a second or more on, renew it, so a live owner is never taken over mid-request."""
    import butler_mqtt.journal.records as records

    j = make(lease_s=30)
    assert j.begin("k", "mqtt") is None
    claimed = _lease(j, "k")
    j.intents("k", ["t1"])
    assert _lease(j, "k") == claimed  # not renewed: set milliseconds ago
    real = records.time.time
    monkeypatch.setattr(records.time, "time", lambda: real() + 1.5)  # past Leases.RENEW_AFTER_S
    j.intents("k", ["t2"])
    assert _lease(j, "k") >= claimed + 1.4
    prior = j.load("k")
    assert prior is not None and list(prior.intents) == ["t1", "t2"]


def test_a_key_the_journal_does_not_remember_gets_its_lease_renewed(make):
    """Intents for a key this instance has no note of (claimed by a resume, or its notes
    cleared) renew the lease: the note only ever saves a statement, never a renewal."""
    j = make(lease_s=600)
    assert j.begin("k", "mqtt") is None
    j.records.leases.drop("k")
    j._db.run("UPDATE requests SET lease_until = 0 WHERE key = 'k'")
    j.intents("k", ["t1"])
    assert _lease(j, "k") > 0


def test_a_single_task_request_is_four_statements_and_no_transaction(tmp_path: Path):
    """The request path's journal writes (claim, intents, done with two replies) are single
    statements, atomic each: every statement releases the GIL while the journal's lock is held,
    and BEGIN/COMMIT around them made the request workers queue behind that lock (SQLite)."""
    j = Journal(tmp_path / "j.sqlite3")
    seen: list[str] = []
    j._db._db.set_trace_callback(seen.append)
    try:
        assert j.begin("k", "mqtt", request={"taskId": ["t1"]}) is None
        j.intents("k", ["t1"])
        j.finish("k", [{"event": "task", "taskId": "t1"}, {"event": "summary"}])
    finally:
        j._db._db.set_trace_callback(None)
        j.close()
    words = [s.split()[0].upper() for s in seen]
    assert words == ["INSERT", "INSERT", "INSERT", "UPDATE"], seen
