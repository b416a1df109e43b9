"""Failure details and stop against the simulator over real mTLS (contract section 8, qrs-api.md 13).

Hostile cases included: a log route that 404s (fallback), fails, hangs or answers garbage; a
download that drips, 404s first, is 200 MB, or is invalid UTF-8 / UTF-16.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.backends.qrs.client import QrsClient
from butler_mqtt.backends.qrs.failure import ScriptLogReader, failure_details
from butler_mqtt.backends.qrs.logtail import tail_of
from butler_mqtt.backends.qrs.stopping import stop_running
from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import QrsNotFound
from butler_mqtt.sim import QrsSimulator, SimTask
from butler_mqtt.sim.scriptlog import log_bytes

OK = "fa110000-0000-4000-8000-000000000001"
FAIL = "fa110000-0000-4000-8000-000000000002"
LONG = "fa110000-0000-4000-8000-000000000003"
LONG2 = "fa110000-0000-4000-8000-000000000004"
MISSING = "fa110000-0000-4000-8000-0000000000ff"

TASKS = [
    SimTask(OK, "Reload ok", run_seconds=0.05),
    SimTask(FAIL, "Reload fail", run_seconds=0.05, outcome="fail", failure_message="Field 'Amount' not found"),
    SimTask(LONG, "Reload long", run_seconds=30),
    SimTask(LONG2, "Reload long 2", run_seconds=30),
]


def qrs_cfg(qrs_certs: Path, port: int) -> QrsConfig:
    return QrsConfig.model_validate(
        {
            "host": "localhost", "port": port, "cert": qrs_certs / "client.pem",
            "key": qrs_certs / "client_key.pem", "ca": qrs_certs / "root.pem", "timeout": 10, "retries": 1,
        }
    )


@pytest.fixture
def client(qrs_certs: Path, sim: QrsSimulator) -> Any:
    c = QrsClient(qrs_cfg(qrs_certs, sim.port))
    yield c
    c.close()


@pytest.fixture
def reader(qrs_certs: Path, sim: QrsSimulator) -> Any:
    r = ScriptLogReader(qrs_cfg(qrs_certs, sim.port), deadline_s=20)
    yield r
    r.close()


def run_to_end(client: QrsClient, task_id: str) -> dict[str, Any]:
    """Start the task and return its execution result once final."""
    session = client.start_synchronous(task_id)
    for _ in range(400):
        rows = client.execution_results([session])
        if rows and rows[-1]["status"] in (6, 7, 8):
            return rows[-1]
        time.sleep(0.025)
    raise AssertionError("the execution did not end")


def expected_tail(sim: QrsSimulator, task_id: str, result: dict[str, Any], lines: int) -> list[str]:
    spec = sim.store.log_of_result(task_id, result["id"])
    assert spec is not None
    return tail_of(log_bytes(spec), lines)


def calls(sim: QrsSimulator) -> list[tuple[str, int]]:
    return [(r.path.split("/")[2], r.status) for r in sim.request_log]


def test_the_tail_is_the_last_lines_of_that_execution(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    first = run_to_end(client, FAIL)
    second = run_to_end(client, FAIL)
    sim.clear_log()
    one = failure_details(reader, first, lines=40)
    two = failure_details(reader, second, lines=40)
    assert one is not None and two is not None
    assert one["scriptLogTail"] == expected_tail(sim, FAIL, first, 40)
    assert two["scriptLogTail"] == expected_tail(sim, FAIL, second, 40)
    assert len(one["scriptLogTail"]) == 40 and one["scriptLogTail"] != two["scriptLogTail"]
    assert first["id"] in one["scriptLogTail"][-2] and "run 1" in one["scriptLogTail"][-2]
    assert second["id"] in two["scriptLogTail"][-2] and "run 2" in two["scriptLogTail"][-2]
    assert one["scriptLogTail"][-3].endswith("Error: Field 'Amount' not found")
    assert one["message"] == "Field 'Amount' not found"
    assert one["details"][0] == "Changing task state to Triggered"
    assert one["details"][-1] == "Changing task state from Started to FinishedFail"
    assert "scriptLogError" not in one
    # One ticket and one download per execution: the cost of a failure's log.
    assert [c[0] for c in calls(sim)] == ["reloadtask", "download"] * 2


def test_success_and_zero_lines_cost_nothing(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    good = run_to_end(client, OK)
    bad = run_to_end(client, FAIL)
    sim.clear_log()
    assert failure_details(reader, good, lines=40) is None
    zero = failure_details(reader, bad, lines=0)
    assert zero is not None and set(zero) == {"message", "details"}
    assert sim.request_log == []


def test_the_older_route_is_used_when_the_newer_one_404s_and_remembered(
    client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator
) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults["scriptlogfile"] = "404"
    sim.clear_log()
    got = failure_details(reader, result, lines=5)
    assert got is not None and got["scriptLogTail"] == expected_tail(sim, FAIL, result, 5)
    paths = [(r.path.rsplit("/", 1)[-1] if "reloadtask/" + FAIL in r.path else "download", r.status) for r in sim.request_log]
    assert paths == [("scriptlogfile", 404), ("scriptlog", 200), ("download", 200)]
    assert reader.prefer_old_route
    sim.clear_log()
    again = failure_details(reader, result, lines=5)
    assert again is not None and again["scriptLogTail"] == got["scriptLogTail"]
    assert [r.path.rsplit("/", 1)[-1] for r in sim.request_log][:1] == ["scriptlog"]
    assert len(sim.request_log) == 2  # the missing route is not asked again


def test_a_failing_route_without_fallback_gives_script_log_error(
    client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator
) -> None:
    sim.store.file_references = False  # a server that no longer fills the deprecated field
    result = run_to_end(client, FAIL)
    sim.log_faults["scriptlogfile"] = "500"
    got = failure_details(reader, result, lines=40)
    assert got is not None and "scriptLogTail" not in got
    assert "scriptlogfile: QRS answered 500" in got["scriptLogError"]
    assert got["message"] == "Field 'Amount' not found"  # the rest of the failure is still there
    assert not any(r.path.endswith("/scriptlog") for r in sim.request_log)


@pytest.mark.parametrize("fault", ["garbage", "deepjson", "badticket", "500", "404"])
def test_both_routes_failing_or_answering_garbage(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator, fault: str) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults.update(scriptlogfile=fault, scriptlog=fault)
    sim.clear_log()
    got = failure_details(reader, result, lines=40)
    assert got is not None and "scriptLogTail" not in got
    assert got["scriptLogError"].startswith("script log not read: scriptlogfile: ")
    assert "; scriptlog: " in got["scriptLogError"]
    assert not any("/download/" in r.path for r in sim.request_log)  # never a made-up ticket


def test_a_bare_ticket_string_is_accepted(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults["scriptlogfile"] = "bareticket"
    got = failure_details(reader, result, lines=3)
    assert got is not None and got["scriptLogTail"] == expected_tail(sim, FAIL, result, 3)


def test_a_download_that_404s_at_first_is_asked_again(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults["download"] = "first404"
    sim.clear_log()
    got = failure_details(reader, result, lines=3)
    assert got is not None and got["scriptLogTail"] == expected_tail(sim, FAIL, result, 3)
    assert [r.status for r in sim.request_log] == [200, 404, 200]


def test_a_garbage_download_still_gives_valid_text(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults["download"] = "garbage"
    got = failure_details(reader, result, lines=40)
    assert got is not None and got["scriptLogTail"]
    for line in got["scriptLogTail"]:
        line.encode("utf-8")
        assert "\x00" not in line and len(line) <= 1000


@pytest.mark.parametrize("route", ["scriptlogfile", "download"])
def test_a_hanging_route_is_cut_by_the_deadline(client: QrsClient, qrs_certs: Path, sim: QrsSimulator, route: str) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults[route] = "hang"
    reader = ScriptLogReader(qrs_cfg(qrs_certs, sim.port), deadline_s=1.0)
    t0 = time.monotonic()
    got = failure_details(reader, result, lines=40)
    elapsed = time.monotonic() - t0
    reader.close()
    assert got is not None and "scriptLogTail" not in got and "1 s" in got["scriptLogError"]
    assert elapsed < 10  # the deadline (1 s), not the 10 s read timeout nor the hour-long hang


def test_a_dripping_download_is_cut_at_the_total_deadline(client: QrsClient, qrs_certs: Path, sim: QrsSimulator) -> None:
    result = run_to_end(client, FAIL)
    sim.log_faults["download"] = "drip"
    sim.log_drip_seconds, sim.log_drip_bytes = 0.05, 16  # ~9 KB at 320 B/s: half a minute
    reader = ScriptLogReader(qrs_cfg(qrs_certs, sim.port), deadline_s=1.5)
    t0 = time.monotonic()
    got = failure_details(reader, result, lines=40)
    elapsed = time.monotonic() - t0
    reader.close()
    assert got is not None and "scriptLogTail" not in got
    assert "did not end within 1.5 s" in got["scriptLogError"]
    assert elapsed < 10  # every read succeeds quickly: only a wall-clock deadline stops this


@pytest.mark.parametrize("encoding", ["invalid-utf-8", "utf-16-le", "utf-16-be", "utf-8-nobom"])
def test_logs_in_other_encodings(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator, encoding: str) -> None:
    sim.store.replace_task(SimTask(FAIL, "Reload fail", run_seconds=0.05, outcome="fail", log_encoding=encoding,
                                   failure_message="Fält 'Belopp' saknas €"))
    result = run_to_end(client, FAIL)
    got = failure_details(reader, result, lines=6)
    assert got is not None
    tail = got["scriptLogTail"]
    assert tail[-1].endswith("Execution finished.") and "Execution Failed" in tail[-2 if encoding != "invalid-utf-8" else -3]
    assert any(line.endswith("Error: Fält 'Belopp' saknas €") for line in tail)
    assert not any(line.startswith("\ufeff") for line in tail)
    if encoding == "invalid-utf-8":
        assert any("bad \ufffd" in line for line in tail)
    for line in tail:
        line.encode("utf-8")


def test_a_200_mb_log_keeps_only_the_tail(client: QrsClient, qrs_certs: Path, sim: QrsSimulator) -> None:
    sim.store.replace_task(SimTask(FAIL, "Reload fail", run_seconds=0.05, outcome="fail", log_bytes=200 * 1024 * 1024))
    result = run_to_end(client, FAIL)
    assert result["scriptLogSize"] >= 200 * 1024 * 1024
    reader = ScriptLogReader(qrs_cfg(qrs_certs, sim.port), deadline_s=600)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    got = failure_details(reader, result, lines=40)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    reader.close()
    assert got is not None and "scriptLogError" not in got, got.get("scriptLogError")
    assert got["scriptLogTail"][-1].endswith("Execution finished.")
    assert got["scriptLogTail"][-3].endswith("Error: Field 'Amount' not found")
    assert any("padding of execution" in line for line in got["scriptLogTail"])
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB reading a 200 MB log"


# --- stop --------------------------------------------------------------------------------------


def test_stopping_a_running_task_goes_abort_initiated_aborting_aborted(client: QrsClient, sim: QrsSimulator) -> None:
    sim.store.abort_initiated_seconds = 0.4
    sim.store.aborting_seconds = 0.4
    session = client.start_synchronous(LONG)
    time.sleep(0.2)
    outcome = stop_running(client, LONG)
    assert (outcome.status, outcome.execution_id) == ("stopping", session)
    seen: list[int] = []
    for _ in range(200):
        status = client.execution_results([session])[-1]["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 6:
            break
        time.sleep(0.02)
    assert seen == [4, 5, 6]
    assert [r.task_id for r in sim.stop_requests] == [LONG]
    assert client.get_json(f"/qrs/reloadtask/{LONG2}")["operational"]["lastExecutionResult"]["status"] == 0


def test_stopping_an_idle_task_is_not_running_and_sends_no_stop(client: QrsClient, sim: QrsSimulator) -> None:
    run_to_end(client, OK)
    sim.clear_log()
    assert stop_running(client, OK).status == "notRunning"
    assert stop_running(client, LONG2).status == "notRunning"  # never ran
    assert stop_running(client, MISSING).status == "notFound"
    assert not any(r.method == "POST" for r in sim.request_log)
    client.stop_task(OK)  # QRS itself answers 204 for an idle task: the answer tells nothing
    with pytest.raises(QrsNotFound):
        client.stop_task(MISSING)
    with pytest.raises(ValueError):
        client.stop_task("../about")


def test_stop_many(client: QrsClient, sim: QrsSimulator) -> None:
    sim.store.abort_initiated_seconds = sim.store.aborting_seconds = 0.05
    sessions = [client.start_synchronous(t) for t in (LONG, LONG2)]
    client.stop_tasks([LONG, LONG2, MISSING])
    time.sleep(0.5)
    assert [client.execution_results([s])[-1]["status"] for s in sessions] == [6, 6]


def test_a_huge_ticket_answer_is_cut_not_read(client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator) -> None:
    result = run_to_end(client, FAIL)
    sim.fault, sim.fault_paths, sim.huge_bytes = "huge", r"/scriptlog", 20 * 1024 * 1024
    got = failure_details(reader, result, lines=40)
    # The answer is `[` + 20 MB of spaces + `]`: valid JSON when read whole ("holds no download
    # ticket"), not JSON when cut at the 4 KiB cap, as it must be.
    assert got is not None and "scriptLogTail" not in got
    assert got["scriptLogError"].count("the answer is not JSON") == 2, got["scriptLogError"]


def test_a_read_started_just_before_the_deadline_ends_at_it(client: QrsClient, qrs_certs: Path, sim: QrsSimulator) -> None:
    """Bytes at 3 s, the next at 6 s, a 4 s deadline: a read timeout counted per read (4 s from
    each read's start) would wait for the bytes at 6 s; the deadline ends it at 4 s."""
    result = run_to_end(client, FAIL)
    sim.log_faults["download"] = "drip"
    sim.log_drip_seconds, sim.log_drip_bytes = 3.0, 1024
    reader = ScriptLogReader(qrs_cfg(qrs_certs, sim.port), deadline_s=4.0)
    t0 = time.monotonic()
    got = failure_details(reader, result, lines=40)
    elapsed = time.monotonic() - t0
    reader.close()
    assert got is not None and "did not end within 4 s" in got["scriptLogError"], got
    assert elapsed < 5.5


def test_each_attempt_of_a_retried_execution_has_its_own_tail(
    client: QrsClient, reader: ScriptLogReader, sim: QrsSimulator
) -> None:
    sim.store.retry_delay = 0.05
    sim.store.replace_task(SimTask(FAIL, "Reload fail", run_seconds=0.05, outcome="fail", max_retries=1))
    session = client.start_synchronous(FAIL)
    for _ in range(400):
        rows = client.execution_results([session])
        if len(rows) == 2 and all(r["status"] == 8 for r in rows):
            break
        time.sleep(0.025)
    assert len(rows) == 2 and rows[0]["id"] != rows[1]["id"]
    tails = [failure_details(reader, row, lines=3) for row in rows]
    for row, got in zip(rows, tails, strict=True):
        assert got is not None and got["scriptLogTail"] == expected_tail(sim, FAIL, row, 3)
        assert row["id"] in got["scriptLogTail"][-2]


def test_the_stop_route_refuses_a_malformed_id(client: QrsClient, sim: QrsSimulator) -> None:
    assert client._call("POST", "/qrs/task/not-a-guid/stop").status_code == 400
    assert client._call("POST", "/qrs/task/stop/many", json_body={"ids": 1}).status_code == 400
    assert sim.stop_requests == []
