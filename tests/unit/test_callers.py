"""Pure caller logic (contract section 10): topic routing, REST identification by token hash
and certificate CN, the caller's allow-list on top of start_filter, the shared rate limiter.
Hostile cases included: wildcard / `$` / empty / 1,000-character levels, tokens compared by
hash in constant time against every hash, a caller's name never taken from a request body."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import threading
from typing import Any

import pytest

from butler_mqtt import callers as callers_mod
from butler_mqtt.callers import (
    CHALLENGE,
    MAX_TOKEN_CHARS,
    CallerRateLimiter,
    CallerRejected,
    Callers,
    Subscription,
    TopicRoute,
    caller_subscriptions,
    caller_topic_filters,
    client_cert_cn,
    denial,
    label,
    restrict,
    token_sha256,
)
from butler_mqtt.config import AllowList, Config, MqttConfig
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import QrsTask, StartRequest, validate_request
from butler_mqtt.selection import plan, select

ERP_TOKEN = "erp-secret-token-0123456789abcdefghijklmnopq"
DWH_TOKEN = "dwh-secret-token-0123456789abcdefghijklmnopq"
LEGACY = "legacy-http-token"
ERP_TASK = "e0000000-0000-4000-8000-000000000001"
DWH_TASK = "d0000000-0000-4000-8000-000000000001"
SHARED = "50000000-0000-4000-8000-000000000001"
TASKS = [
    QrsTask(ERP_TASK, "ERP orders", tags=("erp",)),
    QrsTask(DWH_TASK, "DWH facts", tags=("dwh",), custom_properties=(("system", "dwh"),)),
    QrsTask(SHARED, "Shared", tags=("erp", "dwh")),
]


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "callers": [
            {"name": "erp", "tokens_sha256": [token_sha256(ERP_TOKEN)], "client_cert_cn": "erp.example.com",
             "allow": {"tags": ["ERP"]}, "requests_per_minute": 3},
            {"name": "dwh", "topic": "data-warehouse", "tokens_sha256": [token_sha256(DWH_TOKEN)],
             "client_cert_cn": "dwh.example.com", "allow": {"custom_properties": [{"name": "System", "value": "DWH"}]}},
        ]
    }
    data.update(extra)
    return Config.model_validate(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- MQTT topics -------------------------------------------------------------------------------


def test_a_caller_topic_names_the_caller():
    c = Callers(config())
    assert c.route_topic("qliksense/task/start/erp") == TopicRoute("start", c.callers[0])
    assert c.route_topic("qliksense/task/stop/erp") == TopicRoute("stop", c.callers[0])
    assert c.route_topic("qliksense/task/start/data-warehouse") == TopicRoute("start", c.callers[1])
    # By topic level, not by name: the level "dwh" is no caller's.
    with pytest.raises(CallerRejected, match="no caller has the topic level 'dwh'"):
        c.route_topic("qliksense/task/start/dwh")


def test_bare_topics_are_the_anonymous_caller():
    c = Callers(config())
    assert c.route_topic("qliksense/task/start") == TopicRoute("start", None)
    assert c.route_topic("qliksense/start_task") == TopicRoute("start_plain", None)
    assert c.route_topic("qliksense/task/stop") == TopicRoute("stop", None)


def test_callers_only_refuses_the_bare_topics_but_serves_callers():
    c = Callers(config(callers_only=True))
    for topic in ("qliksense/task/start", "qliksense/start_task", "qliksense/task/stop"):
        with pytest.raises(CallerRejected) as info:
            c.route_topic(topic)
        assert info.value.error == "Caller required" and "qliksense/task/start/<caller>" in info.value.details
        assert isinstance(info.value, RequestRejected)  # the handlers' error-reply path
    assert c.route_topic("qliksense/task/start/erp") == TopicRoute("start", c.callers[0])


@pytest.mark.parametrize(
    "level",
    ["", "+", "#", "$SYS", "erp$", "ERP", "erp ", " erp", "erp/x", "erp/", "x" * 1000, "erp\x00", "\u202eerp",
     "data-warehouse/..", "erp\udc80"],
)
def test_hostile_levels_are_unknown_callers_whatever_they_hold(level):
    c = Callers(config())
    for base in ("qliksense/task/start", "qliksense/task/stop"):
        with pytest.raises(CallerRejected) as info:
            c.route_topic(f"{base}/{level}")
        err = info.value
        assert err.error == "Unknown caller" and err.http_status == 401
        # Quoted, cut short, control characters escaped: the reply cannot be used to echo junk.
        assert len(err.details) < 200 and "\x00" not in err.details and "\u202e" not in err.details


def test_the_daemons_own_topics_under_the_caller_filter_are_ignored_not_answered():
    # topics.reply defaults to <topics.start>/reply, matched by <topics.start>/+: answering it
    # with an error reply (published on that very topic) would loop.
    c = Callers(config(alerts={"topic": "qliksense/task/stop/alerts"}))
    assert c.route_topic("qliksense/task/start/reply") is None
    assert c.route_topic("qliksense/task/stop/alerts") is None


def test_a_topic_outside_the_daemons_is_refused():
    with pytest.raises(CallerRejected, match="does not serve"):
        Callers(config()).route_topic("elsewhere/erp")


def test_without_callers_every_level_is_unknown_and_bare_topics_are_anonymous():
    c = Callers(Config())
    assert not c.enabled and c.labels() == ("",)
    assert c.route_topic("qliksense/task/start") == TopicRoute("start", None)
    with pytest.raises(CallerRejected):
        c.route_topic("qliksense/task/start/erp")


def test_a_callers_name_is_never_taken_from_the_request_body():
    # The routing and identification functions take no body at all ...
    c = Callers(config())
    assert list(inspect.signature(c.route_topic).parameters) == ["topic"]
    assert list(inspect.signature(c.identify_rest).parameters) == ["authorization", "cert_cn"]
    # ... and a body that names a caller is not a valid request: nothing starts.
    for field in ("caller", "callerName"):
        with pytest.raises(RequestRejected):
            validate_request({"taskId": ERP_TASK, field: "erp"})
    # A bare-topic request stays anonymous whatever it says.
    assert c.route_topic("qliksense/task/start").caller is None


# -- REST --------------------------------------------------------------------------------------


def test_rest_caller_by_token_hash():
    c = Callers(config(http={"token": LEGACY}))
    assert c.identify_rest(f"Bearer {ERP_TOKEN}", None) is c.callers[0]
    assert c.identify_rest(f"bearer   {DWH_TOKEN}  ", None) is c.callers[1]
    assert c.identify_rest(f"Bearer {LEGACY}", None) is None  # the anonymous caller


def test_rest_caller_by_certificate_cn():
    c = Callers(config())
    assert c.identify_rest(None, "erp.example.com") is c.callers[0]
    assert c.identify_rest(None, "dwh.example.com") is c.callers[1]
    assert c.identify_rest(None, "ERP.example.com") is None  # exact, and not a caller: anonymous
    assert c.identify_rest(None, "someone-else") is None


def test_a_certificate_cn_beside_the_legacy_token_is_the_caller_not_anonymous():
    # Holding http.token must not let a caller shed its own allow-list.
    c = Callers(config(http={"token": LEGACY}))
    assert c.identify_rest(f"Bearer {LEGACY}", "erp.example.com") is c.callers[0]
    assert c.identify_rest(None, "erp.example.com") is c.callers[0]


def test_a_token_and_a_certificate_of_two_callers_are_refused():
    with pytest.raises(CallerRejected, match="different callers") as info:
        Callers(config()).identify_rest(f"Bearer {ERP_TOKEN}", "dwh.example.com")
    assert info.value.http_status == 401


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong", f"Bearer {ERP_TOKEN}x", f"Bearer {ERP_TOKEN[:-1]}", f"Bearer {token_sha256(ERP_TOKEN)}",
     "Bearer " + "x" * (MAX_TOKEN_CHARS + 1), f"Bearer {ERP_TOKEN.upper()}", "Bearer \udc80", "Bearer é"],
)
def test_wrong_tokens_are_401_and_never_echoed(header):
    c = Callers(config(http={"token": LEGACY}))
    with pytest.raises(CallerRejected) as info:
        c.identify_rest(header, None)
    err = info.value
    assert (err.error, err.details, err.http_status) == ("Unauthorized", "wrong bearer token", 401)
    assert CHALLENGE["WWW-Authenticate"].startswith("Bearer")


def test_the_hash_itself_is_not_a_token():
    # Sending the configured hash as the bearer token must not work (the file is not the key).
    c = Callers(config())
    with pytest.raises(CallerRejected):
        c.identify_rest(f"Bearer {c.callers[0].tokens_sha256[0]}", None)


def test_no_token_with_http_token_set_is_401_as_before():
    c = Callers(config(http={"token": LEGACY}))
    for header in (None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   "):
        with pytest.raises(CallerRejected, match=r"send 'Authorization: Bearer <token>' \(http.token\)"):
            c.identify_rest(header, None)


def test_without_any_token_configured_the_header_is_ignored_as_before():
    c = Callers(config(callers=[{"name": "erp", "client_cert_cn": "erp.example.com"}]))
    assert c.identify_rest("Bearer whatever", None) is None
    assert c.identify_rest("Bearer whatever", "erp.example.com") is c.callers[0]
    assert Callers(Config()).identify_rest("Bearer anything", None) is None


def test_with_caller_tokens_and_no_http_token_an_unauthenticated_call_is_anonymous_but_a_wrong_token_is_not():
    c = Callers(config())
    assert c.identify_rest(None, None) is None
    with pytest.raises(CallerRejected, match="wrong bearer token"):
        c.identify_rest("Bearer wrong", None)


def test_callers_only_refuses_the_legacy_token_and_anonymous_calls():
    c = Callers(config(http={"token": LEGACY}, callers_only=True))
    with pytest.raises(CallerRejected, match="http.token alone is not accepted"):
        c.identify_rest(f"Bearer {LEGACY}", None)
    with pytest.raises(CallerRejected, match="send 'Authorization"):
        c.identify_rest(None, "not-a-caller")
    assert c.identify_rest(f"Bearer {ERP_TOKEN}", None) is c.callers[0]
    assert c.identify_rest(f"Bearer {LEGACY}", "dwh.example.com") is c.callers[1]
    open_site = Callers(config(callers_only=True))
    with pytest.raises(CallerRejected, match="callers_only is set"):
        open_site.identify_rest(None, None)


def test_every_hash_is_compared_in_constant_time_whatever_matched(monkeypatch):
    """The token is compared by hash, with hmac.compare_digest, against every configured hash
    (and http.token's), never stopping at the first match or mismatch."""
    many = [{"name": f"c{i}", "tokens_sha256": [token_sha256(f"tok-{i}-{j}") for j in range(3)]} for i in range(10)]
    c = Callers(config(callers=many, http={"token": LEGACY}))
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(callers_mod.hmac, "compare_digest", spy)
    for token, expect in (("tok-0-0", "c0"), ("tok-9-2", "c9"), ("nope", None), (LEGACY, None)):
        calls.clear()
        if token == "nope":
            with pytest.raises(CallerRejected):
                c.identify_rest(f"Bearer {token}", None)
        else:
            found = c.identify_rest(f"Bearer {token}", None)
            assert (found.name if found else None) == expect
        assert len(calls) == 30 + 1  # every caller hash, and http.token's
        assert {a for a, _ in calls} == {hashlib.sha256(token.encode()).hexdigest()}  # by hash, never the token
        assert all(isinstance(a, str) and len(a) == len(b) == 64 for a, b in calls)


def test_client_cert_cn_from_getpeercert():
    cert = {"subject": ((("countryName", "SE"),), (("commonName", "erp.example.com"),))}
    assert client_cert_cn(cert) == "erp.example.com"
    assert client_cert_cn(None) is None and client_cert_cn({}) is None
    assert client_cert_cn({"subject": ((("organizationName", "x"),),)}) is None
    two = {"subject": ((("commonName", "erp.example.com"),), (("commonName", "dwh.example.com"),))}
    assert client_cert_cn(two) is None  # ambiguous: no caller
    assert client_cert_cn({"subject": "garbage"}) is None
    assert client_cert_cn({"subject": [[("commonName", 5)]]}) is None


# -- allow-lists -------------------------------------------------------------------------------


def test_a_callers_allow_list_is_judged_like_start_filters_on_the_tasks_own_properties():
    cfg = config()
    erp, dwh = cfg.callers
    erp_task, dwh_task, shared = TASKS
    assert denial(erp_task, erp) is None and denial(shared, erp) is None  # tags, case-insensitive
    assert denial(dwh_task, erp) == "not on caller erp's allow-list"
    assert denial(dwh_task, dwh) is None  # custom property pair, case-insensitive
    assert denial(erp_task, dwh) is not None and denial(shared, dwh) is not None
    assert denial(dwh_task, None) is None  # anonymous: start_filter alone decides


def test_empty_lists_admit_nothing():
    nothing = Config.model_validate({"callers": [{"name": "idle"}]}).callers[0]
    assert all(denial(t, nothing) is not None for t in TASKS)


def test_restrict_denies_what_the_caller_may_not_start_on_top_of_start_filter():
    erp = config().callers[0]
    req = StartRequest(taskId=[ERP_TASK, DWH_TASK], tag=["erp"])
    sel = select(req, TASKS)
    # start_filter admits ERP_TASK and DWH_TASK by ID, not SHARED.
    start_filter = AllowList(task_ids=[ERP_TASK, DWH_TASK])
    out = restrict(plan(sel, req, start_filter), sel, erp)
    by_id = {o.task_id: (o.status, o.reason) for o in out}
    assert by_id[ERP_TASK] == ("started", None)
    assert by_id[DWH_TASK] == ("denied", "not on caller erp's allow-list")  # ID named, but not erp's
    assert by_id[SHARED] == ("denied", "not on the start_filter allow-list")  # start_filter's reason kept
    # The anonymous caller: start_filter alone.
    assert [o.status for o in restrict(plan(sel, req, None), sel, None)] == ["started", "started", "started"]


def test_restrict_applies_to_dry_runs_too():
    erp = config().callers[0]
    req = StartRequest(taskId=[DWH_TASK], dryRun=True)
    sel = select(req, TASKS)
    assert [o.status for o in restrict(plan(sel, req, None), sel, erp)] == ["denied"]


def test_an_id_in_the_request_body_does_not_widen_the_allow_list():
    dwh = config().callers[1]
    req = StartRequest(taskId=[ERP_TASK], allTaskIdsMustExist=True)
    sel = select(req, TASKS)
    assert [o.status for o in restrict(plan(sel, req, None), sel, dwh)] == ["denied"]


# -- rate ----------------------------------------------------------------------------------------


def test_over_the_rate_is_an_error_naming_the_limit_and_a_minute_later_it_is_admitted():
    clock = Clock()
    c = Callers(config(), clock=clock)
    erp = c.callers[0]
    for _ in range(3):
        c.admit(erp)
        clock.now += 1
    with pytest.raises(CallerRejected) as info:
        c.admit(erp)
    err = info.value
    assert err.error == "Rate limited" and "requests_per_minute (3)" in err.details and "erp" in err.details
    assert err.http_status == 429 and err.retry_after == pytest.approx(57.0)
    clock.now += 56.9
    with pytest.raises(CallerRejected):
        c.admit(erp)  # refused requests are not counted, but the window has not moved yet
    clock.now += 0.2
    c.admit(erp)  # the first request left the window


def test_a_sliding_window_never_admits_more_than_n_in_any_minute():
    clock = Clock()
    limiter = CallerRateLimiter({"erp": 5}, clock=clock)
    admitted: list[float] = []
    for _ in range(2000):
        if limiter.take("erp") is None:
            admitted.append(clock.now)
        clock.now += 0.37
    assert len(admitted) > 50
    for i, t in enumerate(admitted):
        assert sum(1 for u in admitted[i:] if u - t < 60) <= 5


def test_callers_without_a_limit_and_the_anonymous_caller_are_not_limited_and_not_stored():
    clock = Clock()
    c = Callers(config(), clock=clock)
    dwh = c.callers[1]
    for _ in range(1000):
        c.admit(dwh)
        c.admit(None)
    assert c.limiter.limit("dwh") is None and c.limiter.limit("erp") == 3
    assert set(c.limiter._times) == {"erp"}  # bounded: only configured, limited callers
    for name in (f"forged-{i}" for i in range(1000)):
        assert c.limiter.take(name) is None
    assert set(c.limiter._times) == {"erp"}
    assert c.limiter._times["erp"].maxlen == 3


def test_one_limiter_whatever_the_ingress():
    # The MQTT and the REST ingress identify the same caller object and count on one limiter.
    clock = Clock()
    c = Callers(config(), clock=clock)
    via_mqtt = c.route_topic("qliksense/task/start/erp").caller
    via_rest = c.identify_rest(f"Bearer {ERP_TOKEN}", None)
    via_cert = c.identify_rest(None, "erp.example.com")
    c.admit(via_mqtt)
    c.admit(via_rest)
    c.admit(via_cert)
    for caller in (via_mqtt, via_rest, via_cert, c.route_topic("qliksense/task/stop/erp").caller):
        with pytest.raises(CallerRejected, match="Rate limited|requests_per_minute"):
            c.admit(caller)


def test_the_limiter_is_thread_safe():
    limiter = CallerRateLimiter({"erp": 500})
    admitted: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        n = sum(1 for _ in range(400) if limiter.take("erp") is None)
        with lock:
            admitted.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 500  # 3,200 tries within far less than a minute: exactly the limit


# -- subscriptions -------------------------------------------------------------------------------


def test_subscriptions_for_callers():
    cfg = config()
    assert caller_subscriptions(cfg.mqtt, cfg.callers) == [
        Subscription("qliksense/task/start/+", "start", True),
        Subscription("qliksense/task/stop/+", "stop", True),
    ]
    assert caller_topic_filters(cfg.mqtt, cfg.callers) == ["qliksense/task/start/+", "qliksense/task/stop/+"]


def test_no_callers_no_extra_subscriptions():
    cfg = Config()
    assert caller_subscriptions(cfg.mqtt, cfg.callers) == [] and caller_topic_filters(cfg.mqtt, cfg.callers) == []


def test_subscriptions_under_a_shared_group_and_custom_topics():
    mqtt = MqttConfig.model_validate({"shared_group": "qlik", "topics": {"start": "a/start", "stop": "a/stop"}})
    subs = caller_subscriptions(mqtt, config().callers)
    assert subs == [Subscription("$share/qlik/a/start/+", "start", False), Subscription("$share/qlik/a/stop/+", "stop", False)]


def test_mqtt_311_has_no_no_local():
    mqtt = MqttConfig.model_validate({"protocol": "3.1.1"})
    assert [s.no_local for s in caller_subscriptions(mqtt, config().callers)] == [False, False]


def test_label():
    erp = config().callers[0]
    assert label(erp) == "erp" and label(None) == ""
    assert Callers(config()).labels() == ("", "erp", "dwh")



def test_a_stored_caller_name_comes_back_and_a_removed_caller_admits_nothing():
    c = Callers(config())
    assert c.stored(None) is None
    assert c.stored("dwh") is c.callers[1]
    # Removed from the configuration since its chain was journaled: its later stages, retries
    # and queued starts are denied, not run as the anonymous caller (start_filter only).
    gone = c.stored("old-erp")
    assert gone is not None and gone.name == "old-erp"
    assert all(denial(task, gone) == "not on caller old-erp's allow-list" for task in TASKS)
    with pytest.raises(CallerRejected):
        c.route_topic("qliksense/task/start/old-erp")


def test_a_flood_on_unknown_caller_topics_is_refused_and_leaves_no_state():
    c = Callers(config())
    before = (dict(c._by_level), dict(c._by_cn), list(c._hashes), {k: list(v) for k, v in c.limiter._times.items()})
    for i in range(20_000):
        with pytest.raises(CallerRejected):
            c.route_topic(f"qliksense/task/start/unknown-{i}")
    after = (dict(c._by_level), dict(c._by_cn), list(c._hashes), {k: list(v) for k, v in c.limiter._times.items()})
    assert after == before


def test_request_keys_are_per_caller():
    from butler_mqtt import keys

    k = keys.for_request_id("r1")
    assert keys.for_caller(k, None) == k == "id:r1"  # the anonymous caller: as before callers
    erp, dwh = keys.for_caller(k, "erp"), keys.for_caller(k, "dwh")
    assert erp != dwh and erp != k and erp == "caller:erp:id:r1"
    # A requestId cannot forge another caller's key: the caller part comes first.
    assert keys.for_caller(keys.for_request_id("caller:erp:id:r1"), None) != erp
