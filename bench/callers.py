"""Callers: what identifying and judging a request costs with 10 callers configured, against
none, per call (the pure functions the ingresses and the use case call: routing an MQTT topic,
identifying a REST client by token hash, the rate limiter, the caller's allow-list on a
50-task selection). The end-to-end figure (the request path with and without callers) is for
bench/latency.py once the ingresses call these.

Run: .venv/bin/python bench/callers.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

from butler_mqtt.callers import Callers, restrict, token_sha256
from butler_mqtt.config import Config
from butler_mqtt.model import QrsTask, StartRequest
from butler_mqtt.selection import plan, select


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    n = ap.parse_args().calls
    ten = Config.model_validate({
        "http": {"token": "legacy"},
        "callers": [
            {"name": f"c{i}", "tokens_sha256": [token_sha256(f"tok-{i}-{j}") for j in range(2)],
             "client_cert_cn": f"c{i}.example.com", "allow": {"tags": [f"t{i}"]}, "requests_per_minute": 100_000}
            for i in range(10)
        ],
    })
    none = Config.model_validate({"http": {"token": "legacy"}})
    ticks = itertools.count()  # a clock 1 ms per call: the limiter's steady state, never over the limit
    with_c, without = Callers(ten, clock=lambda: next(ticks) / 1000), Callers(none)
    tasks = [QrsTask(f"00000000-0000-4000-8000-{i:012d}", f"T{i}", tags=(f"t{i % 10}",)) for i in range(50)]
    req = StartRequest(tag=[f"t{i}" for i in range(10)])
    sel = select(req, tasks)
    caller = with_c.callers[9]
    rows = [
        ("route_topic (bare topic)", per_call_us(lambda: without.route_topic("qliksense/task/start"), n),
         per_call_us(lambda: with_c.route_topic("qliksense/task/start"), n)),
        ("route_topic (caller level)", None, per_call_us(lambda: with_c.route_topic("qliksense/task/start/c9"), n)),
        ("identify_rest (http.token)", per_call_us(lambda: without.identify_rest("Bearer legacy", None), n),
         per_call_us(lambda: with_c.identify_rest("Bearer legacy", None), n)),
        ("identify_rest (caller token, 20 hashes)", None, per_call_us(lambda: with_c.identify_rest("Bearer tok-9-1", None), n)),
        ("admit (rate limiter)", per_call_us(lambda: without.admit(None), n), per_call_us(lambda: with_c.admit(caller), n)),
        ("plan + restrict (50 tasks)", per_call_us(lambda: restrict(plan(sel, req, None), sel, None), n // 100),
         per_call_us(lambda: restrict(plan(sel, req, None), sel, caller), n // 100)),
    ]
    print(f"{'per call, microseconds':42} {'no callers':>11} {'10 callers':>11}")
    for name, a, b in rows:
        print(f"{name:42} {'-' if a is None else f'{a:11.2f}':>11} {b:11.2f}")


if __name__ == "__main__":
    main()
