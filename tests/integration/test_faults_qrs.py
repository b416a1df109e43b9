"""Faults around the daemon while requests stream in: QRS down (30 s and a short one), QRS
answering 500s, QRS slower than `qrs.timeout`, the journal's disk read-only, and a flood of
10,000 malformed messages. Every request is answered; every task whose reply says `started`
was started exactly once, and no task ever twice. No timing assertions: only waits with
generous limits (the durations below are how long a fault lasts, not limits on the daemon).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.sim import QrsSimulator, SimTask
from tests.conftest import make_config
from tests.support.mqtt import Sender, wait_until
from tests.support.ops import daemon_env
from tests.support.streams import Replies, deferred

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 120
TASK_IDS = [f"fa0c5000-0000-4000-8000-{i:012d}" for i in range(N_TASKS)]
TASKS = [SimTask(t, f"Task {i}", run_seconds=0.05) for i, t in enumerate(TASK_IDS)]


# --------------------------------------------------------------------------- helpers


class Publisher(Sender):
    """A Sender (tests/support/mqtt.py) speaking in the requests of these tests."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(port, topic, inflight=500)

    def raw(self, payload: bytes, topic: str | None = None) -> None:
        self.send(payload, topic=topic)

    def request(self, rid: str, task_id: str, **extra: Any) -> str:
        self.raw(json.dumps({"requestId": rid, "taskId": task_id, **extra}).encode())
        return rid

    def stream(self, items: list[tuple[str, str]], pause: float) -> threading.Thread:
        """Publish (requestId, taskId) pairs in the background, `pause` s apart."""

        def run() -> None:
            for rid, tid in items:
                self.request(rid, tid)
                time.sleep(pause)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def confirm(self, timeout: float = 60) -> None:
        self.confirm_all(timeout)


def topics() -> dict[str, Any]:
    base = f"faults/{uuid.uuid4().hex[:8]}"
    return {"topics": {"start": f"{base}/start", "start_plain": None, "reply": f"{base}/reply", "status": f"{base}/status"}}


def assert_started_once(sim: QrsSimulator, task_ids: Iterable[str]) -> None:
    ids = [s.task_id for s in sim.starts]
    doubled = sorted({t for t in ids if ids.count(t) > 1})
    assert not doubled, f"started twice: {doubled}"
    missing = sorted(set(task_ids) - set(ids))
    assert not missing, f"{len(missing)} tasks never started: {missing[:5]}"


def assert_replies_started(replies: Replies, pairs: Iterable[tuple[str, str]]) -> None:
    """Each request's summary says its one task was started (and the task event agrees)."""
    for rid, tid in pairs:
        finals = replies.finals(rid)
        assert finals and all(f["event"] == "summary" for f in finals), (rid, finals)
        assert all(f["totalTasksStarted"] == 1 for f in finals), (rid, finals)
        task_events = replies.tasks(rid)
        assert task_events and all(e["taskId"] == tid and e["status"] == "started" for e in task_events), task_events


@pytest.fixture
def rig(qrs_certs, sim, broker, tmp_path, start_daemon):
    """A daemon on private topics, a reply listener and a publisher; `rig(**config sections)`."""
    made: list[Any] = []

    def make(**sections: Any) -> tuple[Any, Replies, Publisher]:
        mqtt_section = {**topics(), **sections.pop("mqtt", {})}
        cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", mqtt=mqtt_section, **sections)
        running = start_daemon(cfg)
        replies = Replies(broker.port, cfg.mqtt.topics.reply)
        pub = Publisher(broker.port, cfg.mqtt.topics.start)
        made.extend([replies, pub])
        return running, replies, pub

    yield make
    for m in made:
        m.close()


def pairs(prefix: str, indexes: Iterable[int]) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", TASK_IDS[i]) for i in indexes]


# --------------------------------------------------------------------------- QRS outage


