"""Follow started executions to their final state; run `then` chains; survive restarts.

One thread polls QRS with ONE query per interval for every execution in flight across all
requests (`GET /qrs/executionresult/full?filter=executionID eq A or executionID eq B ...`,
chunked only when the filter gets too long). Final states (qrs-api.md 6.4): Aborted,
FinishedSuccess, FinishedFail, Skipped, Error, Reset. Retry, Queued, AbortInitiated and
Aborting are not final. An execution that cannot be followed ends as `Unknown` with a reason:
no result row and no execution session after a grace period, or `tracking.max_wait` reached.

Every waited request is a `Waited` record stored in the journal (table `waits`) on each
change, so after a restart the daemon picks up the executions and chains it was following.

Run policies (contract section 7) live here too, where executions end: a reload that ended
FinishedFail, Aborted, Error or Reset is started again after `retry.delay` (doubling), a
followed execution still running at its `deadline` gets one `taskOverdue`, and the same poll
frees butler-mqtt's running slots and makes reruns due for the queue runner (`queueing.py`),
which the tracker runs about once a second while the queue holds anything.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from butler_mqtt import replies
from butler_mqtt.admission import Ticket
from butler_mqtt.chains import NextStage, after_stage, finish_failure, start_failures
from butler_mqtt.config import TrackingConfig
from butler_mqtt.errors import ButlerError, QrsError, is_transient, rate_limited, retry_after
from butler_mqtt.journal import Journal
from butler_mqtt.model import FINAL_STATES, Route, StartRequest, TaskOutcome
from butler_mqtt.ops import retry
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.policies import RETRYABLE, Policy, retries_left, retry_delay
from butler_mqtt.qrs.client import QrsClient
from butler_mqtt.queueing import QueueRunner
from butler_mqtt.service import StageResult, StartService

log = structlog.get_logger("butler_mqtt.tracking")



@dataclass
class Pending:
    execution_id: str
    task_id: str
    task_name: str
    stage: int | None
    started: float  # wall clock (stored: survives a restart)
    deadline: float  # wall clock (stored): tracking.max_wait
    attempt: int | None = None  # with retry: 1 = the first start
    overdue_at: float | None = None  # wall clock: policies.deadline (taskOverdue once)
    overdue_sent: bool = False
    matched_by: list[str] = field(default_factory=list)
    # This process's view, on the monotonic clock: a wall-clock step (NTP, an admin) must not
    # end a wait early. Derived from the stored wall-clock values once, when loaded.
    mono_started: float = field(default=-1.0, compare=False)
    mono_deadline: float = field(default=-1.0, compare=False)

    def __post_init__(self) -> None:
        if self.mono_started < 0:
            now_wall, now_mono = time.time(), time.monotonic()
            self.mono_started = now_mono - max(0.0, now_wall - self.started)
            self.mono_deadline = now_mono + max(0.0, self.deadline - now_wall)

    def stored(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mono_started")
        d.pop("mono_deadline")
        return d


_PENDING_FIELDS = ("execution_id", "task_id", "task_name", "stage", "started", "deadline", "attempt", "overdue_at",
                   "overdue_sent", "matched_by")


@dataclass
class Waited:
    """A request whose end is awaited: its chain, where it is, what is still running."""

    key: str
    request_id: str | None
    request: dict[str, Any]  # the root StartRequest as JSON
    route: Route
    started: float
    chained: bool
    stage: int = 0
    pending: dict[str, Pending] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    stage_failures: list[str] = field(default_factory=list)  # why the current stage is not a success
    starting: bool = False  # the current stage's starts are being sent
    report: bool = True  # wait/then: publish taskFinished and requestFinished (else: retries, deadlines only)
    queued: dict[str, dict[str, Any]] = field(default_factory=dict)  # queue entry id -> the task waiting on it
    retrying: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> the retry to come

    @property
    def idle(self) -> bool:
        """Nothing of the current stage is running, starting, queued or due for a retry."""
        return not (self.pending or self.starting or self.queued or self.retrying)

    def stage_request(self, index: int) -> StartRequest | None:
        req: StartRequest | None = StartRequest.model_validate(self.request)
        for _ in range(index):
            req = req.then if req is not None else None
        return req

    def to_json(self) -> str:
        d = asdict(self)
        d["pending"] = {k: p.stored() for k, p in self.pending.items()}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Waited:
        d = json.loads(text)
        d["route"] = Route(**d["route"])
        d["pending"] = {k: Pending(**{f: v[f] for f in _PENDING_FIELDS if f in v}) for k, v in d["pending"].items()}
        return cls(**d)


Publish = Callable[[Route, dict[str, Any]], None]


def latest_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """With retries QRS keeps several results per execution: keep the newest of each."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        eid = str(row.get("executionID") or row.get("executionId") or "").lower()
        if not eid:
            continue
        key = (str(row.get("startTime") or ""), str(row.get("modifiedDate") or ""))
        best = out.get(eid)
        if best is None or key >= (str(best.get("startTime") or ""), str(best.get("modifiedDate") or "")):
            out[eid] = row
    return out


