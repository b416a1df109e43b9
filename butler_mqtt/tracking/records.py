"""What the tracker keeps per waited request, stored in the journal (table `waits`) on each
change, so that after a restart the daemon picks up the executions and chains it was following."""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from butler_mqtt.model import Route, StartRequest, TaskOutcome


@dataclass
class Pending:
    execution_id: str
    task_id: str
    task_name: str
    stage: int | None
    started: float  # wall clock (stored: survives a restart)
    deadline: float  # wall clock (stored): tracking.max_wait
    attempt: int | None = None  # with retry: 1 = the first start
    overdue_at: float | None = None  # wall clock: policies.deadline (taskOverdue once)
    overdue_sent: bool = False
    matched_by: list[str] = field(default_factory=list)
    stopped: bool = False  # onDeadline stop: stopped at its deadline (never retried)
    # This process's view, on the monotonic clock: a wall-clock step (NTP, an admin) must not
    # end a wait early. Derived from the stored wall-clock values once, when loaded.
    mono_started: float = field(default=-1.0, compare=False)
    mono_deadline: float = field(default=-1.0, compare=False)

    def __post_init__(self) -> None:
        if self.mono_started < 0:
            now_wall, now_mono = time.time(), time.monotonic()
            self.mono_started = now_mono - max(0.0, now_wall - self.started)
            self.mono_deadline = now_mono + max(0.0, self.deadline - now_wall)

    def stored(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mono_started")
        d.pop("mono_deadline")
        return d


_PENDING_FIELDS = ("execution_id", "task_id", "task_name", "stage", "started", "deadline", "attempt", "overdue_at",
                   "overdue_sent", "matched_by", "stopped")


@dataclass
class Waited:
    """A request whose end is awaited: its chain, where it is, what is still running."""

    key: str
    request_id: str | None
    request: dict[str, Any]  # the root StartRequest as JSON
    route: Route
    started: float
    chained: bool
    stage: int = 0
    pending: dict[str, Pending] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    stage_failures: list[str] = field(default_factory=list)  # why the current stage is not a success
    starting: bool = False  # the current stage's starts are being sent
    report: bool = True  # wait/then: publish taskFinished and requestFinished (else: retries, deadlines only)
    queued: dict[str, dict[str, Any]] = field(default_factory=dict)  # queue entry id -> the task waiting on it
    retrying: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> the retry to come
    #: The caller's name (contract section 10; None: anonymous): later stages and retries, also
    #: after a restart, are judged by its allow-list (`Callers.stored`).
    caller: str | None = None

    @property
    def idle(self) -> bool:
        """Nothing of the current stage is running, starting, queued or due for a retry."""
        return not (self.pending or self.starting or self.queued or self.retrying)

    def stage_request(self, index: int) -> StartRequest | None:
        req: StartRequest | None = StartRequest.model_validate(self.request)
        for _ in range(index):
            req = req.then if req is not None else None
        return req

    def to_json(self) -> str:
        d = asdict(self)
        d["pending"] = {k: p.stored() for k, p in self.pending.items()}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Waited:
        d = json.loads(text)
        d["route"] = Route(**d["route"])
        d["pending"] = {k: Pending(**{f: v[f] for f in _PENDING_FIELDS if f in v}) for k, v in d["pending"].items()}
        return cls(**d)


def queued_record(o: TaskOutcome, stage: int | None) -> dict[str, Any]:
    """What a waited request keeps of its task waiting in the queue."""
    return {"task_id": o.task_id, "task_name": o.task_name, "stage": stage, "attempt": o.attempt,
            "matched_by": list(o.matched_by)}


def bound(w: Waited) -> AbstractContextManager[None]:
    """The logging context of work done for this request: its `requestId` on every line, and
    its caller (also read by the metrics and alerts observers: `caller` label and field)."""
    return structlog.contextvars.bound_contextvars(requestId=w.request_id, caller=w.caller or "")
