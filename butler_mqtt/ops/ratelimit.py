"""Repeated identical log lines, once per interval with a count.

A fault that repeats (QRS refusing every request, an accept loop out of file descriptors)
must stay visible without flooding the journal: the first occurrence is logged at once, the
repeats within `interval_s` are counted, and the next line that gets through says how many
were suppressed (`repeated=N`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable


class RateLimiter:
    """`allow(key)` -> (log now?, how many were suppressed since the last line). Thread-safe."""

    def __init__(self, interval_s: float = 60.0, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[Hashable, tuple[float, int]] = {}  # key -> (last logged, suppressed)

    def allow(self, key: Hashable) -> tuple[bool, int]:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[key] = (last, suppressed + 1)
                return False, suppressed + 1
            if len(self._seen) >= self._max_keys and key not in self._seen:
                self._seen.clear()  # bounded: a flood of distinct keys cannot grow memory
            self._seen[key] = (now, 0)
            return True, suppressed


class RateLimitFilter(logging.Filter):
    """A stdlib logging filter (asyncio, uvicorn, paho): identical messages once per interval."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self._limiter = RateLimiter(interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        ok, suppressed = self._limiter.allow((record.name, record.levelno, str(record.msg)[:200]))
        if ok and suppressed:
            record.msg = f"{record.msg} (repeated {suppressed} times since the last line)"
        return ok