class Tracker:
    """The polling thread, the chain engine, retries and deadlines. Thread-safe."""

    QUEUE_TICK_S = 1.0

    def __init__(
        self,
        cfg: TrackingConfig,
        qrs: QrsClient,
        service: StartService,
        journal: Journal,
        publish: Publish,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.qrs = qrs
        self.service = service
        self.journal = journal
        self.publish = publish
        self.metrics = metrics
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waited: dict[str, Waited] = {}
        self._watched: set[str] = set()  # executions the queue needs (slots, reruns) beyond _waited
        self._watch_started: dict[str, float] = {}
        self._next_poll: float | None = None
        self._queue_due: float | None = None
        self._stop = False
        self._stages = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chain")
        self._timers: set[threading.Timer] = set()
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self.polls = 0
        self._refused_since: float | None = None
        self.grace_s = max(30.0, 3 * cfg.poll_interval)
        self.queue = QueueRunner(service.cfg.policies, service, journal, publish, metrics)
        service.admission.followed = self.running_tasks
        service.admission.on_queued = self.queue_changed

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # Our own records (a previous run of this instance) and orphans of dead instances.
        self._adopt(self.journal.own_waits() + self.journal.claim_waits())
        try:
            self.queue.recover()
        except ButlerError as exc:
            log.warning("queue_recovery_failed", error=str(exc))
        self.queue_changed()  # what waits, and waiters an earlier run did not tell
        self._schedule(self.cfg.first_poll)
        self._thread.start()

    def _adopt(self, records: list[tuple[str, str]]) -> None:
        for key, text in records:
            with self._lock:
                if key in self._waited:
                    continue
            try:
                w = Waited.from_json(text)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("wait_record_unreadable", key=key, error=str(exc))
                continue
            with self._lock:
                self._waited[w.key] = w
            log.info("tracking_resumed", requestId=w.request_id, stage=w.stage, executions=len(w.pending))
            for tkey, r in w.retrying.items():
                self._later(max(0.0, float(r["due"]) - time.time()), self._retry, w.key, tkey)
            if w.queued:
                self.queue_changed()
            if w.starting:  # stopped while sending this stage's starts: finish that stage
                self._stages.submit(self._run_stage, w.key, w.stage, True)
            elif w.idle:
                self._stages.submit(self._stage_ended, w.key)
            else:
                self._schedule(self.cfg.first_poll)

    def _maintain(self) -> None:
        """Renew the leases on what we follow; take over chains and queue work whose owner died."""
        try:
            self.journal.renew_waits()
            self._adopt(self.journal.claim_waits())
            self.queue.maintain()
            watched = set(self.journal.runq.watched()) if self.queue.active else set()
        except ButlerError as exc:
            log.warning("tracking_lease_failed", error=str(exc))
            return
        self._set_watched(watched)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
            timers, self._timers = self._timers, set()
        for t in timers:
            t.cancel()  # the stage is resumed after the restart (the record says `starting`)
        self._thread.join(10)
        self._stages.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def following(self) -> int:
        """Executions being followed to their end right now (the metric)."""
        with self._lock:
            return sum(len(w.pending) for w in self._waited.values())

    def running_tasks(self) -> dict[str, str]:
        """Task id -> execution id of what this tracker follows and has not seen end."""
        with self._lock:
            return {p.task_id: eid for w in self._waited.values() for eid, p in w.pending.items()}

    def queue_changed(self) -> None:
        """Something was queued, a slot freed or a rerun became due: run the queue soon."""
        with self._lock:
            self._queue_due = time.monotonic()
            self._wake.notify_all()

    # ------------------------------------------------------------------ entry point

    def follow(self, key: str, req: StartRequest, result: StageResult, route: Route) -> None:
        """Called once stage 0 of a waited request (or one with retries or a deadline) started."""
        w = Waited(
            key=key,
            request_id=req.requestId,
            request=req.model_dump(mode="json"),
            route=route,
            started=time.time(),
            chained=req.then is not None,
            report=req.waits,
        )
        self._absorb(w, result)
        with self._lock:
            self._waited[key] = w
            self._save(w)
            idle = w.idle
        self._go_on(key, idle)

    def _go_on(self, key: str, idle: bool) -> None:
        """After a change to a waited request: end its stage when nothing of it is left, else poll soon."""
        if idle:
            self._stages.submit(self._stage_ended, key)
        else:
            self._schedule(self.cfg.first_poll)

    def _absorb(self, w: Waited, result: StageResult) -> None:
        """Record a stage's started executions and its tasks that cannot succeed."""
        w.stage_failures = start_failures(result.outcomes)
        stage = w.stage if w.chained else None
        for o in result.outcomes:
            if o.status in ("started", "alreadyRunning") and o.execution_id:
                self._pend(w, o, stage, result.policy)
        for entry_id, o in result.queued.items():
            w.queued[str(entry_id)] = _queued_record(o, stage)

    def _pend(self, w: Waited, o: TaskOutcome, stage: int | None, policy: Policy) -> None:
        assert o.execution_id is not None
        now = time.time()
        w.pending[o.execution_id] = Pending(
            o.execution_id, o.task_id, o.task_name, stage, now, now + self.cfg.max_wait, o.attempt,
            now + policy.deadline if policy.deadline is not None else None, matched_by=list(o.matched_by),
        )

    def _policy(self, w: Waited, stage: int | None) -> Policy:
        root = StartRequest.model_validate(w.request)
        stage_req: StartRequest | None = root
        for _ in range(stage or 0):
            stage_req = stage_req.then if stage_req is not None else None
        return self.service.policy(root, stage_req)

    def _save(self, w: Waited) -> None:
        try:
            self.journal.save_wait(w.key, w.to_json())
        except ButlerError as exc:
            log.error("wait_record_not_saved", requestId=w.request_id, error=str(exc))

    def _schedule(self, delay: float) -> None:
        with self._lock:
            at = time.monotonic() + delay
            if self._next_poll is None or at < self._next_poll:
                self._next_poll = at
                self._wake.notify_all()

    def _set_watched(self, watched: set[str]) -> None:
        with self._lock:
            new = watched - self._watched
            now = time.time()
            for eid in new:
                self._watch_started.setdefault(eid, now)
            self._watched = watched
            for eid in list(self._watch_started):
                if eid not in watched:
                    del self._watch_started[eid]
        if new:
            self._schedule(self.cfg.first_poll)

    # ------------------------------------------------------------------ polling

    def _run(self) -> None:
        maintain_every = self.journal.lease_s / 3
        next_maintenance = time.monotonic() + maintain_every
        while True:
            with self._lock:
                while not self._stop:
                    now = time.monotonic()
                    wakes = [t for t in (self._next_poll, self._queue_due, next_maintenance) if t is not None]
                    if now >= min(wakes):
                        break
                    self._wake.wait(min(wakes) - now)
                if self._stop:
                    return
                now = time.monotonic()
                due = self._next_poll is not None and now >= self._next_poll
                if due:
                    self._next_poll = None
                queue_due = self._queue_due is not None and now >= self._queue_due
                if queue_due:
                    self._queue_due = None
                pending = self._pending_all()
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + maintain_every
                self._maintain()
            if queue_due:
                self._stages.submit(self._queue_tick)
            if due and pending:
                try:
                    self._poll(pending)
                except Exception:  # never let one bad answer stop the tracking thread
                    log.exception("tracking_poll_failed")
                self._schedule(self.cfg.poll_interval)

    def _pending_all(self) -> dict[str, Pending]:
        """Everything to poll (lock held): the waited requests' executions and the queue's."""
        pending = {eid: p for w in self._waited.values() for eid, p in w.pending.items()}
        for eid in self._watched:
            if eid not in pending:
                started = self._watch_started.get(eid, time.time())
                pending[eid] = Pending(eid, "", "", None, started, started + self.cfg.max_wait)
        return pending

    def _queue_tick(self) -> None:
        self.queue.tick()
        try:
            watched = set(self.journal.runq.watched())
            more = self.journal.runq.pending_work()
        except ButlerError as exc:
            log.warning("queue_watch_failed", error=str(exc))
            watched, more = set(self._watched), True
        self._set_watched(watched)
        self._collect_queued()
        with self._lock:
            if more or any(w.queued for w in self._waited.values()):
                at = time.monotonic() + self.QUEUE_TICK_S
                if self._queue_due is None or at < self._queue_due:
                    self._queue_due = at
                    self._wake.notify_all()

    def _collect_queued(self) -> None:
        """Waited requests learn what became of their queued tasks (started by any instance)."""
        with self._lock:
            asked = {int(e): w.key for w in self._waited.values() for e in w.queued}
        if not asked:
            return
        try:
            outcomes = self.journal.runq.outcomes(asked)
        except ButlerError as exc:
            log.warning("queue_outcomes_failed", error=str(exc))
            return
        for entry_id, outcome in outcomes.items():
            self._queued_done(asked[entry_id], str(entry_id), outcome)

    def _queued_done(self, key: str, entry: str, outcome: dict[str, Any]) -> None:
        with self._lock:
            w = self._waited.get(key)
            rec = w.queued.pop(entry, None) if w is not None else None
            if w is None or rec is None:
                return
            eid, status = outcome.get("executionId"), str(outcome.get("status"))
            if status == "started" and eid:
                o = TaskOutcome(rec["task_id"], rec["task_name"], "started", rec.get("matched_by", []), str(eid),
                                attempt=rec.get("attempt"))
                self._pend(w, o, rec.get("stage"), self._policy(w, rec.get("stage")))
            else:
                w.stage_failures.append(f"{rec['task_name']} ({rec['task_id']}): {status}")
            self._save(w)
            idle = w.idle
        self._go_on(key, idle)

    def _poll(self, pending: dict[str, Pending]) -> None:
        self.polls += 1
        refused: str | None = None
        try:
            rows = latest_rows(self.qrs.execution_results(list(pending)))
            self._refused_since = None
        except QrsError as exc:
            log.warning("tracking_poll_failed", error=str(exc), executions=len(pending))
            rows = None
            if not is_transient(exc):  # QRS refuses to tell: give up after the grace period
                self._refused_since = self._refused_since or time.monotonic()
                if time.monotonic() - self._refused_since > self.grace_s:
                    refused = f"QRS refuses to report executions: {exc}"
        now = time.monotonic()
        for eid, p in pending.items():
            row = rows.get(eid) if rows is not None else None
            status = row.get("status") if row is not None else None
            if isinstance(status, int) and status in FINAL_STATES:
                self._finish(eid, FINAL_STATES[status], row)
            elif refused is not None:
                self._finish(eid, "Unknown", None, refused)
            elif now > p.mono_deadline:
                self._finish(eid, "Unknown", row, f"still not finished after tracking.max_wait ({self.cfg.max_wait:.0f} s)")
            elif rows is not None and row is None and now - p.mono_started > self.grace_s:
                # No result row yet: if the session is gone too, nobody can tell the outcome.
                try:
                    gone = not self.qrs.execution_session_exists(eid)
                except QrsError:
                    gone = False
                if gone:
                    self._finish(eid, "Unknown", None, "the execution session ended and QRS has no result for it")
            else:
                self._check_overdue(eid)

    def _check_overdue(self, eid: str) -> None:
        """One `taskOverdue` per followed execution still running at its deadline."""
        now = time.time()
        with self._lock:
            due = [(w, p) for w in self._waited.values() for e, p in w.pending.items()
                   if e == eid and p.overdue_at is not None and not p.overdue_sent and now >= p.overdue_at]
            for w, p in due:
                p.overdue_sent = True
                self._save(w)
        for w, p in due:
            ev = replies.task_overdue(w.request_id, p.task_id, p.task_name, eid, int((now - p.started) * 1000), p.stage)
            log.warning("task_overdue", requestId=w.request_id, taskId=p.task_id, executionId=eid)
            if self.metrics is not None:
                self.metrics.overdue.inc()
            self._emit(w, ev)

    def _finish(self, eid: str, status: str, row: dict[str, Any] | None, reason: str | None = None) -> None:
        """Execution `eid` ended: every request following it hears it (attach: several)."""
        with self._lock:
            waited = [w for w in self._waited.values() if eid in w.pending]
            watched = eid in self._watched
            self._watched.discard(eid)
        if watched or self.queue.active:
            try:
                if self.journal.runq.ended([eid]):
                    self.queue_changed()
            except ButlerError as exc:
                log.warning("queue_slot_not_freed", executionId=eid, error=str(exc))
        for w in waited:
            self._finish_for(w, eid, status, row, reason)

    def _finish_for(self, w: Waited, eid: str, status: str, row: dict[str, Any] | None, reason: str | None) -> None:
        with self._lock:
            p = w.pending.pop(eid, None)
            if p is None:
                return
            policy = self._policy(w, p.stage)
            again = p.attempt is not None and status in RETRYABLE and retries_left(policy, p.attempt)
            delay = retry_delay(policy, p.attempt or 1) if again else None
            if again:
                tkey = f"{p.stage}/{p.task_id}"
                w.retrying[tkey] = {"task_id": p.task_id, "task_name": p.task_name, "stage": p.stage,
                                    "attempt": (p.attempt or 1) + 1, "due": time.time() + (delay or 0.0),
                                    "matched_by": p.matched_by, "last": status}
            else:
                w.finished[status] = w.finished.get(status, 0) + 1
                failure = finish_failure(p.task_name, p.task_id, status)
                if failure is not None:
                    w.stage_failures.append(failure)
            self._save(w)
            idle = w.idle
        attempt = p.attempt if policy.retry_attempts > 0 else None
        ev = replies.task_finished(w.request_id, p.task_id, p.task_name, eid, status, row, reason, p.stage, attempt, delay)
        if w.report:
            self._emit(w, ev)
        else:  # followed for retries or a deadline only: not published, but observed (alerts, metrics)
            self.service.notify(ev)
        log.info("task_finished", requestId=w.request_id, taskId=p.task_id, executionId=eid, status=status,
                 attempt=attempt, retry_in_s=delay)
        if again:
            self._later(delay or 0.0, self._retry, w.key, f"{p.stage}/{p.task_id}")
        elif idle:
            self._stages.submit(self._stage_ended, w.key)

    # ------------------------------------------------------------------ retries

    def _retry(self, key: str, tkey: str, attempt_no: int = 0) -> None:
        """Start a failed reload again (its attempt number in the record), under the same policies."""
        with self._lock:
            w = self._waited.get(key)
            r = w.retrying.get(tkey) if w is not None else None
            if w is None or r is None or self._stop:
                return
        policy = self._policy(w, r["stage"])
        ticket = Ticket(key, w.request_id, r["stage"], w.route, attempt=int(r["attempt"]))
        try:
            o, queued = self.service.start_task_again(r["task_id"], list(r["matched_by"]), policy, ticket,
                                                      lambda ev: self._emit(w, ev))
        except Exception as exc:  # noqa: BLE001 - every failure ends in a later try or a final outcome
            if is_transient(exc) and attempt_no < 50:  # QRS or the journal unavailable for now
                log.warning("retry_deferred", requestId=w.request_id, taskId=r["task_id"], error=str(exc))
                self._later(retry.CHAIN_STAGE.delay(attempt_no, retry_after(exc)), self._retry, key, tkey, attempt_no + 1)
                return
            if not isinstance(exc, ButlerError):
                log.exception("retry_failed", requestId=w.request_id, taskId=r["task_id"])
            o, queued = TaskOutcome(r["task_id"], r["task_name"], "failed", reason=f"the retry could not be started: {exc}"), {}
        if self.metrics is not None:
            self.metrics.retries.inc()
        self._retried(w, tkey, r, o, queued)

    def _retried(self, w: Waited, tkey: str, r: dict[str, Any], o: TaskOutcome | None,
                 queued: dict[int, TaskOutcome]) -> None:
        with self._lock:
            w.retrying.pop(tkey, None)
            if o is not None and o.status in ("started", "alreadyRunning") and o.execution_id:
                self._pend(w, o, r["stage"], self._policy(w, r["stage"]))
            elif queued:
                for entry_id, q in queued.items():
                    w.queued[str(entry_id)] = _queued_record(q, r["stage"])
            else:  # the retry could not start: the last attempt's outcome is final
                w.finished[r["last"]] = w.finished.get(r["last"], 0) + 1
                why = o.reason or o.status if o is not None else "the task no longer exists"
                w.stage_failures.append(f"{r['task_name']} ({r['task_id']}): {r['last']}; retry: {why}")
            self._save(w)
            idle = w.idle
        self._go_on(w.key, idle)

    # ------------------------------------------------------------------ chains

    def _emit(self, w: Waited, ev: dict[str, Any]) -> None:
        try:
            self.journal.reply(w.key, ev)
        except ButlerError as exc:
            log.error("journal_write_failed", error=str(exc))
        self.publish(w.route, ev)
        self.service.notify(ev)  # every event the tracker sends (its own and chain stages')

    def _stage_ended(self, key: str) -> None:
        with self._lock:
            w = self._waited.get(key)
            if w is None or not w.idle:
                return
            decision = after_stage(w.stage_request(w.stage), w.stage, list(w.stage_failures))
            if isinstance(decision, NextStage):
                w.stage = decision.index
                w.starting = True
                self._save(w)
        if isinstance(decision, NextStage):
            self._run_stage(key, decision.index, False)
        else:
            self._request_finished(w, decision.stopped_at, decision.reason)

    def _run_stage(self, key: str, index: int, resumed: bool, attempt: int = 0) -> None:
        """Start stage `index` of a chain. A transient QRS or journal failure (before anything of
        the stage started) is retried later, on a timer, never by sleeping in the small chain
        pool; it gives up after tracking.max_wait. A permanent one ends the chain."""
        with self._lock:
            w = self._waited.get(key)
            if w is None or self._stop:
                return
        stage_req = w.stage_request(index)
        if stage_req is None:
            return self._request_finished(w, None, None)
        try:
            prior = self.journal.load(key) if resumed else None
            result = self.service.run_stage(
                stage_req, w.request_id, lambda ev: self._emit(w, ev), index, key, prior,
                root=StartRequest.model_validate(w.request), route=w.route,
            )
        except Exception as exc:  # noqa: BLE001 - every failure ends in a retry or requestFinished
            if not is_transient(exc):
                log.error("chain_stage_refused", requestId=w.request_id, stage=index, error=str(exc))
                return self._request_finished(w, index, f"stage {index} could not be started: {exc}")
            delay = retry.CHAIN_STAGE.delay(attempt, retry_after(exc))  # at least a 429's Retry-After
            if time.time() + delay - w.started > self.cfg.max_wait:
                return self._request_finished(
                    w, index, f"stage {index} could not be started within tracking.max_wait ({self.cfg.max_wait:.0f} s): {exc}"
                )
            log.warning("chain_stage_deferred", requestId=w.request_id, stage=index, error=str(exc), retry_in_s=delay)
            # A start QRS refused with 429 left intents: the next try resumes from them (asks QRS).
            self._later(delay, self._run_stage, key, index, resumed or rate_limited(exc), attempt + 1)
            return
        with self._lock:
            self._absorb(w, result)
            w.starting = False
            self._save(w)
            idle = w.idle
        if idle:
            self._stage_ended(key)
        else:
            self._schedule(self.cfg.first_poll)

    def _later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` in the chain pool after `delay` seconds (unless stopping meanwhile)."""

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._stop:
                    return
            self._stages.submit(fn, *args)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _request_finished(self, w: Waited, stopped_at: int | None, reason: str | None) -> None:
        if w.report:
            ev = replies.request_finished(w.request_id, w.finished, stopped_at, int((time.time() - w.started) * 1000), reason)
            self._emit(w, ev)
        with self._lock:
            self._waited.pop(w.key, None)
        try:
            self.journal.drop_wait(w.key)
        except ButlerError as exc:
            log.error("journal_write_failed", error=str(exc))
        log.info("request_finished", requestId=w.request_id, finished=w.finished, stoppedAtStage=stopped_at)


def _queued_record(o: TaskOutcome, stage: int | None) -> dict[str, Any]:
    return {"task_id": o.task_id, "task_name": o.task_name, "stage": stage, "attempt": o.attempt,
            "matched_by": list(o.matched_by)}
