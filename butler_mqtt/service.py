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
from butler_mqtt.selection import Selection, check_for_backend, plan, select
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



class _SwappableFilter:
    """The start_filter in force, swapped whole on SIGHUP (a lock: never half of one)."""

    def __init__(self, start_filter: Any) -> None:
        self._lock = threading.Lock()
        self._filter = start_filter

    def set(self, start_filter: Any) -> None:
        with self._lock:
            self._filter = start_filter

    def allow(self) -> Any:
        with self._lock:
            return self._filter.allow if self._filter.enabled else None

class StartService:
    """Resolve, filter and start. Thread-safe; one instance serves every ingress."""

    def __init__(self, cfg: Config, backend: Backend, journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.journal = journal
        concurrency = cfg.cloud.start_concurrency if backend.kind == "cloud" else cfg.qrs.start_concurrency
        self.starts = Starts(backend, concurrency)
        self._filter = _SwappableFilter(cfg.start_filter)
        self.keys = KeyLocks()
        self.callers = Callers(cfg)  # contract section 10: one rate limiter for every ingress
        self.admission = Admission(backend, journal)
        #: Every fresh reply event (never a replayed one), whatever the ingress: alerter, metrics.
        self.observers: list[Emit] = []
        #: Hands a followed request (wait/then, retries, a deadline) to the tracker once its
        #: first stage started. runtime.build sets it.
        self.follow: Follow | None = None
        #: The way out of a request's later events (MQTT: its route); runtime.build sets it.
        self.publish: Publish | None = None
        #: Called with (ingress, replayed, start seconds, caller label) after each request (the metrics).
        self.handled: list[Callable[[str, bool, float | None, str], None]] = []

    def close(self) -> None:
        self.starts.close()

    def notify(self, ev: Event) -> None:
        """Hand a new reply event to every observer (quick: on the request's thread; a failing one
        never reaches the request)."""
        for observe in self.observers:
            try:
                observe(ev)
            except Exception:  # noqa: BLE001 - watching a request must never break it
                log.exception("event_observer_failed", observer=getattr(observe, "__qualname__", repr(observe)))

    def send_later(self, key: str | None, route: Route, ev: Event, *, observe: bool = True) -> None:
        """A request's later event (taskFinished, taskOverdue, a later stage's, a queued start,
        requestFinished), the one way they leave: journaled under `key`, published, observed."""
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
        """The one use case, for every ingress: claim (a duplicate gets the recorded outcome), run
        the first stage with each event handed to `emit`, hand a followed request to the tracker,
        record. Raises RequestRejected (nothing claimed), CallerRejected (over its rate: nothing
        claimed), QrsError (nothing started: the claim is dropped), JournalError (do not ack)."""
        check_for_backend(req, self.backend.kind)  # before the claim: a refused request is not journaled
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
        self._filter.set(start_filter)  # SIGHUP reload: requests in flight are not disturbed

    def allow_list(self) -> Any:
        return self._filter.allow()  # the start_filter allow-list in force (None: every task is allowed)

    def resolve(self, stage: StartRequest) -> Selection:
        return self.resolve_tasks(stage)[0]  # all criteria in one backend query (chunked if long)

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
        for o in admitted.stopping:  # ifRunning restart: the running execution is stopping
            send(replies.task(o, ticket.request_id, ticket.stage))
        for o in admitted.decided:
            send(replies.task(o, ticket.request_id, ticket.stage))
        self._start_all(admitted.to_start, ticket.key, ticket.stage, ticket.request_id, send)
        self.admission.record(admitted)
        return admitted

    def start_task_again(
        self, task_id: str, matched_by: list[Match], policy: Policy, ticket: Ticket, send: Emit,
        stage: StartRequest | None = None, caller: CallerConfig | None = None,
    ) -> tuple[TaskOutcome | None, dict[int, TaskOutcome]]:
        """A retry (section 7): looked up again and started under the same policies if the caller
        may still (else `denied`). (None, {}) when it no longer exists; else its outcome and, when
        queued, {entry id: outcome}. `stage`: its stage (Qlik Cloud reload options apply too)."""
        # Qlik Cloud addresses an app (the task) by appId, QRS a reload task by taskId.
        lookup = StartRequest(appId=[task_id]) if self.backend.kind == "cloud" else StartRequest(taskId=[task_id])
        selection, tasks = self.resolve_tasks(lookup)
        if not selection.selected:
            return None, {}
        task = selection.selected[0].task
        o = TaskOutcome(task.id, task.name, "started", list(matched_by), attempt=ticket.attempt,
                        partial=bool(stage and stage.partial), variables=stage.variables if stage else None)
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
        return self.starts.one(o)  # a queued task (the queue runner); `o` gets the answer

    def run_stage(
        self, stage: StartRequest, request_id: str | None, emit: Emit, stage_index: int | None = None,
        key: str | None = None, prior: Prior | None = None, *, root: StartRequest | None = None,
        route: Route | None = None, caller: CallerConfig | None = None,
    ) -> StageResult:
        """Resolve and start one stage (start_filter, then the caller's allow-list), emitting one
        `task` event per task then the summary. Raises QrsError only while resolving (nothing
        started yet: the whole request may safely be tried again later)."""
        t0 = time.perf_counter()
        selection, tasks = self.resolve_tasks(stage)
        allow = self.allow_list()
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
        # The first stage's figures are in the request's `audit` line (info) that follows: only
        # a chain stage, which has no audit line of its own, says them at info.
        (log.debug if stage_index is None else log.info)(
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
        journal = self.journal if key is not None else None
        if to_start and journal is not None and key is not None:
            journal.intents(key, [intent_key(o.task_id, stage, o.attempt) for o in to_start])
        for o in self.starts.many(to_start, _withdrawer(journal, key, stage)):
            send(replies.task(o, request_id, stage))


def _withdrawer(journal: Journal | None, key: str | None, stage: int | None) -> Callable[[list[TaskOutcome]], None]:
    """Starts QRS refused with 429 did not run: their intents go, so the stage, handled again
    later (the caller's transient path), starts them anew; the others are resumed."""

    def withdraw(refused: list[TaskOutcome]) -> None:
        if refused and journal is not None and key is not None:
            journal.withdraw_intents(key, [intent_key(o.task_id, stage, o.attempt) for o in refused])

    return withdraw


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
            **({"appId": req.appId} if req.appId else {}),
            **({"space": req.space} if req.space else {}),
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
    received: float | None = None,
    caller: CallerConfig | None = None,
) -> Handled:
    """`service.submit` with the claim spelled out (tests, benchmarks). `key` is the
    idempotency key (requestId, or MQTT 5 correlation data); None disables duplicate
    suppression. `on_started` runs after the starts and before the journal marks the request
    done, instead of the tracker (which `submit` hands a followed request to there, so a crash
    in between resumes the request instead of forgetting to follow it). `received`: when the
    request arrived (time.time(); the history's received time; default: now)."""
    claim = Claim(ingress, key, source, payload_hash, route, received, caller)
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
    received: float | None = None
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
        prior = journal.begin(key, ingress, claim.payload_hash, source=source, request=asked, received=claim.received,
                              caller=claim.caller_name)
    if prior is not None and prior.done:
        again = [replies.replayed(ev) for ev in prior.replies]
        for ev in again:
            emit(ev)
        log.info("audit", ingress=ingress, source=source, requestId=req.requestId, duplicate=True, **_audit_fields(req, claim.caller),
                 outcome="earlier outcome re-published; nothing started")
        return Handled(again, replayed=True)

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
        if journal is not None and key is not None and prior is None and not _sent_starts(journal, key):
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


def _sent_starts(journal: Journal, key: str) -> bool:
    """Were start intents recorded under `key`? Then the claim is kept (not forgotten): the
    request is resumed from them (QRS asked about each) when it is handled again, so a stage
    left for later because QRS answered 429 never starts a task twice."""
    prior = journal.load(key)
    return prior is not None and bool(prior.intents)
