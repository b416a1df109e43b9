"""The pure pieces of the Qlik Cloud client: settings, Retry-After, query encoding, reload
options, failure caps, status names, the start pacer (on a fake clock), proxy choice."""

from __future__ import annotations

import email.utils
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from butler_mqtt.backends.cloud import reloads
from butler_mqtt.backends.cloud.auth import _lifetime
from butler_mqtt.backends.cloud.client import _next_link, error_summary, query, retry_after
from butler_mqtt.backends.cloud.pacing import StartPacer
from butler_mqtt.backends.cloud.selection import app_from_item
from butler_mqtt.backends.cloud.settings import CloudSettings
from butler_mqtt.backends.cloud.transport import Answer, proxy_for, redact_url
from butler_mqtt.backends.qrs import logtail
from butler_mqtt.errors import CloudRateLimited, ConfigError, RequestRejected

TENANT = "https://acme.eu.qlikcloud.com"


def settings(**kw: Any) -> CloudSettings:
    values: dict[str, Any] = {"tenant": TENANT, "client_id": "cid", "client_secret": "very-secret-value"}
    values.update(kw)
    return CloudSettings(**values)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"tenant": "http://acme.eu.qlikcloud.com"}, "cloud.tenant"),
        ({"tenant": "https://u:p@acme.eu.qlikcloud.com"}, "cloud.tenant"),
        ({"tenant": "https://acme.eu.qlikcloud.com/api"}, "cloud.tenant"),
        ({"api_key": "k"}, "cloud.api_key"),
        ({"client_secret": None}, "cloud.client_secret"),
        ({"client_id": None, "client_secret": None}, "cloud.client_id"),
        ({"proxy": "socks5://p:1080"}, "cloud.proxy"),
        ({"timeout": 0}, "cloud.timeout"),
        ({"reloads_per_minute": 0}, "cloud.reloads_per_minute"),
        ({"max_pages": 0}, "cloud.max_pages"),
        ({"page_size": 101}, "cloud.page_size"),
    ],
)
def test_settings_fail_at_load_naming_the_key(kw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**kw)
    assert caught.value.key == key


def test_api_key_alone_is_enough_and_secrets_are_scrubbed() -> None:
    s = CloudSettings(tenant=TENANT, api_key="key-123456", proxy="http://bob:pw-9876@proxy:3128")
    assert "key-123456" not in repr(s) and "pw-9876" not in repr(s)
    assert s.scrub("Bearer key-123456 via bob:pw-9876@proxy") == "Bearer *** via ***@proxy"
    assert "very-secret-value" not in repr(settings())
    assert redact_url("https://u:p@host:8443/path?token=x#f") == "https://host:8443/path"


# --- HTTP details -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [("13", 13.0), ("0.5", 0.5), (" 2 ", 2.0), ("-4", 0.0), ("999999", 3600.0), ("soon", None), ("", None),
     (None, None), ("nan", None)],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after(header) == expected


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now=lambda: now) == pytest.approx(30, abs=1)


@pytest.mark.parametrize("name", ['q"uote', "it's", "a&b=c", "x#y", "100%", "50%25", "plus+sign", "Sаles", "a b", "/..?"])
def test_query_encodes_every_value(name: str) -> None:
    text = query(name=name, type="public", skipped=None)
    assert "skipped" not in text and "#" not in text and "+" not in text and " " not in text
    assert parse_qs(urlsplit("https://h/p" + text).query) == {"name": [name], "type": ["public"]}


def test_error_summary_is_short_and_survives_garbage() -> None:
    body = b'{"errors": [{"code": "RELOADS-003", "title": "Forbidden", "details": "no\\nway"}]}'
    assert error_summary(Answer(403, body)) == "RELOADS-003 Forbidden: no way"
    assert error_summary(Answer(500, b"<html>")) == ""
    assert error_summary(Answer(500, b'{"errors": "x"}')) == ""
    assert len(error_summary(Answer(400, b'{"errors": [{"code": "' + b"x" * 5000 + b'"}]}'))) == 300