@pytest.mark.parametrize(
    ("how", "seconds"),
    [("dropped", 6), ("stopped", 30)],
    ids=["connections-dropped-6s", "qrs-stopped-30s"],
)
def test_qrs_outage_while_requests_stream_in(how, seconds, rig, sim, qrs_certs):
    """`dropped`: QRS reads each request and closes the connection without an answer;
    `stopped`: QRS is gone (connections refused), then a new one comes up on the same port
    with the same repository."""
    running, replies, pub = rig()
    before = pairs(f"out-{how}", range(0, 10))
    for rid, tid in before:
        pub.request(rid, tid)
    assert replies.wait_answered([r for r, _ in before], 60) == set()
    assert len(sim.starts) == 10

    port = sim.port
    if how == "dropped":
        sim.fault = "outage"
    else:
        sim.stop()
    down_at = time.monotonic()
    during = pairs(f"out-{how}", range(10, 50))
    streamer = pub.stream(during, pause=min(0.1, seconds / 2 / len(during)))
    assert wait_until(lambda: deferred(running) >= 1, 60), "no request was deferred while QRS was down"
    streamer.join(60)
    time.sleep(max(0.0, seconds - (time.monotonic() - down_at)))
    # While QRS was down nothing was answered with a guess and nothing was started.
    assert replies.unanswered(r for r, _ in during) == {r for r, _ in during}
    assert len(sim.starts) == 10

    new = None
    if how == "dropped":
        sim.fault = None
    else:
        new = QrsSimulator(certs_dir=qrs_certs, port=port)
        new.store = sim.store  # same repository, same record of starts
        new.start()
    try:
        after = pairs(f"out-{how}", range(50, 60))
        for rid, tid in after:
            pub.request(rid, tid)
        pub.confirm()
        assert replies.wait_answered([r for r, _ in during + after], 120) == set()
        assert_started_once(sim, TASK_IDS[:60])
        assert len(sim.starts) == 60
        assert_replies_started(replies, before + during + after)
        assert deferred(running) >= 1
    finally:
        if new is not None:
            new.stop()


# --------------------------------------------------------------------------- QRS answering 500


def test_qrs_answering_500_then_healthy(rig, sim):
    running, replies, pub = rig()
    before = pairs("e500", range(0, 5))
    for rid, tid in before:
        pub.request(rid, tid)
    assert replies.wait_answered([r for r, _ in before], 60) == set()

    sim.fault = "error500"
    during = pairs("e500", range(5, 35))
    pub.stream(during, pause=0.02).join(30)
    assert wait_until(lambda: deferred(running) >= 3, 60), "requests were not deferred on 500s"
    assert replies.unanswered(r for r, _ in during) == {r for r, _ in during}
    assert len(sim.starts) == 5
    assert any(x.status == 500 for x in sim.request_log)

    sim.fault = None
    assert replies.wait_answered([r for r, _ in during], 120) == set()
    assert_started_once(sim, TASK_IDS[:35])
    assert len(sim.starts) == 35
    assert_replies_started(replies, before + during)


@pytest.mark.parametrize("fault", ["error500", "outage"])
def test_a_failed_start_is_reported_and_never_retried_blindly(fault, rig, sim):
    """A start QRS answers with 500 (or drops without an answer) may or may not have run:
    the task is reported `failed` with the reason, and not started again by the daemon, not
    even when the same request is sent again (idempotency replays the failed outcome)."""
    _running, replies, pub = rig()
    victim = TASK_IDS[100]
    sim.fault, sim.fault_paths = fault, r"/start"
    pub.request("fail-start-1", victim)
    assert replies.wait_answered(["fail-start-1"], 60) == set()
    (task_ev,) = replies.tasks("fail-start-1")
    assert task_ev["status"] == "failed"
    assert ("500" in task_ev["reason"]) if fault == "error500" else ("unreachable" in task_ev["reason"])
    (summary,) = replies.finals("fail-start-1")
    assert summary["totalTasksStarted"] == 0 and [t["taskId"] for t in summary["tasksFailed"]] == [victim]
    posts = [x for x in sim.request_log if x.method == "POST" and victim in x.path]
    assert len(posts) == 1, f"the start was sent {len(posts)} times"
    assert sim.starts == []

    # QRS healthy again: the daemon keeps serving; the same request is answered from the
    # journal (still failed, still not started); a new request starts the task.
    sim.fault = sim.fault_paths = None
    pub.request("fail-start-1", victim)
    pub.request("fail-start-2", TASK_IDS[101])
    assert wait_until(lambda: len(replies.finals("fail-start-1")) == 2, 60)
    assert replies.wait_answered(["fail-start-2"], 60) == set()
    assert [e["status"] for e in replies.tasks("fail-start-1")] == ["failed", "failed"]
    assert [s.task_id for s in sim.starts] == [TASK_IDS[101]]
    assert len([x for x in sim.request_log if x.method == "POST" and victim in x.path]) == 1


