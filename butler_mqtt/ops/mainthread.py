"""Keep the main thread free for signal handlers.

A signal may be delivered to any thread, but CPython runs its Python handler in the main thread
only, once that thread runs Python code again: a main thread blocked in a 30 s drain (a join, a
lock) would hear a second SIGTERM only when the drain ended. `run_beside_main` runs the work in
a thread of its own; the main thread only waits for it, in short slices.
"""
from __future__ import annotations

import threading
from collections.abc import Callable


def run_beside_main(work: Callable[[], None], name: str, slice_s: float = 0.2) -> None:
    """`work()` in the thread `name`; returns when it ends, raising what it raised."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name=name)
    thread.start()
    while thread.is_alive():
        thread.join(slice_s)
    if failure:
        raise failure[0]
