"""`butler-mqtt init --from-butler` (issue 16): Butler's config -> butler-mqtt's, pure parts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from butler_mqtt.butler_import import (
    ImportResult,
    convert,
    fill_template,
    load_butler,
    starter_template,
)
from butler_mqtt.config import Config, load_config
from butler_mqtt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "butler" / "production.yaml"
T1 = "11111111-1111-4111-8111-111111111111"


def production(tmp_path: Path, **subst: str) -> Path:
    text = FIXTURE.read_text()
    values = {"QRS_PORT": "4242", "BROKER_PORT": "1883", "REST_PORT": "8080", "CERTS": "/etc/butler/certs"} | subst
    for k, v in values.items():
        text = text.replace(f"__{k}__", v)
    p = tmp_path / "butler-production.yaml"
    p.write_text(text)
    return p


def doc(tmp_path: Path) -> dict[str, Any]:
    return load_butler(production(tmp_path))


def as_config(result: ImportResult, tmp_path: Path) -> Config:
    p = tmp_path / "imported.yaml"
    p.write_text(result.yaml_text)
    return load_config(p, environ={})


def keys(notes: list[Any]) -> list[str]:
    return [n.butler_key for n in notes]


def test_the_production_config_keeps_its_meaning(tmp_path):
    result = convert(doc(tmp_path))
    cfg = as_config(result, tmp_path)
    assert (cfg.qrs.host, cfg.qrs.port) == ("localhost", 4242)
    assert (cfg.qrs.user_directory, cfg.qrs.user_id) == ("Internal", "sa_repository")
    assert cfg.qrs.cert == Path("/etc/butler/certs/client.pem")
    assert cfg.qrs.key == Path("/etc/butler/certs/client_key.pem")
    assert cfg.qrs.ca == Path("/etc/butler/certs/root.pem")
    assert cfg.qrs.verify is False
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", 1883)
    assert cfg.mqtt.topics.start_plain == "qliksense/start_task"
    assert cfg.mqtt.topics.start == "qliksense/task/start"  # the JSON topic keeps its default
    assert cfg.http.enabled and (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8080)
    assert cfg.http.tls.cert == Path("/etc/butler/certs/http_cert.pem")
    assert cfg.http.tls.key == Path("/etc/butler/certs/http_key.pem")
    assert cfg.http.tls.client_ca is None  # Butler's tls.ca was a chain, not client authentication
    assert cfg.start_filter.enabled
    assert cfg.start_filter.allow.task_ids == [T1]  # 'not-a-task-id' dropped, reported
    assert cfg.start_filter.allow.tags == ["startTask1"]
    assert [(c.name, c.value) for c in cfg.start_filter.allow.custom_properties] == [("taskGroup", "tasks1")]
    assert cfg.logging.level == "debug"  # Butler's verbose
    # Everything else is the documented default.
    defaults = load_config(None, environ={})
    assert cfg.tracking == defaults.tracking and cfg.journal == defaults.journal and cfg.metrics == defaults.metrics
    assert cfg.mqtt.client_id == defaults.mqtt.client_id and cfg.mqtt.tls == defaults.mqtt.tls


def test_the_report_names_each_key(tmp_path):
    result = convert(doc(tmp_path))
    carried = {n.butler_key: n.target for n in result.carried}
    assert carried["Butler.configQRS.host"] == "qrs.host"
    assert carried["Butler.cert.clientCertKey"] == "qrs.key"
    assert carried["Butler.mqttConfig.taskStartTopic"] == "mqtt.topics.start_plain"
    assert carried["Butler.restServerConfig.serverPort"] == "http.port"
    assert carried["Butler.startTaskFilter.allowTask.customProperty"] == "start_filter.allow.custom_properties"
    changed = {n.butler_key: n for n in result.changed}
    assert changed["Butler.configQRS.rejectUnauthorized"].value is False
    assert "WARNING" in changed["Butler.configQRS.rejectUnauthorized"].why
    assert "not a task GUID" in changed["Butler.startTaskFilter.allowTask.taskId[1]"].why
    assert "MQTT starts as well" in changed["Butler.startTaskFilter"].why
    left = {n.butler_key: n.why for n in result.left_out}
    assert left["Butler.influxDb (22 keys)"] == "not about starting tasks"
    assert "key-value store" in left["Butler.restServerEndpointsEnable.keyValueStore"]
    assert "chain" in left["Butler.restServerConfig.tls.ca"]
    assert "one port" in left["Butler.restServerConfig.backgroundServerPort"]
    assert "engine" in left["Butler.configEngine (6 keys)"]
    text = result.report()
    for title in ("Carried over, same meaning:", "Set differently, and why:", "Left out, and why:"):
        assert title in text
    assert "Butler.mqttConfig.taskFailureTopic" in text and "smtp-secret" not in text


def _leaves(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    return [prefix]


VARIANTS = {
    "as is": lambda b: None,
    "mqtt off": lambda b: b["mqttConfig"].update(enable=False),
    "rest off": lambda b: b["restServerConfig"].update(enable=False),
    "start endpoint off": lambda b: b["restServerEndpointsEnable"].update(senseStartTask=False),
    "tls off": lambda b: b["restServerConfig"]["tls"].update(enable=False),
    "event grid": lambda b: b["mqttConfig"]["azureEventGrid"].update(enable=True, clientId="c", clientCertFile="/c.pem",
                                                                      clientKeyFile="/k.pem"),
    "filter off, empty": lambda b: b.update(startTaskFilter={"enable": False, "allowTask": {"taskId": None, "tag": None,
                                                                                           "customProperty": None}}),
    "plain http qrs": lambda b: b["configQRS"].update(useSSL=False, authentication="header"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_butler_key_is_accounted_for_exactly_once(tmp_path, variant):
    """Each leaf of Butler's file is carried, changed or left out: none is silently dropped,
    and no left-out line covers a key that was used."""
    data = doc(tmp_path)
    VARIANTS[variant](data["Butler"])
    result = convert(data)
    def is_section(key: str) -> bool:  # a general note about a whole section covers no key
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return isinstance(node, dict)

    used = [k for k in (n.butler_key.split("[")[0] for n in result.carried + result.changed) if not is_section(k)]
    left = [n.butler_key.split(" (")[0] for n in result.left_out]
    for leaf in _leaves(data["Butler"], "Butler"):
        by_use = any(leaf == u or leaf.startswith(u + ".") for u in used)
        by_left = [x for x in left if leaf == x or leaf.startswith(x + ".")]
        assert by_use or by_left, leaf
        assert len(by_left) <= 1 and not (by_use and by_left and leaf in used), leaf


def test_comments_and_layout_of_the_starter_are_kept(tmp_path):
    template = starter_template()
    text = convert(doc(tmp_path)).yaml_text
    out_lines = text.splitlines()
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            assert line in out_lines, line
        elif "#" in line and "verify: true" not in line:  # every trailing comment but the replaced one
            comment = line[line.index("#"):]
            assert any(o.endswith(comment) for o in out_lines), comment
    assert text.startswith("# Imported from a Butler configuration by `butler-mqtt init --from-butler`.")


def test_reject_unauthorized_false_is_an_explicit_verify_false_with_a_warning(tmp_path):
    text = convert(doc(tmp_path)).yaml_text
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip().startswith("verify: false"))
    assert "WARNING" in lines[at] and lines[at].startswith("  verify: false")
    assert lines[at - 3].strip().startswith("# WARNING: imported from Butler's configQRS.rejectUnauthorized: false")
    data = doc(tmp_path)
    data["Butler"]["configQRS"]["rejectUnauthorized"] = True
    result = convert(data)
    assert as_config(result, tmp_path).qrs.verify is True and "WARNING" not in result.yaml_text
    assert "Butler.configQRS.rejectUnauthorized" in keys(result.carried)


def test_butler_template_placeholders_and_relative_paths(tmp_path):
    data = doc(tmp_path)
    data["Butler"]["cert"] = {"clientCert": "<path/to/cert/client.pem>", "clientCertKey": "config/certs/client_key.pem",
                              "clientCertCA": "C:\\Qlik\\certs\\root.pem"}
    result = convert(data)
    cfg = as_config(result, tmp_path)
    assert cfg.qrs.cert == Path("certs/client.pem")  # the default: Butler still had the placeholder
    assert cfg.qrs.key == Path("config/certs/client_key.pem")
    assert str(cfg.qrs.ca) == "C:\\Qlik\\certs\\root.pem"  # a Windows path survives the quoting
    changed = {n.butler_key: n.why for n in result.changed}
    assert "placeholder" in changed["Butler.cert.clientCert"]
    assert "relative" in changed["Butler.cert.clientCertKey"]
    assert "Butler.cert.clientCertCA" in keys(result.carried)


def test_mqtt_off_in_butler_turns_the_plain_topic_off(tmp_path):
    data = doc(tmp_path)
    data["Butler"]["mqttConfig"]["enable"] = False
    result = convert(data)
    cfg = as_config(result, tmp_path)
    assert cfg.mqtt.topics.start_plain is None and cfg.mqtt.host == "127.0.0.1"
    assert "MQTT was off" in {n.butler_key: n.why for n in result.changed}["Butler.mqttConfig.enable"]


def test_start_topic_outside_the_subscription_root_is_noted(tmp_path):
    data = doc(tmp_path)
    data["Butler"]["mqttConfig"]["taskStartTopic"] = "erp/start"
    result = convert(data)
    note = {n.butler_key: n for n in result.carried}["Butler.mqttConfig.taskStartTopic"]
    assert note.value == "erp/start" and "never received it" in note.why


@pytest.mark.parametrize(("api", "endpoint", "key"), [
    (False, True, "Butler.restServerConfig.enable"),
    (True, False, "Butler.restServerEndpointsEnable.senseStartTask"),
])
def test_rest_off_in_butler_stays_off(tmp_path, api, endpoint, key):
    data = doc(tmp_path)
    data["Butler"]["restServerConfig"]["enable"] = api
    data["Butler"]["restServerEndpointsEnable"]["senseStartTask"] = endpoint
    result = convert(data)
    cfg = as_config(result, tmp_path)
    assert not cfg.http.enabled and cfg.http.port == 8081 and cfg.http.tls.cert is None
    changed = {n.butler_key: n for n in result.changed}
    assert changed[key].target == "http.enabled" and changed[key].value is False
    assert "not carried" in changed["Butler.restServerConfig.serverPort"].why


def test_rest_without_tls_beyond_loopback_warns_about_authentication(tmp_path):
    data = doc(tmp_path)
    data["Butler"]["restServerConfig"].update(serverHost="0.0.0.0", tls={"enable": False, "cert": "x", "key": "y", "ca": None})
    result = convert(data)
    cfg = as_config(result, tmp_path)
    assert cfg.http.host == "0.0.0.0" and cfg.http.tls.cert is None
    why = {n.butler_key: n.why for n in result.changed}["Butler.restServerConfig"]
    assert "no authentication" in why and "http.token" in why and "HTTPS" in why


def test_azure_event_grid_becomes_mqtt_tls_with_the_client_id(tmp_path):
    data = doc(tmp_path)
    data["Butler"]["mqttConfig"]["brokerPort"] = 8883
    data["Butler"]["mqttConfig"]["azureEventGrid"] = {"enable": True, "clientId": "butler-prod",
                                                      "clientCertFile": "/etc/eg/client.pem", "clientKeyFile": "/etc/eg/client.key"}
    cfg = as_config(convert(data), tmp_path)
    assert cfg.mqtt.tls.enabled and cfg.mqtt.tls.verify and cfg.mqtt.tls.ca is None
    assert (cfg.mqtt.tls.cert, cfg.mqtt.tls.key) == (Path("/etc/eg/client.pem"), Path("/etc/eg/client.key"))
    assert cfg.mqtt.client_id == "butler-prod" and cfg.mqtt.username == "butler-prod" and cfg.mqtt.port == 8883


def test_empty_allow_lists_and_a_minimal_file(tmp_path):
    result = convert({"Butler": {"startTaskFilter": {"enable": False, "allowTask": {"taskId": None, "tag": None,
                                                                                    "customProperty": None}}}})
    cfg = as_config(result, tmp_path)
    assert not cfg.start_filter.enabled and cfg.start_filter.allow.task_ids == []
    assert cfg.qrs == load_config(None, environ={}).qrs
    assert "Butler.configQRS.headers.static" in keys(result.changed)  # no X-Qlik-User: defaults kept, said so


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda b: b["configQRS"].update(port="abc"), "Butler.configQRS.port", "port number"),
        (lambda b: b["configQRS"].update(port=70000), "Butler.configQRS.port", "port number"),
        (lambda b: b["mqttConfig"].update(enable="sometimes"), "Butler.mqttConfig.enable", "true or false"),
        (lambda b: b["configQRS"]["headers"]["static"][0].update(value="sa_repository"),
         "Butler.configQRS.headers.static[0].value", "UserDirectory="),
        (lambda b: b["configQRS"]["headers"].update(static=["X-Qlik-User"]), "Butler.configQRS.headers.static[0]", "name"),
        (lambda b: b["startTaskFilter"]["allowTask"].update(customProperty=[{"name": "taskGroup"}]),
         "Butler.startTaskFilter.allowTask.customProperty[0]", "name: ..., value"),
        (lambda b: b["startTaskFilter"]["allowTask"].update(tag="startTask1"), "Butler.startTaskFilter.allowTask.tag", "a list"),
        (lambda b: b.update(configQRS="qlik.example.com"), "Butler.configQRS", "a mapping"),
        (lambda b: b.update(logLevel="loud"), "Butler.logLevel", "unknown log level"),
        (lambda b: b["restServerConfig"]["tls"].update(cert=None), "Butler.restServerConfig.tls.cert", "required"),
        (lambda b: b["mqttConfig"].update(brokerHost=["a"]), "Butler.mqttConfig.brokerHost", "expected text"),
    ],
)
def test_a_bad_butler_value_is_an_error_naming_the_butler_key(tmp_path, mutate, key, words):
    data = copy.deepcopy(doc(tmp_path))
    mutate(data["Butler"])
    with pytest.raises(ConfigError) as err:
        convert(data)
    assert err.value.key == key and words in err.value.reason, err.value


def test_files_that_are_not_butler_configs(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_butler(tmp_path / "missing.yaml")
    assert err.value.key == "--from-butler" and "file not found" in err.value.reason
    bad = tmp_path / "bad.yaml"
    bad.write_text("Butler:\n    configQRS:\n      host: a\n     port: 1\n")
    with pytest.raises(ConfigError) as err:
        load_butler(bad)
    assert err.value.key == str(bad) and "line 4" in err.value.reason
    ours = tmp_path / "ours.yaml"
    ours.write_text(starter_template())
    with pytest.raises(ConfigError) as err:
        convert(load_butler(ours))
    assert err.value.key == "Butler" and "not a Butler configuration" in err.value.reason
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError) as err:
        load_butler(tmp_path / "list.yaml")
    assert err.value.key == "Butler"


@pytest.mark.parametrize("value", ["C:\\certs\\client.pem", "a: b", "#x", "yes", "123", "null", "~", "it's", " x",
                                   "qliksense/#", "[x]", "-", "ünïcode", "@a", "%x"])
def test_fill_template_writes_values_that_read_back_exactly(value):
    template = "a:\n  b: x          # keep me\n  c: []    # list\nd: 1\n"
    text = fill_template(template, {"a.b": value, "a.c": [value, {"name": value, "value": "v"}], "d": 2})
    assert yaml.safe_load(text) == {"a": {"b": value, "c": [value, {"name": value, "value": "v"}]}, "d": 2}
    assert "# keep me" in text and "# list" in text


def test_fill_template_refuses_a_key_the_template_lacks():
    with pytest.raises(RuntimeError, match="no key a.z"):
        fill_template("a:\n  b: 1\n", {"a.z": 2})


def test_the_readme_mapping_table_names_real_keys_on_both_sides(tmp_path):
    """docs/moving-from-butler.md: each Butler key it names is one the import reads, each
    butler-mqtt key exists in the settings model."""
    import re

    page = (REPO / "docs" / "moving-from-butler.md").read_text()
    section = page[:page.index("What differs from Butler, and why:")]
    rows = [ln for ln in section.splitlines() if ln.strip().startswith("| `")]
    assert len(rows) >= 10
    result = convert(doc(tmp_path))
    read = " ".join(n.butler_key for n in result.carried + result.changed)
    dump = load_config(None, environ={}).model_dump()
    for row in rows:
        butler, ours = row.strip().strip("|").split("|")[:2]
        for key in re.findall(r"`(?:[a-zA-Z]+\.)?([a-zA-Z]+)(?:[:` ])", butler):
            assert key in read or key == "azureEventGrid", (key, row)
        for key in re.findall(r"`((?:qrs|mqtt|http|start_filter|logging)\.[a-z_.]+)", ours):
            node: Any = dump
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (key, row)
                node = node[part]
    assert "`POST` or `PUT` `/v4/reloadtask/start`" in (REPO / "docs" / "reference" / "rest-api.md").read_text()


def test_cli_init_writes_the_starter_or_the_import_and_never_overwrites(tmp_path, capsys):
    from butler_mqtt.cli import main

    plain = tmp_path / "new" / "butler.yaml"
    assert main(["init", str(plain)]) == 0
    assert plain.read_text() == starter_template()
    assert main(["init", str(plain)]) == 2
    assert "exists and is not overwritten" in capsys.readouterr().err
    imported = tmp_path / "imported.yaml"
    assert main(["init", "--from-butler", str(production(tmp_path)), str(imported)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {imported} from Butler's ") and "Left out, and why:" in out
    assert load_config(imported, environ={}).mqtt.topics.start_plain == "qliksense/start_task"
    before = imported.read_text()
    # an existing PATH is refused before Butler's file is even read
    assert main(["init", "--from-butler", str(tmp_path / "nope.yaml"), str(imported)]) == 2
    assert f"{imported}: exists" in capsys.readouterr().err and imported.read_text() == before
    assert main(["init", "--from-butler", str(tmp_path / "nope.yaml"), str(tmp_path / "x.yaml")]) == 2
    assert "--from-butler: file not found" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    bad = tmp_path / "bad-butler.yaml"
    bad.write_text("Butler:\n    configQRS:\n        port: qrs\n")
    assert main(["init", "--from-butler", str(bad), str(tmp_path / "y.yaml")]) == 2
    assert "Butler.configQRS.port: expected a port number" in capsys.readouterr().err
    assert not (tmp_path / "y.yaml").exists()
