"""Sending starts to the backend: bounded concurrency, and a start without an answer (or
interrupted by a crash) confirmed with the backend, never sent blindly a second time.

`StartService` (service.py) owns one `Starts`; every start of every request, retry and
queued task goes through `Starts.one`.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import structlog

from butler_mqtt.backends.base import Backend, StartOptions
from butler_mqtt.errors import QrsError, QrsNotFound, QrsUnreachable, rate_limited
from butler_mqtt.model import EMPTY_GUID, TaskOutcome

log = structlog.get_logger("butler_mqtt.service")


class Starts:
    """Thread-safe. QRS sees at most `concurrency` starts at a time from this instance."""

    def __init__(self, backend: Backend, concurrency: int) -> None:
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="qrs-start")
        # Starts of every request (pooled or inline) share one limit.
        self._slots = threading.BoundedSemaphore(concurrency)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def many(
        self, outcomes: list[TaskOutcome], refused: Callable[[list[TaskOutcome]], None] | None = None
    ) -> Iterator[TaskOutcome]:
        """Start these tasks (one inline, more in the pool); each outcome as its answer comes.

        A start that raised (QRS answered 429: nothing ran) is not yielded: once every other
        answer is, `refused` is told of the 429'd ones and the first error is raised (the
        request is then handled again later, resumed from its intents)."""
        if len(outcomes) == 1:  # inline, no pool and no Future: the common single-task request
            try:
                done = self.one(outcomes[0])
            except Exception as error:
                if refused is not None:
                    refused([outcomes[0]] if rate_limited(error) else [])
                raise
            yield done
            return
        # Each start runs in a copy of this request's logging context (its requestId).
        start: Callable[[TaskOutcome], TaskOutcome] = self.one
        futures = [self._pool.submit(contextvars.copy_context().run, start, o) for o in outcomes]
        for fut in as_completed(futures):
            if fut.exception() is None:
                yield fut.result()
        failed = [(o, exc) for o, fut in zip(outcomes, futures, strict=True) if (exc := fut.exception()) is not None]
        if failed:
            if refused is not None:
                refused([o for o, exc in failed if rate_limited(exc)])
            raise failed[0][1]

    def one(self, o: TaskOutcome) -> TaskOutcome:
        """Start one task; `o` gets QRS's answer (started, notStarted or failed, with the reason).

        Raises QrsRefused (429) when QRS kept refusing the start with Too Many Requests beyond
        the client's retries: nothing ran, so it is never a final `failed`; the caller leaves
        it for later (transient: errors.rate_limited)."""
        sent = time.time()
        try:
            with self._slots:
                sent = time.time()
                options = StartOptions(o.partial, dict(o.variables or {})) if o.partial or o.variables else None
                execution_id = self.backend.start(o.task_id, options)
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
            execution_id = self.backend.started_since(o.task_id, sent)
        except QrsError as exc:
            o.reason = f"{o.reason}; QRS could not be asked whether the start arrived ({exc}): it may run anyway"
            return
        if execution_id is None:
            o.reason = f"{o.reason}; QRS shows no execution of this task since the start was sent"
        else:
            o.status, o.execution_id = "started", execution_id
            o.reason = "QRS did not answer the start in time; the execution was found in QRS"
        log.warning("start_unanswered", taskId=o.task_id, executionId=execution_id)

    def recover(self, o: TaskOutcome, since: float) -> None:
        """The daemon stopped after sending this start (at `since`) but before recording the
        answer: ask QRS whether it arrived. `o` gets the execution, stays `started` without
        one (never reached QRS: start it now), or `failed` when QRS cannot tell."""
        try:
            execution_id = self.backend.started_since(o.task_id, since)
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
