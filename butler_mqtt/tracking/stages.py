"""The chain stage engine: a waited request's stages, one after the other.

A stage's executions are recorded when its starts are answered; each end is reported
(`taskFinished`) and counted; when nothing of the stage is left (running, starting, queued,
due for a retry) the chain decides (chains.after_stage): the next stage is started through the
same use case as the first (`StartService.run_stage`, recorded in the journal as it goes), or
the request ends with `requestFinished`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from butler_mqtt import replies
from butler_mqtt.chains import NextStage, after_stage, finish_failure, start_failures
from butler_mqtt.config import TrackingConfig
from butler_mqtt.errors import is_transient, rate_limited, retry_after
from butler_mqtt.journal import Journal
from butler_mqtt.model import Route, StartRequest, TaskOutcome, matches
from butler_mqtt.ops import retry
from butler_mqtt.policies import Policy
from butler_mqtt.replies import Event
from butler_mqtt.service import StageResult, StartService
from butler_mqtt.tracking.polling import Poller
from butler_mqtt.tracking.records import Pending, Waited, bound, queued_record
from butler_mqtt.tracking.timers import Timers
from butler_mqtt.tracking.waits import Waits

log = structlog.get_logger("butler_mqtt.tracking")


class RetryPlan(Protocol):
    """What the stage engine asks of the retries (tracking/retries.py) when an execution ends."""

    def after_end(self, w: Waited, p: Pending, status: str, policy: Policy) -> float | None: ...

    def schedule(self, key: str, tkey: str, delay: float) -> None: ...


class Stages:
    """Thread-safe (every record change under the waits' lock)."""

    def __init__(self, cfg: TrackingConfig, service: StartService, journal: Journal, waits: Waits, timers: Timers,
                 poller: Poller) -> None:
        self.cfg = cfg
        self.service = service
        self.journal = journal
        self.waits = waits
        self.timers = timers
        self.poller = poller
        self._retries: RetryPlan | None = None

    def attach(self, retries: RetryPlan) -> None:
        self._retries = retries

    # ------------------------------------------------------------------ a request to follow

    def follow(self, key: str, req: StartRequest, result: StageResult, route: Route, caller: str | None = None) -> None:
        """Called once stage 0 of a waited request (or one with retries or a deadline) started."""
        w = Waited(key=key, request_id=req.requestId, request=req.model_dump(mode="json"), route=route,
                   started=time.time(), chained=req.then is not None, report=req.waits, caller=caller)
        with self.waits.locked():
            self.absorb(w, result)
            self.waits.add(w)
            idle = w.idle
        self.go_on(key, idle)

    def go_on(self, key: str, idle: bool) -> None:
        """After a change to a waited request: end its stage when nothing of it is left, else poll soon."""
        if idle:
            self.timers.submit(self.stage_ended, key)
        else:
            self.poller.schedule(self.cfg.first_poll)

    def absorb(self, w: Waited, result: StageResult) -> None:
        """Record a stage's started executions and its tasks that cannot succeed."""
        w.stage_failures = start_failures(result.outcomes)
        stage = w.stage if w.chained else None
        for o in result.outcomes:
            if o.status in ("started", "alreadyRunning") and o.execution_id:
                self.pend(w, o, stage, result.policy)
        for entry_id, o in result.queued.items():
            w.queued[str(entry_id)] = queued_record(o, stage)

    def pend(self, w: Waited, o: TaskOutcome, stage: int | None, policy: Policy) -> None:
        assert o.execution_id is not None
        now = time.time()
        w.pending[o.execution_id] = Pending(
            o.execution_id, o.task_id, o.task_name, stage, now, now + self.cfg.max_wait, o.attempt,
            now + policy.deadline if policy.deadline is not None else None, matched_by=list(o.matched_by),
        )

    def policy(self, w: Waited, stage: int | None) -> Policy:
        root = StartRequest.model_validate(w.request)
        stage_req: StartRequest | None = root
        for _ in range(stage or 0):
            stage_req = stage_req.then if stage_req is not None else None
        return self.service.policy(root, stage_req)

    def emit(self, w: Waited, ev: Event) -> None:
        """A later event of a request: recorded in its journal entry, published, observed."""
        self.service.send_later(w.key, w.route, ev)

    # ------------------------------------------------------------------ executions end

    def execution_ended(self, eid: str, status: str, row: Mapping[str, Any] | None, reason: str | None,
                        failure: Mapping[str, Any] | None = None) -> None:
        """Execution `eid` ended: every request following it hears it (attach: several), with
        why it failed (`failure`, tracking/failures.py) when it did."""
        for w in self.waits.following_execution(eid):
            with bound(w):
                self._finish_for(w, eid, status, row, reason, failure)

    def _finish_for(self, w: Waited, eid: str, status: str, row: Mapping[str, Any] | None, reason: str | None,
                    failure: Mapping[str, Any] | None) -> None:
        assert self._retries is not None, "runtime.build attaches the retries"
        with self.waits.locked():
            p = w.pending.pop(eid, None)
            if p is None:
                return
            policy = self.policy(w, p.stage)
            delay = self._retries.after_end(w, p, status, policy)
            if delay is None:
                w.finished[status] = w.finished.get(status, 0) + 1
                failed = finish_failure(p.task_name, p.task_id, status)
                if failed is not None:
                    w.stage_failures.append(failed)
            self.waits.save(w)
            idle = w.idle
        attempt = p.attempt if policy.retry_attempts > 0 else None
        ev = replies.task_finished(w.request_id, p.task_id, p.task_name, eid, status, row, reason, p.stage, attempt, delay,
                                   failure)
        if w.report:
            self.emit(w, ev)
        else:  # followed for retries or a deadline only: not published, but observed (alerts, metrics)
            self.service.notify(ev)
        log.info("task_finished", taskId=p.task_id, executionId=eid, status=status, attempt=attempt, retry_in_s=delay)
        if delay is not None:
            self._retries.schedule(w.key, f"{p.stage}/{p.task_id}", delay)
        elif idle:
            self.timers.submit(self.stage_ended, w.key)

    def queued_done(self, key: str, entry: str, outcome: dict[str, Any]) -> None:
        """A task of this request waited in the queue; now it started (followed) or did not."""
        w = self.waits.get(key)
        if w is not None:
            with bound(w):
                self._queued_done(w, entry, outcome)

    def _queued_done(self, w: Waited, entry: str, outcome: dict[str, Any]) -> None:
        with self.waits.locked():
            rec = w.queued.pop(entry, None)
            if rec is None:
                return
            eid, status = outcome.get("executionId"), str(outcome.get("status"))
            if status == "started" and eid:
                o = TaskOutcome(rec["task_id"], rec["task_name"], "started", matches(rec.get("matched_by", [])), str(eid),
                                attempt=rec.get("attempt"))
                self.pend(w, o, rec.get("stage"), self.policy(w, rec.get("stage")))
            else:
                w.stage_failures.append(f"{rec['task_name']} ({rec['task_id']}): {status}")
            self.waits.save(w)
            idle = w.idle
        self.go_on(w.key, idle)

    # ------------------------------------------------------------------ chains

    def stage_ended(self, key: str) -> None:
        w = self.waits.get(key)
        if w is not None:
            with bound(w):
                self._stage_ended(w)

    def _stage_ended(self, w: Waited) -> None:
        with self.waits.locked():
            if self.waits.get(w.key) is not w or not w.idle:
                return
            decision = after_stage(w.stage_request(w.stage), w.stage, list(w.stage_failures))
            if isinstance(decision, NextStage):
                w.stage = decision.index
                w.starting = True
                self.waits.save(w)
        if isinstance(decision, NextStage):
            self.run_stage(w.key, decision.index, False)
        else:
            self.request_finished(w, decision.stopped_at, decision.reason)

    def run_stage(self, key: str, index: int, resumed: bool, attempt: int = 0) -> None:
        """Start stage `index` of a chain. A transient QRS or journal failure (before anything of
        the stage started) is retried later, on a timer, never by sleeping in the small chain
        pool; it gives up after tracking.max_wait. A permanent one ends the chain."""
        w = self.waits.get(key)
        if w is None or self.timers.stopped:
            return
        with bound(w):
            self._run_stage(w, index, resumed, attempt)

    def _run_stage(self, w: Waited, index: int, resumed: bool, attempt: int) -> None:
        key = w.key
        stage_req = w.stage_request(index)
        if stage_req is None:
            return self.request_finished(w, None, None)
        idle: list[bool] = []

        def started(result: StageResult) -> None:
            with self.waits.locked():
                self.absorb(w, result)
                w.starting = False
                self.waits.save(w)
                idle.append(w.idle)

        try:
            prior = self.journal.load(key) if resumed else None
            # Published and observed as they come; recorded with the stage (run_and_record).
            self.service.run_and_record(
                stage_req, w.request_id, lambda ev: self.service.send_later(None, w.route, ev), index, key, prior,
                root=StartRequest.model_validate(w.request), route=w.route, started=started,
                caller=self.service.callers.stored(w.caller),
            )
        except Exception as exc:  # noqa: BLE001 - every failure ends in a retry or requestFinished
            if not idle:  # nothing of the stage started: try the stage again later, or give up
                return self._stage_failed(w, index, resumed, attempt, exc)
            # The stage started and is followed; only its record failed (a crash now resumes
            # it from the start intents, checked with QRS).
            log.error("journal_write_failed", stage=index, error=str(exc))
        if idle[0]:
            self.stage_ended(key)
        else:
            self.poller.schedule(self.cfg.first_poll)

    def _stage_failed(self, w: Waited, index: int, resumed: bool, attempt: int, exc: Exception) -> None:
        if not is_transient(exc):
            log.error("chain_stage_refused", stage=index, error=str(exc))
            return self.request_finished(w, index, f"stage {index} could not be started: {exc}")
        delay = retry.CHAIN_STAGE.delay(attempt, retry_after(exc))  # at least a 429's Retry-After
        if time.time() + delay - w.started > self.cfg.max_wait:
            return self.request_finished(
                w, index, f"stage {index} could not be started within tracking.max_wait ({self.cfg.max_wait:.0f} s): {exc}"
            )
        log.warning("chain_stage_deferred", stage=index, error=str(exc), retry_in_s=delay)
        # A start QRS refused with 429 left intents: the next try resumes from them (asks QRS).
        self.timers.later(delay, self.run_stage, w.key, index, resumed or rate_limited(exc), attempt + 1)

    def request_finished(self, w: Waited, stopped_at: int | None, reason: str | None) -> None:
        if w.report:
            ev = replies.request_finished(w.request_id, w.finished, stopped_at, int((time.time() - w.started) * 1000), reason)
            self.emit(w, ev)
        self.waits.drop(w)
        log.info("request_finished", finished=w.finished, stoppedAtStage=stopped_at)
