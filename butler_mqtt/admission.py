"""Admission: which of a stage's tasks start now, attach, are skipped or wait in the queue.

The run policies of contract section 7, applied to the tasks a stage is about to start (after
selection, the allow-list and the crash-resume plan). `policies.decide` is the rule; this module
gathers its inputs and carries its verdicts out:

* running state: QRS's `operational.lastExecutionResult` from the resolution query (no extra
  call), plus the executions butler-mqtt started and has not seen end (the journal's `runs`
  and what the tracker follows);
* the running execution's session id, when the task runs and was not started by us: one
  `executionresult/full?filter=id eq R ...` call for every such task of the stage (only with
  `ifRunning` attach, skip or queue);
* the durable queue (`journal.runq`): reruns and waits for a slot, joined per task; a stage's
  own new entries that may start now (free slot, nothing of higher priority waiting) are
  claimed and started inline, so a request under the cap is answered `started` at once.

With the defaults (`ifRunning: start`, `max_running: 0`) nothing here runs: no journal or QRS
call is added to a request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from butler_mqtt.backends.base import Backend
from butler_mqtt.errors import QrsError
from butler_mqtt.journal import Journal
from butler_mqtt.journal.runq import Entry, Queued, Waiter, Wanted
from butler_mqtt.model import QrsTask, Route, TaskOutcome
from butler_mqtt.policies import Action, Policy, decide, stops_running

log = structlog.get_logger("butler_mqtt.admission")

#: What the tracker follows right now: task id -> execution id.
Followed = Callable[[], dict[str, str]]


@dataclass(frozen=True)
class Ticket:
    """Who asks: the request's journal key, its requestId, the stage, where its replies go."""

    key: str | None
    request_id: str | None
    stage: int | None
    route: Route | None
    attempt: int | None = None


@dataclass
class Admitted:
    """The verdicts for one stage's candidates."""

    to_start: list[TaskOutcome] = field(default_factory=list)  # start now
    decided: list[TaskOutcome] = field(default_factory=list)  # alreadyRunning / skipped / queued
    claimed: dict[str, tuple[Entry, str]] = field(default_factory=dict)  # task id -> (entry, waiter key): inline
    queued: dict[int, TaskOutcome] = field(default_factory=dict)  # entry id -> the queued task
    stopping: list[TaskOutcome] = field(default_factory=list)  # ifRunning restart: `stopping` events, first