def test_next_link_spellings() -> None:
    assert _next_link({"links": {"next": {"href": "https://a/1"}}}) == "https://a/1"
    assert _next_link({"Links": {"Next": {"Href": "https://a/2"}}}) == "https://a/2"
    assert _next_link({"links": {"next": None}}) is None
    assert _next_link({"links": "x"}) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [({"expires_in": 3600}, 3600.0), ({"expires_in": 0}, 1.0), ({"expires_in": 10**9}, 86400.0), ({}, 21600.0),
     ({"expires_in": True}, 21600.0), ({"expires_at": "not a date"}, 21600.0)],
)
def test_token_lifetime(payload: dict[str, Any], expected: float) -> None:
    assert _lifetime(payload) == expected


def test_token_lifetime_from_expires_at() -> None:
    import datetime as dt

    at = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert _lifetime({"expires_at": at}) == pytest.approx(3600, abs=5)
    naive = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).replace(tzinfo=None).isoformat()
    assert _lifetime({"expires_at": naive}) == pytest.approx(7200, abs=5)


def test_proxy_choice() -> None:
    s = settings()
    assert proxy_for(s, {}) is None
    assert proxy_for(s, {"HTTPS_PROXY": "http://p:3128"}) == "http://p:3128"
    assert proxy_for(s, {"https_proxy": "http://p:1", "HTTPS_PROXY": "http://p:2"}) == "http://p:1"
    assert proxy_for(s, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": ".qlikcloud.com"}) is None
    assert proxy_for(s, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "other.example"}) == "http://p:3128"
    assert proxy_for(settings(proxy="http://mine:8080"), {"NO_PROXY": "*"}) == "http://mine:8080"


# --- selection --------------------------------------------------------------------------------


def test_only_app_ids_leave_an_item() -> None:
    item = {"id": "65f0c1aaaaaaaaaaaaaaaaaa", "name": "Sales", "resourceType": "app",
            "resourceId": "116DBFAE-7FB9-4983-8E23-5CCD8C508722", "spaceId": "s1", "collectionIds": ["t1", 3]}
    app = app_from_item(item)
    assert app is not None and app.app_id == "116dbfae-7fb9-4983-8e23-5ccd8c508722" and app.item_id == item["id"]
    assert app.tag_ids == ("t1",)
    assert app_from_item({**item, "resourceId": None, "resourceAttributes": {"id": "116dbfae-7fb9-4983-8e23-5ccd8c508722"}})
    assert app_from_item({**item, "resourceId": item["id"]}) is None  # an item id is not an app id
    assert app_from_item({**item, "resourceType": "dataset"}) is None


# --- reload options, status names, failure ------------------------------------------------------


def test_reload_options_limits() -> None:
    reloads.check_options(True, {f"v{i}": "x" * 256 for i in range(20)})
    reloads.check_options(None, None)
    for partial, variables, needle in [
        ("yes", None, "partial"),
        (False, {f"v{i}": "x" for i in range(21)}, "at most 20"),
        (False, {"v": "x" * 257}, "256"),
        (False, {"x" * 257: "v"}, "names"),
        (False, {"": "v"}, "names"),
        (False, {"v": 5}, "strings"),
        (False, ["v"], "object"),
    ]:
        with pytest.raises(RequestRejected, match=needle):
            reloads.check_options(partial, variables)  # type: ignore[arg-type]


def test_status_names() -> None:
    assert reloads.FINAL_STATUS == {"SUCCEEDED": "FinishedSuccess", "FAILED": "FinishedFail",
                                    "CANCELED": "Aborted", "EXCEEDED_LIMIT": "Error"}
    for status in ("QUEUED", "RELOADING", "CANCELING", "CREATED", "SOMETHING_NEW"):
        assert reloads.CloudReload("r", "a", status).active  # unknown statuses count as running
    assert not reloads.CloudReload("r", "a", "FAILED").active


