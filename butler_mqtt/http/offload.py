"""Blocking work (a request's QRS calls and journal writes) off the event loop, in threads of
its own: the start and stop endpoints' one hop out and back.

Why not Starlette's `run_in_threadpool` (anyio's worker threads)? Per call it costs about
twice the CPU (measured: 125-140 microseconds against 60-70 with 8 concurrent callers), on
the event loop thread every REST request crosses. The rules are anyio's: at most `limit`
threads (40, anyio's default), started when needed and kept; the work runs in a copy of the
caller's context (its requestId is on every log line the work writes); a cancelled caller
does not stop work already started (its starts are journaled and answered on MQTT as usual),
and the result it no longer waits for is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Threads at most (anyio's default limit): REST requests beyond it wait for a free one.
LIMIT = 40

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[[], Any]]


class Offload:
    """`await offload.run(fn)`: fn() in one of the threads, its result or exception back."""

    def __init__(self, limit: int = LIMIT, name: str = "rest") -> None:
        self.limit = limit
        self.name = name
        self._jobs: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            spawn = self._idle == 0 and self._threads < self.limit
            if spawn:
                self._threads += 1
                name = f"{self.name}-{self._threads}"
            elif self._idle > 0:
                self._idle -= 1
        if spawn:
            try:  # before the job is queued: a thread that cannot start leaves no job behind
                threading.Thread(target=self._serve, name=name, daemon=True).start()
            except RuntimeError:
                with self._lock:
                    self._threads -= 1
                raise
        self._jobs.put((loop, future, contextvars.copy_context(), fn))
        return await future

    def _serve(self) -> None:
        while True:
            loop, future, ctx, fn = self._jobs.get()
            error: BaseException | None = None
            result: Any = None
            try:
                result = ctx.run(fn)
            except BaseException as exc:  # handed to the awaiting request, raised there
                error = exc
            with self._lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is closed (the server stopped): nobody waits
                pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its request was cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
