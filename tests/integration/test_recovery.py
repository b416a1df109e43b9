"""Crash recovery through the journal, with the simulator: no start lost, none doubled."""

from __future__ import annotations

from pathlib import Path

import pytest

from butler_mqtt.backends.qrs.backend import QrsBackend
from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.journal import Journal
from butler_mqtt.model import StartRequest
from butler_mqtt.service import StartService, handle_request
from butler_mqtt.sim import QrsSimulator, SimTask
from tests.conftest import make_config

X = "abcdef01-0000-4000-8000-000000000001"
Y = "abcdef01-0000-4000-8000-000000000002"


@pytest.fixture
def setup(qrs_certs: Path, broker, tmp_path):
    sim = QrsSimulator(tasks=[SimTask(X, "X", tags=["t"]), SimTask(Y, "Y", tags=["t"])], certs_dir=qrs_certs).start()
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state")
    journal = Journal(tmp_path / "j.sqlite3")
    qrs = QrsClient(cfg.qrs)
    service = StartService(cfg, QrsBackend(qrs), journal)
    yield sim, service, journal
    service.close()
    qrs.close()
    journal.close()
    sim.stop()


def test_crash_after_start_sent_is_recovered_from_qrs_not_started_again(setup):
    sim, service, journal = setup
    req = StartRequest(requestId="k1", tag=["t"])
    # A first run "crashed": X's start reached QRS, Y's start intent was recorded but never sent.
    assert journal.begin("id:k1", "mqtt") is None
    journal.intents("id:k1", [X])
    started = sim.store.start(X)
    journal.intents("id:k1", [Y])
    events: list[dict] = []
    handled = handle_request(service, req, events.append, ingress="mqtt", key="id:k1")
    tasks = {e["taskId"]: e for e in handled.events if e["event"] == "task"}
    assert tasks[X]["status"] == "started" and tasks[X]["executionId"] == started.execution_id
    assert tasks[Y]["status"] == "started"
    assert sorted(s.task_id for s in sim.starts) == sorted([X, Y])  # each exactly once


def test_redelivery_after_done_replays(setup):
    sim, service, journal = setup
    req = StartRequest(requestId="k2", taskId=[X])
    first: list[dict] = []
    handle_request(service, req, first.append, ingress="mqtt", key="id:k2")
    again: list[dict] = []
    handled = handle_request(service, req, again.append, ingress="mqtt", key="id:k2")
    # the earlier outcome, each reply marked replayed (issue 25); the first ones are not
    assert handled.replayed and again == [{**e, "replayed": True} for e in first]
    assert not any("replayed" in e for e in first) and handled.events == again
    assert len(sim.starts) == 1


def test_journal_survives_reopen(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    j.begin("id:a", "mqtt")
    j.reply("id:a", {"event": "summary", "requestId": "a"})
    j.finish("id:a")
    j.close()
    j2 = Journal(tmp_path / "j.sqlite3")
    prior = j2.begin("id:a", "mqtt")
    assert prior is not None and prior.done and prior.replies == [{"event": "summary", "requestId": "a"}]
    j2.close()


def test_a_task_in_two_chain_stages_is_started_in_each(setup):
    sim, service, journal = setup
    assert journal.begin("id:chain", "mqtt") is None
    events: list[dict] = []
    service.run_stage(StartRequest(taskId=[X]), "chain", events.append, 0, "id:chain")
    import time

    time.sleep(0.5)  # X runs 0.2 s: let stage 0's run finish (a running task is not started again)
    # Stage 1 resumed after a crash: stage 0's intent for X must not count as stage 1's.
    service.run_stage(StartRequest(taskId=[X]), "chain", events.append, 1, "id:chain", journal.load("id:chain"))
    assert [s.task_id for s in sim.starts] == [X, X]
