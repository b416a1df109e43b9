"""Is the backend (QRS) answering? Seen from every call, whatever ingress or thread made it.

The backend client reports each call's outcome (`observe`, the QrsClient's call observer
signature): no answer (refused, reset, timeout, TLS failure) or a 5xx is a failure, any other
answer (429 too: QRS is there, only busy) a success. Three readers:

* `/healthz`: `failing` (the last call failed) means QRS is not "ok", whoever met the failure;
* the retained status topic: `on_change(problem)` is called with a stable one-line text once
  QRS has failed for STATUS_AFTER_S with no success in between, and with None at the next
  success (one publish per outage and one per recovery, never one per failed call);
* requests waiting on a transient failure (`wait`): woken at the first success after a failure
  instead of sleeping out their backoff (up to 30 s). While QRS fails, at most one waiter per
  PROBE_EVERY_S is let go early, so that someone notices QRS answering again even when no new
  request comes: one extra call per interval, whatever the number of waiters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: A failure must last this long (no success in between) before the status topic shows it.
STATUS_AFTER_S = 5.0
#: While QRS fails, one waiting request per this many seconds retries early (a probe).
PROBE_EVERY_S = 2.0
#: Waiters are woken by a recovery at most this often (a QRS failing only on some routes
#: must not turn the waiters' backoff into a busy loop).
WAKE_MIN_S = 1.0


class BackendHealth:
    """Thread-safe. `name` is what the status text calls the backend (its URL)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self.last_ok = 0.0  # monotonic of the last success, 0: none yet
        self.last_failure = 0.0
        self._first_failure: tuple[float, float] | None = None  # (monotonic, wall) since the last success
        self._announced = False
        self._recoveries = 0
        self._last_wake = 0.0
        self._next_probe = 0.0
        self.on_change: list[Callable[[str | None], None]] = []

    @property
    def failing(self) -> bool:
        """The most recent call failed (no success since)."""
        with self._cond:
            return self._first_failure is not None

    def observe(self, method: str, route: str, status: int | None, seconds: float) -> None:
        """One call's outcome (a QrsClient call observer)."""
        now = time.monotonic()
        announce: str | None = None
        changed = False
        with self._cond:
            if status is not None and status < 500:
                self.last_ok = now
                if self._first_failure is None:
                    return
                self._first_failure = None
                changed, self._announced = self._announced, False
                if now - self._last_wake >= WAKE_MIN_S:
                    self._last_wake = now
                    self._recoveries += 1
                    self._cond.notify_all()
            else:
                self.last_failure = now
                if self._first_failure is None:
                    self._first_failure = (now, time.time())
                    self._next_probe = now + PROBE_EVERY_S
                if self._announced or now - self._first_failure[0] < STATUS_AFTER_S:
                    return
                self._announced = changed = True
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._first_failure[1]))
                announce = f"{self.name} is not answering since {since} (requests wait unacked and are retried)"
        if changed:
            for fn in self.on_change:
                fn(announce)

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Sleep up to `timeout` s; return early when `stop` is set (then True), when the backend
        answered again after failing, or when it is this waiter's turn to probe (then False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = self._recoveries
            while not stop.is_set() and self._recoveries == seen:
                now = time.monotonic()
                if now >= deadline:
                    break
                if self._first_failure is not None and now >= self._next_probe and deadline - now > PROBE_EVERY_S:
                    self._next_probe = now + PROBE_EVERY_S
                    break  # this waiter tries again now: a probe for everyone
                self._cond.wait(min(deadline - now, PROBE_EVERY_S, 0.5))
        return stop.is_set()
