"""The one use case: handle a start request, producing the contract's reply events.

Used by every ingress. Flow per stage: one filtered QRS query (chunked only when the URL would
get too long) -> pure selection and plan -> starts with bounded concurrency -> events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from butler_mqtt import replies
from butler_mqtt.admission import Admission, Admitted, Ticket
from butler_mqtt.config import Config
from butler_mqtt.errors import QrsError, QrsNotFound, QrsUnreachable, rate_limited
from butler_mqtt.journal import Journal, Prior
from butler_mqtt.model import EMPTY_GUID, QrsTask, Route, StartRequest, TaskOutcome
from butler_mqtt.policies import Policy, effective
from butler_mqtt.qrs.client import QrsClient
from butler_mqtt.qrs.filters import chunk_or, criteria_clauses
from butler_mqtt.resume import intent_key, plan_resume
from butler_mqtt.selection import Selection, plan, select

log = structlog.get_logger("butler_mqtt.service")

Emit = Callable[[dict[str, Any]], None]


@dataclass
class StageResult:
    outcomes: list[TaskOutcome]
    not_found: list[dict[str, Any]]
    summary: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    queued: dict[int, TaskOutcome] = field(default_factory=dict)  # queue entry id -> the task waiting on it

    @property
    def follow(self) -> bool:
        """Does the tracker need this request: retries or deadlines to watch, or a waited request
        (the caller knows `wait`/`then`)."""
        return self.policy.follows


class StartService:
    """Resolve, filter and start. Thread-safe; one instance serves every ingress."""

    def __init__(self, cfg: Config, qrs: QrsClient, journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.qrs = qrs
        self.journal = journal
        self._pool = ThreadPoolExecutor(max_workers=cfg.qrs.start_concurrency, thread_name_prefix="qrs-start")
        # Starts of every request (pooled or inline) share one limit: QRS sees at most
        # start_concurrency starts at a time from this instance.
        self._start_slots = threading.BoundedSemaphore(cfg.qrs.start_concurrency)
        self._allow_lock = threading.Lock()
        self._allow = cfg.start_filter
        self.keys = KeyLocks()
        self.admission = Admission(qrs, journal)
        #: Called with every reply event as it is produced (never with a replayed one): the
        #: alerter and the metrics watch the requests here, whatever the ingress (`notify`).
        self.observers: list[Emit] = []

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def notify(self, ev: dict[str, Any]) -> None:
        """Hand a new reply event to every observer. An observer must be quick (it runs on
        the request's thread) and its failure never reaches the request."""
        for observe in self.observers:
            try:
                observe(ev)
            except Exception:  # noqa: BLE001 - watching a request must never break it
                log.exception("event_observer_failed", observer=getattr(observe, "__qualname__", repr(observe)))

    def observed(self, emit: Emit) -> Emit:
        """`emit`, then `notify`: how a fresh request's events leave the use case."""

        def both(ev: dict[str, Any]) -> None:
            emit(ev)
            self.notify(ev)

        return both

    def set_start_filter(self, start_filter: Any) -> None:
        """Swap the allow-list (SIGHUP reload) without disturbing requests in flight."""
        with self._allow_lock:
            self._allow = start_filter

    def resolve(self, stage: StartRequest) -> Selection:
        """All criteria of the stage in one `GET /qrs/reloadtask/full` (chunked if long)."""
        return self.resolve_tasks(stage)[0]

    def resolve_tasks(self, stage: StartRequest) -> tuple[Selection, dict[str, QrsTask]]:
        """`resolve`, with the tasks QRS returned by id (their running state: run policies)."""
        tasks: list[QrsTask] = []
        for expr in chunk_or(criteria_clauses(stage), self.cfg.qrs.max_filter_length):
            tasks.extend(QrsTask.from_qrs(obj) for obj in self.qrs.reload_tasks(expr))
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
        self, task_id: str, matched_by: list[str], policy: Policy, ticket: Ticket, send: Emit
    ) -> tuple[TaskOutcome | None, dict[int, TaskOutcome]]:
        """A retry (contract section 7): the task is looked up again (its running state too) and
        started under the same policies. (None, {}) when it no longer exists; else its outcome
        and, when it waits in the queue, {entry id: outcome}."""
        selection, tasks = self.resolve_tasks(StartRequest(taskId=[task_id]))
        if not selection.selected:
            return None, {}
        task = selection.selected[0].task
        o = TaskOutcome(task.id, task.name, "started", list(matched_by), attempt=ticket.attempt)
        admitted = self.start_tasks([o], tasks, policy, ticket, send)
        return o, admitted.queued

    def start_one(self, o: TaskOutcome) -> TaskOutcome:
        """Start one task; `o` gets QRS's answer (started, notStarted or failed, with the reason).

        Raises QrsRefused (429) when QRS kept refusing the start with Too Many Requests beyond
        the client's retries: nothing ran, so it is never a final `failed`; the caller leaves
        it for later (transient: errors.rate_limited)."""
        sent = time.time()
        try:
            with self._start_slots:
                sent = time.time()
                execution_id = self.qrs.start_synchronous(o.task_id)
        except QrsNotFound:
            o.status, o.reason = "failed", "QRS: task not found when starting (deleted meanwhile?)"
        except QrsUnreachable as exc:
            o.status, o.reason = "failed", f"QRS unreachable: {exc}"
            self._confirm_unanswered(o, sent)
        except QrsError as exc:
            if rate_limited(exc):
                raise
            o.status, o.reason = "failed", f"QRS refused the start: {exc}"
        else:
            if execution_id == EMPTY_GUID:
                o.status, o.reason = "notStarted", "QRS did not start the task (disabled, or no scheduler available)"
            else:
                o.status, o.execution_id = "started", execution_id
        return o

    def _confirm_unanswered(self, o: TaskOutcome, sent: float) -> None:
        """A start that got no answer (timeout, connection dropped) may still have reached QRS
        and run. Ask QRS, never start it again: a `failed` reply for a reload that runs would
        invite the caller to start it a second time."""
        try:
            execution_id = self.qrs.execution_since(o.task_id, sent)
        except QrsError as exc:
            o.reason = f"{o.reason}; QRS could not be asked whether the start arrived ({exc}): it may run anyway"
            return
        if execution_id is None:
            o.reason = f"{o.reason}; QRS shows no execution of this task since the start was sent"
        else:
            o.status, o.execution_id = "started", execution_id
            o.reason = "QRS did not answer the start in time; the execution was found in QRS"
        log.warning("start_unanswered", taskId=o.task_id, executionId=execution_id)

    def _recover(self, o: TaskOutcome, since: float) -> None:
        try:
            execution_id = self.qrs.execution_since(o.task_id, since)
        except QrsError as exc:
            if rate_limited(exc):
                raise  # QRS asks us to come back later: the request is resumed then
            o.status = "failed"
            o.reason = f"the daemon stopped while starting this task and QRS could not tell whether it started: {exc}"
            return
        if execution_id is not None:
            o.execution_id = execution_id
            o.reason = "start confirmed from QRS (handling of this request was interrupted after the start was sent)"
        log.warning("start_recovered", taskId=o.task_id, executionId=execution_id, restarted=execution_id is None)

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
    ) -> StageResult:
        """Resolve and start one stage, emitting one `task` event per task then the summary.

        Raises QrsUnreachable (and other QrsError) only while resolving, i.e. before anything
        was started, so the caller may safely retry the whole request later.
        """
        t0 = time.perf_counter()
        selection, tasks = self.resolve_tasks(stage)
        with self._allow_lock:
            allow = self._allow.allow if self._allow.enabled else None
        outcomes = plan(selection, stage, allow)
        events: list[dict[str, Any]] = []

        def send(ev: dict[str, Any]) -> None:
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
            started=summ["totalTasksStarted"],
            denied=len(summ["tasksDenied"]),
            failed=len(summ["tasksFailed"]),
            not_found=len(selection.not_found),
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return StageResult(outcomes, selection.not_found, summ, events, policy, admitted.queued)

    def _resume(
        self, outcomes: list[TaskOutcome], prior: Prior | None, stage: int | None, request_id: str | None, send: Emit
    ) -> list[TaskOutcome]:
        """Report what needs no start; return the tasks to start (resume.plan_resume decides)."""
        steps = plan_resume(
            [o for o in outcomes if o.status == "started"],
            prior.task_event if prior is not None else None,
            prior.intents if prior is not None else {},
            stage,
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
                self._recover(o, step.since)
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
            self.journal.intents(key, [intent_key(o.task_id, stage) for o in to_start])
        if len(to_start) == 1:
            futures = [_done(self.start_one, to_start[0])]
        else:
            futures = [self._pool.submit(self.start_one, o) for o in to_start]
        for fut in as_completed(futures):
            if fut.exception() is None:
                send(replies.task(fut.result(), request_id, stage))
        failed: list[tuple[TaskOutcome, BaseException]] = []
        for o, fut in zip(to_start, futures, strict=True):
            exc = fut.exception()
            if exc is not None:
                failed.append((o, exc))
        if not failed:
            return
        # Starts QRS refused with 429 did not run: their intents go, so the stage, handled again
        # later (the caller's transient path), starts them anew; the others are resumed.
        refused = [intent_key(o.task_id, stage) for o, exc in failed if rate_limited(exc)]
        if refused and key is not None and self.journal is not None:
            self.journal.withdraw_intents(key, refused)
        raise failed[0][1]


def _done(fn: Callable[[TaskOutcome], TaskOutcome], o: TaskOutcome) -> Future[TaskOutcome]:
    """`fn(o)` run here, as a finished Future (one start needs no pool thread)."""
    fut: Future[TaskOutcome] = Future()
    try:
        fut.set_result(fn(o))
    except Exception as exc:  # noqa: BLE001 - handed to the caller through the Future
        fut.set_exception(exc)
    return fut


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

    events: list[dict[str, Any]]
    replayed: bool = False
    #: Fresh requests that sent starts: seconds from the claim until every start of the first
    #: stage was answered (the start latency metric).
    start_seconds: float | None = None


def _audit_fields(req: StartRequest) -> dict[str, Any]:
    return {
        "criteria": {
            "taskId": req.taskId,
            "tag": req.tag,
            "customProperty": [c.model_dump() for c in req.customProperty],
        },
        "dryRun": req.dryRun,
        "allTaskIdsMustExist": req.allTaskIdsMustExist,
    }


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
) -> Handled:
    """One request end to end: journal check, the stage(s), journal record, one audit line.

    `key` is the idempotency key (requestId, or MQTT 5 correlation data); None disables
    duplicate suppression. Raises QrsError when QRS cannot resolve the request (nothing was
    started; the journal claim is dropped so a retry is handled anew) and JournalError when
    the journal cannot record it (the caller must not ack). `on_started` runs after the
    starts and before the journal marks the request done (tracking registers itself there,
    so a crash in between resumes the request instead of forgetting to follow it). `route`:
    where later events go (a task started from butler-mqtt's queue).
    """
    with service.keys.hold(key):
        return _handle(service, req, emit, Claim(ingress, key, source, payload_hash, route), on_started)


