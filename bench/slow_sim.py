"""`butler-mqtt sim` with a CPU cost per QRS call: a stand-in that answers at once but is slower
(as a stand-in written on a heavier web framework would be). Used by `ceiling.py --sim-cpu-ms`.

Run: .venv/bin/python bench/slow_sim.py <cpu ms per call> <the arguments of `butler-mqtt sim`>
With SLOW_SIM_TRACE=<file> (inherited through ceiling.py), every 2 ms a line "<unix time> <QRS
calls in progress>" goes to that file: how well each path keeps the stand-in fed (idle samples
while requests are waiting in the daemon).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from butler_mqtt.cli import main
from butler_mqtt.sim import server

ACTIVE = [0]  # QRS calls in progress (SLOW_SIM_TRACE)
_active_lock = threading.Lock()


def _trace(path: str) -> None:
    out = open(path, "w", buffering=1 << 16)  # noqa: SIM115

    def sample() -> None:
        n = 0
        while True:
            time.sleep(0.002)
            out.write(f"{time.time():.3f} {ACTIVE[0]}\n")
            n += 1
            if n % 250 == 0:
                out.flush()

    threading.Thread(target=sample, daemon=True).start()


def _slowed(cpu_s: float):  # type: ignore[no-untyped-def]
    dispatch = server._Handler._dispatch

    def slow(self: server._Handler) -> None:
        with _active_lock:
            ACTIVE[0] += 1
        try:
            end = time.thread_time() + cpu_s
            while time.thread_time() < end:  # holds the GIL, as a framework's own code would
                pass
            dispatch(self)
        finally:
            with _active_lock:
                ACTIVE[0] -= 1

    return slow


if __name__ == "__main__":
    if os.environ.get("SLOW_SIM_TRACE"):
        _trace(os.environ["SLOW_SIM_TRACE"])
    server._Handler._dispatch = _slowed(float(sys.argv[1]) / 1000)  # type: ignore[method-assign]
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(main())
