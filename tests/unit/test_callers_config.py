"""The `callers` and `callers_only` keys (contract section 10): validated at load, every problem
naming the key and the entry, hostile topic levels refused before anything subscribes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from butler_mqtt.config import MAX_TOPIC_LEVEL, Config, load_config
from butler_mqtt.errors import ConfigError

H1 = hashlib.sha256(b"token-one").hexdigest()
H2 = hashlib.sha256(b"token-two").hexdigest()
GUID = "a8b4c123-def4-5678-9abc-def012345678"


def load(tmp_path: Path, data: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    return load_config(f, environ=environ or {})


def refused(tmp_path: Path, data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return info.value


def test_defaults_are_no_callers_and_not_callers_only():
    cfg = Config()
    assert cfg.callers == [] and cfg.callers_only is False
    assert cfg.mqtt.topics.stop == "qliksense/task/stop"


def test_a_full_caller_as_in_the_contract_loads(tmp_path):
    cfg = load(tmp_path, {"callers": [{
        "name": "erp", "topic": "erp", "tokens_sha256": [H1.upper()], "client_cert_cn": "erp.example.com",
        "allow": {"task_ids": [GUID.upper()], "tags": ["erp"], "custom_properties": [{"name": "sys", "value": "erp"}]},
        "requests_per_minute": 60,
    }], "callers_only": True})
    c = cfg.callers[0]
    assert (c.name, c.topic, c.client_cert_cn, c.requests_per_minute) == ("erp", "erp", "erp.example.com", 60)
    assert c.tokens_sha256 == [H1]  # normalised to lower case
    assert c.allow.task_ids == [GUID] and c.allow.tags == ["erp"]
    assert cfg.callers_only is True


def test_topic_defaults_to_the_name(tmp_path):
    cfg = load(tmp_path, {"callers": [{"name": "dwh-loader"}]})
    assert cfg.callers[0].topic == "dwh-loader"
    assert cfg.callers[0].allow.task_ids == [] and cfg.callers[0].requests_per_minute is None


def test_callers_from_the_environment(tmp_path):
    cfg = load(tmp_path, {}, {"BUTLER_MQTT__CALLERS": "[{name: erp, topic: e1}]", "BUTLER_MQTT__CALLERS_ONLY": "true"})
    assert cfg.callers[0].topic == "e1" and cfg.callers_only is True


@pytest.mark.parametrize("name", ["", "ERP", "erp system", "erp/x", "erp+", "é", "a" * 65, "erp\n", "$sys"])
def test_bad_names_are_refused_naming_the_entry(tmp_path, name):
    err = refused(tmp_path, {"callers": [{"name": "ok"}, {"name": name, "topic": "x"}]})
    assert err.key == "callers.1.name" and "a-z, 0-9" in err.reason
    assert err.source is not None and "line" in err.source


def test_a_name_that_is_not_a_string_is_refused(tmp_path):
    assert refused(tmp_path, {"callers": [{"name": 123}]}).key == "callers.0.name"


@pytest.mark.parametrize(
    "level, words",
    [
        ("", "empty"),
        ("+", "wildcard (+)"),
        ("erp+", "wildcard (+)"),
        ("#", "wildcard (#)"),
        ("a/b", "separator"),
        ("$SYS", "'$'"),
        ("e$rp", "'$'"),
        ("erp\x00", "control"),
        ("erp\x1b[2J", "control"),
        ("erp\u0085", "control"),
        ("x" * (MAX_TOPIC_LEVEL + 1), "at most"),
        ("x" * 1000, "at most"),
    ],
)
def test_hostile_topic_levels_are_refused_at_load(tmp_path, level, words):
    err = refused(tmp_path, {"callers": [{"name": "erp", "topic": level}]})
    assert err.key == "callers.0.topic" and words in err.reason, err


def test_a_lone_surrogate_topic_level_is_refused():
    with pytest.raises(ValueError, match="UTF-8"):
        Config.model_validate({"callers": [{"name": "erp", "topic": "erp\udc80"}]})


def test_the_longest_topic_level_and_unicode_are_fine(tmp_path):
    cfg = load(tmp_path, {"callers": [{"name": "a", "topic": "x" * MAX_TOPIC_LEVEL}, {"name": "b", "topic": "lager-ö"}]})
    assert [c.topic for c in cfg.callers] == ["x" * MAX_TOPIC_LEVEL, "lager-ö"]


@pytest.mark.parametrize(
    "callers, words",
    [
        ([{"name": "erp"}, {"name": "erp", "topic": "other"}], "name 'erp' is callers[0]'s"),
        ([{"name": "erp"}, {"name": "dwh", "topic": "erp"}], "topic 'erp' is callers[0]'s"),
        ([{"name": "a", "tokens_sha256": [H1]}, {"name": "b", "tokens_sha256": [H2, H1.upper()]}], "a token"),
        ([{"name": "a", "client_cert_cn": "x"}, {"name": "b", "client_cert_cn": "x"}], "client_cert_cn 'x'"),
    ],
)
def test_duplicates_across_callers_are_refused(tmp_path, callers, words):
    err = refused(tmp_path, {"callers": callers})
    assert err.key == "callers" and "callers[1]" in err.reason and words in err.reason, err


def test_the_same_hash_twice_in_one_caller_is_kept_once(tmp_path):
    assert load(tmp_path, {"callers": [{"name": "a", "tokens_sha256": [H1, H1.upper()]}]}).callers[0].tokens_sha256 == [H1]


@pytest.mark.parametrize("bad", ["abc", H1[:-1], H1 + "0", "g" * 64, "token-one", 12])
def test_token_hashes_are_64_hex_digits(tmp_path, bad):
    err = refused(tmp_path, {"callers": [{"name": "erp", "tokens_sha256": [bad]}]})
    assert err.key.startswith("callers.0.tokens_sha256")


def test_too_many_tokens_for_one_caller(tmp_path):
    many = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(33)]
    assert refused(tmp_path, {"callers": [{"name": "erp", "tokens_sha256": many}]}).key == "callers.0.tokens_sha256"


def test_a_caller_token_that_is_also_http_token_is_refused(tmp_path):
    err = refused(tmp_path, {"http": {"token": "token-one"}, "callers": [{"name": "erp", "tokens_sha256": [H1]}]})
    assert err.key == "callers" and "http.token" in err.reason
    assert "token-one" not in str(err)


@pytest.mark.parametrize("rate", [0, -1, 1.5, True, "lots", 100_001])
def test_requests_per_minute_is_a_positive_whole_number_or_null(tmp_path, rate):
    assert refused(tmp_path, {"callers": [{"name": "erp", "requests_per_minute": rate}]}).key == "callers.0.requests_per_minute"


@pytest.mark.parametrize("cn", ["", " erp", "erp\n", "x" * 65])
def test_bad_certificate_cns(tmp_path, cn):
    assert refused(tmp_path, {"callers": [{"name": "erp", "client_cert_cn": cn}]}).key == "callers.0.client_cert_cn"


def test_allow_lists_are_typed_like_start_filters(tmp_path):
    err = refused(tmp_path, {"callers": [{"name": "erp", "allow": {"task_ids": ["nope"]}}]})
    assert err.key == "callers.0.allow.task_ids" and "not a GUID" in err.reason
    assert refused(tmp_path, {"callers": [{"name": "erp", "allow": {"bogus": []}}]}).key == "callers.0.allow.bogus"
    assert refused(tmp_path, {"callers": [{"name": "erp", "secret": "x"}]}).key == "callers.0.secret"


def test_callers_only_without_callers_is_refused(tmp_path):
    err = refused(tmp_path, {"callers_only": True})
    assert err.key == "callers_only" and "at least one caller" in err.reason


def test_a_caller_topic_that_is_the_reply_topic_is_refused(tmp_path):
    # topics.reply defaults to <topics.start>/reply: a caller "reply" would make the daemon
    # take its own replies for requests.
    err = refused(tmp_path, {"callers": [{"name": "reply"}]})
    assert err.key == "callers" and "qliksense/task/start/reply" in err.reason
    err = refused(tmp_path, {"alerts": {"topic": "qliksense/task/stop/alerts"}, "callers": [{"name": "alerts"}]})
    assert "qliksense/task/stop/alerts" in err.reason
    # Under other topics it is fine.
    cfg = load(tmp_path, {"mqtt": {"topics": {"reply": "replies"}}, "callers": [{"name": "reply"}]})
    assert cfg.callers[0].topic == "reply"


def test_a_caller_topic_that_makes_another_daemon_topic_is_refused(tmp_path):
    err = refused(tmp_path, {"mqtt": {"topics": {"stop": "qliksense/task/start/stop"}}, "callers": [{"name": "stop"}]})
    assert err.key == "callers" and "qliksense/task/start/stop" in err.reason


def test_the_number_of_callers_is_bounded():
    from butler_mqtt.config import MAX_CALLERS

    with pytest.raises(ValueError, match="at most 1000"):
        Config.model_validate({"callers": [{"name": f"c{i}"} for i in range(MAX_CALLERS + 1)]})
    assert len(Config.model_validate({"callers": [{"name": f"c{i}"} for i in range(MAX_CALLERS)]}).callers) == MAX_CALLERS
