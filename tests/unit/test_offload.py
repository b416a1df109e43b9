"""http/offload.py: the REST endpoints' work off the event loop (in place of anyio's threads)."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from butler_mqtt.http.offload import Offload

REQUEST = contextvars.ContextVar("request", default=None)


def test_result_exception_and_context_come_back():
    off = Offload(limit=4)

    async def main() -> None:
        REQUEST.set("req-1")
        assert await off.run(lambda: (REQUEST.get(), threading.current_thread().name)) == ("req-1", "rest-1")
        with pytest.raises(KeyError, match="gone"):
            await off.run(lambda: {}["gone"])
        assert await off.run(lambda: 42) == 42  # the thread survived the exception

    asyncio.run(main())


def test_never_more_threads_than_the_limit_and_queued_work_still_runs():
    off = Offload(limit=2)
    gate = threading.Event()
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            running.append(i)
            peak[0] = max(peak[0], len(running))
        gate.wait(10)
        with lock:
            running.remove(i)
        return i

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(off.run(lambda i=i: work(i))) for i in range(6)]
        await asyncio.sleep(0.2)
        assert peak[0] == 2  # two run, four wait for a free thread
        gate.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == list(range(6))
    assert peak[0] == 2
    assert sum(t.name.startswith("rest-") for t in threading.enumerate()) >= 2


def test_a_cancelled_caller_lets_the_work_finish_and_the_next_call_works():
    off = Offload(limit=1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        finished.set()
        return "done"

    async def main() -> str:
        task = asyncio.ensure_future(off.run(slow))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        return await off.run(lambda: "next")  # the same (single) thread, after the cancelled work

    assert asyncio.run(main()) == "next"
    assert finished.is_set()
