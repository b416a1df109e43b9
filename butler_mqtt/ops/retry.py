"""One backoff rule for every retry loop: the delay doubles from `first` up to `cap`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first: float
    cap: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0 = the first retry)."""
        return min(self.first * self.factor ** max(0, attempt), self.cap)


#: A delivery kept unacked while QRS or the journal is unavailable.
DELIVERY = Backoff(0.5, 30.0)
#: A QRS call that failed transiently (GETs; starts only when never sent).
QRS_CALL = Backoff(0.2, 2.0)
#: A chain stage that could not be started yet.
CHAIN_STAGE = Backoff(1.0, 30.0)
#: An alert POST to the webhook that failed (alerts.webhook.retry_delay replaces `first`).
WEBHOOK = Backoff(1.0, 60.0)
