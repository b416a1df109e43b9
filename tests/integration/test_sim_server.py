"""The QRS simulator over real mutual TLS, driven with `requests` like a QRS client would."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from butler_mqtt.sim import QrsSimulator, SimTask
from tests.support.simclock import FakeClock

KEY = "Ab3dEf6hIj9lMn0p"
USER = "UserDirectory=INTERNAL; UserId=sa_api"
EMPTY = "00000000-0000-0000-0000-000000000000"
XSRF = "XSRF prevention check failed. Possible XSRF discovered."
NO_USER = (
    "Unknown users not allowed for repository calls, missing or malformed http header: X-Qlik-User"
)

OK = "a1000000-0000-4000-8000-000000000001"
FAIL = "a1000000-0000-4000-8000-000000000002"
OFF = "a1000000-0000-4000-8000-000000000003"
SPECIAL = "a1000000-0000-4000-8000-000000000004"
DECOY = "a1000000-0000-4000-8000-000000000005"
EXTERNAL = "a1000000-0000-4000-8000-000000000006"
MISSING = "a1000000-0000-4000-8000-0000000000ff"
SPECIAL_TAG = "R&D 'Q1' #1 +50% a\\b"

TASKS = [
    SimTask(OK, "Reload ok", tags=["daily"], run_seconds=0.3),
    SimTask(FAIL, "Reload fail", tags=["daily"], run_seconds=0.3, outcome="fail"),
    SimTask(OFF, "Reload off", tags=["daily"], enabled=False),
    SimTask(SPECIAL, "Reload special", tags=[SPECIAL_TAG], run_seconds=0.3),
    SimTask(DECOY, "Reload decoy", tags=["R", "R&D", "R&D 'Q1' #1 50% a\\b"], run_seconds=0.3),
    SimTask(EXTERNAL, "Run export", task_type=1, run_seconds=0.3),
]


#: The shared `sim` fixture (tests/conftest.py) serves TASKS with the certificates the
#: simulator generates itself into this module's empty folder.
SIM_CERTS = "certs_dir"


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-certs")


class Client:
    """A QRS client as the research recommends: client cert, root CA, Xrfkey, X-Qlik-User."""

    def __init__(self, sim: QrsSimulator) -> None:
        self.sim = sim
        self.base_url = sim.base_url
        self.session = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would override a session-level `verify`.
        self.session.trust_env = False
        self.session.cert = (str(sim.certs.client), str(sim.certs.client_key))
        self.session.verify = str(sim.certs.root)

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        *,
        key: str | None = KEY,
        header_key: str | None = KEY,
        user: str | None = USER,
        **kw: Any,
    ) -> requests.Response:
        query = dict(params or {})
        if key is not None:
            query["xrfkey"] = key
        headers = {}
        if header_key is not None:
            headers["X-Qlik-Xrfkey"] = header_key
        if user is not None:
            headers["X-Qlik-User"] = user
        return self.session.request(
            method, self.base_url + path, params=query, headers=headers, timeout=10, **kw
        )

    def get(self, path: str, params: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        return self.call("GET", path, params, **kw)

    def post(self, path: str, params: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        return self.call("POST", path, params, **kw)

    def json(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self.get(path, params)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        return response.json()

    def wait_finished(self, session: str, timeout: float = 10) -> dict[str, Any]:
        """Poll like a client: session until 404, then the result by executionID."""
        deadline = time.monotonic() + timeout
        while self.get(f"/qrs/executionsession/{session}").status_code == 200:
            assert time.monotonic() < deadline, "execution did not finish"
            time.sleep(0.05)
        (result,) = self.json("/qrs/executionresult/full", {"filter": f"executionID eq {session}"})
        return result  # type: ignore[no-any-return]


@pytest.fixture
def client(sim: QrsSimulator) -> Client:
    return Client(sim)


# --- transport and security ---------------------------------------------------------------------


def test_about(client: Client) -> None:
    about = client.json("/qrs/about")
    assert about["schemaPath"] == "About" and isinstance(about["buildVersion"], str)
    enums = client.json("/qrs/about/api/enums")
    assert "7: FinishedSuccess" in enums["TaskExecutionStatus"]["values"]


def test_keep_alive_over_http_1_1(client: Client) -> None:
    for _ in range(3):
        response = client.get("/qrs/about")
        assert response.status_code == 200 and response.raw.version == 11
    assert response.headers.get("Connection", "").lower() != "close"


def test_client_certificate_is_required(sim: QrsSimulator) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            f"{sim.base_url}/qrs/about?xrfkey={KEY}",
            headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER},
            verify=str(sim.certs.root),
            timeout=10,
        )
    assert sim.request_log == []


def test_client_certificate_from_another_ca_is_refused(sim: QrsSimulator, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert("QlikClient")
    cert, key = tmp_path / "client.pem", tmp_path / "client_key.pem"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            f"{sim.base_url}/qrs/about?xrfkey={KEY}",
            headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER},
            cert=(str(cert), str(key)),
            verify=str(sim.certs.root),
            timeout=10,
        )
    assert sim.request_log == []


def test_server_certificate_names_localhost(sim: QrsSimulator) -> None:
    response = Client(sim).session.get(
        f"https://localhost:{sim.port}/qrs/about?xrfkey={KEY}",
        headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER},
        timeout=10,
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("key", "header_key"),
    [
        (None, KEY),
        (KEY, None),
        (None, None),
        (KEY, KEY.swapcase()),
        ("abc", "abc"),  # wrong length
        ("Ab3dEf6hIj9lMn0-", "Ab3dEf6hIj9lMn0-"),  # wrong characters
    ],
)
def test_xrfkey_check(client: Client, key: str | None, header_key: str | None) -> None:
    for method, path in [("GET", "/qrs/about"), ("POST", f"/qrs/task/{OK}/start")]:
        response = client.call(method, path, key=key, header_key=header_key)
        assert response.status_code == 403
        assert response.text == XSRF
    assert client.sim.starts == []


def test_xrfkey_parameter_name_is_case_insensitive(client: Client) -> None:
    response = client.get("/qrs/about", {"Xrfkey": KEY}, key=None)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "user", [None, "", "UserDirectory:INTERNAL; UserId:sa_api", "UserId=sa_api", "sa_api"]
)
def test_x_qlik_user_required(client: Client, user: str | None) -> None:
    response = client.get("/qrs/about", user=user)
    assert response.status_code == 403
    assert response.text == NO_USER


@pytest.mark.parametrize(
    "user",
    [
        "UserDirectory=INTERNAL; UserId=sa_repository",
        "userDirectory=INTERNAL;UserId=sa_api",
        "USERDIRECTORY=internal ; UserID=sa_api",
        "UserId=sa_api; UserDirectory=INTERNAL",
    ],
)
def test_x_qlik_user_spellings(client: Client, user: str) -> None:
    assert client.get("/qrs/about", user=user).status_code == 200


def test_unknown_routes_are_404(client: Client) -> None:
    assert client.get("/qrs/nothing").status_code == 404
    assert client.get("/other").status_code == 404
    assert client.get(f"/qrs/task/{OK}").status_code == 404  # no such QRS route
    assert client.post(f"/qrs/reloadtask/{OK}/start").status_code == 404
    assert client.call("PUT", "/qrs/about").status_code == 404


# --- reading tasks ---------------------------------------------------------------------------------


def test_filter_with_url_special_characters_finds_exactly_that_task(client: Client) -> None:
    escaped = SPECIAL_TAG.replace("\\", "\\\\").replace("'", "\\'")
    tasks = client.json("/qrs/reloadtask/full", {"filter": f"tags.name eq '{escaped}'"})
    assert [t["id"] for t in tasks] == [SPECIAL]
    # Percent-encoded spaces work as well as '+'.
    tasks = client.json("/qrs/reloadtask/full?filter=name%20eq%20%27reload%20OK%27")
    assert [t["id"] for t in tasks] == [OK]


def test_unencoded_ampersand_splits_the_query(client: Client) -> None:
    url = f"{client.sim.base_url}/qrs/reloadtask/full?xrfkey={KEY}&filter=tags.name eq 'R&D'"
    response = client.session.get(url, headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER})
    assert response.status_code == 400
    assert response.text == "Missing parameter value(s)"


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        ("name eq 'it''s'", "Cannot parse the expression: name eq 'it''s'"),
        ('name eq "x"', 'Cannot parse the expression: name eq "x"'),
        ("()", "Invalid expression"),
    ],
)
def test_filter_errors_are_400_text(client: Client, expr: str, text: str) -> None:
    response = client.get("/qrs/reloadtask/full", {"filter": expr})
    assert response.status_code == 400
    assert response.text == text


def test_lists_counts_and_single_objects(client: Client) -> None:
    condensed = client.json("/qrs/reloadtask", {"filter": "tags.name eq 'DAILY'"})
    assert [t["id"] for t in condensed] == [OK, FAIL, OFF]
    assert "tags" not in condensed[0] and condensed[0]["privileges"] is None
    assert client.json("/qrs/reloadtask/count", {"filter": "tags.name eq 'daily'"}) == {"value": 3}
    assert client.json("/qrs/reloadtask/count") == {"value": 5}
    assert client.json("/qrs/externalprogramtask/count") == {"value": 1}
    ordered = client.json("/qrs/task/full", {"orderby": "name desc"})
    assert [t["name"] for t in ordered][:2] == ["Run export", "Reload special"]
    one = client.json(f"/qrs/reloadtask/{OK.upper()}")
    assert one["id"] == OK and one["schemaPath"] == "ReloadTask"
    external = client.json(f"/qrs/externalprogramtask/{EXTERNAL}")
    assert external["schemaPath"] == "ExternalProgramTask"
    assert client.get(f"/qrs/reloadtask/{MISSING}").status_code == 404
    assert client.get(f"/qrs/reloadtask/{MISSING}").text == ""
    assert client.get("/qrs/reloadtask/not-a-guid").status_code == 400
    # Paths are case-insensitive, as on QRS.
    assert client.json("/qrs/ReloadTask/Full", {"filter": f"id eq {OK}"})[0]["id"] == OK


def test_tags_and_custom_property_definitions(client: Client) -> None:
    tags = client.json("/qrs/tag/full", {"filter": "name eq 'daily'"})
    assert len(tags) == 1 and tags[0]["schemaPath"] == "Tag"
    assert client.json("/qrs/custompropertydefinition/full") == []


# --- starting and tracking -------------------------------------------------------------------------


def test_synchronous_start_runs_to_finished_success(client: Client) -> None:
    response = client.post(f"/qrs/task/{OK}/start/synchronous")
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    session = response.json()["value"]
    assert session != EMPTY
    running = client.json(f"/qrs/executionsession/{session}")
    assert running["id"] == session and running["executionResult"]["status"] in (1, 2)
    listed = client.json("/qrs/executionsession", {"filter": f"id eq {session}"})
    assert [s["id"] for s in listed] == [session]
    result = client.wait_finished(session)
    assert result["status"] == 7 and result["taskID"] == OK and result["duration"] > 0
    assert client.get(f"/qrs/executionsession/{session}").status_code == 404
    assert client.json("/qrs/executionsession", {"filter": f"id eq {session}"}) == []
    task = client.json(f"/qrs/reloadtask/{OK}")
    assert task["operational"]["lastExecutionResult"]["status"] == 7
    assert [(s.task_id, s.execution_id) for s in client.sim.starts] == [(OK, session)]


def test_failing_task_finishes_fail(client: Client) -> None:
    session = client.post(f"/qrs/task/{FAIL}/start/synchronous").json()["value"]
    assert client.wait_finished(session)["status"] == 8


def test_executionresult_by_several_execution_ids(client: Client) -> None:
    sessions = [
        client.post(f"/qrs/task/{task}/start/synchronous").json()["value"]
        for task in (OK, FAIL, SPECIAL)
    ]
    expr = " or ".join(f"executionID eq {s}" for s in sessions[:2])
    condensed = client.json("/qrs/executionresult", {"filter": expr})
    assert len(condensed) == 2 and "taskID" not in condensed[0]
    full = client.json(
        "/qrs/executionresult/full", {"filter": expr.upper().replace(" OR ", " or ")}
    )
    assert sorted(r["taskID"] for r in full) == sorted([OK, FAIL])


def test_disabled_task_returns_the_empty_guid(client: Client) -> None:
    response = client.post(f"/qrs/task/{OFF}/start/synchronous")
    assert response.status_code == 201 and response.json() == {"value": EMPTY}
    assert client.post(f"/qrs/task/{OFF}/start").status_code == 204
    assert client.sim.starts == []


def test_asynchronous_starts(client: Client) -> None:
    response = client.post(f"/qrs/task/{OK}/start")
    assert response.status_code == 204 and response.content == b""
    response = client.post("/qrs/task/start/many", json=[FAIL, EXTERNAL, MISSING, "junk"])
    assert response.status_code == 204
    assert sorted(s.task_id for s in client.sim.starts) == sorted([OK, FAIL, EXTERNAL])


def test_start_by_name(client: Client) -> None:
    assert client.post("/qrs/task/start", {"name": "reload ok"}).status_code == 204
    response = client.post("/qrs/task/start/synchronous", {"name": "Run export"})
    assert response.status_code == 201
    assert client.sim.starts[-1].execution_id == response.json()["value"]
    response = client.post("/qrs/task/start/synchronous", {"name": "No such task"})
    assert response.status_code == 400
    assert response.text == "Cannot find a task with the following name: No such task"


def test_bad_start_ids(client: Client) -> None:
    assert client.post(f"/qrs/task/{MISSING}/start").status_code == 404
    assert client.post(f"/qrs/task/{MISSING}/start/synchronous").status_code == 404
    assert client.post("/qrs/task/not-a-guid/start/synchronous").status_code == 400
    assert client.sim.starts == []


def test_already_running_task_is_not_started_again(client: Client) -> None:
    first = client.post(f"/qrs/task/{OK}/start/synchronous").json()["value"]
    second = client.post(f"/qrs/task/{OK}/start/synchronous").json()["value"]
    assert client.post(f"/qrs/task/{OK}/start").status_code == 204
    assert second == first and len(client.sim.starts) == 1
    client.sim.already_running = "409"
    response = client.post(f"/qrs/task/{OK}/start/synchronous")
    assert (response.status_code, response.text) == (409, "Conflict")
    assert len(client.sim.starts) == 1


# --- the scheduler (on the simulator's clock, moved by the test) -----------------------------------

QUEUE = [f"a1000000-0000-4000-8000-0000000001{i:02d}" for i in range(4)]


@pytest.fixture
def clock(sim: QrsSimulator) -> FakeClock:
    """The simulator's clock, frozen until the test moves it; four tasks of 10, 4, 2 and 5 s."""
    fake = FakeClock()
    sim.store.clock = fake
    sim.store.start_delay = 1.0
    sim.store.retry_delay = 0.5
    for i, (task_id, run) in enumerate(zip(QUEUE, (10, 4, 2, 5), strict=True)):
        sim.store.add_task(SimTask(task_id, f"Queue {i}", tags=["queue"], run_seconds=run))
    return fake


