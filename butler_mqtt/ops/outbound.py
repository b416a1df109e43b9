"""Outbound HTTP calls with a TOTAL deadline and a byte cap, through urllib3: the alert webhook
uses this helper (QRS calls go through ops/http1.py, whose reads enforce the same total
deadline themselves; Qlik Cloud has its own watchdog, backends/cloud/watchdog.py).

urllib3's timeouts are per socket operation: a peer that drips a byte just inside the read
timeout holds a call for ever, in the response head as well as in the body. Here a call runs
inside `deadline(seconds)`: every connection that sends a request in that block (the pools'
`ConnectionCls`, `WatchedHTTPConnection` / `WatchedHTTPSConnection`) is watched by one reaper
thread, which shuts the connection's socket down when the deadline passes; the blocked read then
ends at once and `Deadline.expired` says why. `read_capped` reads at most `cap + 1` bytes of
an answer and says whether there was more: the rest is never read (the connection is closed,
not drained), so a 1 GB answer costs `cap` bytes of memory.

Usage (the caller closes or releases the response itself, after the block):

    with deadline(30.0) as d:
        resp = pool.urlopen("GET", url, preload_content=False, retries=False)
        body, over = read_capped(resp, cap)
    if d.expired: ...  # whatever the read raised, the reason is the deadline
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

#: Bytes read per step of `read_capped`.
CHUNK = 64 * 1024
#: A deadline is enforced this much late at most (the reaper wakes at most this often).
RESOLUTION_S = 0.25


class Deadline:
    """The wall-clock end of one call (monotonic), and the connections it has to cut then."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._done = False  # the block ended first: never cut after that
        self._conns: list[HTTPConnection] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conns.append(conn)
            expired = self.expired
        if expired:
            _cut(conn)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            conns = list(self._conns)
        for conn in conns:
            _cut(conn)

    def finish(self) -> None:
        """The call is over: a connection given back to its pool afterwards is never cut."""
        with self._lock:
            self._done = True
            self._conns.clear()


def _cut(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        # The TCP socket under TLS too: the blocked reader sees EOF and its call ends.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Reaper:
    """One daemon thread for every deadline of the process: a heap ordered by deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, d: Deadline) -> int:
        with self._cond:
            n = next(self._seq)
            heapq.heappush(self._heap, (d.at, n, d))
            self._live.add(n)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbound-deadlines", daemon=True)
                self._thread.start()
        # Never notified: the reaper looks every RESOLUTION_S. Waking it for each call (every
        # QRS call starts a deadline) cost a thread switch per call on the request path.
        return n

    def cancel(self, n: int) -> None:
        with self._cond:
            self._live.discard(n)
            while self._heap and self._heap[0][1] not in self._live:  # calls end about in order:
                heapq.heappop(self._heap)  # the heap stays as small as the calls in flight

    def _run(self) -> None:
        while True:
            due: list[Deadline] = []
            with self._cond:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._live):
                    _, n, d = heapq.heappop(self._heap)
                    if n in self._live:
                        self._live.discard(n)
                        due.append(d)
                if not due:
                    # One look per RESOLUTION_S, however many calls come and go.
                    self._cond.wait(RESOLUTION_S)
                    continue
            for d in due:
                d.expire()


_REAPER = _Reaper()
_current = threading.local()


@contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Every request sent by a watched connection in this thread, inside the block, ends by
    `seconds` from now (its socket is shut down then)."""
    d = Deadline(seconds)
    n = _REAPER.watch(d)
    outer = getattr(_current, "deadline", None)
    _current.deadline = d
    try:
        yield d
    finally:
        _current.deadline = outer
        _REAPER.cancel(n)
        d.finish()


class _Watched:
    def request(self, *args: Any, **kwargs: Any) -> None:
        d: Deadline | None = getattr(_current, "deadline", None)
        if d is not None:
            d.attach(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


class WatchedHTTPConnection(_Watched, HTTPConnection):
    """urllib3's HTTPConnection, cut at the `deadline` of the block that sends through it."""


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    """urllib3's HTTPSConnection, cut at the `deadline` of the block that sends through it."""


class WatchedHTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


def watched_pool_manager(**kwargs: Any) -> urllib3.PoolManager:
    """A PoolManager whose connections honour `deadline`."""
    pm = urllib3.PoolManager(**kwargs)
    pm.pool_classes_by_scheme = {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}
    return pm


def read_capped(resp: Any, cap: int) -> tuple[bytes, bool]:
    """At most `cap` bytes of the body of `resp` (urllib3, `preload_content=False`), and True
    when there was more. Reads in CHUNK steps, so memory follows what arrives, never `cap`
    up front; the caller closes the response when there was more (the rest is never read)."""
    declared = getattr(resp, "length_remaining", None)
    if isinstance(declared, int) and declared <= min(cap, CHUNK) and not resp.headers.get("Content-Encoding"):
        # A small, declared, uncompressed body (nearly every QRS answer): one read. urllib3 reads
        # no further than the Content-Length, and a short body raises (enforce_content_length).
        return resp.read(declared), False
    parts: list[bytes] = []
    n = 0
    while n <= cap:
        chunk = resp.read(min(CHUNK, cap + 1 - n))
        if not chunk:
            break
        parts.append(chunk)
        n += len(chunk)
    data = b"".join(parts)
    return data[:cap], n > cap


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (urllib3 keeps the socket/ssl error in args or cause),
    at most 10: the one walk both backends' error tables read."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(out) < 10:
        e = todo.pop(0)
        if e in out:
            continue
        out.append(e)
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return out