@dataclass(frozen=True)
class Claim:
    """Who asks (ingress, source) and under which idempotency key (None: no suppression)."""

    ingress: str
    key: str | None
    source: str = ""
    payload_hash: str | None = None
    route: Route | None = None


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
        prior = journal.begin(key, ingress, claim.payload_hash, source=source, request=asked)
    if prior is not None and prior.done:
        for ev in prior.replies:
            emit(ev)
        log.info("audit", ingress=ingress, source=source, requestId=req.requestId, duplicate=True, **_audit_fields(req),
                 outcome="earlier outcome re-published; nothing started")
        return Handled(prior.replies, replayed=True)

    # Replies are published as they happen and recorded together when the stage is done (one
    # transaction): a crash in between is resumed from the start intents, checked with QRS.
    try:
        result = service.run_stage(
            req, req.requestId, service.observed(emit), 0 if req.then is not None else None, key, prior, root=req,
            route=claim.route,
        )
    except QrsError:
        if journal is not None and key is not None and prior is None and not _sent_starts(journal, key):
            journal.forget(key)
        raise
    answered = time.perf_counter()
    if on_started is not None:
        on_started(result)
    if journal is not None and key is not None:
        journal.finish(key, result.events)
    s = result.summary
    log.info(
        "audit",
        ingress=ingress,
        source=source,
        requestId=req.requestId,
        duplicate=False,
        resumed=prior is not None,
        **_audit_fields(req),
        started=[t["taskId"] for t in s["tasksStarted"] if t["status"] == "started"],
        notStarted=[t["taskId"] for t in s["tasksStarted"] if t["status"] == "notStarted"],
        wouldStart=[t["taskId"] for t in s["tasksStarted"] if t["status"] == "wouldStart"],
        denied=[t["taskId"] for t in s["tasksDenied"]],
        failed=[t["taskId"] for t in s["tasksFailed"]],
        notFound=s["tasksNotFound"],
        ms=round((time.perf_counter() - t0) * 1000, 1),
    )
    sent = s["tasksStarted"] or s["tasksFailed"]
    return Handled(result.events, start_seconds=answered - t0 if sent and not req.dryRun else None)


def _sent_starts(journal: Journal, key: str) -> bool:
    """Were start intents recorded under `key`? Then the claim is kept (not forgotten): the
    request is resumed from them (QRS asked about each) when it is handled again, so a stage
    left for later because QRS answered 429 never starts a task twice."""
    prior = journal.load(key)
    return prior is not None and bool(prior.intents)
