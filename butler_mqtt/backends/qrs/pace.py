"""Two small pieces of state the QRS client keeps across calls (thread-safe, no I/O):

* `HoldOff`: after a 429, no call of this client goes out before its `Retry-After` (or, without
  one, the first backoff step); a call does not sleep out more than its budget of it.
* `ServerClock`: QRS's clock minus ours, learned from the `Date` header of its answers, so that
  "did my start arrive?" is asked in QRS's time.
"""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime

from butler_mqtt.errors import QrsRefused
from butler_mqtt.ops import retry


class HoldOff:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0  # monotonic: no call before this (a 429's Retry-After)

    def hold(self, hint: float | None) -> None:
        """QRS said 429 with this Retry-After (None: none given)."""
        until = time.monotonic() + (hint if hint is not None else retry.QRS_CALL.first)
        with self._lock:
            self._not_before = max(self._not_before, until)

    def refuse_past(self, budget: float, what: str) -> None:
        """A call does not sleep out a long Retry-After (a start's journal lease would run out, a
        REST caller would wait): past `budget` (monotonic) it is refused as a 429 at once and left
        to the caller's later try."""
        with self._lock:
            until = self._not_before
        if until > budget:
            wait = until - time.monotonic()
            raise QrsRefused(f"{what}: QRS asked to wait {wait:.0f} s (429 Too Many Requests)", 429, retry_after=wait)

    def wait(self) -> None:
        """Sleep until the last Retry-After has passed (at most the cap of one)."""
        with self._lock:
            wait = self._not_before - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, retry.RETRY_AFTER_CAP_S))


class ServerClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset: float | None = None
        self._last_date: str | None = None

    def learn(self, date_header: str | None, t0: float) -> None:
        """An answer's `Date` header; `t0`: time.perf_counter() when the call was sent."""
        # One parse per new header value: under load many answers share the same second.
        if not date_header or date_header == self._last_date:
            return
        self._last_date = date_header
        try:
            server_now = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # The Date header has 1 s resolution and was stamped somewhere during the call.
        local = time.time() - (time.perf_counter() - t0) / 2
        with self._lock:
            self._offset = server_now + 0.5 - local

    @property
    def offset(self) -> float | None:
        """The server's clock minus ours in seconds, None before any answer with a date."""
        with self._lock:
            return self._offset