# --------------------------------------------------------------------------- QRS slower than the timeout


def test_qrs_slower_than_the_timeout_defers_then_answers(rig, sim):
    running, replies, pub = rig(qrs={"timeout": 1, "retries": 1})
    before = pairs("slow", range(0, 5))
    for rid, tid in before:
        pub.request(rid, tid)
    assert replies.wait_answered([r for r, _ in before], 60) == set()

    sim.latency_ms = 2500  # every answer comes 1.5 s after the daemon gave up on it
    during = pairs("slow", range(5, 25))
    pub.stream(during, pause=0.02).join(30)
    assert wait_until(lambda: deferred(running) >= 3, 60), "slow requests were not deferred"
    assert replies.unanswered(r for r, _ in during) == {r for r, _ in during}
    assert len(sim.starts) == 5  # the resolution timed out: no start was ever sent

    sim.latency_ms = 0
    assert replies.wait_answered([r for r, _ in during], 120) == set()
    assert_started_once(sim, TASK_IDS[:25])
    assert len(sim.starts) == 25
    assert_replies_started(replies, before + during)


def test_a_start_qrs_performs_but_answers_too_late(rig, sim):
    """The start reaches QRS and runs, but the answer comes after `qrs.timeout`: the task runs
    once (never a blind second start), and the reply must not claim it did not run."""
    _running, replies, pub = rig(qrs={"timeout": 1, "retries": 1})
    victim = TASK_IDS[110]
    original = sim.store.start

    def start_then_stall(task_id: str) -> Any:
        outcome = original(task_id)
        if task_id.lower() == victim:
            sim._stopping.wait(2.5)  # the execution exists; the answer is late
        return outcome

    sim.store.start = start_then_stall  # type: ignore[method-assign]
    pub.request("late-1", victim)
    assert replies.wait_answered(["late-1"], 60) == set()
    assert [s.task_id for s in sim.starts] == [victim]  # ran exactly once
    (task_ev,) = replies.tasks("late-1")
    (summary,) = replies.finals("late-1")
    assert task_ev["status"] == "started", task_ev
    assert task_ev["executionId"] == sim.starts[0].execution_id
    assert "did not answer" in task_ev["reason"]
    assert summary["totalTasksStarted"] == 1
    # Sent again: the journal's answer, no second start.
    pub.request("late-1", victim)
    assert wait_until(lambda: len(replies.finals("late-1")) == 2, 60)
    assert [s.task_id for s in sim.starts] == [victim]


# --------------------------------------------------------------------------- journal disk read-only


def _immutable(paths: list[Path], on: bool) -> None:
    if shutil.which("chattr") is None:
        pytest.fail("chattr not found: install e2fsprogs (apt-get install e2fsprogs)")
    r = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True, text=True)
    if r.returncode != 0 and on:
        pytest.fail(f"chattr +i failed ({r.stderr.strip()}): run the tests as root on ext4/xfs/btrfs/tmpfs")


