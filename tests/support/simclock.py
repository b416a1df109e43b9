"""A settable clock for the QRS simulator (``Store(clock=...)`` or ``sim.store.clock = ...``):
executions are computed from the clock, so a test moves time instead of sleeping."""

from __future__ import annotations


class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.start = now
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> None:
        """Set the time to ``offset`` seconds after the start."""
        self.now = self.start + offset
