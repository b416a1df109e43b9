"""Group commit for the SQLite journal: the transactions several threads ask for at once run
as one.

Why: every SQLite statement releases the GIL, and a thread that wants it back waits for another
thread to let go of it (up to the switch interval). A transaction holding the journal's lock
was therefore stretched by the GIL, and the request workers queued behind it: measured with a
slower QRS stand-in, workers spent half their time waiting for that lock while QRS sat idle.

How: the first thread to arrive leads: it takes every operation queued so far (its own
included) and runs them in one `BEGIN IMMEDIATE` ... `COMMIT`, then wakes their threads and
hands the lead to the first operation that arrived meanwhile. Alone, a thread runs its own
transaction at once, as before. The durability is the same (each caller returns only after the
COMMIT that holds its writes); the order is the order of arrival.

When any operation of a batch fails, or the COMMIT does, the batch is rolled back and each of
its operations runs again in a transaction of its own: a failure belongs to the operation that
caused it and never undoes another's writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Op(Generic[T]):
    __slots__ = ("fn", "value", "error", "done", "wake")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.wake: threading.Lock | None = None  # held while its thread waits (followers only)

    def run(self) -> None:
        try:
            self.value = self.fn()
            self.error = None
        except BaseException as exc:  # handed to the op's own thread
            self.error = exc

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[no-any-return]


class GroupCommit:
    """`transact(fn)`: fn runs inside a transaction, perhaps together with other threads' fns.

    `begin`, `commit` and `rollback` run the statements; `lock` (re-entrant) is held while a
    batch runs, so that whoever else takes it (a plain statement, a reopen) waits for the batch.
    """

    def __init__(self, lock: threading.RLock, begin: Callable[[], object], commit: Callable[[], object],
                 rollback: Callable[[], object]) -> None:
        self.lock = lock
        self._begin, self._commit, self._rollback = begin, commit, rollback
        self._queue: list[_Op[Any]] = []
        self._qlock = threading.Lock()
        self._leading = False
        self.batches = 0  # transactions run (tests and benchmarks read them)
        self.grouped = 0  # operations that shared a transaction with another

    def transact(self, fn: Callable[[], T]) -> T:
        op: _Op[T] = _Op(fn)
        with self._qlock:
            self._queue.append(op)
            follow = self._leading
            if follow:
                op.wake = threading.Lock()
                op.wake.acquire()
            else:
                self._leading = True
        if follow:
            assert op.wake is not None
            op.wake.acquire()  # released when its batch is done or the lead passes to it
            if op.done:
                return op.result()
        self._lead()
        return op.result()

    def _lead(self) -> None:
        """Run what is queued as one batch, wake its threads, pass the lead on."""
        batch: list[_Op[Any]] = []
        try:
            with self.lock:
                with self._qlock:
                    batch, self._queue = self._queue, []
                self._run(batch)
        finally:
            with self._qlock:
                nxt = self._queue[0] if self._queue else None
                if nxt is None:
                    self._leading = False
            for op in batch:
                op.done = True
                if op.wake is not None:
                    op.wake.release()
            if nxt is not None and nxt.wake is not None:
                nxt.wake.release()  # not done: it leads the next batch

    def _run(self, batch: list[_Op[Any]]) -> None:
        self.batches += 1
        if len(batch) == 1:
            self._alone(batch[0])
            return
        self.grouped += len(batch)
        try:
            self._begin()
            for op in batch:
                op.run()
                if op.error is not None:
                    break
            else:
                self._commit()
                return
        except BaseException:  # noqa: BLE001 - BEGIN or COMMIT failed: each on its own below
            pass
        self._safe_rollback()
        for op in batch:  # each in a transaction of its own: a failure is its own operation's
            self._alone(op)

    def _alone(self, op: _Op[Any]) -> None:
        try:
            self._begin()
        except BaseException as exc:
            op.error = exc
            return
        op.run()
        if op.error is not None:
            self._safe_rollback()
            return
        try:
            self._commit()
        except BaseException as exc:
            op.error = exc
            self._safe_rollback()

    def _safe_rollback(self) -> None:
        try:
            self._rollback()
        except Exception:  # noqa: BLE001 - no transaction left open (a failed COMMIT may end it)
            pass
