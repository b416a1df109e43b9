"""The gate in front of the client's outgoing packets: replies and acks pass side by side, a
deliberate reconnect (MqttListener.request_redelivery) closes it and waits until nothing passes.

Why not one lock: sending releases the GIL (paho wakes its network thread through a socket), and
a thread that held a lock across that waited for the GIL with the lock held, so every other
worker queued behind it (measured: a tenth of the workers' time). Here the lock is held only to
count, never across a send.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SendGate:
    """`enter()` ... `leave()` around each send (many at once); `closed()` for exclusive use."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._passing = 0
        self._closed = False

    def enter(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._passing += 1

    def try_enter(self) -> bool:
        """`enter` without waiting: False (nothing entered) while the gate is closed."""
        with self._cond:
            if self._closed:
                return False
            self._passing += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._passing -= 1
            if self._closed and self._passing == 0:
                self._cond.notify_all()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """No send passes until the block ends; it starts once the sends under way are done."""
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._passing:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()
