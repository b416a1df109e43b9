"""mqtt/acking.py: a delivery is acked once every reply's PUBACK is in, by whichever thread
handles the last one, without a worker waiting; anything else goes to the waiting path."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from butler_mqtt.mqtt import acking
from butler_mqtt.mqtt.acking import UNKNOWN, AckAfterReplies


class Recorder:
    def __init__(self, fast_ok: bool = True) -> None:
        self.fast_ok = fast_ok
        self.fast: list[tuple[Any, list[tuple[int, int]], str]] = []
        self.slow: list[tuple[Any, list[mqtt.MQTTMessageInfo], str]] = []
        self.slow_done = threading.Event()

    def on_fast(self, job: Any, codes: list[tuple[int, int]]) -> bool:
        self.fast.append((job, sorted(codes), threading.current_thread().name))
        return self.fast_ok

    def on_slow(self, job: Any, replies: list[mqtt.MQTTMessageInfo], _deadline: float) -> None:
        self.slow.append((job, replies, threading.current_thread().name))
        self.slow_done.set()


def _puback(acks: AckAfterReplies, info: mqtt.MQTTMessageInfo, code: int = 0) -> None:
    """What paho's thread does for a PUBACK: our callback first, then the message is published."""
    acks.on_puback(info, info.mid, code)
    info._set_as_published()


def test_acked_with_the_last_puback_and_not_before():
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    a, b = mqtt.MQTTMessageInfo(1), mqtt.MQTTMessageInfo(2)
    acks.hand("job", [a, b], 30)
    assert acks.waiting == 1 and r.fast == []
    _puback(acks, b, 0x10)
    assert r.fast == []  # one reply still unconfirmed
    _puback(acks, a)
    assert r.fast == [("job", [(1, 0), (2, 0x10)], "MainThread")] and acks.waiting == 0
    assert r.slow == []


def test_pubacks_that_came_before_the_hand_over_count():
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    a, b = mqtt.MQTTMessageInfo(3), mqtt.MQTTMessageInfo(4)
    _puback(acks, a)
    _puback(acks, b, 0x87)
    acks.hand("job", [a, b], 30)
    assert r.fast == [("job", [(3, 0), (4, 0x87)], "MainThread")] and acks.waiting == 0


def test_a_puback_forgotten_before_the_hand_over_is_looked_up_not_waited_for(monkeypatch):
    monkeypatch.setattr(acking, "_EARLY_KEPT", 2)
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    mine = mqtt.MQTTMessageInfo(5)
    _puback(acks, mine)
    for mid in range(6, 10):  # other replies' PUBACKs push it out of the memory
        _puback(acks, mqtt.MQTTMessageInfo(mid))
    acks.hand("job", [mine], 30)
    assert r.fast == [("job", [(5, UNKNOWN)], "MainThread")]


def test_the_same_mid_of_another_message_is_not_taken_for_this_reply():
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    _puback(acks, mqtt.MQTTMessageInfo(7))  # an earlier message that used mid 7
    mine = mqtt.MQTTMessageInfo(7)
    acks.hand("job", [mine], 30)
    assert r.fast == [] and acks.waiting == 1
    _puback(acks, mine)
    assert [f[0] for f in r.fast] == ["job"]


def test_a_delivery_the_fast_path_declines_goes_to_the_waiting_path():
    r = Recorder(fast_ok=False)
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    info = mqtt.MQTTMessageInfo(8)
    acks.hand("job", [info], 30)
    _puback(acks, info, 0x10)
    assert r.slow_done.wait(5)
    assert r.slow[0][0] == "job" and r.slow[0][1] == [info] and r.slow[0][2].startswith("mqtt-confirm")


def test_a_reply_never_confirmed_goes_to_the_waiting_path_at_its_deadline(monkeypatch):
    monkeypatch.setattr(acking, "SWEEP_S", 0.05)
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    info = mqtt.MQTTMessageInfo(9)
    t0 = time.monotonic()
    acks.hand("job", [info], 0.2)
    assert r.slow_done.wait(5)
    assert time.monotonic() - t0 >= 0.2 and r.fast == []
    _puback(acks, info)  # too late: nothing happens twice
    assert r.fast == [] and len(r.slow) == 1


