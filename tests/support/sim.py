"""Reading the QRS simulator in tests."""

from __future__ import annotations

from typing import Any


def started_ids(sim: Any) -> list[str]:
    """The task IDs the simulator was asked to start (and did), sorted, repeats kept."""
    return sorted(s.task_id for s in sim.starts)
