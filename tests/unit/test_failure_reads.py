"""tracking/failures.py: a failure is read once per execution, off the caller's thread, and the
event goes out at the deadline when the read is late (then with scriptLogError), exactly once."""

from __future__ import annotations

import threading
from typing import Any

from butler_mqtt.config import TrackingConfig
from butler_mqtt.tracking import failures
from butler_mqtt.tracking.failures import Failures
from butler_mqtt.tracking.timers import Timers


class SlowBackend:
    """A Backend's `failure` that waits for `release` (only the method the reader calls)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def failure(self, task_id: str, execution_id: str, log_lines: int) -> dict[str, Any]:
        self.calls += 1
        self.release.wait(10)
        return {"message": f"failed {execution_id}", "details": [], "scriptLogTail": ["x"] * log_lines}


def test_a_late_read_is_published_at_the_deadline_once_then_cached(monkeypatch):
    monkeypatch.setattr(failures, "SLACK_S", 0.0)
    backend, timers = SlowBackend(), Timers()
    f = Failures(TrackingConfig(script_log_deadline=0.2, script_log_lines=3), backend, timers)  # type: ignore[arg-type]
    got: list[Any] = []
    done = threading.Event()

    def then(failure: Any) -> None:
        got.append(failure)
        done.set()

    f.fetch("e1", "t1", then)
    assert f.busy("e1")  # the poller's further reports of this end are ignored meanwhile
    assert done.wait(5)
    assert got[0]["scriptLogError"] == "failure details not read within 0.2 s" and got[0]["message"] == ""
    backend.release.set()
    threading.Event().wait(0.3)
    assert len(got) == 1 and not f.busy("e1")  # the late answer does not publish again
    again: list[Any] = []
    f.fetch("e1", "t1", again.append)  # another request for the same execution: the cache
    assert again == [{"message": "failed e1", "details": [], "scriptLogTail": ["x", "x", "x"]}]
    assert backend.calls == 1
    f.close()
    timers.stop()
    timers.shutdown()


def test_a_backend_error_gives_an_event_without_failure():
    class Broken:
        def failure(self, *_: Any) -> Any:
            raise RuntimeError("boom")

    timers = Timers()
    f = Failures(TrackingConfig(), Broken(), timers)  # type: ignore[arg-type]
    got: list[Any] = []
    done = threading.Event()
    f.fetch("e2", "t2", lambda failure: (got.append(failure), done.set()))
    assert done.wait(5) and got == [None]
    f.close()
    timers.stop()
    timers.shutdown()