def test_failure_caps_and_clean_text() -> None:
    bad = "x" * 5000 + "\ud800\x00"
    reload = reloads.CloudReload(
        "r", "a", "FAILED", error_message=bad, log="Started loading\r\n" + "y" * 3000 + "\r\nbad \ud800\x07\r\n"
    )
    failure = reloads.failure(reload, ["last line"], "log unavailable \x00")
    assert len(failure["message"]) == logtail.MESSAGE_CHARS and failure["message"].endswith(logtail.ELLIPSIS)
    assert failure["details"][0] == "Started loading" and len(failure["details"][1]) <= logtail.LINE_CHARS
    assert failure["details"][2] == "bad \ufffd\ufffd"  # lone surrogate and control character replaced
    assert failure["scriptLogTail"] == ["last line"] and "\x00" not in failure["scriptLogError"]
    for text in [failure["message"], *failure["details"]]:
        text.encode("utf-8")  # valid UTF-8: no lone surrogates
    many = reloads.CloudReload("r", "a", "FAILED", log="\n".join(f"line {i}" for i in range(100)))
    assert reloads.failure(many)["details"] == [f"line {i}" for i in range(80, 100)]
    assert reloads.failure(reloads.CloudReload("r", "a", "EXCEEDED_LIMIT"))["message"] == "reload ended EXCEEDED_LIMIT"


def test_reload_from_refuses_what_is_not_a_reload() -> None:
    from butler_mqtt.errors import CloudRefused

    for payload in (None, [], {"id": 5, "status": "QUEUED"}, {"id": "a/../b", "status": "QUEUED"}, {"id": "r"}):
        with pytest.raises(CloudRefused):
            reloads.reload_from(payload)


# --- pacer ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pacer_spreads_starts() -> None:
    clock = FakeClock()
    pacer = StartPacer(60, clock=clock, sleep=clock.sleep)  # one a second
    starts = []
    for _ in range(5):
        pacer.acquire(clock.now + 100)
        starts.append(clock.now)
    assert [round(b - a, 6) for a, b in zip(starts, starts[1:], strict=False)] == [1.0] * 4


def test_pacer_burst_after_a_quiet_spell() -> None:
    clock = FakeClock()
    pacer = StartPacer(60, burst=3, clock=clock, sleep=clock.sleep)
    clock.now += 10
    waits = [pacer.acquire(clock.now + 100) for _ in range(5)]
    assert waits[:3] == [0, 0, 0] and waits[3] > 0


def test_pacer_deadline_and_pause() -> None:
    clock = FakeClock()
    pacer = StartPacer(6, clock=clock, sleep=clock.sleep)  # one per 10 s
    pacer.acquire(clock.now + 1)
    with pytest.raises(CloudRateLimited) as caught:
        pacer.acquire(clock.now + 1)
    assert caught.value.retry_after == pytest.approx(10)
    assert pacer.acquire(clock.now + 11) == pytest.approx(10)  # the refused call reserved nothing
    pacer.pause_until(clock.now + 60)
    assert pacer.acquire(clock.now + 100) == pytest.approx(60)


def test_settings_paths(tmp_path: Path) -> None:
    assert settings(ca=tmp_path / "ca.pem").ca == tmp_path / "ca.pem"
    assert settings().base_url == TENANT and settings(tenant=TENANT + "/").base_url == TENANT


def test_an_unreadable_ca_bundle_fails_at_load_naming_cloud_ca(tmp_path: Path) -> None:
    from butler_mqtt.backends.cloud.transport import CloudTransport

    (tmp_path / "bad.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "bad.pem"):
        with pytest.raises(ConfigError) as caught:
            CloudTransport(settings(ca=path))
        assert caught.value.key == "cloud.ca"
    CloudTransport(settings(ca=tmp_path / "missing.pem", verify=False)).close()  # not read when verify is off
