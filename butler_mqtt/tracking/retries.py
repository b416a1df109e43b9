"""Retries and deadlines (contract section 7), where executions end or run late.

* A reload that ended FinishedFail, Aborted, Error or Reset is started again after
  `retry.delay` (doubling), through the same use case as every start (`StartService`), under
  the same policies; the waited record says which retry is due, so a restart resumes it.
* A followed execution still running at its `deadline` gets one `taskOverdue`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from butler_mqtt import replies
from butler_mqtt.admission import Ticket
from butler_mqtt.errors import ButlerError, is_transient, retry_after
from butler_mqtt.model import TaskOutcome, matches
from butler_mqtt.ops import retry
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.policies import Policy, retried_after, retries_left, retry_delay, stops_at_deadline
from butler_mqtt.service import StartService
from butler_mqtt.tracking.records import Pending, Waited, bound, queued_record
from butler_mqtt.tracking.stages import Stages
from butler_mqtt.tracking.timers import Timers
from butler_mqtt.tracking.waits import Waits

log = structlog.get_logger("butler_mqtt.tracking")


class Retries:
    """Thread-safe."""

    def __init__(self, service: StartService, waits: Waits, timers: Timers, stages: Stages,
                 metrics: Metrics | None) -> None:
        self.service = service
        self.waits = waits
        self.timers = timers
        self.stages = stages
        self.metrics = metrics

    def after_end(self, w: Waited, p: Pending, status: str, policy: Policy) -> float | None:
        """(Waits' lock held.) The delay of the retry to come, recorded in `w`; None: final."""
        again = p.attempt is not None and retried_after(status, p.stopped) and retries_left(policy, p.attempt)
        if not again:
            return None
        delay = retry_delay(policy, p.attempt or 1)
        w.retrying[f"{p.stage}/{p.task_id}"] = {
            "task_id": p.task_id, "task_name": p.task_name, "stage": p.stage, "attempt": (p.attempt or 1) + 1,
            "due": time.time() + delay, "matched_by": p.matched_by, "last": status,
        }
        return delay

    def schedule(self, key: str, tkey: str, delay: float) -> None:
        self.timers.later(delay, self.retry, key, tkey)

    def resume(self, w: Waited) -> None:
        """After a restart: the retries the record says are due."""
        for tkey, r in w.retrying.items():
            self.schedule(w.key, tkey, max(0.0, float(r["due"]) - time.time()))

    def retry(self, key: str, tkey: str, attempt_no: int = 0) -> None:
        """Start a failed reload again (its attempt number in the record), under the same policies."""
        w = self.waits.get(key)
        with self.waits.locked():
            r = w.retrying.get(tkey) if w is not None else None
        if w is None or r is None or self.timers.stopped:
            return
        with bound(w):
            policy = self.stages.policy(w, r["stage"])
            ticket = Ticket(key, w.request_id, r["stage"], w.route, attempt=int(r["attempt"]))
            try:
                o, queued = self.service.start_task_again(r["task_id"], matches(r["matched_by"]), policy, ticket,
                                                          lambda ev: self.stages.emit(w, ev), w.stage_request(r["stage"] or 0),
                                                          self.service.callers.stored(w.caller))
            except Exception as exc:  # noqa: BLE001 - every failure ends in a later try or a final outcome
                if is_transient(exc) and attempt_no < 50:  # QRS or the journal unavailable for now
                    log.warning("retry_deferred", taskId=r["task_id"], error=str(exc))
                    self.timers.later(retry.CHAIN_STAGE.delay(attempt_no, retry_after(exc)), self.retry, key, tkey, attempt_no + 1)
                    return
                if not isinstance(exc, ButlerError):
                    log.exception("retry_failed", taskId=r["task_id"])
                o, queued = TaskOutcome(r["task_id"], r["task_name"], "failed", reason=f"the retry could not be started: {exc}"), {}
            if self.metrics is not None:
                self.metrics.retries.inc()
            log.info("retry_started", taskId=r["task_id"], attempt=r["attempt"], status=o.status if o else None,
                     executionId=o.execution_id if o else None)
            self._retried(w, tkey, r, o, queued)

    def _retried(self, w: Waited, tkey: str, r: dict[str, Any], o: TaskOutcome | None,
                 queued: dict[int, TaskOutcome]) -> None:
        with self.waits.locked():
            w.retrying.pop(tkey, None)
            if o is not None and o.status in ("started", "alreadyRunning") and o.execution_id:
                self.stages.pend(w, o, r["stage"], self.stages.policy(w, r["stage"]))
            elif queued:
                for entry_id, q in queued.items():
                    w.queued[str(entry_id)] = queued_record(q, r["stage"])
            else:  # the retry could not start: the last attempt's outcome is final
                w.finished[r["last"]] = w.finished.get(r["last"], 0) + 1
                why = o.reason or o.status if o is not None else "the task no longer exists"
                w.stage_failures.append(f"{r['task_name']} ({r['task_id']}): {r['last']}; retry: {why}")
            self.waits.save(w)
            idle = w.idle
        self.stages.go_on(w.key, idle)


class Deadlines:
    """One `taskOverdue` per followed execution still running at its deadline; with
    onDeadline stop (contract section 8) the execution is stopped too (`action: stopped`), off
    the polling thread, and its end is not retried."""

    def __init__(self, waits: Waits, stages: Stages, metrics: Metrics | None) -> None:
        self.waits = waits
        self.stages = stages
        self.metrics = metrics
        #: Stops an execution (task id, execution id): the stop use case (runtime.build sets it).
        self.stop: Callable[[str, str], None] | None = None

    def check(self, eid: str) -> None:
        now = time.time()
        with self.waits.locked() as waited:
            due = [(w, p) for w in waited.values() for e, p in w.pending.items()
                   if e == eid and p.overdue_at is not None and not p.overdue_sent and now >= p.overdue_at]
            for w, p in due:
                p.overdue_sent = True
                p.stopped = self.stop is not None and stops_at_deadline(self.stages.policy(w, p.stage))
                self.waits.save(w)
        if any(p.stopped for _, p in due):
            task_id = next(p.task_id for _, p in due if p.stopped)
            self.stages.timers.submit(self._stop, task_id, eid)
        for w, p in due:
            with bound(w):
                ev = replies.task_overdue(w.request_id, p.task_id, p.task_name, eid, int((now - p.started) * 1000), p.stage,
                                          "stopped" if p.stopped else None)
                log.warning("task_overdue", taskId=p.task_id, executionId=eid)
                if self.metrics is not None:
                    self.metrics.overdue.inc()
                self.stages.emit(w, ev)

    def _stop(self, task_id: str, eid: str) -> None:
        assert self.stop is not None
        try:
            self.stop(task_id, eid)
            log.info("stopped_at_deadline", taskId=task_id, executionId=eid)
        except Exception as exc:  # noqa: BLE001 - following goes on; the end is reported as it comes
            log.error("stop_at_deadline_failed", taskId=task_id, executionId=eid, error=str(exc)[:300])