class Admission:
    def __init__(self, backend: Backend, journal: Journal | None) -> None:
        self.backend = backend
        self.journal = journal
        self.followed: Followed | None = None  # set once the tracker exists
        self.on_queued: Callable[[], None] | None = None  # wakes the queue runner
        #: ifRunning restart: ask the backend to stop (task id, execution id), once per execution
        #: (runtime.build sets it to the stop use case's coalescer).
        self.stop: Callable[[str, str], None] | None = None

    @staticmethod
    def needed(policy: Policy) -> bool:
        return policy.if_running != "start" or policy.max_running > 0

    def admit(self, candidates: list[TaskOutcome], tasks: dict[str, QrsTask], policy: Policy, t: Ticket) -> Admitted:
        """Raises QrsError (transient or not) before anything was started or queued."""
        out = Admitted()
        if not candidates:
            return out
        if self.journal is None or not self.needed(policy):
            out.to_start = list(candidates)
            return out
        ours, waiting = self.journal.runq.state_of([o.task_id for o in candidates])
        if self.followed is not None:
            ours = {**self.followed(), **ours}
        actions: dict[str, Action] = {}
        restarting: set[str] = set()
        for o in candidates:
            task = tasks.get(o.task_id)
            running = o.task_id in ours or (task is not None and task.running)
            actions[o.task_id] = decide(policy, running, o.task_id in waiting)
            if stops_running(policy, actions[o.task_id], running):
                restarting.add(o.task_id)
        executions = self._running_executions(candidates, tasks, ours, actions, restarting)
        self._stop_for_restart(candidates, restarting, executions, out)
        wanted: list[tuple[TaskOutcome, Wanted]] = []
        for o in candidates:
            action, eid = actions[o.task_id], executions.get(o.task_id)
            if action == "start":
                out.to_start.append(o)
            elif action == "attach":
                o.status, o.execution_id = "alreadyRunning", eid
                o.reason = None if eid else "the task is running in QRS; its execution could not be identified"
                out.decided.append(o)
            elif action == "skip":
                o.status = "skipped"
                o.reason = f"the task is running (execution {eid or 'not identified'}); ifRunning: skip"
                out.decided.append(o)
            else:
                after = eid if action in ("rerun", "restart") else None
                if action in ("rerun", "restart") and after is None:
                    log.warning("rerun_without_execution", taskId=o.task_id,
                                detail="the running execution could not be identified: queued for the next slot instead")
                wanted.append((o, self._wanted(o, policy, t, after)))
        if wanted:
            self._enqueue(wanted, policy, out)
        return out

    def _stop_for_restart(self, candidates: list[TaskOutcome], restarting: set[str], executions: dict[str, str],
                          out: Admitted) -> None:
        """ifRunning restart: stop each running execution (once: the coalescer), a `stopping` event each."""
        for o in candidates:
            eid = executions.get(o.task_id)
            if o.task_id not in restarting or eid is None:
                continue
            if self.stop is not None:
                self.stop(o.task_id, eid)  # raises QrsError: nothing was started or queued yet
            out.stopping.append(TaskOutcome(o.task_id, o.task_name, "stopping", list(o.matched_by), eid,
                                            attempt=o.attempt))

    def _running_executions(
        self, candidates: list[TaskOutcome], tasks: dict[str, QrsTask], ours: dict[str, str], actions: dict[str, Action],
        restarting: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> dict[str, str]:
        """task id -> the running execution's id, for the tasks whose verdict names it."""
        out = {o.task_id: ours[o.task_id] for o in candidates if o.task_id in ours}
        unknown: list[QrsTask] = []  # running in Qlik, not started by us: ask the backend
        for o in candidates:
            task = tasks.get(o.task_id)
            wanted = actions[o.task_id] in ("attach", "skip", "rerun", "restart") or o.task_id in restarting
            if o.task_id not in out and wanted and task is not None and task.last_result_id:
                unknown.append(task)
        if unknown:
            try:
                found = self.backend.running_executions(unknown)
            except QrsError as exc:
                log.warning("running_execution_lookup_failed", error=str(exc), tasks=len(unknown))
                if any(actions[t.id] in ("rerun", "restart") for t in unknown):
                    raise  # a rerun must know what to wait for: the request is retried later
                found = {}
            out.update({tid: eid for tid, eid in found.items() if tid not in out})
        return out

    @staticmethod
    def _wanted(o: TaskOutcome, policy: Policy, t: Ticket, after: str | None) -> Wanted:
        key = t.key if t.key is not None else f"nokey:{uuid.uuid4().hex}"  # unique: never merges two requests
        waiter = Waiter(key, t.request_id, o.task_id, t.stage, t.route or Route(""), list(o.matched_by), t.attempt,
                        journaled=t.key is not None)
        return Wanted(o.task_id, o.task_name, policy.priority, waiter, after)

    def _enqueue(self, wanted: list[tuple[TaskOutcome, Wanted]], policy: Policy, out: Admitted) -> None:
        assert self.journal is not None
        placed: list[Queued] = self.journal.runq.enqueue([w for _, w in wanted], policy.queue_timeout,
                                                         policy.max_running > 0)
        fresh = {q.entry_id for (_, w), q in zip(wanted, placed, strict=True) if not q.joined and w.after_execution is None}
        claimed = {e.id: e for e in self.journal.runq.claim(policy.max_running, only=fresh)} if fresh else {}
        rest = {q.entry_id for q in placed if q.entry_id not in claimed}
        positions = self.journal.runq.positions(rest) if claimed and rest else {q.entry_id: q.position for q in placed}
        for (o, w), q in zip(wanted, placed, strict=True):
            entry = claimed.get(q.entry_id)
            if entry is not None:
                out.to_start.append(o)
                out.claimed[o.task_id] = (entry, w.waiter.key)
                continue
            o.status, o.position = "queued", positions[q.entry_id]
            out.decided.append(o)
            out.queued[q.entry_id] = o
        if out.queued and self.on_queued is not None:
            self.on_queued()

    def record(self, admitted: Admitted) -> None:
        """The inline-claimed entries' starts are done: record them (slots held by started reloads)."""
        if not admitted.claimed or self.journal is None:
            return
        by_task = {o.task_id: o for o in admitted.to_start}
        self.journal.runq.started(
            [(entry, _outcome_of(by_task[task_id]), waiter) for task_id, (entry, waiter) in admitted.claimed.items()],
        )
        if self.on_queued is not None:
            self.on_queued()  # other requests may have joined these entries meanwhile


def _outcome_of(o: TaskOutcome) -> dict[str, object]:
    d: dict[str, object] = {"status": o.status}
    if o.execution_id:
        d["executionId"] = o.execution_id
    if o.reason:
        d["reason"] = o.reason
    return d
