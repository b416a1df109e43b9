"""Follow started executions to their final state; run `then` chains; survive restarts.

One thread polls QRS with ONE query per interval for every execution in flight across all
requests (`GET /qrs/executionresult/full?filter=executionID eq A or executionID eq B ...`,
chunked only when the filter gets too long). Final states (qrs-api.md 6.4): Aborted,
FinishedSuccess, FinishedFail, Skipped, Error, Reset. Retry, Queued, AbortInitiated and
Aborting are not final. An execution that cannot be followed ends as `Unknown` with a reason:
no result row and no execution session after a grace period, or `tracking.max_wait` reached.

Every waited request is a `Waited` record stored in the journal (table `waits`) on each
change, so after a restart the daemon picks up the executions and chains it was following.
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
from butler_mqtt.chains import NextStage, after_stage, finish_failure, start_failures
from butler_mqtt.config import TrackingConfig
from butler_mqtt.errors import ButlerError, QrsError, is_transient
from butler_mqtt.journal import Journal
from butler_mqtt.model import FINAL_STATES, Route, StartRequest
from butler_mqtt.ops import retry
from butler_mqtt.qrs.client import QrsClient
from butler_mqtt.service import StageResult, StartService

log = structlog.get_logger("butler_mqtt.tracking")



@dataclass
class Pending:
    execution_id: str
    task_id: str
    task_name: str
    stage: int | None
    started: float  # wall clock (stored: survives a restart)
    deadline: float  # wall clock (stored)
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
        d["pending"] = {
            k: Pending(**{f: v[f] for f in ("execution_id", "task_id", "task_name", "stage", "started", "deadline")})
            for k, v in d["pending"].items()
        }
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
    """The polling thread and the chain engine. Thread-safe."""

    def __init__(
        self, cfg: TrackingConfig, qrs: QrsClient, service: StartService, journal: Journal, publish: Publish
    ) -> None:
        self.cfg = cfg
        self.qrs = qrs
        self.service = service
        self.journal = journal
        self.publish = publish
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waited: dict[str, Waited] = {}
        self._next_poll: float | None = None
        self._stop = False
        self._stages = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chain")
        self._timers: set[threading.Timer] = set()
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self.polls = 0
        self._refused_since: float | None = None
        self.grace_s = max(30.0, 3 * cfg.poll_interval)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # Our own records (a previous run of this instance) and orphans of dead instances.
        self._adopt(self.journal.own_waits() + self.journal.claim_waits())
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
            if w.starting:  # stopped while sending this stage's starts: finish that stage
                self._stages.submit(self._run_stage, w.key, w.stage, True)
            elif not w.pending:
                self._stages.submit(self._stage_ended, w.key)
            else:
                self._schedule(self.cfg.first_poll)

    def _maintain(self) -> None:
        """Renew the leases on what we follow; take over chains whose owner died."""
        try:
            self.journal.renew_waits()
            self._adopt(self.journal.claim_waits())
        except ButlerError as exc:
            log.warning("tracking_lease_failed", error=str(exc))

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


    # ------------------------------------------------------------------ entry point

    def follow(self, key: str, req: StartRequest, result: StageResult, route: Route) -> None:
        """Called once stage 0 of a waited request has been started."""
        w = Waited(
            key=key,
            request_id=req.requestId,
            request=req.model_dump(mode="json"),
            route=route,
            started=time.time(),
            chained=req.then is not None,
        )
        self._absorb(w, result)
        with self._lock:
            self._waited[key] = w
            self._save(w)
        if not w.pending:
            self._stages.submit(self._stage_ended, key)
        else:
            self._schedule(self.cfg.first_poll)

    def _absorb(self, w: Waited, result: StageResult) -> None:
        """Record a stage's started executions and its tasks that cannot succeed."""
        now = time.time()
        w.stage_failures = start_failures(result.outcomes)
        for o in result.outcomes:
            if o.status == "started" and o.execution_id:
                w.pending[o.execution_id] = Pending(
                    o.execution_id, o.task_id, o.task_name, w.stage if w.chained else None, now, now + self.cfg.max_wait
                )

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

    # ------------------------------------------------------------------ polling

    def _run(self) -> None:
        maintain_every = self.journal.lease_s / 3
        next_maintenance = time.monotonic() + maintain_every
        while True:
            with self._lock:
                while not self._stop:
                    now = time.monotonic()
                    if (self._next_poll is not None and now >= self._next_poll) or now >= next_maintenance:
                        break
                    until = next_maintenance if self._next_poll is None else min(self._next_poll, next_maintenance)
                    self._wake.wait(until - now)
                if self._stop:
                    return
                due = self._next_poll is not None and time.monotonic() >= self._next_poll
                if due:
                    self._next_poll = None
                pending = {eid: p for w in self._waited.values() for eid, p in w.pending.items()}
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + maintain_every
                self._maintain()
            if due and pending:
                try:
                    self._poll(pending)
                except Exception:  # never let one bad answer stop the tracking thread
                    log.exception("tracking_poll_failed")
                self._schedule(self.cfg.poll_interval)

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

    def _finish(self, eid: str, status: str, row: dict[str, Any] | None, reason: str | None = None) -> None:
        with self._lock:
            w = next((w for w in self._waited.values() if eid in w.pending), None)
            if w is None:
                return
            p = w.pending.pop(eid)
        ev = replies.task_finished(w.request_id, p.task_id, p.task_name, eid, status, row, reason, p.stage)
        with self._lock:
            w.finished[status] = w.finished.get(status, 0) + 1
            failure = finish_failure(p.task_name, p.task_id, status)
            if failure is not None:
                w.stage_failures.append(failure)
            self._save(w)
            stage_done = not w.pending and not w.starting
        self._emit(w, ev)
        log.info("task_finished", requestId=w.request_id, taskId=p.task_id, executionId=eid, status=status)
        if stage_done:
            self._stages.submit(self._stage_ended, w.key)

    # ------------------------------------------------------------------ chains

    def _emit(self, w: Waited, ev: dict[str, Any]) -> None:
        try:
            self.journal.reply(w.key, ev)
        except ButlerError as exc:
            log.error("journal_write_failed", error=str(exc))
        self.publish(w.route, ev)

    def _stage_ended(self, key: str) -> None:
        with self._lock:
            w = self._waited.get(key)
            if w is None or w.pending or w.starting:
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
            result = self.service.run_stage(stage_req, w.request_id, lambda ev: self._emit(w, ev), index, key, prior)
        except Exception as exc:  # noqa: BLE001 - every failure ends in a retry or requestFinished
            if not is_transient(exc):
                log.error("chain_stage_refused", requestId=w.request_id, stage=index, error=str(exc))
                return self._request_finished(w, index, f"stage {index} could not be started: {exc}")
            delay = retry.CHAIN_STAGE.delay(attempt)
            if time.time() + delay - w.started > self.cfg.max_wait:
                return self._request_finished(
                    w, index, f"stage {index} could not be started within tracking.max_wait ({self.cfg.max_wait:.0f} s): {exc}"
                )
            log.warning("chain_stage_deferred", requestId=w.request_id, stage=index, error=str(exc), retry_in_s=delay)
            self._later(delay, self._run_stage, key, index, resumed, attempt + 1)
            return
        with self._lock:
            self._absorb(w, result)
            w.starting = False
            self._save(w)
            empty = not w.pending
        if empty:
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
        ev = replies.request_finished(w.request_id, w.finished, stopped_at, int((time.time() - w.started) * 1000), reason)
        self._emit(w, ev)
        with self._lock:
            self._waited.pop(w.key, None)
        try:
            self.journal.drop_wait(w.key)
        except ButlerError as exc:
            log.error("journal_write_failed", error=str(exc))
        log.info("request_finished", requestId=w.request_id, finished=w.finished, stoppedAtStage=stopped_at)
