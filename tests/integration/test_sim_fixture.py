"""The shared `sim` fixture (tests/conftest.py) takes simulator knobs from the test module's
SIM_OPTIONS and from a `sim_options` marker, so daemon tests can run against a busy scheduler."""

from __future__ import annotations

import json
from typing import Any

import pytest

from butler_mqtt.sim import SimTask
from tests.support.simclock import FakeClock

A = "a2000000-0000-4000-8000-000000000001"
B = "a2000000-0000-4000-8000-000000000002"
TASKS = [SimTask(A, "Fixture A", run_seconds=10), SimTask(B, "Fixture B", run_seconds=10, max_retries=2)]
SIM_OPTIONS = {"max_concurrent": 1, "already_running": "409"}


def test_module_options_reach_the_simulator(sim: Any) -> None:
    assert (sim.max_concurrent, sim.queue_timeout, sim.already_running) == (1, None, "409")
    sim.store.clock = clock = FakeClock()
    sim.store.start(A)
    queued = sim.store.start(B)
    clock.at(1)
    assert sim.store.start(B).execution_id == queued.execution_id
    session = json.loads(sim.store.get("executionsession", queued.execution_id) or "null")
    assert session["executionResult"]["status"] == 3
    assert json.loads(sim.store.get("reloadtask", B) or "null")["maxRetries"] == 2


@pytest.mark.sim_options(max_concurrent=3, queue_timeout=60)
def test_a_marker_overrides_the_module_options(sim: Any) -> None:
    assert (sim.max_concurrent, sim.queue_timeout, sim.already_running) == (3, 60, "409")
    sim.max_concurrent = 0  # and they stay changeable while it runs
    assert sim.store.max_concurrent == 0
