"""Issue 11, class 5 (requests without requestId or correlation data) and the "100 poison
messages" promise, through a real Mosquitto and the simulator over mTLS.

* An anonymous request waiting unacked while QRS is down, redelivered by a restarted broker
  (dup), starts its task once when QRS is back.
* An identical anonymous payload published later is a new request (tomorrow's trigger).
* Correlation data is only an idempotency key together with the response topic.
* 100 poison messages (wildcard/`$`/own response topics, lone surrogates, oversize, invalid
  JSON, retained, QoS 0) are each answered with an error, start nothing, and leave no delivery
  unacked; a valid request sent after them is answered and started once.
No timing assertions: only waits with generous limits.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import Inbox, Received, Sender, idle, record_deliveries, wait_until
from tests.support.streams import deferred

X = "d0000005-0000-4000-8000-000000000001"
Y = "d0000005-0000-4000-8000-000000000002"
VALID = "d0000005-0000-4000-8000-000000000003"
TASKS = [
    SimTask(X, "Anonymous X", tags=["poison-tag"], run_seconds=0.05),
    SimTask(Y, "Anonymous Y", run_seconds=0.05),
    SimTask(VALID, "After the poison", run_seconds=0.05),
]


def private_topics() -> dict[str, Any]:
    base = f"hostile/{uuid.uuid4().hex[:8]}"
    return {
        "topics": {"start": f"{base}/start", "start_plain": f"{base}/plain", "reply": f"{base}/reply", "status": f"{base}/status"}
    }


def _daemon(qrs_certs: Path, sim: Any, broker: Any, tmp_path: Path, start_daemon: Any, **mqtt: Any) -> Any:
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", mqtt={**private_topics(), **mqtt})
    return start_daemon(cfg)


def _starts(sim: Any, task: str) -> int:
    return [s.task_id for s in sim.starts].count(task)


def _anon(r: Received) -> bool:
    return r.event.get("requestId") is None


def test_anonymous_request_redelivered_by_a_restarted_broker_while_qrs_is_down_starts_once(
    qrs_certs, sim, own_broker, tmp_path, start_daemon
):
    running = _daemon(qrs_certs, sim, own_broker, tmp_path, start_daemon)
    d = running.daemon
    t = running.cfg.mqtt.topics
    replies = Inbox(own_broker.port, t.reply, persistent=True)
    sender = Sender(own_broker.port, t.start)
    deliveries = record_deliveries(d)
    try:
        sim.fault = "outage"  # QRS reads each request and drops the connection
        sender.send({"taskId": X}, confirm=True)  # no requestId, no correlation data
        assert wait_until(lambda: deferred(running) >= 1, 30), "the request was not deferred while QRS was down"
        assert d.listener.unacked == 1

        own_broker.restart()  # persistence on: the unacked delivery is resent with dup
        assert wait_until(lambda: any(dup and topic == t.start for topic, _m, dup in deliveries), 60), (
            f"the restarted broker did not redeliver the request: {deliveries}"
        )
        assert _starts(sim, X) == 0 and replies.finals(_anon) == []

        sim.fault = None
        final = replies.wait_final(_anon, 90)
        assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
        assert wait_until(lambda: idle(d), 30), f"still busy: unacked={d.listener.unacked}"
        assert d.listener.unacked == 0
        assert _starts(sim, X) == 1, f"started {_starts(sim, X)} times"
        assert len(replies.finals(_anon)) == 1, replies.finals(_anon)
    finally:
        sim.fault = None
        sender.close()
        replies.close()


def test_identical_anonymous_payload_published_later_is_a_new_request(qrs_certs, sim, broker, tmp_path, start_daemon):
    running = _daemon(qrs_certs, sim, broker, tmp_path, start_daemon)
    t = running.cfg.mqtt.topics
    replies = Inbox(broker.port, t.reply)
    sender = Sender(broker.port, t.start)
    payload = json.dumps({"taskId": X}).encode()
    try:
        sender.send(payload, confirm=True)
        assert replies.wait_count(lambda r: _anon(r) and r.event["event"] == "summary", 1, 30) == 1
        assert _starts(sim, X) == 1
        # The first run has ended (in QRS's clock): a second start is not "already running".
        assert wait_until(lambda: sim.store.clock() - sim.starts[-1].at > 0.3, 10)
        sender.send(payload, confirm=True)  # the same bytes, the same topic: tomorrow's trigger
        assert replies.wait_count(lambda r: _anon(r) and r.event["event"] == "summary", 2, 30) == 2
        summaries = [r.event for r in replies.finals(_anon)]
        assert all(s["event"] == "summary" and s["totalTasksStarted"] == 1 for s in summaries), summaries
        assert _starts(sim, X) == 2, "the second identical request was replayed instead of started"
        execs = [r.event.get("executionId") for r in replies.select(lambda r: _anon(r) and r.event["event"] == "task")]
        assert len(execs) == 2 and len(set(execs)) == 2, execs
    finally:
        sender.close()
        replies.close()


def test_same_correlation_data_on_two_response_topics_is_two_requests(qrs_certs, sim, broker, tmp_path, start_daemon):
    running = _daemon(qrs_certs, sim, broker, tmp_path, start_daemon)
    t = running.cfg.mqtt.topics
    base = f"clients/{uuid.uuid4().hex[:8]}"
    inbox = Inbox(broker.port, f"{base}/#")
    alice, bob = Sender(broker.port, t.start), Sender(broker.port, t.start)
    corr = b"same-correlation-0001"
    try:
        alice.send({"taskId": X}, response_topic=f"{base}/alice", correlation=corr, confirm=True)
        bob.send({"taskId": Y}, response_topic=f"{base}/bob", correlation=corr, confirm=True)
        for who, task in (("alice", X), ("bob", Y)):
            final = inbox.wait_final(lambda r, who=who: r.topic == f"{base}/{who}", 30)
            assert final.correlation == corr
            assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
            (task_ev,) = [r.event for r in inbox.select(lambda r, who=who: r.topic == f"{base}/{who}" and r.event["event"] == "task")]
            assert task_ev["taskId"] == task and task_ev["status"] == "started", task_ev
        assert _starts(sim, X) == 1 and _starts(sim, Y) == 1
        # The same correlation data on the same response topic is the same request: replayed.
        alice.send({"taskId": X}, response_topic=f"{base}/alice", correlation=corr, confirm=True)
        assert inbox.wait_count(lambda r: r.topic == f"{base}/alice" and r.event["event"] == "summary", 2, 30) == 2
        assert _starts(sim, X) == 1
    finally:
        alice.close()
        bob.close()
        inbox.close()


# --------------------------------------------------------------------------- 100 poison messages

SURROGATE = "\ud800"


def poison(i: int, t: Any) -> dict[str, Any]:
    """Send-kwargs of poison message `i`; its payload would start X (or Y) if it were acted on."""
    rid = f"poison-{i}"
    start_x = {"requestId": rid, "taskId": X}
    kinds: list[dict[str, Any]] = [
        {"payload": start_x, "response_topic": "evil/#"},
        {"payload": start_x, "response_topic": "evil/+/replies"},
        {"payload": start_x, "response_topic": "$SYS/evil"},
        {"payload": start_x, "response_topic": t.start},  # a reply loop through the daemon itself
        {"payload": start_x, "response_topic": f"{t.status}/forged"},
        {"payload": start_x, "response_topic": ""},
        {"payload": start_x, "response_topic": "r/" + "x" * 2000},
        {"payload": {"requestId": rid, "tag": [SURROGATE]}},
        {"payload": {"requestId": rid, "tag": ["poison-tag" + SURROGATE]}},
        {"payload": {"requestId": rid, "customProperty": [{"name": SURROGATE, "value": "v"}]}},
        {"payload": {"requestId": rid, "customProperty": [{"name": "p", "value": "v" + SURROGATE}]}},
        {"payload": {"requestId": "r" + SURROGATE, "taskId": X}},
        {"payload": {"requestId": SURROGATE, "tag": ["poison-tag"]}},
        {"payload": b'{"requestId": "' + rid.encode() + b'", "tag": ["' + b"a" * 70_000 + b'"]}'},
        {"payload": b'{"requestId": "' + rid.encode() + b'", "taskId": '},
        {"payload": b"\xff\xfe\xfd"},
        {"payload": start_x, "retain": True},
        {"payload": X.encode(), "topic": t.start_plain, "retain": True},
        {"payload": start_x, "qos": 0, "response_topic": "evil/#"},
        {"payload": {"requestId": rid, "taskId": X, "then": {"tag": [SURROGATE]}}},
        {"payload": b"[" * 10_000},
        {"payload": (X + SURROGATE).encode("utf-8", "surrogatepass"), "topic": t.start_plain},
    ]
    return kinds[i % len(kinds)]


def test_a_valid_request_after_100_poison_messages_is_answered(qrs_certs, sim, broker, tmp_path, start_daemon):
    running = _daemon(qrs_certs, sim, broker, tmp_path, start_daemon)
    d = running.daemon
    t = running.cfg.mqtt.topics
    inbox = Inbox(broker.port, t.reply)
    elsewhere = Inbox(broker.port, "evil/#")  # where a wildcard response topic points
    sender = Sender(broker.port, t.start)
    n = 100
    try:
        sent = [poison(i, t) for i in range(n)]
        for kw in sent:
            sender.send(**kw)
        sender.confirm_all()
        assert sender.disconnects == [], f"the broker refused a poison message: {sender.disconnects}"
        qos1 = sum(1 for kw in sent if kw.get("qos", 1) == 1)
        errors = lambda r: r.topic == t.reply and r.event.get("event") == "error"  # noqa: E731
        got = inbox.wait_count(errors, qos1, 60)
        assert got >= qos1, f"only {got} of {qos1} poison messages (QoS 1) got an error reply"
        assert got <= n

        sender.send({"requestId": "after-poison", "taskId": VALID}, confirm=True)
        final = inbox.wait_final(lambda r: r.event.get("requestId") == "after-poison", 30)
        assert final.topic == t.reply
        assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
        assert wait_until(lambda: idle(d), 30), f"still busy: unacked={d.listener.unacked}"
        assert d.listener.unacked == 0
        assert [s.task_id for s in sim.starts] == [VALID], "a poison message started a task"
        # Each poison message was answered once at most, nothing but errors, only on the reply topic.
        assert inbox.count_all() == len(inbox.select(errors)) + 2  # + the valid task event and summary
        assert len(inbox.select(errors)) <= n
        # Wildcards etc.: answered on topics.reply with the request's correlation data, never started.
        by_id: dict[str, int] = {}
        for r in inbox.select(errors):
            rid = r.event.get("requestId")
            if rid is not None:
                by_id[rid] = by_id.get(rid, 0) + 1
        assert all(v == 1 for v in by_id.values()), {k: v for k, v in by_id.items() if v != 1}
        assert all(k.startswith("poison-") for k in by_id), sorted(by_id)
        titles = {r.event["error"] for r in inbox.select(errors)}
        for expected in ("Invalid response topic", "Payload too large", "Retained request ignored"):
            assert expected in titles, titles
        assert elsewhere.count_all() == 0, [r.topic for r in elsewhere.items]
        assert d.healthy_threads()
    finally:
        for topic in (t.start, t.start_plain):  # clear the retained poison from the shared broker
            sender.send(b"", topic=topic, retain=True, confirm=True)
        sender.close()
        inbox.close()
        elsewhere.close()
