"""The simulated Qlik Sense scheduler: capacity, queue timeout, scripted outcomes, retries.

No clock and no thread: the store places an execution in the :class:`Fifo` when it is
triggered and keeps the times it gets; every state, detail line and result row is then read
off those times (:func:`timeline`) whenever a client asks (see :mod:`.store`). When a scheduler
setting changes, the store builds a new queue from the slots busy at that moment and places
the executions still waiting (Triggered or Queued) again, in trigger order.

Model (qrs-api.md 6.6; choices where the research is silent are marked *chosen*):

* An execution is Triggered (1) for the store's ``start_delay``, then needs a slot of the
  scheduler. ``capacity`` slots exist (0 = unlimited; QRS's "Max concurrent reloads" defaults
  to 4). Without a free slot the execution is Queued (3) until one frees; queued executions
  start in trigger order (first in, first out), each as soon as a slot frees.
* A slot is held from the start of the first attempt to the end of the last one, including
  the Retry pauses between them (*chosen*: a retry does not go back into the queue).
* ``queue_timeout`` seconds (None = off; QRS's default is 30 minutes): an execution Queued
  longer than that is cancelled, ends Aborted (6) (*chosen*, qrs-api.md 6.6 allows Aborted or
  Reset) with a detail line naming the queue timeout, never runs and holds no slot.
* Attempts: an attempt fails when the task's ``outcome`` is ``"fail"`` or while the task's
  run number (counted per task over every attempt that ran, retries included) is at most its
  ``fail_first``. A failed attempt is retried up to the task's ``maxRetries`` times: the
  execution shows Retry (10) for the store's ``retry_delay``, then the next attempt runs within the
  same execution session, with its own execution result row. The session ends with the last
  attempt's state.
* Result rows: the row of attempt ``i`` appears when that attempt starts, so the newest row by
  ``startTime`` is always the current one; a retried row shows Retry (10) during the pause and
  FinishedFail (8) once the next attempt has started.
* A failed attempt gets an Error detail (``detailsType`` 0) with the task's failure message
  just before "Reference to scriptlog added".
* A stop (:func:`stopped`, qrs-api.md 13.1) cuts a timeline at the moment it arrives: the
  execution shows AbortInitiated (4), then Aborting (5), and ends Aborted (6) on the row of the
  attempt current at the stop; attempts still to come never happen (*chosen*: a stop during a
  Retry pause aborts the retried row; one before the first attempt started leaves a row that
  never started and holds no slot).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

#: TaskExecutionStatus (qrs-api.md 6.4), index = wire value.
STATUS_NAMES = (
    "NeverStarted",
    "Triggered",
    "Started",
    "Queued",
    "AbortInitiated",
    "Aborting",
    "Aborted",
    "FinishedSuccess",
    "FinishedFail",
    "Skipped",
    "Retry",
    "Error",
    "Reset",
    "DistributionQueue",
    "DistributionRunning",
)
TRIGGERED, STARTED, QUEUED, ABORT_INITIATED, ABORTING, ABORTED = 1, 2, 3, 4, 5, 6
FINISHED_SUCCESS, FINISHED_FAIL, RETRY = 7, 8, 10

#: ExecutionResultDetail ``detailsType`` (qrs-api.md 13.2).
DETAIL_ERROR, DETAIL_WARNING, DETAIL_INFORMATION = 0, 1, 2

#: Detail lines of one phase are this far apart, so sorting by detailCreatedDate gives their order.
LINE_STEP = 0.001


@dataclass(frozen=True)
class Waiting:
    """An execution that needs a slot: when it could start, and how long it holds the slot."""

    ready_at: float
    occupancy: float


@dataclass(frozen=True)
class Decision:
    """When a waiting execution starts, or (``started_at`` None) when it is cancelled."""

    started_at: float | None
    cancelled_at: float | None = None


class Fifo:
    """The scheduler's queue: ``capacity`` slots (0 = unlimited), first in, first out.

    ``busy_until`` holds the end times of the executions holding a slot at ``now`` (there may
    be more of them than ``capacity`` after the capacity was lowered). :meth:`place` then gives
    each execution, in trigger order, its start or cancel time; the state it keeps (the slots'
    end times and the latest start, which no later trigger overtakes) is all the next one needs.
    """

    def __init__(
        self, capacity: int, queue_timeout: float | None, busy_until: Iterable[float] = (), now: float = 0.0
    ) -> None:
        self.capacity = capacity
        self.queue_timeout = queue_timeout
        self._busy = sorted(t for t in busy_until if t > now)
        self._previous = now

    def place(self, item: Waiting, now: float) -> Decision:
        """Start (or cancel) ``item``, triggered after everything placed before; not before ``now``."""
        if self.capacity <= 0:
            return Decision(max(item.ready_at, now))
        busy = self._busy
        ready = max(item.ready_at, now, self._previous)
        del busy[: bisect.bisect_right(busy, ready)]
        start = ready if len(busy) < self.capacity else busy[len(busy) - self.capacity]
        if self.queue_timeout and start > item.ready_at + self.queue_timeout:
            return Decision(None, max(item.ready_at + self.queue_timeout, now))
        del busy[: bisect.bisect_right(busy, start)]
        bisect.insort(busy, start + item.occupancy)
        self._previous = start
        return Decision(start)


def attempt_outcomes(*, always_fails: bool, fail_first: int, max_retries: int, runs_before: int) -> tuple[int, ...]:
    """The final state of each attempt of one execution (the last one is the session's).

    ``runs_before`` is how many attempts of the task ran before this execution.
    """
    outcomes: list[int] = []
    while True:
        failed = always_fails or runs_before + len(outcomes) + 1 <= fail_first
        outcomes.append(FINISHED_FAIL if failed else FINISHED_SUCCESS)
        if not failed or len(outcomes) > max_retries:
            return tuple(outcomes)


def occupancy(attempts: int, run_seconds: float, retry_pause: float) -> float:
    """How long an execution of ``attempts`` attempts holds its slot."""
    return attempts * run_seconds + (attempts - 1) * retry_pause


@dataclass(frozen=True)
class Phase:
    """From ``at`` on (until the next phase), the execution is in ``status``, shown on ``row``."""

    at: float
    status: int
    row: int


@dataclass(frozen=True)
class Line:
    """A detail line of result row ``row``, shown from phase index ``phase`` on."""

    phase: int
    row: int
    at: float
    message: str
    kind: int = DETAIL_INFORMATION  # detailsType: 0 Error, 1 Warning, 2 Information


@dataclass(frozen=True)
class Row:
    """One execution result row (one attempt) on a timeline.

    ``started_phase`` is None for an attempt that never started (a cancelled execution);
    ``final_phase`` is the phase index from which the row shows ``final_status``.
    """

    start: float | None
    stop: float
    started_phase: int | None
    final_phase: int
    final_status: int


@dataclass(frozen=True)
class Timeline:
    phases: tuple[Phase, ...]
    lines: tuple[Line, ...]
    rows: tuple[Row, ...]
    times: tuple[float, ...]  # the phases' start times

    @property
    def end(self) -> float:
        """When the execution session ends (its last phase begins)."""
        return self.phases[-1].at

    def phase_at(self, now: float) -> int:
        """Index of the phase the execution is in at ``now``."""
        return max(0, bisect.bisect_right(self.times, now) - 1)


@dataclass(frozen=True)
class RunPlan:
    """What one execution will do once it has a slot."""

    outcomes: tuple[int, ...]
    run_seconds: float
    retry_pause: float
    max_retries: int
    is_reload: bool
    node: str
    failure_message: str = ""


class _Builder:
    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.lines: list[Line] = []
        self.rows: list[Row] = []

    def phase(self, at: float, status: int, row: int) -> int:
        self.phases.append(Phase(at, status, row))
        return len(self.phases) - 1

    def say(self, phase: int, row: int, at: float, *messages: str, kind: int = DETAIL_INFORMATION) -> None:
        for i, message in enumerate(messages):
            self.lines.append(Line(phase, row, at + i * LINE_STEP, message, kind))

    def done(self) -> Timeline:
        phases = tuple(self.phases)
        return Timeline(phases, tuple(self.lines), tuple(self.rows), tuple(p.at for p in phases))


def timeline(triggered_at: float, ready_at: float, decision: Decision, plan: RunPlan, queue_timeout: float | None) -> Timeline:
    """Phases, detail lines and result rows of one execution (messages modelled on QRS's)."""
    b = _Builder()
    b.say(
        b.phase(triggered_at, TRIGGERED, 0),
        0,
        triggered_at,
        "Changing task state to Triggered",
        f"Trying to start task. Sending task to slave-node {plan.node}",
    )
    start = decision.started_at
    queued = start is None or start > ready_at
    if queued:
        b.say(b.phase(ready_at, QUEUED, 0), 0, ready_at, "Changing task state from Triggered to Queued")
    if start is None:
        at = decision.cancelled_at if decision.cancelled_at is not None else ready_at
        aborted = b.phase(at, ABORTED, 0)
        b.say(
            aborted,
            0,
            at,
            f"Task was cancelled: it waited in the scheduler queue longer than the queue timeout "
            f"({queue_timeout or 0:g} seconds)",
            "Changing task state from Queued to Aborted",
        )
        b.rows.append(Row(None, at, None, aborted, ABORTED))
        return b.done()
    _attempts(b, start, "Queued" if queued else "Triggered", plan)
    return b.done()


def _attempts(b: _Builder, start: float, previous: str, plan: RunPlan) -> None:
    count = len(plan.outcomes)
    for i, outcome in enumerate(plan.outcomes):
        started = b.phase(start, STARTED, i)
        if i > 0:
            b.say(started, i - 1, start, f"Retry {i} of {plan.max_retries}: the task was started again")
            b.rows[i - 1] = _closed(b.rows[i - 1], started)
        b.say(started, i, start, f"Changing task state from {previous} to Started")
        end = start + plan.run_seconds
        last = i == count - 1
        ended = b.phase(end, outcome if last else RETRY, i)
        at = end
        if outcome == FINISHED_FAIL and plan.failure_message:
            b.say(ended, i, at, plan.failure_message, kind=DETAIL_ERROR)
            at += LINE_STEP
        messages = ["Reference to scriptlog added"] if plan.is_reload else []
        messages.append(f"Changing task state from Started to {STATUS_NAMES[outcome if last else RETRY]}")
        b.say(ended, i, at, *messages)
        b.rows.append(Row(start, end, started, ended, outcome))
        start, previous = end + plan.retry_pause, "Retry"


def _closed(row: Row, phase: int) -> Row:
    """A retried attempt's row: final (FinishedFail) once the next attempt has started."""
    return Row(row.start, row.stop, row.started_phase, phase, row.final_status)


@dataclass(frozen=True)
class Stop:
    """A stop request (``POST /qrs/task/{id}/stop``) at ``at``: the execution shows
    AbortInitiated (4) for ``initiated_for`` seconds, then Aborting (5) for ``aborting_for``
    seconds, then ends Aborted (6) (qrs-api.md 13.1)."""

    at: float
    initiated_for: float
    aborting_for: float

    @property
    def ends_at(self) -> float:
        return self.at + self.initiated_for + self.aborting_for


def stopped(t: Timeline, stop: Stop) -> Timeline:
    """``t`` cut at ``stop.at`` and ended by AbortInitiated -> Aborting -> Aborted.

    What had happened before the stop stays (phases, detail lines, earlier attempts' rows);
    the attempt current at the stop ends Aborted on its own row, with an Error detail line
    saying who stopped it; later attempts never happen. Phases already begun are kept
    whole (*chosen*); a stop before the first attempt started leaves a row that never started.
    """
    keep = t.phase_at(stop.at) + 1
    current = t.phases[keep - 1]
    row_index = current.row
    b = _Builder()
    b.phases = list(t.phases[:keep])
    b.lines = [line for line in t.lines if line.phase < keep]
    initiated = b.phase(stop.at, ABORT_INITIATED, row_index)
    b.say(initiated, row_index, stop.at, "Abort requested by user (manual stop)", kind=DETAIL_WARNING)
    b.say(
        initiated, row_index, stop.at + LINE_STEP,
        f"Changing task state from {STATUS_NAMES[current.status]} to AbortInitiated",
    )
    aborting_at = max(stop.at + 2 * LINE_STEP, stop.at + stop.initiated_for)
    aborting = b.phase(aborting_at, ABORTING, row_index)
    b.say(aborting, row_index, aborting_at, "Changing task state from AbortInitiated to Aborting")
    aborted_at = max(aborting_at + LINE_STEP, aborting_at + stop.aborting_for)
    aborted = b.phase(aborted_at, ABORTED, row_index)
    b.say(aborted, row_index, aborted_at, "Task was aborted by a user", kind=DETAIL_ERROR)
    b.say(aborted, row_index, aborted_at + LINE_STEP, "Changing task state from Aborting to Aborted")
    b.rows = list(t.rows[: row_index + 1])
    row = b.rows[row_index]
    began = row.started_phase is not None and row.started_phase < keep
    b.rows[row_index] = Row(
        row.start if began else None, aborted_at, row.started_phase if began else None, aborted, ABORTED
    )
    return b.done()
