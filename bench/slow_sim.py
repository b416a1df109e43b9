"""`butler-mqtt sim` with a CPU cost per QRS call: a stand-in that answers at once but is slower
(as a stand-in written on a heavier web framework would be). Used by `ceiling.py --sim-cpu-ms`.

Run: .venv/bin/python bench/slow_sim.py <cpu ms per call> <the arguments of `butler-mqtt sim`>
"""

from __future__ import annotations

import sys
import time

from butler_mqtt.cli import main
from butler_mqtt.sim import server


def _slowed(cpu_s: float):  # type: ignore[no-untyped-def]
    dispatch = server._Handler._dispatch

    def slow(self: server._Handler) -> None:
        end = time.thread_time() + cpu_s
        while time.thread_time() < end:  # holds the GIL, as a framework's own code would
            pass
        dispatch(self)

    return slow


if __name__ == "__main__":
    server._Handler._dispatch = _slowed(float(sys.argv[1]) / 1000)  # type: ignore[method-assign]
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(main())