def test_read_only_journal_disk_keeps_requests_unacked_until_writable(rig, sim, tmp_path):
    """The journal's directory and files are made immutable (the way to make them unwritable
    for root: a read-only remount is refused while the journal is open, `chmod` does not stop
    root). The `-shm` index stays writable: it is memory-mapped, and an immutable mapping
    kills the process with SIGBUS, which is a different fault (covered by the SIGKILL test).
    Expected: requests are not acked and not answered, nothing is started, and once the disk
    is writable again every request is answered and every task started exactly once."""
    running, replies, pub = rig()
    state = tmp_path / "state"
    before = pairs("ro", range(0, 5))
    for rid, tid in before:
        pub.request(rid, tid)
    assert replies.wait_answered([r for r, _ in before], 60) == set()

    locked = [state] + [p for p in state.iterdir() if not p.name.endswith("-shm")]
    assert any(p.name.endswith(".sqlite3") for p in locked), sorted(p.name for p in locked)
    _immutable(locked, True)
    try:
        during = pairs("ro", range(5, 25))
        pub.stream(during, pause=0.02).join(30)
        assert wait_until(lambda: deferred(running) >= 3, 60), "requests were not deferred on journal errors"
        assert replies.unanswered(r for r, _ in during) == {r for r, _ in during}
        assert len(sim.starts) == 5  # nothing started without a journal record
    finally:
        _immutable(locked, False)
    assert replies.wait_answered([r for r, _ in during], 120) == set()
    assert_started_once(sim, TASK_IDS[:25])
    assert len(sim.starts) == 25
    assert_replies_started(replies, before + during)
    # Answered once: nothing was published for a request before its journal record existed.
    assert all(len(replies.finals(r)) == 1 for r, _ in during), {r: len(replies.finals(r)) for r, _ in during}


def test_journal_disk_turns_read_only_between_start_and_record(rig, sim, tmp_path):
    """The worst moment: the task was started, then the journal cannot record the outcome.
    The request is not acked; once the disk is writable the retry finds the start intent,
    asks QRS, and reports the execution instead of starting the task again."""
    running, replies, pub = rig()
    journal = running.daemon.runtime.journal
    state = tmp_path / "state"
    original = journal.finish
    locked: list[Path] = []

    def finish_on_a_read_only_disk(*args: Any, **kwargs: Any) -> Any:
        if not locked:
            locked.extend([state] + [p for p in state.iterdir() if not p.name.endswith("-shm")])
            _immutable(locked, True)
        return original(*args, **kwargs)

    journal.finish = finish_on_a_read_only_disk  # type: ignore[method-assign]
    victim = TASK_IDS[90]
    try:
        pub.request("ro-mid-1", victim)
        assert wait_until(lambda: deferred(running) >= 1, 60), "the unrecorded request was not deferred"
        assert [s.task_id for s in sim.starts] == [victim]
    finally:
        if locked:
            _immutable(locked, False)
    assert replies.wait_answered(["ro-mid-1"], 60) == set()
    assert wait_until(lambda: running.daemon.handler.handled >= 1, 60)
    assert [s.task_id for s in sim.starts] == [victim], "started again after the journal came back"
    execution = sim.starts[0].execution_id
    task_events = replies.tasks("ro-mid-1")
    assert task_events and all(e["status"] == "started" and e["executionId"] == execution for e in task_events), task_events
    finals = replies.finals("ro-mid-1")
    assert all(f["event"] == "summary" and f["totalTasksStarted"] == 1 for f in finals)
    # The first attempt published its replies before the record failed; the retry sends them
    # again (the contract allows a repeated answer, never a repeated start).
    assert len(finals) <= 2, finals
    # Sent again later: answered from the journal, still one start.
    pub.request("ro-mid-1", victim)
    assert wait_until(lambda: running.daemon.handler.handled >= 2, 60)
    assert [s.task_id for s in sim.starts] == [victim]


# --------------------------------------------------------------------------- flood of malformed messages


