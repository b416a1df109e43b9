"""Property-based runs against the live REST API: no input makes it answer 500, every answer
is JSON in a documented shape.

* schemathesis drives every operation of /openapi.json (positive and negative cases) and checks
  the answers against the document itself (status codes, content types, response schemas);
  failing with an install hint when schemathesis is missing.
* hypothesis throws arbitrary JSON, raw bytes, paths, methods and headers at the server.

One daemon serves the whole module (the simulator stays up, so 5xx would be a bug).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from butler_mqtt.sim import QrsSimulator, SimTask
from tests.conftest import RunningDaemon, make_config

T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
TASKS = [
    SimTask(T1, "Finance daily", tags=["daily-refresh"], custom_properties=[("taskGroup", "finance")], run_seconds=0.01),
    SimTask(T2, "Sales daily", tags=["daily-refresh"], run_seconds=0.01),
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a CI failure reproduces locally
)


@pytest.fixture(scope="module")
def base_url(qrs_certs: Path, broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sim = QrsSimulator(tasks=TASKS, certs_dir=qrs_certs).start()
    cfg = make_config(
        qrs_certs, sim.port, broker, tmp_path_factory.mktemp("fuzz-state"),
        http={"enabled": True, "port": 0, "max_body_bytes": 8192},
        logging={"level": "warning", "format": "console"},
    )
    daemon = RunningDaemon(cfg)
    try:
        yield f"http://127.0.0.1:{daemon.daemon.http_server.port}"
    finally:
        daemon.stop()
        sim.stop()


def assert_json_not_500(resp: requests.Response) -> None:
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.request.path_url.startswith("/metrics") and resp.status_code == 200:
        return
    assert resp.headers.get("content-type") == "application/json", resp.headers
    body = resp.json()
    if resp.status_code >= 400:
        assert set(body) == {"error", "details"}, body


# --------------------------------------------------------------------------- schemathesis


def test_schemathesis_finds_no_500_and_the_document_holds(base_url: str) -> None:
    try:
        import schemathesis
    except ImportError:
        pytest.fail("schemathesis is not installed: run scripts/setup (it is in the [test] extras)")
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")  # fails on an invalid document
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v4/reloadtask/{taskId}/start"),
        ("PUT", "/v4/reloadtask/{taskId}/start"),
        ("POST", "/v4/reloadtask/start"),
        ("PUT", "/v4/reloadtask/start"),
        ("GET", "/healthz"),
    }
    session = requests.Session()
    for op in operations:
        start_op = op.path.startswith("/v4/")
        # GET /healthz and /metrics take no input: nothing to negate, a few calls suffice.
        modes = list(schemathesis.GenerationMode) if start_op else [schemathesis.GenerationMode.POSITIVE]
        for mode in modes:
            # The bare form (/v4/reloadtask/start) is the same handler: fewer cases suffice.
            examples = (60 if "{taskId}" in op.path else 20) if start_op else 3

            @settings(FUZZ, max_examples=examples)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                case.call_and_validate(base_url=base_url, session=session, checks=checks)

            run()


# --------------------------------------------------------------------------- hypothesis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=15), inner, max_size=4),
    max_leaves=12,
)
# Bodies that look like what callers send, with the values anywhere in them.
keys = st.sampled_from(
    ["taskId", "tag", "customProperty", "allTaskIdsMustExist", "dryRun", "requestId", "wait", "then", "onFailure", "x"]
)
seedish = st.dictionaries(keys, json_values | st.just(T1) | st.just([T2]), max_size=5)
itemish = st.fixed_dictionaries(
    {"type": st.sampled_from(["starttaskid", "starttasktag", "starttaskcustomproperty", "keyvaluestore", "other"])},
    optional={"payload": st.dictionaries(st.sampled_from(["taskId", "tag", "customPropertyName", "customPropertyValue", "k"]),
                                         json_values | st.just(T1) | st.just("daily-refresh"), max_size=3)},
)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    seedish.map(lambda v: json.dumps(v).encode()),
    st.lists(itemish | json_values, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.just(b""),
)
path_ids = st.sampled_from(["-", T1, T1.upper(), "x", "%20", "..", "%00", "-%2F-"]) | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#"), min_size=1, max_size=40
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/problem+json", "", "application/json; charset=latin-1"]),
        "X-HTTP-Method-Override": st.sampled_from(["PUT", "POST", "DELETE", "GET", "", "put ", "x" * 30]),
        "Authorization": st.sampled_from(["Bearer x", "Basic", ""]),
    },
)
queries = st.dictionaries(st.sampled_from(["allTaskIdsMustExist", "dryRun", "x"]), st.sampled_from(["true", "false", "", "1", "yes"]), max_size=2)


@settings(FUZZ, max_examples=300)  # cheap (a few ms each): explore more
@given(
    method=st.sampled_from(["POST", "PUT", "GET", "DELETE", "PATCH"]),
    task_id=path_ids,
    body=bodies,
    headers=headers,
    query=queries,
)
def test_arbitrary_requests_never_get_a_500(base_url: str, method: str, task_id: str, body: bytes, headers: dict[str, str], query: dict[str, str]) -> None:
    url = f"{base_url}/v4/reloadtask/{requests.utils.quote(task_id, safe='-%')}/start"
    resp = requests.request(method, url, data=body, headers=headers, params=query, timeout=30)
    assert_json_not_500(resp)


@FUZZ
@given(path=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="?#"), max_size=40))
def test_arbitrary_paths_answer_json(base_url: str, path: str) -> None:
    resp = requests.get(f"{base_url}/{path}", timeout=30)
    if resp.request.path_url.startswith(("/docs", "/openapi.json", "/metrics")):
        assert resp.status_code < 500
        return
    assert_json_not_500(resp)
