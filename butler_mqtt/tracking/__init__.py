"""Follow started executions to their final state; run `then` chains, retries and deadlines;
drive butler-mqtt's queue; survive restarts. A package of single jobs:

* `polling`     -- the thread: one backend query per interval for every execution in flight;
* `stages`      -- the chain stage engine: a waited request's stages and its end;
* `retries`     -- retries of failed reloads, and `taskOverdue` at a deadline;
* `queue_ticks` -- the queue runner's ticks, its followed executions and freed slots;
* `waits`       -- the waited requests, saved in the journal, adopted after a restart;
* `failures`    -- why a followed execution failed (its script log's tail), read off the poller;
* `timers`      -- the small pool and the timers later work runs on (with its logging context);
* `records`     -- what is kept per waited request.

`runtime.build` makes and wires the pieces (`runtime.build_tracker`); `Tracker` is their
lifecycle (start, stop) and the few questions the edges ask.
"""

from __future__ import annotations

import structlog

from butler_mqtt.errors import ButlerError
from butler_mqtt.journal import Journal
from butler_mqtt.model import Route, StartRequest
from butler_mqtt.service import Publish, StageResult
from butler_mqtt.tracking.failures import Failures
from butler_mqtt.tracking.polling import Poller
from butler_mqtt.tracking.queue_ticks import QueueTicks
from butler_mqtt.tracking.records import Waited, bound
from butler_mqtt.tracking.retries import Deadlines, Retries
from butler_mqtt.tracking.stages import Stages
from butler_mqtt.tracking.timers import Timers
from butler_mqtt.tracking.waits import Waits

__all__ = ["Deadlines", "Failures", "Poller", "Publish", "QueueTicks", "Retries", "Stages", "Timers", "Tracker", "Waited", "Waits"]

log = structlog.get_logger("butler_mqtt.tracking")


class Tracker:
    """The tracking pieces' lifecycle, and what the edges ask of them. Thread-safe."""

    def __init__(self, journal: Journal, waits: Waits, poller: Poller, stages: Stages, retries: Retries,
                 queue: QueueTicks, timers: Timers) -> None:
        self.journal = journal
        self.waits = waits
        self.poller = poller
        self.stages = stages
        self.retries = retries
        self.queue = queue
        self.timers = timers
        #: Failure details being read (runtime.build_tracker sets it).
        self.failures: Failures | None = None

    def start(self) -> None:
        # Our own records (a previous run of this instance) and orphans of dead instances.
        self.waits.adopt(self.journal.own_waits() + self.journal.claim_waits(), self._resume)
        self.queue.recover()
        self.poller.queue_changed()  # what waits, and waiters an earlier run did not tell
        self.poller.schedule(self.poller.cfg.first_poll)
        self.poller.start()

    def _resume(self, w: Waited) -> None:
        """A waited request taken over (after a restart, or from a dead instance): go on with it."""
        with bound(w):
            log.info("tracking_resumed", stage=w.stage, executions=len(w.pending))
            self.retries.resume(w)
            if w.queued:
                self.poller.queue_changed()
            if w.starting:  # stopped while sending this stage's starts: finish that stage
                self.timers.submit(self.stages.run_stage, w.key, w.stage, True)
            elif w.idle:
                self.timers.submit(self.stages.stage_ended, w.key)
            else:
                self.poller.schedule(self.poller.cfg.first_poll)

    def maintain(self) -> None:
        """Renew the leases on what we follow; take over chains and queue work whose owner died."""
        try:
            self.journal.renew_waits()
            self.waits.adopt(self.journal.claim_waits(), self._resume)
            self.queue.maintain()
        except ButlerError as exc:
            log.warning("tracking_lease_failed", error=str(exc))

    def stop(self) -> None:
        self.timers.stop()  # the stage is resumed after the restart (the record says `starting`)
        self.poller.stop()
        self.timers.shutdown()
        if self.failures is not None:
            self.failures.close()

    @property
    def alive(self) -> bool:
        return self.poller.alive

    @property
    def polls(self) -> int:
        return self.poller.polls

    @property
    def grace_s(self) -> float:
        return self.poller.grace_s

    @grace_s.setter
    def grace_s(self, value: float) -> None:
        self.poller.grace_s = value

    def following(self) -> int:
        """Executions being followed to their end right now (the metric)."""
        return self.waits.following()

    def running_tasks(self) -> dict[str, str]:
        return self.waits.running_tasks()

    def queue_changed(self) -> None:
        self.poller.queue_changed()

    def follow(self, key: str, req: StartRequest, result: StageResult, route: Route, caller: str | None = None) -> None:
        self.stages.follow(key, req, result, route, caller)
