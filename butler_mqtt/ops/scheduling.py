"""The daemon's CPU scheduling policy (`cpu_scheduling`): `batch` by default on Linux.

Why: butler-mqtt usually shares its host with the service it feeds (Qlik Sense and its QRS, or
a QRS stand-in), and on a busy host every wake-up of one of its threads (a PUBACK, a QRS answer,
a journal write) could preempt that service. Under SCHED_BATCH the kernel still gives the daemon
its fair share of the CPU, but its wake-ups do not preempt a running thread: the service it waits
for keeps running. Measured on 2 shared cores against a QRS stand-in in its own process
(`bench/ceiling.py --sim-cpu-ms 1.2`, three alternating rounds): MQTT 0.86-0.89 of what the
stand-in serves a minimal client with the normal policy, 0.92-0.93 with batch; REST 0.91-0.93
and 0.92-0.95. On an idle host nothing changes. `normal`: the kernel's default (SCHED_OTHER).

The policy is set on every thread the process has, and the threads started later inherit it.
It needs no privilege (the nice value is unchanged); where it cannot be set (not Linux, or a
sandbox refusing it) one line says so and the daemon runs on with the default. A process started
under another policy than the default (systemd's `CPUSchedulingPolicy=`, `chrt`) keeps it: the
administrator chose it. `normal` changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

log = structlog.get_logger("butler_mqtt.ops")

POLICIES = ("batch", "normal")


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # 0: the calling thread


def apply(policy: str) -> bool:
    """Set `policy` (one of POLICIES) on every thread of this process. True when it is in effect."""
    if policy not in POLICIES:
        raise ValueError(f"cpu_scheduling: {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "normal":
        return True
    if not hasattr(os, "sched_setscheduler") or not Path("/proc/self/task").is_dir():
        log.info("cpu_scheduling_unchanged", policy=policy, detail="not available on this system; the default is kept")
        return False
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        log.info("cpu_scheduling_unchanged", policy=policy, running=current(),
                 detail="started under another policy than the default (CPUSchedulingPolicy=, chrt): kept")
        return False
    try:
        for tid in _threads():
            try:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    except OSError as exc:
        log.warning("cpu_scheduling_unchanged", policy=policy, error=str(exc),
                    detail="the kernel refused the policy; the daemon runs with the default (cpu_scheduling)")
        return False
    log.info("cpu_scheduling", policy=policy)
    return True


def current() -> str:
    """The calling thread's policy, in the words of POLICIES (or the kernel's number)."""
    if not hasattr(os, "sched_getscheduler"):
        return "normal"
    got = os.sched_getscheduler(0)
    names = {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal", getattr(os, "SCHED_IDLE", -1): "idle",
             os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr"}
    return names.get(got, str(got))
