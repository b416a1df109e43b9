"""The tracker's small work pool and its timers: later work (a retry, a deferred chain stage,
the end of a stage) runs in the pool, never on the polling thread, and never after `stop`.

Each piece of work runs in a copy of the logging context it was handed from (structlog's
contextvars: the request's `requestId`), so a line logged for a request by a timer or the pool
carries its requestId like the line of the thread that asked for it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Timers:
    """Thread-safe. `submit` runs now in the pool, `later` after a delay."""

    def __init__(self, workers: int = 4) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain")
        self._timers: set[threading.Timer] = set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None] | None:
        """Run `fn(*args)` in the pool, in a copy of the caller's context (None: stopping)."""
        ctx = contextvars.copy_context()
        try:
            return self._pool.submit(ctx.run, fn, *args)
        except RuntimeError:  # shut down meanwhile: the record is resumed after the restart
            return None

    def later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` in the pool after `delay` seconds (unless stopping meanwhile)."""
        ctx = contextvars.copy_context()

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._stopped:
                    return
            ctx.run(self.submit, fn, *args)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            if self._stopped:
                return
            self._timers.add(timer)
        timer.start()

    def stop(self) -> None:
        """Cancel the timers (their work is resumed after the restart, from the records) and
        let the pool finish what it runs."""
        with self._lock:
            self._stopped = True
            timers, self._timers = self._timers, set()
        for t in timers:
            t.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
