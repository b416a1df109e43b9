"""A total deadline for one HTTP exchange, whatever phase it is in.

urllib3's timeouts are per socket operation: a peer (or proxy) that drips the status line and
headers one byte at a time keeps every single read under the timeout and the call alive for
ever. `Watchdog` is one daemon thread holding the deadlines of the calls in flight; when one
passes, it shuts down the socket of that call's connection, so the blocked read ends at once
and the call fails (the caller sees `Guard.fired` and names it a timeout).

The connection is found through `WatchedHTTPSConnectionPool`, whose connections register
themselves in the calling thread's current `Guard` when they send a request.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
from typing import Any

import urllib3
from urllib3.connection import HTTPSConnection

_CURRENT = threading.local()


class Guard:
    """The deadline of one call and the connection it is using."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conn: Any = None
        self.done = False
        self.fired = False

    def __enter__(self) -> Guard:
        _CURRENT.guard = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.done = True
        _CURRENT.guard = None

    def cut(self) -> None:
        conn = self.conn
        sock = getattr(conn, "sock", None)
        if self.done or sock is None:
            return
        self.fired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _WatchedConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        guard = getattr(_CURRENT, "guard", None)
        if guard is not None:
            guard.conn = self
        super().request(*args, **kwargs)


class WatchedHTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedConnection


class Watchdog:
    """One thread for every call of a transport: cuts the connection of a call past its deadline."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Guard]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def guard(self, deadline: float) -> Guard:
        """A Guard for a call ending at `deadline` (a `clock()` value); use it as a context."""
        guard = Guard(deadline)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cloud-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), guard))
            self._cond.notify()
        return guard

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > self._clock()):
                    # Finished calls are dropped lazily: skip them without waiting for their deadline.
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    timeout = self._heap[0][0] - self._clock() if self._heap else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, guard = heapq.heappop(self._heap)
            guard.cut()