def start(client: Client, task_id: str) -> str:
    response = client.post(f"/qrs/task/{task_id}/start/synchronous")
    assert response.status_code == 201, response.text
    session: str = response.json()["value"]
    return session


def queue_statuses(client: Client) -> list[int]:
    tasks = client.json("/qrs/reloadtask/full", {"filter": "tags.name eq 'queue'", "orderby": "name"})
    return [t["operational"]["lastExecutionResult"]["status"] for t in tasks]


def rows(client: Client, session: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.json("/qrs/executionresult/full", {"filter": f"executionID eq {session}"})
    return found


def test_max_concurrent_queues_and_starts_in_trigger_order(client: Client, clock: FakeClock) -> None:
    client.sim.max_concurrent = 2
    sessions = [start(client, t) for t in QUEUE]
    assert len(set(sessions)) == 4 and len(client.sim.starts) == 4
    clock.at(1.5)
    assert queue_statuses(client) == [2, 2, 3, 3]
    (queued,) = rows(client, sessions[2])
    assert queued["status"] == 3 and queued["startTime"] == "1753-01-01T00:00:00.000Z"
    assert "Changing task state from Triggered to Queued" in [d["message"] for d in queued["details"]]
    session = client.json(f"/qrs/executionsession/{sessions[3]}")
    assert session["executionResult"]["status"] == 3
    clock.at(5.5)  # the 4 s task ended at 5: the first queued one took its slot
    assert queue_statuses(client) == [2, 7, 2, 3]
    clock.at(7.5)  # the 2 s task ended at 7, before the 10 s one: the last one started then
    assert queue_statuses(client) == [2, 7, 7, 2]
    third, fourth = rows(client, sessions[2])[0], rows(client, sessions[3])[0]
    assert third["startTime"] < fourth["startTime"]
    clock.at(13)
    assert queue_statuses(client) == [7, 7, 7, 7]
    assert client.json("/qrs/executionsession") == []


def test_queue_timeout_aborts_a_queued_execution(client: Client, clock: FakeClock) -> None:
    client.sim.max_concurrent = 1
    client.sim.queue_timeout = 2
    start(client, QUEUE[0])
    waiting = start(client, QUEUE[1])
    clock.at(2.5)
    assert queue_statuses(client)[:2] == [2, 3]
    clock.at(3.5)  # Queued since 1, cancelled at 3
    assert client.get(f"/qrs/executionsession/{waiting}").status_code == 404
    (row,) = rows(client, waiting)
    assert row["status"] == 6 and row["startTime"] == "1753-01-01T00:00:00.000Z"
    assert any("queue timeout" in d["message"] for d in row["details"])
    assert queue_statuses(client)[:2] == [2, 6]


@pytest.mark.parametrize("mode", ["same", "409"])
def test_a_queued_task_is_not_started_twice(client: Client, clock: FakeClock, mode: str) -> None:
    client.sim.max_concurrent = 1
    client.sim.already_running = mode
    start(client, QUEUE[0])
    queued = start(client, QUEUE[1])
    clock.at(2)
    assert queue_statuses(client)[:2] == [2, 3]
    again = client.post(f"/qrs/task/{QUEUE[1]}/start/synchronous")
    if mode == "same":
        assert again.status_code == 201 and again.json()["value"] == queued
        assert client.post(f"/qrs/task/{QUEUE[1]}/start").status_code == 204
    else:
        assert (again.status_code, again.text) == (409, "Conflict")
    assert client.post("/qrs/task/start/many", json=[QUEUE[1]]).status_code == 204
    assert [s.execution_id for s in client.sim.starts][1:] == [queued]
    assert len(rows(client, queued)) == 1


def test_fail_first_and_max_retries_over_https(client: Client, clock: FakeClock) -> None:
    flaky = client.sim.store.task(QUEUE[3])
    assert flaky is not None
    flaky.fail_first, flaky.max_retries, flaky.run_seconds = 2, 1, 2
    client.sim.store.replace_task(flaky)
    assert client.json(f"/qrs/reloadtask/{QUEUE[3]}")["maxRetries"] == 1
    session = start(client, QUEUE[3])  # attempt 1 runs 1-3, Retry until 3.5, attempt 2 3.5-5.5
    clock.at(3.2)
    assert client.json(f"/qrs/executionsession/{session}")["executionResult"]["status"] == 10
    clock.at(4)
    assert [r["status"] for r in rows(client, session)] == [8, 2]
    clock.at(6)
    assert [r["status"] for r in rows(client, session)] == [8, 8]  # both runs within fail_first
    assert client.get(f"/qrs/executionsession/{session}").status_code == 404
    session = start(client, QUEUE[3])  # run 3: succeeds at the first attempt
    clock.at(10)
    assert [r["status"] for r in rows(client, session)] == [7]


# --- observation and knobs -------------------------------------------------------------------------


def test_request_log(client: Client) -> None:
    client.get("/qrs/reloadtask/full", {"Filter": "name eq 'a+b'"})
    client.get("/qrs/about", key=None)
    first, second = client.sim.request_log
    assert (first.method, first.path, first.status) == ("GET", "/qrs/reloadtask/full", 200)
    assert first.query == {"filter": "name eq 'a+b'", "xrfkey": KEY}
    assert (second.path, second.status) == ("/qrs/about", 403)
    assert first.at <= second.at
    client.sim.clear_log()
    assert client.sim.request_log == []


def test_plus_in_the_raw_query_decodes_as_space(client: Client) -> None:
    url = f"{client.sim.base_url}/qrs/reloadtask/full?xrfkey={KEY}&filter=name+eq+%27Reload+ok%27"
    response = client.session.get(url, headers={"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER})
    assert [t["id"] for t in response.json()] == [OK]
    assert client.sim.request_log[-1].query["filter"] == "name eq 'Reload ok'"


def test_latency(client: Client) -> None:
    client.sim.latency_ms = 300
    started = time.monotonic()
    assert client.get("/qrs/about").status_code == 200
    assert time.monotonic() - started >= 0.3
    client.sim.latency_ms = 0


def test_error500_fault_limited_to_paths(client: Client) -> None:
    client.sim.fault = "error500"
    client.sim.fault_paths = r"/start"
    assert client.get("/qrs/about").status_code == 200
    response = client.post(f"/qrs/task/{OK}/start/synchronous")
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert client.sim.starts == []
    client.sim.fault_paths = None
    assert client.get("/qrs/about").status_code == 500
    client.sim.fault = None
    assert client.get("/qrs/about").status_code == 200


def test_outage_fault_drops_connections_without_answer(client: Client) -> None:
    client.sim.fault = "outage"
    with pytest.raises(requests.exceptions.ConnectionError):
        client.post(f"/qrs/task/{OK}/start/synchronous")
    assert client.sim.starts == []
    assert [(r.path, r.status) for r in client.sim.request_log] == [
        (f"/qrs/task/{OK}/start/synchronous", 0)
    ]
    client.sim.fault = None
    assert client.get("/qrs/about").status_code == 200


def test_fail_starts_for(client: Client) -> None:
    client.sim.fail_starts_for = {FAIL.upper()}
    response = client.post(f"/qrs/task/{FAIL}/start/synchronous")
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert client.post("/qrs/task/start/many", json=[OK, FAIL]).status_code == 500
    assert client.post(f"/qrs/task/{OK}/start").status_code == 204
    assert [s.task_id for s in client.sim.starts] == [OK]


def test_stopped_simulator_refuses_connections(certs_dir: Path) -> None:
    sim = QrsSimulator(TASKS, certs_dir=certs_dir).start()
    client = Client(sim)
    assert client.get("/qrs/about").status_code == 200  # leaves a pooled keep-alive connection
    sim.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        client.get("/qrs/about")
    with pytest.raises(requests.exceptions.ConnectionError):
        fresh = requests.Session()  # a new connection: the port itself refuses
        fresh.trust_env = False
        fresh.get(client.base_url + "/qrs/about", verify=False, timeout=5)


def test_stop_during_latency_answers_nothing_and_starts_nothing(certs_dir: Path) -> None:
    sim = QrsSimulator(TASKS, certs_dir=certs_dir, latency_ms=5000).start()
    client = Client(sim)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            client.post(f"/qrs/task/{OK}/start/synchronous")
        except requests.exceptions.ConnectionError as error:
            errors.append(error)

    caller = threading.Thread(target=start)
    caller.start()
    deadline = time.monotonic() + 5
    while not sim._server or not sim._server._open:  # wait until the request is in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    sim.stop()
    caller.join(10)
    assert len(errors) == 1
    assert sim.starts == []
