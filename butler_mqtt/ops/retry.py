"""One backoff rule for every retry loop: the delay doubles from `first` up to `cap`, never
shorter than what the server asked for (`Retry-After`, capped at RETRY_AFTER_CAP_S), and
jittered upwards a little so that many waiters do not come back in the same instant.

`retry_after_seconds` reads a `Retry-After` header (delta-seconds or an HTTP date); QRS, a proxy
in front of it, Qlik Cloud and the alert webhook all answer 429/503 with it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

#: A server's hint is honoured up to this long; a longer one is treated as this long (a
#: `Retry-After: 86400` must not park a request for a day).
RETRY_AFTER_CAP_S = 120.0

_random = random.Random()


@dataclass(frozen=True)
class Backoff:
    first: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.1  # up to +10 %

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 = the first retry); at least the
        server's `hint` (seconds, from Retry-After) when it gave one."""
        base = min(self.first * self.factor ** max(0, attempt), self.cap)
        if hint is not None and hint > 0:
            base = max(base, min(hint, RETRY_AFTER_CAP_S))
        return base * (1.0 + _random.uniform(0.0, self.jitter)) if self.jitter > 0 else base


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header as seconds from now (0 when the date is past), capped at
    RETRY_AFTER_CAP_S; None when absent or not understood (the plain backoff applies then)."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if text.isascii() and text.isdigit():
        return min(float(int(text)), RETRY_AFTER_CAP_S)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), RETRY_AFTER_CAP_S)


#: A delivery kept unacked while QRS or the journal is unavailable.
DELIVERY = Backoff(0.5, 30.0)
#: A QRS call that failed transiently (GETs; starts only when never sent or answered 429).
QRS_CALL = Backoff(0.2, 2.0)
#: A chain stage that could not be started yet.
CHAIN_STAGE = Backoff(1.0, 30.0)
#: An alert POST to the webhook that failed (alerts.webhook.retry_delay replaces `first`).
WEBHOOK = Backoff(1.0, 60.0)
