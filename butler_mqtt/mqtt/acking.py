"""Acks after the replies: a delivery is acked once the broker has confirmed every one of its
replies, by paho's network thread as the last PUBACK comes in, while the worker that published
them has already taken its next delivery.

Why: a worker that waited for its replies' PUBACKs was woken for them, and the ack then woke the
network thread again to be written. On a busy host those wake-ups took the CPU from the QRS the
next requests wait for: measured on 2 shared cores (`bench/ceiling.py --sim-cpu-ms 1.2`), the
MQTT path reached 0.91-0.92 of what the stand-in serves a minimal client with the waiting
worker, 0.96-0.98 with no wait at all. The order on the wire is the same as before: the ack
follows the PUBACK of every reply.

What a PUBACK says decides as before: success, or no subscriber before any reconnect, is acked
at once (ReplyPublisher.settled_now); a refusal (logged) and no subscriber after a reconnect (a
resend may be due) go to `slow`, a pool running the waiting confirmation, resends included,
so that nothing is logged and nothing sleeps on paho's thread. A delivery whose
replies are not all confirmed within its deadline goes to `slow` too, which leaves it unacked
for redelivery as before. Nothing here blocks paho's thread: an ack the send gate holds back
(a deliberate reconnect in progress) is written by `slow` as well.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import structlog

if TYPE_CHECKING:
    from butler_mqtt.mqtt.deliveries import Job
    from butler_mqtt.mqtt.listener import MqttListener

log = structlog.get_logger("butler_mqtt.mqtt")

#: PUBACKs remembered that came before their delivery was handed over (bounded).
_EARLY_KEPT = 1024
#: The code of a PUBACK that came before its delivery was handed over and is no longer
#: remembered here (ReplyPublisher.settled_now looks up the codes it keeps).
UNKNOWN = -1
#: How often the deadlines of the deliveries waiting for PUBACKs are checked.
SWEEP_S = 0.5
#: Threads for the deliveries that need the waiting path (resends after a reconnect, time-outs,
#: a closed gate), started as needed: as many as deliveries the broker lets in flight by default
#: (`mqtt.receive_maximum`), so that after a reconnect every reply due for a resend is resent
#: within the window, as when each worker waited for its own.
SLOW_THREADS = 32


class _Pending:
    __slots__ = ("job", "replies", "waiting", "codes", "deadline")

    def __init__(self, job: Job, replies: list[mqtt.MQTTMessageInfo], deadline: float) -> None:
        self.job = job
        self.replies = replies
        self.waiting: set[int] = set()  # id() of the MQTTMessageInfo not confirmed yet
        self.codes: list[tuple[int, int]] = []  # (mid, code) of each confirmed reply
        self.deadline = deadline


class AckAfterReplies:
    """`hand(job, replies, timeout)`: ack `job` once every reply is confirmed (or hand it to `slow`).

    `fast(job, codes)` runs where the last PUBACK is handled (paho's thread, or the worker when
    every PUBACK was in already) and returns False when the delivery needs the waiting path;
    `slow(job, replies, deadline)` is that path, run in a pool; `lost(job)` (never blocking)
    gives a delivery back to the broker when not even the pool can take it.
    """

    def __init__(
        self,
        fast: Callable[[Job, list[tuple[int, int]]], bool],
        slow: Callable[[Job, list[mqtt.MQTTMessageInfo], float], None],
        lost: Callable[[Job], None] = lambda _job: None,
    ) -> None:
        self._fast, self._slow, self._lost = fast, slow, lost
        self._lock = threading.Lock()
        self._by_info: dict[int, _Pending] = {}
        self._pending: set[_Pending] = set()
        # PUBACKs of replies not handed over yet: id(info) -> (info, mid, code); the info is
        # kept so that its id cannot be reused meanwhile.
        self._early: OrderedDict[int, tuple[mqtt.MQTTMessageInfo, int, int]] = OrderedDict()
        self._pool = ThreadPoolExecutor(SLOW_THREADS, thread_name_prefix="mqtt-confirm")
        self._busy = 0  # taken off `_pending` and not settled yet (deciding, or in the pool)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="mqtt-ack-sweep", daemon=True)
        self._sweeper.start()

    @property
    def waiting(self) -> int:
        """Deliveries not acked (or left for redelivery) yet: waiting for PUBACKs or being settled."""
        with self._lock:
            return len(self._pending) + self._busy

    @property
    def alive(self) -> bool:
        """The deadline sweeper runs (gates the systemd watchdog with the other threads)."""
        return self._sweeper.is_alive()

    def hand(self, job: Job, replies: list[mqtt.MQTTMessageInfo], timeout: float) -> None:
        p = _Pending(job, replies, time.monotonic() + timeout)
        with self._lock:
            for info in replies:
                early = self._early.pop(id(info), None)
                if early is not None and early[0] is info:
                    p.codes.append((early[1], early[2]))
                elif info._published:  # noqa: SLF001 - its PUBACK came and was forgotten here
                    p.codes.append((info.mid, UNKNOWN))
                else:
                    p.waiting.add(id(info))
                    self._by_info[id(info)] = p
            if p.waiting:
                self._pending.add(p)
                return
            self._busy += 1
        self._complete(p)

    def on_puback(self, info: mqtt.MQTTMessageInfo, mid: int, code: int) -> None:
        """A reply's PUBACK (paho's thread, before paho marks the message published)."""
        with self._lock:
            p = self._by_info.pop(id(info), None)
            if p is None:
                self._early[id(info)] = (info, mid, code)
                while len(self._early) > _EARLY_KEPT:
                    self._early.popitem(last=False)
                return
            p.waiting.discard(id(info))
            p.codes.append((mid, code))
            if p.waiting:
                return
            self._pending.discard(p)
            self._busy += 1
        self._complete(p)

    def _complete(self, p: _Pending) -> None:
        """Settle `p` (counted in `_busy` by the caller): ack it at once, or the waiting path."""
        try:
            if self._fast(p.job, p.codes):
                self._done()
                return
        except Exception:  # noqa: BLE001 - never in paho's thread: the waiting path decides
            log.exception("ack_after_replies_failed")
        self._to_slow(p)

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1

    def _to_slow(self, p: _Pending) -> None:
        try:
            self._pool.submit(self._run_slow, p)
        except Exception:  # noqa: BLE001 - shut down, or no thread to be had: back to the broker
            self._done()
            self._lost(p.job)

    def _run_slow(self, p: _Pending) -> None:
        try:
            self._slow(p.job, p.replies, p.deadline)
        except Exception:  # noqa: BLE001 - the pool thread must live on
            log.exception("ack_after_replies_failed")
            self._lost(p.job)
        finally:
            self._done()

    def _sweep(self) -> None:
        while not self._stop.wait(SWEEP_S):
            try:
                self._sweep_once(time.monotonic())
            except Exception:  # noqa: BLE001 - the sweeper must live on
                log.exception("ack_sweep_failed")

    def _sweep_once(self, now: float) -> None:
        with self._lock:
            late = [p for p in self._pending if p.deadline <= now]
            for p in late:
                self._pending.discard(p)
                for info in p.replies:
                    if self._by_info.get(id(info)) is p:
                        del self._by_info[id(info)]
            self._busy += len(late)
        for p in late:  # the waiting path finds what was confirmed and leaves the rest unacked
            self._to_slow(p)

    def settle(self, deadline: float) -> int:
        """Wait (until `deadline`, monotonic) for the deliveries still waiting for PUBACKs and
        for the waiting path; returns how many were still waiting then (at shutdown)."""
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        left = self.waiting
        self._stop.set()
        self._pool.shutdown(wait=False)
        return left


class DeliveryAcks:
    """How the request handler ends a delivery it answered: acked once the broker has taken
    every reply (`finish`), or left unacked for redelivery when a reply is not confirmed in
    time. `on_answered` counts the deliveries acked."""

    def __init__(self, listener: MqttListener, timeout: float, on_answered: Callable[[], None]) -> None:
        self.listener = listener
        self.timeout = timeout
        self.on_answered = on_answered
        self.after = AckAfterReplies(self._fast, self._slow, self._lost)
        listener.replies.acks = self.after

    def finish(self, job: Job, replies: list[mqtt.MQTTMessageInfo], force: bool = False) -> None:
        """Ack once every reply is confirmed (a worker does not wait for it). `force` (an
        internal error) waits here, bounded, and acks regardless: such a delivery would fail
        again and must not hold a broker slot."""
        if replies and not force:
            self.after.hand(job, list(replies), self.timeout)
            return
        if replies:
            self.listener.confirm(replies, self.timeout)
        self.listener.ack(job)
        self.on_answered()

    def _fast(self, job: Job, codes: list[tuple[int, int]]) -> bool:
        if not self.listener.replies.settled_now(codes):
            return False  # something to log or a resend that may be due: the waiting path
        if not self.listener.ack(job, wait=False):
            return False  # the send gate is closed: the waiting path acks once it opens
        try:  # acked: nothing after this may send the delivery to the waiting path (a second ack)
            self.on_answered()
        except Exception:  # noqa: BLE001
            log.exception("ack_count_failed")
        return True

    def _lost(self, job: Job) -> None:
        """Not even the waiting path could take it: unacked, the broker sends it again (a worker
        asks for the redelivery once the queue has room: `refused`). Never blocks."""
        self.listener.release(job)
        self.listener.refused += 1

    def _slow(self, job: Job, replies: list[mqtt.MQTTMessageInfo], deadline: float) -> None:
        try:
            if self.listener.confirm(replies, max(0.0, deadline - time.monotonic())):
                self.listener.ack(job)
                self.on_answered()
                return
            log.warning("reply_not_confirmed", detail="request left unacked; a redelivery replays the journal")
        except Exception:  # noqa: BLE001 - the broker is gone or worse: left for redelivery
            log.exception("reply_confirmation_failed", detail="request left unacked; a redelivery replays the journal")
        self.listener.release(job)
        self.listener.refused += 1
        self.listener.request_redelivery()
