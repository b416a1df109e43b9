"""The stop use case (contract section 8): stop the running executions of the selected tasks.

Used by every ingress (MQTT `topics.stop`, REST `/v4/reloadtask/{id|-}/stop`, the CLI through
MQTT) and by the run policies (`ifRunning: restart`, `onDeadline: stop`). Per request:

1. claimed in the journal under its own key space (`stop:<key>`): the same requestId is not
   acted on twice; a duplicate gets the recorded outcome;
2. one resolution query (the same as a start's) -> the pure selection and the allow-list
   (`selection.plan`: denied tasks are never touched);
3. which selected tasks run: the resolution answer's running state (one extra call for their
   execution ids) and what butler-mqtt itself follows and has not seen end;
4. the intents `stop/<task>/<execution>` are recorded before any stop is sent; after a crash a
   task with an intent is stopped again only if that same execution still runs (a stop is
   idempotent), a later execution of the task is never touched;
5. the stops go out with bounded concurrency (`qrs.start_concurrency`), coalesced per task: a
   stop for a task whose stop is in flight waits for that one instead of sending another;
6. replies (replies.py): a `task` event per task (`stopping` with the executionId, `notRunning`,
   `denied`, `failed`), the stop `summary`; with `wait` the tracker follows each stopped
   execution (never retried, no deadline) to its `taskFinished` and `requestFinished`.

A stop never starts anything: nothing here calls `Backend.start`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from butler_mqtt import replies
from butler_mqtt.backends.base import Backend, StopAnswer
from butler_mqtt.callers import label, restrict
from butler_mqtt.config import CallerConfig
from butler_mqtt.errors import QrsError
from butler_mqtt.journal import Prior
from butler_mqtt.model import QrsTask, RetryRequest, Route, StopRequest, TaskOutcome
from butler_mqtt.replies import Event
from butler_mqtt.selection import plan
from butler_mqtt.service import CALLER_CONTEXT, Claim, Emit, Handled, StageResult, StartService

log = structlog.get_logger("butler_mqtt.stops")

#: The journal key of a stop request (its own key space: a start and a stop may share a requestId).
KEY_PREFIX = "stop:"


def intent(task_id: str, execution_id: str) -> str:
    return f"stop/{task_id}/{execution_id}"


@dataclass(frozen=True)
class StopJob:
    task_id: str
    execution_id: str


class Coalescer:
    """One stop per running execution: a stop for a task whose stop is being sent gets that
    one's answer, and an execution already asked to stop (it is ending) is not asked again
    (a flood of stops for one task sends one). Bounded: the last `ASKED` executions are kept."""

    ASKED = 4096

    def __init__(self, backend: Backend, workers: int) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[StopAnswer]] = {}
        self._asked: OrderedDict[str, None] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="stop")
        self.sent = 0  # stops sent to the backend (tests)
        self.on_stopped: Callable[[], None] | None = None  # the metrics: an execution asked to stop

    def stop(self, job: StopJob) -> Future[StopAnswer]:
        with self._lock:
            if job.execution_id in self._asked:
                done: Future[StopAnswer] = Future()
                done.set_result("stopping")
                return done
            running = self._inflight.get(job.task_id)
            if running is not None:
                return running
            fut = self._pool.submit(self._send, job)
            self._inflight[job.task_id] = fut
        return fut

    def _send(self, job: StopJob) -> StopAnswer:
        try:
            with self._lock:
                self.sent += 1
            answer = self.backend.stop(job.task_id, job.execution_id)
            if answer == "stopping":
                if self.on_stopped is not None:
                    self.on_stopped()
                with self._lock:
                    self._asked[job.execution_id] = None
                    while len(self._asked) > self.ASKED:
                        self._asked.popitem(last=False)
            return answer
        finally:
            with self._lock:
                self._inflight.pop(job.task_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class StopService:
    """Thread-safe; one instance serves every ingress."""

    def __init__(self, service: StartService) -> None:
        self.service = service
        self.backend = service.backend
        self.journal = service.journal
        self.coalescer = Coalescer(service.backend, service.cfg.qrs.start_concurrency)
        #: Called with the ingress of each stop request handled (the metrics).
        self.handled: list[Callable[[str], None]] = []

    def close(self) -> None:
        self.coalescer.close()

    def stop_for_policy(self, task_id: str, execution_id: str) -> None:
        """A run policy stops an execution (ifRunning restart, onDeadline stop): once per
        execution, whatever number of requests ask. Raises QrsError when the backend refuses."""
        for observe in self.handled:
            observe("policy")
        self.coalescer.stop(StopJob(task_id, execution_id)).result()

    def submit(self, req: StopRequest, claim: Claim, emit: Emit) -> Handled:
        """Claim, select, stop, reply (module docstring). Raises QrsError while resolving
        (nothing was stopped: the claim is dropped) and JournalError (the caller must not ack)."""
        key = KEY_PREFIX + claim.key if claim.key is not None else None
        self.service.callers.admit(claim.caller)  # over its rate: CallerRejected, nothing claimed
        for observe in self.handled:
            observe(claim.ingress)
        with self.service.keys.hold(key), structlog.contextvars.bound_contextvars(**{CALLER_CONTEXT: label(claim.caller)}):
            handled = self._handle(req, claim, key, self.service.observed(emit))
        for counted in self.service.handled:  # requests_total{ingress, outcome, caller} like every request
            counted(claim.ingress, handled.replayed, None, label(claim.caller))
        return handled

    def _handle(self, req: StopRequest, claim: Claim, key: str | None, emit: Emit) -> Handled:
        journal = self.journal if key is not None else None
        prior: Prior | None = None
        if journal is not None and key is not None:
            asked = req.model_dump(mode="json", exclude_defaults=True)
            prior = journal.begin(key, claim.ingress, claim.payload_hash, source=claim.source, request={**asked, "stop": True},
                                  received=claim.received, caller=claim.caller_name)
        if prior is not None and prior.done:
            for ev in prior.replies:
                emit(ev)
            log.info("audit_stop", ingress=claim.ingress, requestId=req.requestId, duplicate=True)
            return Handled(prior.replies, replayed=True)
        try:
            outcomes, not_found = self._stop(req, key, prior, emit, claim.caller)
        except QrsError:
            if journal is not None and key is not None and prior is None:
                journal.forget(key)
            raise
        summ = replies.stop_summary(req.requestId, outcomes, not_found)
        emit(summ)
        events: list[Event] = [*(replies.task(o, req.requestId) for o in outcomes), summ]
        if req.wait and key is not None:
            self._follow(req, key, outcomes, claim.route or Route(""), claim.caller_name)
        if journal is not None and key is not None:
            journal.finish(key, events)
        log.info("audit_stop", ingress=claim.ingress, source=claim.source, requestId=req.requestId, duplicate=False,
                 stopping=[o.task_id for o in outcomes if o.status == "stopping"],
                 notRunning=[o.task_id for o in outcomes if o.status == "notRunning"],
                 denied=[o.task_id for o in outcomes if o.status == "denied"],
                 failed=[o.task_id for o in outcomes if o.status == "failed"], notFound=not_found)
        return Handled(events)

    def _stop(self, req: StopRequest, key: str | None, prior: Prior | None, emit: Emit,
              caller: CallerConfig | None = None) -> tuple[list[TaskOutcome], list[dict[str, Any]]]:
        stage = req.selection()
        selection, tasks = self.service.resolve_tasks(stage)
        # start_filter, then the caller's allow-list (contract section 10): a stop is judged like a start.
        outcomes = restrict(plan(selection, stage, self.service.allow_list()), selection, caller)
        # candidates are "started" here: they mean "to stop"
        candidates = [o for o in outcomes if o.status == "started"]
        running = self.running(candidates, tasks)
        jobs: dict[str, StopJob] = {}
        for o in candidates:
            eid = running.get(o.task_id)
            done = prior.task_event(o.task_id, None) if prior is not None else None
            if done is not None:  # answered before a crash: the recorded answer, nothing sent
                o.status = "stopping" if done.get("status") == "stopping" else "notRunning"
                o.execution_id, o.reason = done.get("executionId"), done.get("reason")
            elif eid is None:
                o.status = "notRunning"
                earlier = _intended(prior, o.task_id)
                if earlier is not None:  # asked before a crash; that execution has ended since
                    o.status, o.execution_id = "stopping", earlier
            elif _intended(prior, o.task_id) not in (None, eid):
                # Asked before a crash for another execution: this later run is not ours to stop.
                o.status, o.execution_id = "stopping", _intended(prior, o.task_id)
            else:
                jobs[o.task_id] = StopJob(o.task_id, eid)
        if jobs and key is not None and self.journal is not None:
            self.journal.intents(key, [intent(j.task_id, j.execution_id) for j in jobs.values()])
        self._send(jobs, outcomes)
        for o in outcomes:
            emit(replies.task(o, req.requestId))
        return outcomes, selection.not_found

    def running(self, candidates: list[TaskOutcome], tasks: dict[str, QrsTask]) -> dict[str, str]:
        """Task id -> its running execution, for these tasks (contract section 7's "running")."""
        wanted = {o.task_id for o in candidates}
        followed = self.service.admission.followed() if self.service.admission.followed is not None else {}
        out = {t: e for t, e in followed.items() if t in wanted}
        maybe = [tasks[t] for t in wanted if t in tasks and tasks[t].running and t not in out]
        if maybe:
            out.update(self.backend.running_executions(maybe))
        return out

    def _send(self, jobs: dict[str, StopJob], outcomes: list[TaskOutcome]) -> None:
        futures = {task: self.coalescer.stop(job) for task, job in jobs.items()}
        for o in outcomes:
            fut = futures.get(o.task_id)
            if fut is None:
                continue
            try:
                answer = fut.result()
            except QrsError as exc:
                o.status, o.reason = "failed", f"the backend refused the stop: {exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - every task is answered
                o.status, o.reason = "failed", f"the stop could not be sent ({type(exc).__name__})"
                continue
            o.status = answer
            o.execution_id = jobs[o.task_id].execution_id if answer == "stopping" else None

    def _follow(self, req: StopRequest, key: str, outcomes: list[TaskOutcome], route: Route,
                caller: str | None = None) -> None:
        """`wait`: the tracker follows each stopped execution to its end (never retried)."""
        follow = self.service.follow
        followed = [
            TaskOutcome(o.task_id, o.task_name, "alreadyRunning", list(o.matched_by), o.execution_id)
            for o in outcomes if o.status == "stopping" and o.execution_id
        ]
        if follow is None:
            return
        as_start = req.selection(wait=True).model_copy(update={"retry": RetryRequest(attempts=0, delay=0)})
        result = StageResult(followed, [], replies.stop_summary(req.requestId, [], []))  # type: ignore[arg-type]
        follow(key, as_start, result, route, caller)


def _intended(prior: Prior | None, task_id: str) -> str | None:
    """The execution a crashed run of this request had asked to stop, if any."""
    if prior is None:
        return None
    for k in prior.intents:
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "stop" and parts[1] == task_id:
            return parts[2]
    return None