def test_settle_waits_for_the_last_acks_then_reports_what_is_left():
    r = Recorder()
    acks = AckAfterReplies(r.on_fast, r.on_slow)
    info = mqtt.MQTTMessageInfo(10)
    acks.hand("job", [info], 30)
    threading.Timer(0.1, _puback, (acks, info)).start()
    assert acks.settle(time.monotonic() + 5) == 0 and len(r.fast) == 1
    other = AckAfterReplies(r.on_fast, r.on_slow)
    other.hand("job2", [mqtt.MQTTMessageInfo(11)], 30)
    assert other.settle(time.monotonic() + 0.1) == 1


@pytest.mark.parametrize("fail_in", ["fast", "slow"])
def test_a_failing_callback_never_reaches_the_caller(fail_in):
    r = Recorder()
    calls: list[str] = []

    def fast(job: Any, codes: list[tuple[int, int]]) -> bool:
        calls.append("fast")
        if fail_in == "fast":
            raise RuntimeError("boom")
        return False

    def slow(job: Any, replies: list[mqtt.MQTTMessageInfo], deadline: float) -> None:
        calls.append("slow")
        r.slow_done.set()
        if fail_in == "slow":
            raise RuntimeError("boom")

    acks = AckAfterReplies(fast, slow)
    info = mqtt.MQTTMessageInfo(12)
    acks.hand("job", [info], 30)
    _puback(acks, info)  # as paho's thread: must not raise
    assert r.slow_done.wait(5)
    assert calls == ["fast", "slow"]
    assert acks.settle(time.monotonic() + 5) == 0


def test_a_delivery_being_acked_still_counts_as_waiting():
    """settle() at shutdown must not see 0 while the last ack is being decided."""
    inside, go = threading.Event(), threading.Event()

    def fast(job: Any, codes: list[tuple[int, int]]) -> bool:
        inside.set()
        go.wait(5)
        return True

    acks = AckAfterReplies(fast, lambda *a: None)
    info = mqtt.MQTTMessageInfo(13)
    acks.hand("job", [info], 30)
    t = threading.Thread(target=_puback, args=(acks, info))
    t.start()
    assert inside.wait(5)
    assert acks.waiting == 1 and acks.alive
    go.set()
    t.join(5)
    assert acks.waiting == 0


def test_a_delivery_the_pool_cannot_take_goes_back_to_the_broker():
    lost: list[Any] = []
    r = Recorder(fast_ok=False)
    acks = AckAfterReplies(r.on_fast, r.on_slow, lost.append)
    assert acks.settle(time.monotonic()) == 0  # shuts the pool down
    info = mqtt.MQTTMessageInfo(14)
    acks.hand("job", [info], 30)
    _puback(acks, info)
    assert lost == ["job"] and r.slow == [] and acks.waiting == 0


class _Session:
    def __init__(self, connects: int) -> None:
        self.connects = connects
        self.connected_at = time.monotonic()
        self.paused = False


@pytest.mark.parametrize(
    ("connects", "codes", "remembered", "at_once"),
    [
        (1, [(1, 0), (2, 0)], {}, True),  # success
        (1, [(1, 0), (2, 0x10)], {}, True),  # nobody subscribed, never reconnected: nothing to say
        (1, [(1, 0x87)], {}, False),  # refused: logged by confirm, off paho's thread
        (2, [(1, 0x10)], {}, False),  # after a reconnect a resend may be due
        (1, [(1, UNKNOWN)], {1: 0x87}, False),  # a code looked up: refused
        (1, [(1, UNKNOWN)], {}, True),  # nothing remembered: it was success
    ],
)
def test_which_pubacks_settle_a_delivery_on_pahos_thread(connects, codes, remembered, at_once):
    from butler_mqtt.mqtt.gate import SendGate
    from butler_mqtt.mqtt.publishing import ReplyPublisher

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub = ReplyPublisher(client, True, SendGate(), _Session(connects))
    for mid, code in remembered.items():
        pub._pubacks[mid] = (code, "t", None)
    assert pub.settled_now(codes) is at_once
