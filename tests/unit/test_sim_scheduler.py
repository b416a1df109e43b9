"""The simulator's scheduler arithmetic (butler_mqtt/sim/scheduler.py), without a store."""

from __future__ import annotations

from collections.abc import Iterable

from butler_mqtt.sim.scheduler import Decision, Fifo, Waiting, attempt_outcomes


def schedule(
    waiting: list[Waiting], busy: Iterable[float], now: float, capacity: int, timeout: float | None
) -> list[Decision]:
    """Place ``waiting`` in trigger order on a fresh queue whose slots are busy until ``busy``."""
    fifo = Fifo(capacity, timeout, busy, now)
    return [fifo.place(item, now) for item in waiting]


def starts(decisions: list[Decision]) -> list[float | None]:
    return [d.started_at for d in decisions]


def test_first_in_first_out_over_the_slots() -> None:
    waiting = [Waiting(1, 10), Waiting(1, 4), Waiting(1, 2), Waiting(1, 5)]
    assert starts(schedule(waiting, [], 0, 2, None)) == [1, 1, 5, 7]
    assert starts(schedule(waiting, [], 0, 0, None)) == [1, 1, 1, 1]  # 0 = unlimited


def test_slots_freeing_at_the_same_moment_start_as_many() -> None:
    waiting = [Waiting(0, 1), Waiting(0, 1), Waiting(0, 1)]
    assert starts(schedule(waiting, [5, 5], 0, 2, None)) == [5, 5, 6]


def test_more_busy_than_capacity_waits_until_enough_have_ended() -> None:
    assert starts(schedule([Waiting(0, 1)], [3, 8, 9], 0, 2, None)) == [8]


def test_nothing_starts_before_now_and_the_timeout_counts_from_ready() -> None:
    assert schedule([Waiting(1, 1), Waiting(1, 1)], [4], 2, 1, 5) == [Decision(4), Decision(5)]
    assert schedule([Waiting(1, 1), Waiting(1, 1)], [4, 20], 2, 1, 5) == [Decision(None, 6)] * 2
    assert schedule([Waiting(1, 1)], [3], 2, 1, None) == [Decision(3)]
    # A timeout shortened below what an execution has waited cancels it now.
    assert schedule([Waiting(1, 1)], [10], 9, 1, 5) == [Decision(None, 9)]


def test_the_queue_state_carries_over_to_later_triggers() -> None:
    fifo = Fifo(1, None)
    assert fifo.place(Waiting(1, 10), 0) == Decision(1)
    assert fifo.place(Waiting(2, 3), 2) == Decision(11)
    assert fifo.place(Waiting(3, 1), 3) == Decision(14)  # behind the queued one, in order


def test_attempt_outcomes() -> None:
    assert attempt_outcomes(always_fails=False, fail_first=0, max_retries=3, runs_before=0) == (7,)
    assert attempt_outcomes(always_fails=False, fail_first=2, max_retries=3, runs_before=0) == (8, 8, 7)
    assert attempt_outcomes(always_fails=False, fail_first=2, max_retries=3, runs_before=1) == (8, 7)
    assert attempt_outcomes(always_fails=False, fail_first=5, max_retries=1, runs_before=0) == (8, 8)
    assert attempt_outcomes(always_fails=True, fail_first=0, max_retries=0, runs_before=9) == (8,)
