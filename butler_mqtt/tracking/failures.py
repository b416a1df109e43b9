"""Why an execution did not succeed (contract section 8), read off the polling thread.

When a followed execution ends in any state but FinishedSuccess (and not Unknown: then there is
no execution result to read), the poller hands it here instead of to the stage engine at once:

* the backend is asked (`Backend.failure`: the execution result's texts and the tail of THAT
  execution's script log) in a small pool of its own (`WORKERS` threads), so a slow or hanging
  log download never holds the polling thread, the chain pool or another request's replies;
* the answer is kept in a small cache keyed by execution id (`CACHE` entries): an execution's
  failure is read at most once whatever number of requests follow it (attach: several; all of
  them hear the end together, from this one read);
* the `taskFinished` is published as soon as the failure is known, and at the latest
  `tracking.script_log_deadline` + `SLACK_S` seconds after the end: past that, it is published
  with `failure.scriptLogError` saying the details were not read in time (the reader itself
  gives up at `script_log_deadline`, so this bound is only reached when the pool is saturated
  or QRS does not answer the execution result);
* while the read runs, the poller's further reports of the same end are ignored (`busy`).

Nothing raises out of here: a backend error becomes an event without `failure`, logged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import structlog

from butler_mqtt.backends.base import Backend, Failure
from butler_mqtt.config import TrackingConfig
from butler_mqtt.tracking.timers import Timers

log = structlog.get_logger("butler_mqtt.tracking")

WORKERS = 8
CACHE = 512
SLACK_S = 5.0

#: The failure of an execution is known (None: the backend had none, or could not tell).
Known = Callable[[Failure | None], None]


class FailureMetrics(Protocol):
    def script_log_failed(self) -> None: ...


class Failures:
    """Thread-safe. `fetch` returns at once; `then` runs exactly once, in this pool or a timer."""

    def __init__(self, cfg: TrackingConfig, backend: Backend, timers: Timers, metrics: FailureMetrics | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.timers = timers
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="failure")
        self._cache: OrderedDict[str, Failure | None] = OrderedDict()
        self._busy: set[str] = set()
        self.reads = 0  # backend reads made (tests, the benchmark)

    def busy(self, eid: str) -> bool:
        """Is this execution's failure being read (its end already reported to us)?"""
        with self._lock:
            return eid in self._busy

    def cached(self, eid: str) -> tuple[bool, Failure | None]:
        with self._lock:
            if eid in self._cache:
                return True, self._cache[eid]
            return False, None

    def fetch(self, eid: str, task_id: str, then: Known) -> None:
        """Read `eid`'s failure (once: cached), then call `then` with it, or with a
        `scriptLogError` at the deadline if it is not known by then."""
        known, failure = self.cached(eid)
        if known:
            then(failure)
            return
        with self._lock:
            self._busy.add(eid)
        once = _Once(lambda f: self._done(eid, then, f))
        try:
            self._pool.submit(self._read, eid, task_id, once)
        except RuntimeError:  # shutting down: the end is reported again after the restart
            with self._lock:
                self._busy.discard(eid)
            return
        late: Failure = {"message": "", "details": [],
                         "scriptLogError": f"failure details not read within {self.limit_s:g} s"}
        self.timers.later(self.limit_s, once.fire, late, True)

    @property
    def limit_s(self) -> float:
        return self.cfg.script_log_deadline + SLACK_S

    def _read(self, eid: str, task_id: str, once: _Once) -> None:
        failure: Failure | None = None
        try:
            failure = self.backend.failure(task_id, eid, self.cfg.script_log_lines)
            with self._lock:
                self.reads += 1
        except Exception as exc:  # noqa: BLE001 - the end is still reported, without failure
            log.warning("failure_details_failed", executionId=eid, error=str(exc)[:300])
        if failure is not None and failure.get("scriptLogError") and self.metrics is not None:
            self.metrics.script_log_failed()
        with self._lock:
            self._cache[eid] = failure
            self._cache.move_to_end(eid)
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        once.fire(failure, False)

    def _done(self, eid: str, then: Known, failure: Failure | None) -> None:
        try:
            then(failure)
        finally:
            with self._lock:
                self._busy.discard(eid)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Once:
    """Calls `fn` with the first value fired, never again."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._fired = False

    def fire(self, value: Mapping[str, Any] | None, late: bool) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
        if late:
            log.warning("failure_details_late", detail="taskFinished published without the script log")
        self._fn(value)
