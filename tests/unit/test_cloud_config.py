"""`backend` and the `cloud` section (contract section 9): secrets from the environment or systemd
credentials, never in the redacted settings; a value that cannot work names its cloud.* key."""

from __future__ import annotations

from pathlib import Path

import pytest

from butler_mqtt import runtime
from butler_mqtt.config import load_config
from butler_mqtt.errors import ConfigError, RequestRejected
from butler_mqtt.model import validate_request
from butler_mqtt.selection import check_for_backend

TENANT = "https://acme.eu.qlikcloud.com"


def test_the_client_secret_comes_from_the_environment_and_is_never_shown(tmp_path: Path) -> None:
    env = {"BUTLER_MQTT__BACKEND": "cloud", "BUTLER_MQTT__CLOUD__TENANT": TENANT,
           "BUTLER_MQTT__CLOUD__CLIENT_ID": "12345", "BUTLER_MQTT__CLOUD__CLIENT_SECRET": "123456789"}
    cfg = load_config(None, env, missing_ok=True)
    assert cfg.cloud.client_secret is not None and cfg.cloud.client_secret.get_secret_value() == "123456789"
    assert cfg.cloud.client_id == "12345"  # an id that looks like a number stays text
    assert "123456789" not in str(cfg.redacted()) and "123456789" in cfg.secret_values()
    assert cfg.source("cloud.client_secret") == "environment variable BUTLER_MQTT__CLOUD__CLIENT_SECRET"
    assert runtime.cloud_settings(cfg).client_secret == "123456789"


def test_systemd_credentials_hold_the_cloud_secrets(tmp_path: Path) -> None:
    (tmp_path / "cloud_api_key").write_text("key-from-systemd\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "BUTLER_MQTT__BACKEND": "cloud", "BUTLER_MQTT__CLOUD__TENANT": TENANT}
    cfg = load_config(None, env, missing_ok=True)
    assert runtime.cloud_settings(cfg).api_key == "key-from-systemd"
    assert cfg.source("cloud.api_key").startswith("systemd credential")


@pytest.mark.parametrize(
    ("cloud", "key"),
    [
        ({}, "cloud.tenant"),
        ({"tenant": "http://acme.eu.qlikcloud.com", "api_key": "k"}, "cloud.tenant"),
        ({"tenant": TENANT}, "cloud.client_id"),
        ({"tenant": TENANT, "client_id": "a", "client_secret": "b", "api_key": "c"}, "cloud.api_key"),
        ({"tenant": TENANT, "client_id": "a"}, "cloud.client_secret"),
        ({"tenant": TENANT, "api_key": "k", "proxy": "socks5://p:1"}, "cloud.proxy"),
        ({"tenant": TENANT, "api_key": "k", "ca": "/nonexistent/ca.pem"}, "cloud.ca"),
    ],
)
def test_a_cloud_value_that_cannot_work_names_its_key(tmp_path: Path, cloud: dict[str, str], key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("backend: cloud\ncloud:\n" + ("".join(f"  {k}: {v!r}\n" for k, v in cloud.items()) or "  timeout: 30\n"))
    cfg = load_config(path)
    with pytest.raises(ConfigError) as caught:
        runtime.preflight(cfg)
    assert caught.value.key == key
    assert "b" not in {caught.value.reason} and "'c'" not in str(caught.value)


def test_with_backend_cloud_the_qrs_certificates_are_not_needed(tmp_path: Path) -> None:
    env = {"BUTLER_MQTT__BACKEND": "cloud", "BUTLER_MQTT__CLOUD__TENANT": TENANT, "BUTLER_MQTT__CLOUD__API_KEY": "k" * 9,
           "BUTLER_MQTT__QRS__CERT": str(tmp_path / "missing.pem")}
    runtime.preflight(load_config(None, env, missing_ok=True))  # no ConfigError for qrs.cert


@pytest.mark.parametrize(
    ("backend", "body", "word"),
    [
        ("cloud", {"taskId": "a8b4c123-def4-5678-9abc-def012345678"}, "'appId'"),
        ("cloud", {"customProperty": [{"name": "a", "value": "b"}]}, "custom properties"),
        ("qrs", {"space": "Finance"}, "backend: cloud"),
        ("qrs", {"tag": "t", "partial": False}, "backend: cloud"),
        ("qrs", {"tag": "t", "then": {"tag": "u", "variables": {"a": "b"}}}, "'variables'"),
    ],
)
def test_selectors_and_options_of_the_other_backend_are_refused(backend: str, body: dict, word: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        check_for_backend(validate_request(body), backend)
    assert word in caught.value.details


def test_app_ids_are_guids_and_variables_are_bounded() -> None:
    with pytest.raises(RequestRejected) as caught:
        validate_request({"appId": ["not-a-guid"]})
    assert caught.value.error == "Invalid app ID format"
    with pytest.raises(RequestRejected):
        validate_request({"appId": "a8b4c123-def4-5678-9abc-def012345678", "variables": {f"v{i}": "x" for i in range(21)}})
    with pytest.raises(RequestRejected):
        validate_request({"appId": "a8b4c123-def4-5678-9abc-def012345678", "variables": {"v": "x" * 257}})
    req = validate_request({"appId": "A8B4C123-DEF4-5678-9ABC-DEF012345678", "space": "Finance & Ops"})
    assert req.appId == ["a8b4c123-def4-5678-9abc-def012345678"] and req.space == ["Finance & Ops"]
    check_for_backend(req, "cloud")


def test_proxy_credentials_are_secret_values() -> None:
    env = {"BUTLER_MQTT__BACKEND": "cloud", "BUTLER_MQTT__CLOUD__TENANT": TENANT, "BUTLER_MQTT__CLOUD__API_KEY": "k" * 9,
           "BUTLER_MQTT__CLOUD__PROXY": "http://alice:pr0xy-pw@proxy.corp:3128"}
    secrets = load_config(None, env, missing_ok=True).secret_values()
    assert "pr0xy-pw" in secrets and "alice:pr0xy-pw" in secrets and "k" * 9 in secrets


def test_on_the_wire_a_cloud_task_is_an_app() -> None:
    from butler_mqtt import replies
    from butler_mqtt.model import Match, TaskOutcome

    o = TaskOutcome("a8b4c123-def4-5678-9abc-def012345678", "Sales", "started", [Match("appId", "x")], execution_id="5be59decca62aa00097268a4")
    task = replies.task(o, "r1")
    summary = replies.summary("r1", [o], [{"appId": "a8b4c123-def4-5678-9abc-def012345679"}])
    assert replies.on_wire(task, "qrs") == task  # QRS: unchanged
    wired = replies.on_wire(task, "cloud")
    assert (wired["appId"], wired["appName"]) == (o.task_id, "Sales") and "taskId" not in wired and "taskName" not in wired
    listed = replies.on_wire(summary, "cloud")["tasksStarted"][0]
    assert listed["appId"] == o.task_id and "taskId" not in listed
    assert replies.on_wire(summary, "cloud")["tasksNotFound"] == summary["tasksNotFound"]
    error = replies.error("r1", "Invalid request", "x")
    assert replies.on_wire(error, "cloud") == error
