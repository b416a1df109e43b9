"""ops/backend_health.py: every call counts; the status text once per outage; waiters woken."""

from __future__ import annotations

import threading

from butler_mqtt.ops import backend_health
from butler_mqtt.ops.backend_health import BackendHealth


def test_failing_follows_the_last_call_and_429_is_an_answer():
    h = BackendHealth("QRS at https://q:4242")
    assert not h.failing
    h.observe("GET", "/qrs/about", None, 0.1)
    assert h.failing
    h.observe("GET", "/qrs/about", 429, 0.1)  # there, only busy
    assert not h.failing
    h.observe("GET", "/qrs/about", 503, 0.1)
    assert h.failing


def test_the_status_text_comes_once_per_outage_and_goes_at_the_next_answer(monkeypatch):
    monkeypatch.setattr(backend_health, "STATUS_AFTER_S", 0.0)
    h = BackendHealth("QRS at https://q:4242")
    seen: list[str | None] = []
    h.on_change.append(seen.append)
    for _ in range(5):
        h.observe("GET", "/x", None, 0.1)
    h.observe("GET", "/x", 200, 0.1)
    h.observe("GET", "/x", 200, 0.1)
    assert len(seen) == 2 and seen[0] is not None and "QRS at https://q:4242 is not answering since" in seen[0]
    assert seen[1] is None


def test_a_waiter_is_woken_by_the_first_answer_after_a_failure():
    h = BackendHealth("QRS")
    stop = threading.Event()
    h.observe("GET", "/x", None, 0.1)
    h._next_probe = float("inf")  # no probe turn: only the recovery may wake it
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(h.wait(600, stop)))
    t.start()
    for _ in range(30):  # the thread may not wait yet at the first recovery: fail and recover again
        h.observe("GET", "/x", 200, 0.1)
        t.join(1.1)
        if not t.is_alive():
            break
        h.observe("GET", "/x", None, 0.1)
        h._next_probe = float("inf")
    assert not t.is_alive() and out == [False]


def test_stop_ends_a_wait():
    h = BackendHealth("QRS")
    stop = threading.Event()
    stop.set()
    assert h.wait(600, stop) is True