def garbage(i: int) -> tuple[bytes, str | None]:
    """Malformed message number `i` and the requestId its error reply must carry (if any)."""
    kinds: list[tuple[bytes, str | None]] = [
        (b"", None),
        (b"not json {", None),
        (b"\xff\xfe\x00garbage", None),
        (b"[1, 2, 3]", None),
        (b'"just a string"', None),
        (json.dumps({"requestId": f"bad-{i}", "colour": "red"}).encode(), f"bad-{i}"),
        (json.dumps({"requestId": f"bad-{i}", "taskId": "not-a-guid"}).encode(), f"bad-{i}"),
        (json.dumps({"requestId": f"bad-{i}", "tag": 5}).encode(), f"bad-{i}"),
        (json.dumps({"requestId": f"bad-{i}", "tag": "a", "wait": "true"}).encode(), f"bad-{i}"),
        (json.dumps({"requestId": f"bad-{i}"}).encode(), f"bad-{i}"),
        (json.dumps({"requestId": f"bad-{i}", "tag": "x" * 300}).encode(), f"bad-{i}"),
        (b"[" * 5000, None),
        (b'{"tag": "a", "n": ' + b"9" * 5000 + b"}", None),  # beyond Python's int-parsing limit
        (b'{"tag": "a", "then": ' * 50 + b"{}" + b"}" * 50, None),
    ]
    if i % 1000 == 999:
        return b'{"tag": "' + b"a" * 70_000 + b'"}', None  # over the 64 KiB limit
    return kinds[i % len(kinds)]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_flood_of_malformed_messages_mixed_with_valid_ones(qrs_certs, sim, broker, tmp_path, listen):
    n_garbage, n_valid = 10_000, 100
    t = topics()["topics"]
    env = {
        **os.environ,
        **daemon_env(
            qrs_certs, sim.port, broker.port, tmp_path / "state", f"flood-{uuid.uuid4().hex[:8]}",
            BUTLER_MQTT__MQTT__TOPICS__START=t["start"],
            BUTLER_MQTT__MQTT__TOPICS__REPLY=t["reply"],
            BUTLER_MQTT__MQTT__TOPICS__STATUS=t["status"],
            BUTLER_MQTT__LOGGING__LEVEL="error",
        ),
    }
    status = listen(t["status"])
    daemon = subprocess.Popen(
        [sys.executable, "-m", "butler_mqtt", "run"], cwd=REPO, env=env,
        stdout=open(tmp_path / "daemon.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    replies = Replies(broker.port, t["reply"])
    pub = Publisher(broker.port, t["start"])
    try:
        status.wait_for(lambda m: m.get("status") == "online", timeout=30)
        rss_before = _rss_mb(daemon.pid)
        valid = pairs("flood", range(n_valid))
        expected_bad_ids = []
        every = n_garbage // n_valid
        for i in range(n_garbage):
            payload, rid = garbage(i)
            pub.raw(payload)
            if rid is not None:
                expected_bad_ids.append(rid)
            if i % every == 0:
                pub.request(*valid[i // every])
        pub.confirm(120)
        assert replies.wait_answered([r for r, _ in valid], 240) == set()
        is_error = lambda e: e.get("event") == "error"  # noqa: E731
        got_errors = replies.wait_events(is_error, n_garbage, 240)
        rss_after = _rss_mb(daemon.pid)
        assert daemon.poll() is None, "the daemon died"
        assert got_errors == n_garbage, f"{n_garbage - got_errors} malformed messages got no error reply"
        assert replies.unanswered(expected_bad_ids) == set()
        assert all(e["event"] == "error" for r in expected_bad_ids for e in replies.by_id[r])
        assert_started_once(sim, TASK_IDS[:n_valid])
        assert len(sim.starts) == n_valid
        assert_replies_started(replies, valid)
        assert rss_after < 150, f"daemon RSS {rss_before:.0f} MB -> {rss_after:.0f} MB"
        print(f"flood: daemon RSS {rss_before:.1f} MB -> {rss_after:.1f} MB")
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        replies.close()
        pub.close()
