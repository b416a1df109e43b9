"""The main thread stays free for signal handlers while the daemon's work runs beside it."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from butler_mqtt.ops.mainthread import run_beside_main


def test_a_signal_delivered_to_the_working_thread_is_handled_while_the_work_runs():
    heard = threading.Event()
    seen_in: list[str] = []

    def handler(_signum, _frame):
        seen_in.append(threading.current_thread().name)
        heard.set()

    def work() -> None:
        time.sleep(0.5)  # the main thread is waiting for this one by now
        # As the kernel may do: the signal lands on this thread, not on the main one.
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        assert heard.wait(5), "the main thread did not run the handler while the work was running"

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        run_beside_main(work, "lifecycle-test")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert seen_in == [threading.main_thread().name]


def test_what_the_work_raises_reaches_the_caller():
    class Boom(Exception):
        pass

    def work() -> None:
        raise Boom("startup failed")

    with pytest.raises(Boom, match="startup failed"):
        run_beside_main(work, "lifecycle-test")
