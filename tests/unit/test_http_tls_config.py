"""`http.tls` settings (issue 16): validation naming the key, systemd credentials, and the
warnings about an exposed listener."""

from __future__ import annotations

from pathlib import Path

import pytest

from butler_mqtt.config import HttpConfig, load_config
from butler_mqtt.errors import ConfigError
from butler_mqtt.http.tls import is_loopback, listener_warnings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "butler.yaml"
    p.write_text(text)
    return p


def test_defaults_are_plain_http():
    cfg = load_config(None, environ={})
    assert cfg.http.tls.cert is None and cfg.http.tls.key is None and cfg.http.tls.client_ca is None
    assert not cfg.http.tls.enabled


@pytest.mark.parametrize(
    ("tls", "key", "words"),
    [
        ("{cert: a.pem}", "http.tls.key", "http.tls.key"),
        ("{key: a.pem}", "http.tls.key", "set both"),
        ("{client_ca: ca.pem}", "http.tls.client_ca", "need HTTPS"),
        ("{cert: a.pem, key: b.pem, ca: c.pem}", "http.tls.ca", "unknown key"),
    ],
)
def test_incomplete_tls_is_a_config_error_naming_the_key(tmp_path, tls, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"http:\n  tls: {tls}\n"), environ={})
    assert err.value.key == key and words in err.value.reason


def test_tls_from_file_and_environment(tmp_path):
    cfg = load_config(write(tmp_path, "http:\n  tls: {cert: c.pem, key: k.pem}\n"),
                      environ={"BUTLER_MQTT__HTTP__TLS__CLIENT_CA": "/etc/ca.pem"})
    assert cfg.http.tls.cert == Path("c.pem") and cfg.http.tls.key == Path("k.pem")
    assert cfg.http.tls.client_ca == Path("/etc/ca.pem") and cfg.http.tls.enabled


def test_systemd_credentials_replace_the_tls_files(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("http_cert.pem", "http_key.pem", "http_client_ca.pem"):
        (creds / name).write_text("x")
    cfg = load_config(write(tmp_path, "http:\n  tls: {cert: /nope/c.pem, key: /nope/k.pem}\n"),
                      environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.http.tls.cert == creds / "http_cert.pem"
    assert cfg.http.tls.key == creds / "http_key.pem"
    assert cfg.http.tls.client_ca == creds / "http_client_ca.pem"


def test_tls_files_are_checked_only_when_a_listener_is_served(tmp_path):
    qrs = tmp_path / "f.pem"
    qrs.write_text("x")
    base = {"qrs": {"cert": str(qrs), "key": str(qrs), "ca": str(qrs)},
            "http": {"tls": {"cert": str(tmp_path / "missing.pem"), "key": str(qrs)}}}
    from butler_mqtt.config import Config

    Config.model_validate(base).check_qrs_files()  # REST and metrics off: nothing to serve
    with pytest.raises(ConfigError) as err:
        Config.model_validate(base | {"metrics": {"port": 9100}}).check_qrs_files()
    assert err.value.key == "http.tls.cert" and "file not found" in err.value.reason


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "butler.example.com"))


@pytest.mark.parametrize(
    ("http", "events"),
    [
        ({"host": "127.0.0.1", "token": "t"}, []),
        ({"host": "127.0.0.1"}, []),
        ({"host": "0.0.0.0", "token": "t"}, ["http_token_in_clear"]),
        ({"host": "0.0.0.0", "token": "t", "tls": {"cert": "c", "key": "k"}}, []),
        ({"host": "0.0.0.0", "tls": {"cert": "c", "key": "k"}}, ["http_without_token"]),
        ({"host": "0.0.0.0"}, ["http_without_token"]),
        ({"host": "10.0.0.5", "tls": {"cert": "c", "key": "k", "client_ca": "ca"}}, []),
    ],
)
def test_listener_warnings(http, events):
    warned = listener_warnings(HttpConfig.model_validate({"enabled": True, **http}))
    assert [e for e, _ in warned] == events
    assert all(("http.tls" in d or "http.token" in d) for _, d in warned)
