"""ops/scheduling.py: the daemon's CPU scheduling policy (`cpu_scheduling`, default batch)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from butler_mqtt.ops import scheduling

# In a process of its own: the test process keeps its own policy.
PROBE = textwrap.dedent("""
    import os, sys, threading, time
    from butler_mqtt.ops import scheduling
    before = threading.Thread(target=time.sleep, args=(2,), daemon=True)
    before.start()
    if len(sys.argv) > 2:  # started under another policy, as systemd's CPUSchedulingPolicy= would
        os.sched_setscheduler(0, getattr(os, sys.argv[2]), os.sched_param(0))
    applied = scheduling.apply(sys.argv[1])
    after = threading.Thread(target=time.sleep, args=(2,), daemon=True)
    after.start()
    policies = {os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
    print(sorted(policies), scheduling.current(), applied)
""")


def _probe(policy: str, *started_under: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, policy, *started_under], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]  # after the daemon's log line


def test_batch_is_set_on_every_thread_and_inherited_by_later_ones():
    assert _probe("batch") == f"[{os.SCHED_BATCH}] batch True"


def test_normal_is_the_kernels_default():
    assert _probe("normal") == f"[{os.SCHED_OTHER}] normal True"


def test_a_policy_the_process_was_started_under_is_kept():
    """systemd's CPUSchedulingPolicy=idle (or chrt) is the administrator's choice: not overridden."""
    # (the thread started before the probe switched to idle stays normal: nothing became batch)
    assert _probe("batch", "SCHED_IDLE") == f"[{os.SCHED_OTHER}, {os.SCHED_IDLE}] idle False"


def test_an_unknown_policy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="batch, normal"):
        scheduling.apply("realtime")
