"""Issue 11: a hypothesis fuzz run over MQTT payloads and MQTT 5 properties, against one
in-process daemon, a real Mosquitto and the simulator over mTLS.

Each example is a batch of messages to the JSON and plain start topics: payloads are random
bytes, near-valid JSON (lone surrogates, huge numbers, wrong types, unknown keys, chains),
huge numbers; properties are response topics (wildcards, `$`-topics, empty, over-long, the
daemon's own topics, arbitrary text), correlation data, content type, user properties, the
retain flag and QoS 0/1. Strings are limited to what a client can send at all: paho cannot
encode a lone surrogate in a property and Mosquitto disconnects a client that sends control
characters or NUL in one (the test asserts the publisher was never disconnected).

After each batch: a valid request is answered and started; once the daemon is idle, no delivery
is left unacked; and no task was started that no message named (a canary task never is).
Derandomized (fixed seed) and a modest example count, so CI is stable and quick.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from butler_mqtt.sim import SimTask
from tests.conftest import make_config
from tests.support.mqtt import Inbox, Sender, idle, wait_until

BY_ID = "f0220000-0000-4000-8000-000000000001"
BY_TAG = "f0220000-0000-4000-8000-000000000002"
BY_PROP = "f0220000-0000-4000-8000-000000000003"
SENTINEL = "f0220000-0000-4000-8000-000000000004"
CANARY = "f0220000-0000-4000-8000-000000000005"  # named by no message: must never start
TAG, PROP, PROP_VALUE = "fuzz-tag", "FuzzProp", "yes"
TASKS = [
    SimTask(BY_ID, "Fuzz by id", run_seconds=0.05),
    SimTask(BY_TAG, "Fuzz by tag", tags=[TAG], run_seconds=0.05),
    SimTask(BY_PROP, "Fuzz by property", custom_properties=[(PROP, PROP_VALUE)], run_seconds=0.05),
    SimTask(SENTINEL, "Sentinel", run_seconds=0.05),
    SimTask(CANARY, "Canary", tags=["never"], custom_properties=[("Never", "never")], run_seconds=0.05),
]

# Text a hostile client can put in a JSON payload: anything, lone surrogates included.
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
# Text that can travel in an MQTT 5 string property at all.
prop_char = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn"))
prop_text = st.text(prop_char, max_size=40)


def payloads() -> st.SearchStrategy[bytes]:
    ids = st.sampled_from([BY_ID, BY_ID.upper(), "not-a-guid", "", "00000000-0000-0000-0000-000000000000"]) | any_text
    tags = st.sampled_from([TAG, TAG.upper(), TAG + "\ud800", "\ud800", "\udfff", "", "a" * 300]) | any_text
    props = st.fixed_dictionaries(
        {"name": st.sampled_from([PROP, "\ud800"]) | any_text, "value": st.sampled_from([PROP_VALUE, "\udc00"]) | any_text}
    )
    scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text
    stage = st.fixed_dictionaries(
        {},
        optional={
            "requestId": any_text | st.integers(),
            "taskId": st.lists(ids, max_size=3) | ids | scalar,
            "tag": st.lists(tags, max_size=3) | tags | scalar,
            "customProperty": st.lists(props, max_size=2) | scalar,
            "wait": st.booleans() | scalar,
            "dryRun": st.booleans() | scalar,
            "allTaskIdsMustExist": st.booleans() | scalar,
            "unknownKey": scalar,
        },
    )
    chained = st.builds(lambda a, b: {**a, "then": b}, stage, stage | scalar)
    near_valid = (stage | chained).map(lambda d: json.dumps(d).encode())
    truncated = st.builds(lambda b, n: b[: max(1, len(b) - n)], near_valid, st.integers(1, 5))
    huge = st.sampled_from(
        [
            b'{"taskId": [' + b"9" * 5000 + b"]}",
            b'{"tag": ["' + TAG.encode() + b'"], "dryRun": 1e999}',
            b'{"requestId": ' + b"1" * 4400 + b', "tag": ["' + TAG.encode() + b'"]}',
            b'{"tag": [' * 3000,
            b'{"tag": ["' + b"x" * 70_000 + b'"]}',
        ]
    )
    return st.one_of(st.binary(max_size=120), near_valid, near_valid, truncated, huge, st.sampled_from([BY_ID.encode()]))


def messages(own: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    response_topics = st.one_of(
        st.none(),
        st.sampled_from(["", "evil/#", "evil/+/x", "#", "$SYS/broker/x", "$share/g/x", "x" * 1025, own["start"], own["plain"],
                         own["status"], f"{own['status']}/sub", f"{own['reply']}/fine"]),
        prop_text.filter(bool),
    )
    return st.fixed_dictionaries(
        {
            "payload": payloads(),
            "topic": st.sampled_from([own["start"], own["start"], own["plain"]]),
            "qos": st.sampled_from([0, 1, 1]),
            "retain": st.sampled_from([False, False, False, True]),
            "response_topic": response_topics,
            "correlation": st.none() | st.binary(max_size=40),
            "content_type": st.none() | prop_text,
            "user_properties": st.none() | st.lists(st.tuples(prop_text, prop_text), max_size=3),
        }
    )


def unusable_route(rt: str | None, own: dict[str, str]) -> bool:
    """A response topic replies cannot go to: such a request must start nothing."""
    if rt is None:
        return False
    return (
        rt == "" or "#" in rt or "+" in rt or rt.startswith("$") or len(rt.encode()) > 1024
        or rt in (own["start"], own["plain"], own["status"]) or rt.startswith(own["status"] + "/")
    )


def named(msg: dict[str, Any], own: dict[str, str]) -> set[str]:
    """The tasks this message could legitimately start (generously: any mention counts)."""
    if msg["retain"] or unusable_route(msg["response_topic"], own):
        return set()
    try:
        text = msg["payload"].decode("utf-8").lower()
    except UnicodeDecodeError:
        return set()
    found = {BY_ID} if BY_ID in text else set()
    if TAG in text:
        found.add(BY_TAG)
    if PROP.lower() in text:
        found.add(BY_PROP)
    return found


def test_fuzz_mqtt_payloads_and_properties(qrs_certs, sim, broker, tmp_path, start_daemon):
    base = f"fuzz/{uuid.uuid4().hex[:8]}"
    own = {"start": f"{base}/start", "plain": f"{base}/plain", "reply": f"{base}/reply", "status": f"{base}/status"}
    topics = {"start": own["start"], "start_plain": own["plain"], "reply": own["reply"], "status": own["status"]}
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", mqtt={"topics": topics})
    running = start_daemon(cfg)
    d = running.daemon
    inbox = Inbox(broker.port, own["reply"])
    sender = Sender(broker.port, own["start"])
    allowed: set[str] = {SENTINEL}
    batches = [0]

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(messages(own), min_size=1, max_size=6))
    def run_batch(batch: list[dict[str, Any]]) -> None:
        batches[0] += 1
        for msg in batch:
            allowed.update(named(msg, own))
            sender.send(**msg)
        sender.confirm_all()
        assert sender.disconnects == [], f"the broker refused a generated message: {sender.disconnects}"
        rid = f"sentinel-{batches[0]}"
        sender.send({"requestId": rid, "taskId": SENTINEL}, confirm=True)
        final = inbox.wait_final(lambda r: r.event.get("requestId") == rid, 30)
        assert final.event["event"] == "summary" and final.event["totalTasksStarted"] == 1, final.event
        assert wait_until(lambda: idle(d), 30), f"not idle: unacked={d.listener.unacked}"
        assert d.listener.unacked == 0, "a delivery was left unacked"
        started = {s.task_id for s in sim.starts}
        assert CANARY not in started, "a task no message named was started"
        assert started <= allowed, f"started outside any selection: {started - allowed}"
        assert d.healthy_threads(), "a daemon thread died"

    try:
        run_batch()
        assert batches[0] >= 60
        # Something was really started along the way, and the error path was really taken.
        assert sum(1 for s in sim.starts if s.task_id == SENTINEL) >= 1
        assert inbox.select(lambda r: r.event.get("event") == "error"), "no message was rejected: the fuzz tested nothing"
        print(f"fuzz: {batches[0]} batches, {len(sim.starts)} starts ({sorted({s.task_id[-1] for s in sim.starts})}),"
              f" {len(inbox.select(lambda r: r.event.get('event') == 'error'))} error replies")
    finally:
        for topic in (own["start"], own["plain"]):  # clear retained messages from the shared broker
            sender.send(b"", topic=topic, retain=True, confirm=True)
        sender.close()
        inbox.close()
