"""CPU profiling of the whole daemon, for the benchmarks only (bench/throughput.py --profile sets
BUTLER_MQTT_PROFILE to the file the yappi statistics of every thread are saved to, as pstats)."""

from __future__ import annotations

import os
from collections.abc import Callable


def run_profiled(run: Callable[[], int]) -> int:
    """`run()`, under yappi (CPU time, all threads) when BUTLER_MQTT_PROFILE names a file."""
    profile = os.environ.get("BUTLER_MQTT_PROFILE")
    if not profile:
        return run()
    import yappi  # type: ignore[import-untyped]  # benchmarks only

    yappi.set_clock_type("cpu")
    yappi.start()
    try:
        return run()
    finally:
        yappi.stop()
        yappi.get_func_stats().save(profile, type="pstat")
