"""The send gate (mqtt/gate.py): sends pass side by side; a deliberate reconnect waits for those
under way and holds back new ones until it is done."""

from __future__ import annotations

import threading
import time

from butler_mqtt.mqtt.gate import SendGate


def test_sends_pass_side_by_side() -> None:
    gate = SendGate()
    gate.enter()
    entered = threading.Event()

    def other() -> None:
        gate.enter()
        entered.set()
        gate.leave()

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(5), "a second send waited for the first"
    gate.leave()
    t.join(5)


def test_closing_waits_for_the_sends_under_way_and_holds_back_new_ones() -> None:
    gate = SendGate()
    gate.enter()  # a send under way
    order: list[str] = []
    closed = threading.Event()
    release = threading.Event()

    def reconnect() -> None:
        with gate.closed():
            order.append("closed")
            closed.set()
            release.wait(5)
            order.append("reopened")

    def late_send() -> None:
        gate.enter()
        order.append("late send")
        gate.leave()

    r = threading.Thread(target=reconnect)
    r.start()
    time.sleep(0.05)
    assert not closed.is_set(), "the gate closed while a send was under way"
    gate.leave()
    assert closed.wait(5)
    s = threading.Thread(target=late_send)
    s.start()
    time.sleep(0.05)
    assert order == ["closed"], "a send passed the closed gate"
    release.set()
    r.join(5)
    s.join(5)
    assert order == ["closed", "reopened", "late send"]
