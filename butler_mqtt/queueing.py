"""The queue runner: starts what waits in butler-mqtt's durable queue once it may start.

Run by the tracker (one tick at a time, in its small pool): about once a second while the
queue holds anything, and at once when a request queued something or a followed execution
ended (a slot freed, a rerun became due). One tick:

1. entries waiting longer than `policies.queue_timeout` are given up: `task` event `expired`;
2. the entries that may start (free slots under `max_running`, priority then arrival; reruns
   once the execution they wait for ended) are claimed and started;
3. every request waiting on an entry that is done gets its `task` event (`started`,
   `notStarted`, `failed` or `expired`), published on its route and written to its journal
   entry -- also those an instance that stopped in between did not tell.

Any instance sharing the journal may run a tick: claims are serialised in the journal, so one
entry is started once, and the slot count holds across instances.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import structlog

from butler_mqtt import keys, replies
from butler_mqtt.admission import Admission
from butler_mqtt.callers import denial
from butler_mqtt.config import PoliciesConfig
from butler_mqtt.errors import ButlerError, QrsError, rate_limited
from butler_mqtt.journal import Journal
from butler_mqtt.journal.runq import Entry, Waiter
from butler_mqtt.model import StartRequest, TaskOutcome, matches
from butler_mqtt.ops.metrics import Metrics
from butler_mqtt.policies import effective
from butler_mqtt.replies import Event
from butler_mqtt.service import StartService

log = structlog.get_logger("butler_mqtt.queue")



class QueueRunner:
    def __init__(
        self, cfg: PoliciesConfig, service: StartService, journal: Journal, metrics: Metrics | None
    ) -> None:
        self.cfg = cfg
        self.service = service
        self.journal = journal
        self.metrics = metrics
        self._busy = threading.Lock()
        self._deferred: list[Entry] = []  # recoveries QRS could not answer yet
        self._refused: list[Entry] = []  # starts QRS answered 429 (nothing ran): started again later
        # The configured defaults use the queue: keep ticking. Else only while something waits.
        self._by_config = Admission.needed(effective(cfg))
        self.active = self._by_config

    def recover(self) -> None:
        """At start (and when taking over a dead instance's work): entries whose start was being
        sent. QRS is asked whether the start arrived; never started twice."""
        for entry in self.journal.runq.take_over(include_own=True):
            with self._for_requests(entry.id):
                self._recover(entry)

    def maintain(self) -> None:
        """Renew our leases; take over the runs and entries of instances that died; try again
        the recoveries QRS could not answer."""
        self.journal.runq.renew()
        deferred, self._deferred = self._deferred, []
        for entry in deferred + self.journal.runq.take_over():
            with self._for_requests(entry.id):
                self._recover(entry)
        refused, self._refused = self._refused, []
        if refused:  # certainly not started (429): no need to ask QRS, which could name an older run
            self._start(refused)

    def _recover(self, entry: Entry) -> None:
        try:
            eid = self.service.backend.started_since(entry.task_id, entry.created)
        except QrsError as exc:
            log.warning("queue_recovery_deferred", taskId=entry.task_id, error=str(exc))
            self._deferred.append(entry)  # stays `starting` with our lease: tried again at the next maintenance
            return
        if eid is None:  # the start never reached QRS: start it now
            self._start([entry])
        else:
            self.journal.runq.started([(entry, {"status": "started", "executionId": eid}, None)])
            log.warning("queue_start_recovered", taskId=entry.task_id, executionId=eid)
        self.active = True

    def tick(self) -> None:
        """One pass (skipped when one is running already). Never raises."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            self._tick()
        except ButlerError as exc:
            log.warning("queue_tick_failed", error=str(exc))
        except Exception:  # a bug must not stop the queue for good
            log.exception("queue_tick_failed")
        finally:
            self._busy.release()

    def _tick(self) -> None:
        runq = self.journal.runq
        for entry in runq.expire():
            with self._for_requests(entry.id):
                log.warning("queue_expired", taskId=entry.task_id, queue_timeout_s=self.cfg.queue_timeout)
            if self.metrics is not None:
                self.metrics.queue_expired.inc()
        entries = runq.claim(self.cfg.max_running)
        if entries:
            self._start(entries)
        for entry_id in runq.unnotified():
            self._tell(entry_id)
        waiting, waiters, running = runq.counts()
        self.active = waiting > 0 or running > 0 or self._by_config
        if self.metrics is not None:
            self.metrics.queue_length.set(waiting)
            self.metrics.queue_waiters.set(waiters)
            self.metrics.running_started.set(running)

    def _for_requests(self, entry_id: int) -> AbstractContextManager[None]:
        """The logging context of work on a queue entry: the requestId of the (first) request
        waiting on it, and every waiting request's when several joined it."""
        try:
            ids = [w.request_id for w in self.journal.runq.waiters(entry_id)]
        except ButlerError:
            return nullcontext()
        extra = {"requestIds": ids} if len(ids) > 1 else {}
        return structlog.contextvars.bound_contextvars(requestId=ids[0] if ids else None, **extra)

    def _start(self, entries: list[Entry]) -> None:
        done = []
        for entry in entries:
            with self._for_requests(entry.id):
                outcome = self._start_entry(entry)
            if outcome is not None:
                done.append((entry, outcome, None))
        self.journal.runq.started(done)

    def _start_entry(self, entry: Entry) -> dict[str, Any] | None:
        """Send one claimed entry's start; its outcome (a failure to send ends it `failed`), None
        when QRS answered 429 (nothing ran): the entry stays `starting` under our lease and is
        started again at the next maintenance."""
        try:
            denied = self._denied(entry)
            if denied is not None:
                log.warning("queue_start_denied", taskId=entry.task_id, reason=denied)
                return {"status": "denied", "reason": denied}
            partial, variables = self._options(entry)
            o = self.service.start_one(TaskOutcome(entry.task_id, entry.task_name, "started", partial=partial,
                                                   variables=variables))
        except Exception as exc:  # noqa: BLE001 - a claimed entry must end done, never stay `starting`
            if rate_limited(exc):
                log.warning("queue_start_deferred", taskId=entry.task_id, error=str(exc))
                self._refused.append(entry)
                return None
            log.exception("queue_start_failed", taskId=entry.task_id)
            o = TaskOutcome(entry.task_id, entry.task_name, "failed", reason=f"the start could not be sent: {exc}")
        log.info("queue_started", taskId=entry.task_id, status=o.status, executionId=o.execution_id)
        outcome: dict[str, Any] = {"status": o.status}
        if o.execution_id:
            outcome["executionId"] = o.execution_id
        if o.reason:
            outcome["reason"] = o.reason
        return outcome

    def _options(self, entry: Entry) -> tuple[bool, dict[str, str] | None]:
        """The Qlik Cloud reload options (partial, variables) of the stage that queued the task,
        from its first waiting request as recorded; none for QRS, or when nothing is recorded."""
        if self.service.backend.kind != "cloud":
            return False, None
        try:
            for w in self.journal.runq.waiters(entry.id):
                asked = self.journal.request_of(w.key)
                stage: StartRequest | None = StartRequest.model_validate(asked) if asked is not None else None
                for _ in range(w.stage or 0):
                    stage = stage.then if stage is not None else None
                if stage is not None:
                    return bool(stage.partial), stage.variables
        except (ButlerError, ValueError) as exc:  # started without them rather than not at all
            log.warning("queue_options_unreadable", taskId=entry.task_id, error=str(exc))
        return False, None

    def _denied(self, entry: Entry) -> str | None:
        """Callers (contract section 10): a queued task starts when its turn comes, and its tags
        may have changed since it was queued. When every request waiting on it is a caller's
        and none of those callers may start the task now, it is not started: why (`denied`).
        A waiter of the anonymous caller (start_filter, judged when queued) lets it start."""
        names = {keys.caller_of(w.key) for w in self.journal.runq.waiters(entry.id)}
        if not names or None in names:
            return None
        cloud = self.service.backend.kind == "cloud"  # Qlik Cloud addresses an app by appId
        selection = self.service.resolve(StartRequest(appId=[entry.task_id]) if cloud else StartRequest(taskId=[entry.task_id]))
        if not selection.selected:
            return None  # gone: the start itself says so
        task = selection.selected[0].task
        reasons = [denial(task, self.service.callers.stored(name)) for name in sorted(n for n in names if n)]
        return reasons[0] if all(reasons) else None

    def _tell(self, entry_id: int) -> None:
        """Publish the `task` event of a done entry to each request still waiting on it."""
        runq = self.journal.runq
        outcome = runq.outcomes([entry_id]).get(entry_id)
        if outcome is None:
            return
        told = []
        first: Event | None = None
        caller = ""
        for w in runq.waiters(entry_id):
            # The waiter's caller (its key is scoped to it) names the events in metrics and alerts.
            with structlog.contextvars.bound_contextvars(requestId=w.request_id, caller=keys.caller_of(w.key) or ""):
                ev = self._tell_one(w, outcome)
            told.append(w.key)
            if first is None:
                first, caller = ev, keys.caller_of(w.key) or ""
        runq.notified(entry_id, told)
        if first is not None:  # observers (alerts, metrics) hear of the entry once, however many wait on it
            with structlog.contextvars.bound_contextvars(caller=caller):
                self.service.notify(first)

    def _tell_one(self, w: Waiter, outcome: dict[str, Any]) -> Event:
        o = TaskOutcome(w.task_id, outcome.get("taskName", ""), outcome["status"], matches(w.matched_by),
                        outcome.get("executionId"), outcome.get("reason"), attempt=w.attempt)
        if o.status == "expired" and o.reason is None:
            o.reason = f"waited longer than policies.queue_timeout ({self.cfg.queue_timeout:.0f} s) in butler-mqtt's queue"
        ev = replies.task(o, w.request_id, w.stage)
        self.service.send_later(w.key if w.journaled else None, w.route, ev, observe=False)
        return ev
