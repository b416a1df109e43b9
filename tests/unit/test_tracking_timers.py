"""The tracker's timers and pool run later work in the logging context it was asked from (the
request's requestId), and never once stopped."""

from __future__ import annotations

import threading

import structlog

from butler_mqtt.tracking.timers import Timers


def test_later_work_runs_with_the_context_of_who_asked_for_it():
    timers = Timers(workers=2)
    seen: list[object] = []
    done = threading.Event()

    def work() -> None:
        seen.append(structlog.contextvars.get_contextvars().get("requestId"))
        done.set()

    try:
        with structlog.contextvars.bound_contextvars(requestId="r-later"):
            timers.later(0.01, work)
        assert structlog.contextvars.get_contextvars().get("requestId") is None
        assert done.wait(5)
        done.clear()
        with structlog.contextvars.bound_contextvars(requestId="r-now"):
            timers.submit(work)
        assert done.wait(5)
        assert seen == ["r-later", "r-now"]
    finally:
        timers.stop()
        timers.shutdown()


def test_nothing_runs_once_stopped():
    timers = Timers(workers=1)
    ran = threading.Event()
    timers.later(0.05, ran.set)
    timers.stop()
    timers.later(0.0, ran.set)
    timers.shutdown()
    assert not ran.wait(0.3) and timers.submit(ran.set) is None
