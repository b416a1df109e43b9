"""The one use case: handle a start request, producing the contract's reply events.

Used by every ingress. Flow per stage: one filtered QRS query (chunked only when the URL would
get too long) -> pure selection and plan -> starts with bounded concurrency -> events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from butler_mqtt import replies
from butler_mqtt.admission import Admission, Admitted, Ticket
from butler_mqtt.backends.base import Backend
from butler_mqtt.callers import Callers, deny, label, restrict
from butler_mqtt.config import CallerConfig, Config
from butler_mqtt.errors import ButlerError, QrsError
from butler_mqtt.journal import Journal, Prior
from butler_mqtt.model import Match, QrsTask, Route, StartRequest, TaskOutcome
from butler_mqtt.policies import Policy, effective
from butler_mqtt.replies import Event
from butler_mqtt.replies.types import SummaryEvent
from butler_mqtt.resume import intent_key, plan_resume
from butler_mqtt.selection import Selection, plan, select
from butler_mqtt.starts import Starts

log = structlog.get_logger("butler_mqtt.service")

Emit = Callable[[Event], None]
#: Publish an event on a route (MQTT).
Publish = Callable[[Route, Event], None]


#: Follow a request: (its key, the request, its first stage's result, where its replies go,
#: its caller's name: later stages and retries are judged by the same caller).
Follow = Callable[[str, StartRequest, "StageResult", Route, str | None], None]
#: The structlog context key naming the caller of the work on this thread (metrics, alerts).
CALLER_CONTEXT = "caller"


@dataclass
class StageResult:
    outcomes: list[TaskOutcome]
    not_found: list[dict[str, Any]]
    summary: SummaryEvent
    events: list[Event] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    queued: dict[int, TaskOutcome] = field(default_factory=dict)  # queue entry id -> the task waiting on it

    @property
    def follow(self) -> bool:
        """Does the tracker need this request: retries or deadlines to watch, or a waited request
        (the caller knows `wait`/`then`)."""
        return self.policy.follows


class StartService:
    """Resolve, filter and start. Thread-safe; one instance serves every ingress."""

    def __init__(self, cfg: Config, backend: Backend, journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.journal = journal
        self.starts = Starts(backend, cfg.qrs.start_concurrency)
        self._allow_lock = threading.Lock()
        self._allow = cfg.start_filter
        self.keys = KeyLocks()
        self.callers = Callers(cfg)  # contract section 10: one rate limiter for every ingress
        self.admission = Admission(backend, journal)
        #: Called with every reply event as it is produced (never with a replayed one): the
        #: alerter and the metrics watch the requests here, whatever the ingress (`notify`).
        self.observers: list[Emit] = []
        #: Hands a request to the tracker once its first stage started, when it has to be
        #: followed (wait/then, retries, a deadline). runtime.build sets it.
        self.follow: Follow | None = None
        #: The way out of a request's later events (MQTT: its route); runtime.build sets it.
        self.publish: Publish | None = None
        #: Called with (ingress, replayed, start seconds, caller label) after each request (the metrics).
        self.handled: list[Callable[[str, bool, float | None, str], None]] = []

    def close(self) -> None:
        self.starts.close()

    def notify(self, ev: Event) -> None:
        """Hand a new reply event to every observer. An observer must be quick (it runs on
        the request's thread) and its failure never reaches the request."""
        for observe in self.observers:
            try:
                observe(ev)
            except Exception:  # noqa: BLE001 - watching a request must never break it
                log.exception("event_observer_failed", observer=getattr(observe, "__qualname__", repr(observe)))

    def send_later(self, key: str | None, route: Route, ev: Event, *, observe: bool = True) -> None:
        """A request's later event (after its first answer: taskFinished, taskOverdue, a later
        stage's, a queued task's start, requestFinished), the one way they all leave: recorded
        under the request's key (None: not journaled), published on its route, observed."""
        if key is not None and self.journal is not None:
            try:
                self.journal.reply(key, ev)
            except ButlerError as exc:
                log.error("journal_write_failed", error=str(exc))
        if route.topic and self.publish is not None:
            self.publish(route, ev)
        if observe:
            self.notify(ev)

    def observed(self, emit: Emit) -> Emit:
        """`emit`, then `notify`: how a fresh request's events leave the use case."""

        def both(ev: Event) -> None:
            emit(ev)
            self.notify(ev)

        return both

    def submit(self, req: StartRequest, claim: Claim, emit: Emit) -> Handled:
        """The one use case, for every ingress: claim the request under its key (a duplicate
        gets the recorded outcome), run its first stage (resolve, plan, start) with each reply
        event handed to `emit` as it is made, hand it to the tracker when it is followed, record
        it. Raises QrsError (nothing was started: the claim is dropped, a retry is handled anew),
        JournalError (the caller must not ack), CallerRejected (over its rate: nothing claimed)."""
        self.callers.admit(claim.caller)

        def on_started(result: StageResult) -> None:
            if self.follow is not None and claim.key is not None and (req.waits or result.follow):
                self.follow(claim.key, req, result, claim.route or Route(""), claim.caller_name)

        with self.keys.hold(claim.key), structlog.contextvars.bound_contextvars(**{CALLER_CONTEXT: label(claim.caller)}):
            handled = _handle(self, req, emit, claim, on_started)
        for observe in self.handled:
            observe(claim.ingress, handled.replayed, handled.start_seconds, label(claim.caller))
        return handled

    def set_start_filter(self, start_filter: Any) -> None:
        """Swap the allow-list (SIGHUP reload) without disturbing requests in flight."""
        with self._allow_lock:
            self._allow = start_filter

    def resolve(self, stage: StartRequest) -> Selection:
        """All criteria of the stage in one `GET /qrs/reloadtask/full` (chunked if long)."""
        return self.resolve_tasks(stage)[0]

    def resolve_tasks(self, stage: StartRequest) -> tuple[Selection, dict[str, QrsTask]]:
        """`resolve`, with the tasks the backend returned by id (their running state: run policies)."""
        tasks = self.backend.tasks(stage)
        return select(stage, tasks), {t.id: t for t in tasks}

    def policy(self, root: StartRequest | None, stage: StartRequest | None) -> Policy:
        return effective(self.cfg.policies, root, stage)

    def start_tasks(
        self, candidates: list[TaskOutcome], tasks: dict[str, QrsTask], policy: Policy, ticket: Ticket, send: Emit
    ) -> Admitted:
        """The run policies, then the starts: one `task` event per candidate (`send`)."""
        admitted = self.admission.admit(candidates, tasks, policy, ticket)
        for o in admitted.decided:
            send(replies.task(o, ticket.request_id, ticket.stage))
        self._start_all(admitted.to_start, ticket.key, ticket.stage, ticket.request_id, send)
        self.admission.record(admitted)
        return admitted

    def start_task_again(
        self, task_id: str, matched_by: list[Match], policy: Policy, ticket: Ticket, send: Emit,
        caller: CallerConfig | None = None,
    ) -> tuple[TaskOutcome | None, dict[int, TaskOutcome]]:
        """A retry (contract section 7): the task is looked up again (its running state too) and
        started under the same policies if the caller may still (else `denied`). (None, {}) when
        it no longer exists; else its outcome and, when it waits in the queue, {entry id: outcome}."""
        selection, tasks = self.resolve_tasks(StartRequest(taskId=[task_id]))
        if not selection.selected:
            return None, {}
        task = selection.selected[0].task
        o = TaskOutcome(task.id, task.name, "started", list(matched_by), attempt=ticket.attempt)
        if deny(o, task, caller):
            send(replies.task(o, ticket.request_id, ticket.stage))
            return o, {}
        # Claimed like a first start: after a crash, this attempt's recorded answer or its
        # intent (then QRS is asked whether the start arrived) is found, never sent twice.
        prior = self.journal.load(ticket.key) if self.journal is not None and ticket.key is not None else None
        if not self._resume([o], prior, ticket.stage, ticket.request_id, send, ticket.attempt):
            return o, {}
        admitted = self.start_tasks([o], tasks, policy, ticket, send)
        return o, admitted.queued

    def start_one(self, o: TaskOutcome) -> TaskOutcome:
        """Start one task (a queued one: the queue runner); `o` gets QRS's answer."""
        return self.starts.one(o)

    def run_stage(
        self,
        stage: StartRequest,
        request_id: str | None,
        emit: Emit,
        stage_index: int | None = None,
        key: str | None = None,
        prior: Prior | None = None,
        *,
        root: StartRequest | None = None,
        route: Route | None = None,
        caller: CallerConfig | None = None,
    ) -> StageResult:
        """Resolve and start one stage (start_filter, then the caller's allow-list), emitting one
        `task` event per task then the summary.

        Raises QrsUnreachable (and other QrsError) only while resolving, i.e. before anything
        was started, so the caller may safely retry the whole request later.
        """
        t0 = time.perf_counter()
        selection, tasks = self.resolve_tasks(stage)
        with self._allow_lock:
            allow = self._allow.allow if self._allow.enabled else None
        outcomes = restrict(plan(selection, stage, allow), selection, caller)
        events: list[Event] = []

        def send(ev: Event) -> None:
            events.append(ev)
            emit(ev)

        policy = self.policy(root, stage)
        to_start = self._resume(outcomes, prior, stage_index, request_id, send)
        if policy.retry_attempts > 0:
            for o in to_start:
                o.attempt = 1
        admitted = self.start_tasks(to_start, tasks, policy, Ticket(key, request_id, stage_index, route), send)
        summ = replies.summary(request_id, outcomes, selection.not_found, stage_index)
        send(summ)
        log.info(
            "stage_done",
            stage=stage_index,
            selected=len(outcomes),
            started=sum(1 for o in outcomes if o.status == "started"),
            denied=sum(1 for o in outcomes if o.status == "denied"),
            failed=sum(1 for o in outcomes if o.status == "failed"),
            not_found=len(selection.not_found),
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return StageResult(outcomes, selection.not_found, summ, events, policy, admitted.queued)

    def run_and_record(
        self,
        stage: StartRequest,
        request_id: str | None,
        emit: Emit,
        index: int | None,
        key: str | None,
        prior: Prior | None,
        *,
        root: StartRequest,
        route: Route | None,
        started: Callable[[StageResult], None],
        caller: CallerConfig | None = None,
    ) -> StageResult:
        """Every stage of every request, the first and each `then`, is run and recorded here:
        its events go to `emit` as they are made, `started` takes the result (the first stage:
        the tracker; a later one: the stage engine), then the events are recorded under `key`
        in one transaction. A crash before the record is resumed from the start intents,
        checked with the backend; `started` first, so a crash in between never forgets to
        follow what started. Raises QrsError before anything started (resolving), and
        JournalError when the record fails (after `started`)."""
        result = self.run_stage(stage, request_id, emit, index, key, prior, root=root, route=route, caller=caller)
        started(result)
        if key is not None and self.journal is not None:
            self.journal.finish(key, result.events)
        return result

    def _resume(
        self, outcomes: list[TaskOutcome], prior: Prior | None, stage: int | None, request_id: str | None, send: Emit,
        attempt: int | None = None,
    ) -> list[TaskOutcome]:
        """Report what needs no start; return the tasks to start (resume.plan_resume decides).
        `attempt`: a retry's (its own intent and recorded event, not the first start's)."""
        recorded = (lambda t, s: prior.task_event(t, s, attempt)) if prior is not None else None
        steps = plan_resume(
            [o for o in outcomes if o.status == "started"], recorded, prior.intents if prior is not None else {},
            stage, attempt,
        )
        by_task = {step.outcome.task_id: step for step in steps}
        to_start: list[TaskOutcome] = []
        for o in outcomes:
            step = by_task.get(o.task_id) if o.status == "started" else None
            if step is None:
                send(replies.task(o, request_id, stage))
            elif step.action == "report" and step.recorded is not None:
                # Started before the daemon stopped: report what was recorded, start nothing.
                o.status, o.execution_id, o.reason = step.recorded["status"], step.recorded.get("executionId"), step.recorded.get("reason")
                send(step.recorded)
            elif step.action == "recover" and step.since is not None:
                # The daemon stopped after sending this start but before recording QRS's
                # answer: ask QRS whether the start arrived rather than risk a double run.
                self.starts.recover(o, step.since)
                if o.status == "started" and o.execution_id is None:
                    to_start.append(o)  # it never reached QRS: start it now
                else:
                    send(replies.task(o, request_id, stage))
            else:
                to_start.append(o)
        return to_start

    def _start_all(
        self, to_start: list[TaskOutcome], key: str | None, stage: int | None, request_id: str | None, send: Emit
    ) -> None:
        """Record the intents (one transaction), then start with bounded concurrency."""
        if to_start and key is not None and self.journal is not None:
            self.journal.intents(key, [intent_key(o.task_id, stage, o.attempt) for o in to_start])
        for o in self.starts.many(to_start):
            send(replies.task(o, request_id, stage))


class KeyLocks:
    """One lock per idempotency key, so a duplicate arriving while the first delivery is
    still being handled (QoS 1 redelivery, a publisher's retry, REST and MQTT at once) waits
    for it and then gets the recorded outcome, instead of meeting a half-done journal entry
    that looks like a crashed run to resume."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        if key is None:
            yield
            return
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass
class Handled:
    """The outcome of one request through `handle_request`."""

    events: list[Event]
    replayed: bool = False
    #: Fresh requests that sent starts: seconds from the claim until every start of the first
    #: stage was answered (the start latency metric).
    start_seconds: float | None = None


def _audit_fields(req: StartRequest, caller: CallerConfig | None) -> dict[str, Any]:
    return {
        "caller": caller.name if caller is not None else None,
        "criteria": {
            "taskId": req.taskId,
            "tag": req.tag,
            "customProperty": [c.model_dump() for c in req.customProperty],
        },
        "dryRun": req.dryRun,
        "allTaskIdsMustExist": req.allTaskIdsMustExist,
    }


def _ids_by_status(outcomes: list[TaskOutcome]) -> dict[str, list[str]]:
    """The audit line's lists: task ids by what became of them (from the outcomes, not the summary)."""
    out: dict[str, list[str]] = {}
    for o in outcomes:
        out.setdefault(o.status, []).append(o.task_id)
    return out


def handle_request(
    service: StartService,
    req: StartRequest,
    emit: Emit,
    *,
    ingress: str,
    key: str | None,
    source: str = "",
    payload_hash: str | None = None,
    on_started: Callable[[StageResult], None] | None = None,
    route: Route | None = None,
    caller: CallerConfig | None = None,
) -> Handled:
    """`service.submit` with the claim spelled out (tests, benchmarks). `key` is the
    idempotency key (requestId, or MQTT 5 correlation data); None disables duplicate
    suppression. `on_started` runs after the starts and before the journal marks the request
    done, instead of the tracker (which `submit` hands a followed request to there, so a crash
    in between resumes the request instead of forgetting to follow it)."""
    claim = Claim(ingress, key, source, payload_hash, route, caller)
    if on_started is None:
        return service.submit(req, claim, emit)
    with service.keys.hold(key):
        return _handle(service, req, emit, claim, on_started)


@dataclass(frozen=True)
class Claim:
    """Who asks (ingress, source, caller) and under which idempotency key (None: no
    suppression). With a caller, `key` is already scoped to it (`keys.for_caller`): the
    ingress names the caller from its transport, never from the request body."""

    ingress: str
    key: str | None
    source: str = ""
    payload_hash: str | None = None
    route: Route | None = None
    caller: CallerConfig | None = None

    @property
    def caller_name(self) -> str | None:
        return self.caller.name if self.caller is not None else None


def _handle(
    service: StartService,
    req: StartRequest,
    emit: Emit,
    claim: Claim,
    on_started: Callable[[StageResult], None] | None,
) -> Handled:
    t0 = time.perf_counter()
    ingress, source, key = claim.ingress, claim.source, claim.key
    journal = service.journal if key is not None else None
    prior = None
    if journal is not None and key is not None:  # the request itself is kept for the history
        asked = req.model_dump(mode="json", exclude_defaults=True)
        prior = journal.begin(key, ingress, claim.payload_hash, source=source, request=asked, caller=claim.caller_name)
    if prior is not None and prior.done:
        for ev in prior.replies:
            emit(ev)
        log.info("audit", ingress=ingress, source=source, requestId=req.requestId, duplicate=True, **_audit_fields(req, claim.caller),
                 outcome="earlier outcome re-published; nothing started")
        return Handled(prior.replies, replayed=True)

    # Replies are published as they happen and recorded together when the stage is done (one
    # transaction): a crash in between is resumed from the start intents, checked with QRS.
    answered: list[float] = []

    def started(result: StageResult) -> None:
        answered.append(time.perf_counter())
        if on_started is not None:
            on_started(result)

    try:
        result = service.run_and_record(
            req, req.requestId, service.observed(emit), 0 if req.then is not None else None, key,
            prior, root=req, route=claim.route, started=started, caller=claim.caller,
        )
    except QrsError:
        if journal is not None and key is not None and prior is None:
            journal.forget(key)
        raise
    by_status = _ids_by_status(result.outcomes)
    log.info(
        "audit",
        ingress=ingress,
        source=source,
        requestId=req.requestId,
        duplicate=False,
        resumed=prior is not None,
        **_audit_fields(req, claim.caller),
        **{status: by_status.get(status, []) for status in ("started", "notStarted", "wouldStart", "denied", "failed")},
        notFound=list(result.not_found),
        ms=round((time.perf_counter() - t0) * 1000, 1),
    )
    sent = any(o.status in ("started", "notStarted", "wouldStart", "failed") for o in result.outcomes)
    return Handled(result.events, start_seconds=answered[0] - t0 if sent and not req.dryRun else None)
