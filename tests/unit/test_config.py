"""Config: YAML + environment, errors that name the key."""

from pathlib import Path

import pytest

from butler_mqtt.config import load_config
from butler_mqtt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_with_contract_defaults():
    cfg = load_config(REPO / "etc" / "butler.yaml", environ={})
    assert cfg.mqtt.topics.start == "qliksense/task/start"
    assert cfg.mqtt.protocol == "5"
    assert cfg.qrs.port == 4242 and cfg.qrs.verify is True
    assert cfg.tracking.poll_interval == 5
    assert cfg.cpu_scheduling == "batch"
    assert load_config(None, environ={"BUTLER_MQTT__CPU_SCHEDULING": "normal"}).cpu_scheduling == "normal"


def test_environment_overrides_nested_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mqtt:\n  port: 1883\n")
    env = {
        "BUTLER_MQTT__MQTT__PORT": "2883",
        "BUTLER_MQTT__MQTT__PASSWORD": "12345",
        "BUTLER_MQTT__MQTT__TLS__ENABLED": "true",
        "BUTLER_MQTT__QRS__HOST": "sense.example",
        "BUTLER_MQTT__MQTT__PROTOCOL": "3.1.1",
    }
    cfg = load_config(f, environ=env)
    assert cfg.mqtt.port == 2883
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "12345"
    assert cfg.mqtt.tls.enabled is True
    assert cfg.qrs.host == "sense.example"
    assert cfg.mqtt.protocol == "3.1.1"


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("mqtt:\n  prot: 5\n", "mqtt.prot"),
        ("mqtt:\n  port: abc\n", "mqtt.port"),
        ("qrs:\n  start_concurrency: 0\n", "qrs.start_concurrency"),
        ("start_filter:\n  allow:\n    task_ids: [nope]\n", "start_filter.allow.task_ids"),
        ("bogus: 1\n", "bogus"),
        ("mqtt:\n  protocol: 4\n", "mqtt.protocol"),
        ("cpu_scheduling: realtime\n", "cpu_scheduling"),
        ("cpu_scheduling: [batch]\n", "cpu_scheduling"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, key):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert info.value.key == key


def test_unknown_env_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"BUTLER_MQTT__QRS__HOSTNAME": "x"})
    assert info.value.key == "qrs.hostname"


def test_missing_certificate_file_names_the_key(tmp_path):
    cfg = load_config(None, environ={"BUTLER_MQTT__QRS__CERT": str(tmp_path / "nope.pem")})
    with pytest.raises(ConfigError) as info:
        cfg.check_qrs_files()
    assert info.value.key == "qrs.cert"


def test_secrets_are_redacted():
    cfg = load_config(None, environ={"BUTLER_MQTT__MQTT__PASSWORD": "hunter2", "BUTLER_MQTT__HTTP__TOKEN": "tok"})
    text = str(cfg.redacted()) + repr(cfg)
    assert "hunter2" not in text and "tok'" not in text


def test_systemd_credentials_override(tmp_path):
    (tmp_path / "mqtt_password").write_text("fromcred\n")
    (tmp_path / "qrs_client.pem").write_text("x")
    cfg = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "fromcred"
    assert cfg.qrs.cert == tmp_path / "qrs_client.pem"
