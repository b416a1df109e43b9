"""Pacing of reload starts under `cloud.reloads_per_minute`, across every thread of the daemon.

`StartPacer` is a token bucket kept as a schedule (GCRA): each start reserves the next free
slot, `60 / reloads_per_minute` seconds after the previous one (a burst of `burst` slots may be
taken at once after a quiet spell), and sleeps until its slot. Reserving under one lock makes
the pace hold across threads: in any window of t seconds at most `burst + rate * t / 60` starts
leave. A 429 answer's `Retry-After` pauses every start (`pause_until`). A start whose slot lies
beyond its deadline reserves nothing and raises `CloudRateLimited` (transient: nothing was sent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from butler_mqtt.errors import CloudRateLimited


class StartPacer:
    def __init__(
        self,
        per_minute: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("per_minute must be > 0 and burst >= 1")
        self.interval = 60.0 / per_minute
        self.burst = burst
        self._clock, self._sleep = clock, sleep
        self._tat = clock()  # theoretical arrival time of the next start
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def acquire(self, deadline: float) -> float:
        """Wait for this start's slot; return the seconds waited. Raises CloudRateLimited (and
        reserves nothing) when the slot is after `deadline` (a `time.monotonic()` value)."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._tat - (self.burst - 1) * self.interval, self._paused_until)
            if slot > deadline:
                wait = slot - now
                raise CloudRateLimited(
                    f"reload starts are paced under cloud.reloads_per_minute ({60 / self.interval:g}/min)"
                    f" or paused by Qlik Cloud's Retry-After: the next free slot is in {wait:.1f} s,"
                    " after this call's deadline",
                    retry_after=wait,
                )
            self._tat = max(self._tat, slot) + self.interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait

    def pause_until(self, when: float) -> None:
        """No start before `when` (a `time.monotonic()` value): a 429's Retry-After."""
        with self._lock:
            self._paused_until = max(self._paused_until, when)
