"""Pure: the run policies of contract section 7, decided per task from plain data.

* `effective()` -- the policy of one stage: the stage's own fields, else the root request's,
  else `policies` in the config (the plain topic and Butler-shaped REST bodies use the config).
* `decide()`    -- for one task about to be started: `start` it, `attach` to the running
  execution, `skip` it, `rerun` it once the running execution ended (ifRunning queue), or let it
  wait for a `slot` (max_running), or `restart` it (ifRunning restart, section 8: stop the
  running execution, start once it ended). A task already waiting in butler-mqtt's queue is joined:
  it runs once for every request waiting on it.
* `retry_delay()` -- the pause before extra start k (delay doubling, at most 3600 s).

"Running" (section 7) is QRS's `operational.lastExecutionResult` in a non-final state, from the
same resolution query (no extra QRS call), or an execution this daemon started and has not
seen end; the caller passes the union.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from butler_mqtt.config import PoliciesConfig
from butler_mqtt.model import DEFAULT_PRIORITY, IfRunning, StartRequest

#: Final states after which `retry` starts a reload again (FinishedSuccess and Skipped are not).
RETRYABLE = frozenset({"FinishedFail", "Aborted", "Error", "Reset"})
MAX_RETRY_DELAY = 3600.0

Action = Literal["start", "attach", "skip", "rerun", "restart", "slot", "join"]


@dataclass(frozen=True)
class Policy:
    """What applies to one stage of one request."""

    if_running: IfRunning = "start"
    max_running: int = 0
    queue_timeout: float = 3600.0
    retry_attempts: int = 0
    retry_delay: float = 60.0
    deadline: float | None = None
    priority: int = DEFAULT_PRIORITY
    on_deadline: str = "notify"  # contract section 8: `stop` at the deadline

    @property
    def follows(self) -> bool:
        """Retries and deadlines need the end (or the duration) of every execution."""
        return self.retry_attempts > 0 or self.deadline is not None


def effective(cfg: PoliciesConfig, root: StartRequest | None = None, stage: StartRequest | None = None) -> Policy:
    """The stage's own fields win, then the root request's, then the config's defaults."""
    layers = [r for r in (stage, root) if r is not None]

    def pick(name: str) -> object:
        for r in layers:
            value = getattr(r, name)
            if value is not None:
                return value
        return None

    if_running = pick("ifRunning") or cfg.if_running
    retry = pick("retry")
    deadline = pick("deadline")
    priority = pick("priority")
    on_deadline = pick("onDeadline") or cfg.on_deadline
    return Policy(
        if_running=if_running,  # type: ignore[arg-type]
        max_running=cfg.max_running,
        queue_timeout=cfg.queue_timeout,
        retry_attempts=retry.attempts if retry is not None else cfg.retry.attempts,  # type: ignore[attr-defined]
        retry_delay=float(retry.delay if retry is not None else cfg.retry.delay),  # type: ignore[attr-defined]
        deadline=float(deadline) if deadline is not None else cfg.deadline,  # type: ignore[arg-type]
        priority=int(priority) if priority is not None else DEFAULT_PRIORITY,  # type: ignore[call-overload]
        on_deadline=str(on_deadline),
    )


def decide(policy: Policy, running: bool, waiting: bool) -> Action:
    """One task about to be started. `running`: it runs now (QRS or us); `waiting`: an entry for
    it waits in butler-mqtt's queue already (a rerun or a slot)."""
    if running and policy.if_running in ("attach", "skip"):
        return policy.if_running
    if waiting and (policy.max_running > 0 or policy.if_running in ("queue", "restart")):
        return "join"  # at most one pending run per task: later requests join it
    if running and policy.if_running == "queue":
        return "rerun"
    if running and policy.if_running == "restart":
        return "restart"  # contract section 8: stop the running execution, start once it ended
    if policy.max_running > 0:
        return "slot"
    return "start"


def retry_delay(policy: Policy, attempt: int) -> float:
    """Seconds before extra start `attempt` (1 = the first retry): delay, doubling, capped."""
    return float(min(MAX_RETRY_DELAY, policy.retry_delay * (2 ** max(0, attempt - 1))))


def stops_running(policy: Policy, action: Action, running: bool) -> bool:
    """ifRunning restart (contract section 8): is the task's running execution to be stopped
    (and a `stopping` event owed)? The first request restarts it; a later one joins that
    restart and gets its own `stopping` event (the execution is asked once: stops.Coalescer)."""
    return policy.if_running == "restart" and running and action in ("restart", "join")


def stops_at_deadline(policy: Policy) -> bool:
    """onDeadline stop (contract section 8): stop a followed execution still running at its deadline."""
    return policy.on_deadline == "stop" and policy.deadline is not None


def retried_after(status: str, stopped_at_deadline: bool) -> bool:
    """May this end be retried? Not when the reload was stopped at its deadline (section 8)."""
    return status in RETRYABLE and not stopped_at_deadline


def retries_left(policy: Policy, attempt: int) -> bool:
    """After start number `attempt` (1 = the first start) failed: is another start allowed?"""
    return attempt <= policy.retry_attempts
