# ruff: noqa: F811  (pytest fixtures imported from tests/support/cloud.py are parameters here)
"""The Qlik Cloud client pieces (butler_mqtt/backends/cloud) through the Cloud simulator over
real HTTPS: credentials, 429s, paging, selection with hostile names, proxies and CAs, reloads."""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trustme

from butler_mqtt.backends.cloud import reloads, selection
from butler_mqtt.backends.cloud.client import CloudClient
from butler_mqtt.backends.cloud.transport import CloudTransport
from butler_mqtt.errors import (
    CloudAuthRefused,
    CloudRateLimited,
    CloudRefused,
    CloudTlsRejected,
    CloudUnreachable,
    RequestRejected,
    is_transient,
)
from butler_mqtt.sim.cloud import CloudSimulator, SimApp, SimSpace, SimTag, World
from tests.support.cloud import (  # noqa: F401
    ConnectProxy,
    SilentServer,
    client_for,
    cloud_certs,
    cloud_sim,
    running,
    settings_for,
)

pytestmark = pytest.mark.integration


def _token_fetches(sim: CloudSimulator) -> int:
    return sum(1 for e in sim.request_log if e.path == "/oauth/token")


def _statuses(sim: CloudSimulator, path_part: str = "/api/") -> list[int]:
    return [e.status for e in sim.request_log if path_part in e.path]


def _no_secret(sim: CloudSimulator, *texts: Any) -> None:
    for text in texts:
        for secret in (sim.client_secret, sim.api_key):
            assert secret not in str(text)


# --- credentials ------------------------------------------------------------------------------


def test_token_is_cached_across_calls_and_threads(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    threads = [threading.Thread(target=lambda: [selection.space_id(client, "Sales") for _ in range(3)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _token_fetches(cloud_sim) == 1
    assert _statuses(cloud_sim) == [200] * 18


def test_token_fetched_again_before_it_expires(cloud_sim: CloudSimulator) -> None:
    cloud_sim.token_lifetime = 1.0  # renewed when a tenth of its life is left
    client = client_for(cloud_sim)
    selection.space_id(client, "Sales")
    time.sleep(0.95)
    selection.space_id(client, "Sales")
    assert _token_fetches(cloud_sim) == 2
    assert 401 not in _statuses(cloud_sim)  # renewed before Qlik refused it


def test_token_revoked_mid_burst_is_fetched_again_once_and_nothing_is_lost(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    selection.space_id(client, "Sales")
    cloud_sim.revoke_tokens()
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        results.append(selection.space_id(client, "Finance"))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1 and results[0] is not None
    assert _token_fetches(cloud_sim) == 2  # the first token, then exactly one more
    assert _statuses(cloud_sim).count(200) == 9


def test_a_token_refused_twice_is_a_permanent_error_naming_the_key(cloud_sim: CloudSimulator) -> None:
    cloud_sim.token_lifetime = -5  # every token is dead on arrival
    client = client_for(cloud_sim)
    with pytest.raises(CloudAuthRefused) as caught:
        selection.space_id(client, "Sales")
    assert caught.value.key == "cloud.client_id" and "cloud.client_id" in str(caught.value)
    assert not is_transient(caught.value)
    assert _token_fetches(cloud_sim) == 2 and _statuses(cloud_sim) == [401, 401]
    _no_secret(cloud_sim, caught.value, repr(client.settings))


def test_wrong_client_secret_is_refused_at_the_token_endpoint(cloud_sim: CloudSimulator) -> None:
    client = CloudClient(settings_for(cloud_sim, client_secret="not-the-secret-xyz"))
    with pytest.raises(CloudAuthRefused) as caught:
        selection.space_id(client, "Sales")
    assert "cloud.client_secret" in str(caught.value) and not is_transient(caught.value)
    assert "not-the-secret-xyz" not in str(caught.value) and _statuses(cloud_sim) == []


def test_api_key_first_refusal_is_the_error(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim, api_key=cloud_sim.api_key)
    assert selection.space_id(client, "Sales") is not None
    cloud_sim.api_key_revoked = True
    with pytest.raises(CloudAuthRefused) as caught:
        selection.space_id(client, "Sales")
    assert caught.value.key == "cloud.api_key" and "cloud.api_key" in str(caught.value)
    assert _statuses(cloud_sim) == [200, 401] and _token_fetches(cloud_sim) == 0
    _no_secret(cloud_sim, caught.value)


@pytest.mark.parametrize("fault", ["garbage", "huge"])
def test_token_endpoint_answering_garbage_or_a_huge_body(cloud_sim: CloudSimulator, fault: str) -> None:
    cloud_sim.token_fault, cloud_sim.huge_bytes = fault, 4 * 1024 * 1024
    with pytest.raises(CloudRefused) as caught:
        selection.space_id(client_for(cloud_sim), "Sales")
    assert not is_transient(caught.value)
    assert ("not an OAuth token" if fault == "garbage" else "larger than") in str(caught.value)
    assert _statuses(cloud_sim) == []


def test_token_endpoint_that_never_answers_is_cut_by_the_deadline(cloud_sim: CloudSimulator) -> None:
    cloud_sim.token_fault = "hang"
    started = time.monotonic()
    with pytest.raises(CloudUnreachable) as caught:
        selection.space_id(client_for(cloud_sim, timeout=1.0), "Sales")
    assert is_transient(caught.value) and time.monotonic() - started < 30
    assert _statuses(cloud_sim) == []


def test_a_call_waiting_for_another_calls_token_fetch_keeps_its_own_deadline(cloud_sim: CloudSimulator) -> None:
    cloud_sim.token_fault = "hang"
    client = client_for(cloud_sim)
    first = threading.Thread(
        target=lambda: pytest.raises(CloudUnreachable, client.json, "GET", "/api/v1/spaces", deadline=time.monotonic() + 4)
    )
    first.start()
    time.sleep(0.2)  # the first call holds the token fetch (hanging) for up to 4 s
    started = time.monotonic()
    with pytest.raises(CloudUnreachable, match="token"):
        client.json("GET", "/api/v1/spaces", deadline=time.monotonic() + 0.5)
    waited = time.monotonic() - started
    first.join()
    assert waited < 3.0  # its own 0.5 s, not the 3.8 s left of the other call's fetch
    assert _token_fetches(cloud_sim) == 1


def test_a_slow_api_answer_is_cut_by_the_deadline(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim, timeout=1.0)
    selection.space_id(client, "Sales")  # token fetched
    cloud_sim.latency_ms = 5000
    with pytest.raises(CloudUnreachable):
        selection.space_id(client, "Sales")


def test_an_answer_dripping_one_byte_at_a_time_is_cut_by_the_total_deadline(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim, timeout=1.0)
    selection.space_id(client, "Sales")  # token fetched
    cloud_sim.fault, cloud_sim.fault_paths, cloud_sim.drip_interval = "drip", "/spaces", 0.05
    started = time.monotonic()
    with pytest.raises(CloudUnreachable, match="within 1 s") as caught:
        selection.space_id(client, "Sales")
    assert is_transient(caught.value) and time.monotonic() - started < 30


def test_headers_dripping_one_line_at_a_time_are_cut_by_the_total_deadline(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim, timeout=1.0)
    selection.space_id(client, "Sales")  # token fetched
    cloud_sim.fault, cloud_sim.fault_paths, cloud_sim.drip_interval = "drip_headers", "/spaces", 0.05
    started = time.monotonic()
    with pytest.raises(CloudUnreachable, match="within 1 s") as caught:
        selection.space_id(client, "Sales")
    assert is_transient(caught.value) and time.monotonic() - started < 30
    cloud_sim.fault = None
    assert selection.space_id(client, "Sales") is not None  # the transport is still usable


def test_secrets_never_reach_a_log_line(cloud_sim: CloudSimulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for(cloud_sim)
    selection.apps_by_tag(client, "nightly")
    cloud_sim.token_lifetime = -5
    cloud_sim.revoke_tokens()
    with pytest.raises(CloudAuthRefused):
        selection.apps_by_tag(client, "nightly")
    keyed = client_for(cloud_sim, api_key=cloud_sim.api_key)
    cloud_sim.api_key_revoked = True
    with pytest.raises(CloudAuthRefused):
        selection.apps_by_tag(keyed, "nightly")
    assert "/oauth/token" in caplog.text  # urllib3 logged the calls: the check has something to read
    _no_secret(cloud_sim, caplog.text)


def test_a_huge_api_answer_is_capped(cloud_sim: CloudSimulator) -> None:
    cloud_sim.fault, cloud_sim.fault_paths, cloud_sim.huge_bytes = "huge", "/spaces", 3 * 1024 * 1024
    with pytest.raises(CloudRefused, match="cloud.max_response_bytes"):
        selection.space_id(client_for(cloud_sim, max_response_bytes=1024 * 1024), "Sales")


# --- 429 --------------------------------------------------------------------------------------


def test_429_storm_with_retry_after_is_waited_out(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    cloud_sim.storm_429, cloud_sim.storm_retry_after = 3, 0.2
    assert selection.space_id(client, "Sales") is not None
    assert _statuses(cloud_sim) == [429, 429, 429, 200] and client.rate_limited == 3


def test_429_storm_without_retry_after_backs_off(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    cloud_sim.storm_429, cloud_sim.storm_retry_after = 2, None
    assert selection.space_id(client, "Sales") is not None
    assert _statuses(cloud_sim) == [429, 429, 200]


def test_429_longer_than_the_deadline_is_transient(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim, timeout=1.0)
    cloud_sim.storm_429, cloud_sim.storm_retry_after = 1000, 30
    with pytest.raises(CloudRateLimited) as caught:
        selection.space_id(client, "Sales")
    assert is_transient(caught.value) and caught.value.retry_after == 30
    assert _statuses(cloud_sim) == [429]


def test_start_limit_429_is_waited_out_and_nothing_starts_twice(cloud_certs: Path) -> None:
    apps = [SimApp(f"00000000-0000-4000-a000-0000000001{i:02d}", f"A{i}", run_seconds=0.01) for i in range(3)]
    with running(World([], [], apps, max_concurrent=0), cloud_certs, start_limit_per_minute=120,
                        rate_window=1) as sim:
        client = client_for(sim, timeout=10.0)
        started = [reloads.start_reload(client, a.id) for a in apps]  # 2 per second allowed
        assert [r.app_id for r in started] == [a.id for a in apps]
        assert sorted(s.app_id for s in sim.starts) == sorted(a.id for a in apps)
        assert _statuses(sim, "/api/v1/reloads").count(201) == 3


@pytest.mark.parametrize("hint", [None, 0.3])
def test_429_storm_on_a_start_starts_it_exactly_once(cloud_sim: CloudSimulator, hint: float | None) -> None:
    client = client_for(cloud_sim)
    app = next(iter(cloud_sim.world.apps))
    selection.space_id(client, "Sales")  # token fetched
    cloud_sim.storm_429, cloud_sim.storm_retry_after = 3, hint
    started = reloads.start_reload(client, app)
    assert [s.reload_id for s in cloud_sim.starts] == [started.id]
    assert _statuses(cloud_sim, "/api/v1/reloads") == [429, 429, 429, 201]


def test_a_pending_reload_429_says_the_app_is_busy(cloud_certs: Path) -> None:
    apps = [SimApp(f"00000000-0000-4000-a000-0000000002{i:02d}", f"B{i}", run_seconds=30) for i in range(2)]
    with running(World([], [], apps, max_concurrent=1), cloud_certs) as sim:
        client = client_for(sim)
        reloads.start_reload(client, apps[0].id)
        queued = reloads.start_reload(client, apps[1].id)
        assert queued.status == "QUEUED"
        assert [r.id for r in reloads.active_reloads(client, apps[1].id)] == [queued.id]
        with pytest.raises(CloudRateLimited) as caught:
            reloads.start_reload(client, apps[1].id)
        assert caught.value.pending and len(sim.starts) == 2


# --- paging and selection ---------------------------------------------------------------------


def test_selection_with_small_pages_and_same_name_apps(cloud_sim: CloudSimulator) -> None:
    cloud_sim.max_page_size = 1
    client = client_for(cloud_sim)
    nightly = selection.apps_by_tag(client, "nightly")
    assert nightly is not None and [a.name for a in nightly] == ["Revenue", "Revenue"]
    assert len({a.app_id for a in nightly}) == 2 and len({a.space_id for a in nightly}) == 2
    finance = selection.apps_by_space(client, "Finance")
    assert finance is not None and sorted(a.name for a in finance) == ["Broken", "Revenue"]
    assert {a.app_id for a in finance} & {a.app_id for a in nightly} == {a.app_id for a in finance if a.name == "Revenue"}
    assert selection.apps_by_tag(client, "Nightly") is None  # exact, case-sensitive
    assert selection.apps_by_space(client, "Fin") is None  # Qlik's space search is a substring search
    assert sum(1 for e in cloud_sim.request_log if "/items" in e.path) >= 4  # really paged


def test_app_ids_item_ids_and_garbage(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    known = next(iter(cloud_sim.world.apps.values()))
    missing = "00000000-0000-4000-a000-00000000dead"
    found, not_found = selection.apps_by_ids(client, [known.id.upper(), missing, known.item_id, "x' or 1=1"])
    assert list(found) == [known.id] and found[known.id].item_id == known.item_id
    assert not_found == [missing, known.item_id, "x' or 1=1"]


def test_paging_loop_is_an_error(cloud_sim: CloudSimulator) -> None:
    cloud_sim.max_page_size, cloud_sim.paging_loop = 1, True
    with pytest.raises(CloudRefused, match="paging loop") as caught:
        selection.apps_by_space(client_for(cloud_sim), "Finance")
    assert not is_transient(caught.value)
    assert len([e for e in cloud_sim.request_log if "/items" in e.path]) <= 3


def test_next_link_to_another_host_is_never_followed(cloud_sim: CloudSimulator) -> None:
    cloud_sim.max_page_size, cloud_sim.links_base = 1, "https://collector.example.org"
    with pytest.raises(CloudRefused, match="not the tenant"):
        selection.apps_by_space(client_for(cloud_sim), "Finance")


@pytest.mark.parametrize("base", ["http://127.0.0.1:{port}", "https://x:y@127.0.0.1:{port}", "https://127.0.0.1:99999",
                                  "//evil.example", "javascript:alert(1)", "https://127.0.0.1.evil.example:{port}"])
def test_next_links_off_the_tenant_are_refused(cloud_sim: CloudSimulator, base: str) -> None:
    cloud_sim.max_page_size, cloud_sim.links_base = 1, base.format(port=cloud_sim.port)
    with pytest.raises(CloudRefused, match="not the tenant"):
        selection.apps_by_space(client_for(cloud_sim), "Finance")
    assert len([e for e in cloud_sim.request_log if e.path == "/api/v1/items"]) == 1


@pytest.mark.parametrize(("fault", "error"), [("error503", CloudRefused), ("error500", CloudRefused)])
def test_token_endpoint_failing_for_now_is_transient(cloud_sim: CloudSimulator, fault: str, error: type) -> None:
    cloud_sim.fault, cloud_sim.fault_paths = fault, "^/oauth/token$"
    with pytest.raises(error) as caught:
        selection.space_id(client_for(cloud_sim), "Sales")
    assert is_transient(caught.value) and not isinstance(caught.value, CloudAuthRefused)
    cloud_sim.fault = None
    assert selection.space_id(client_for(cloud_sim), "Sales") is not None


def test_a_hundred_thousand_apps_bounded_and_refused_past_the_page_limit(cloud_sim: CloudSimulator) -> None:
    cloud_sim.world.generated_apps = 100_000
    client = client_for(cloud_sim, max_pages=100)
    tracemalloc.start()
    try:
        with pytest.raises(CloudRefused, match="cloud.max_pages") as caught:
            selection.apps_by_tag(client, "generated")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not is_transient(caught.value)
    assert len([e for e in cloud_sim.request_log if e.path == "/api/v1/items"]) == 100
    assert peak < 64 * 1024 * 1024  # pages are not kept: one page of 100 items at a time
    last = cloud_sim.world.generated(99_999)
    found, _ = selection.apps_by_ids(client, [last.id])  # one app among 100,000 is one call
    assert list(found) == [last.id]


def test_nasty_tag_and_space_names(cloud_certs: Path) -> None:
    names = ['q"uote', "it's", "a&b", "a&b=c", "x#y", "100%", "50%25", "plus+sign", "Sales", "Sаles", "Ｓales", " Sales"]
    spaces = [SimSpace(f"{i:024x}", n) for i, n in enumerate(names)]
    tags = [SimTag(f"{i + 100:024x}", n) for i, n in enumerate(names)]
    apps = [SimApp(f"00000000-0000-4000-a000-{i:012d}", f"app {i}", spaces[i].id, [tags[i].id]) for i in range(len(names))]
    with running(World(spaces, tags, apps), cloud_certs) as sim:
        client = client_for(sim)
        for i, name in enumerate(names):
            by_tag = selection.apps_by_tag(client, name)
            by_space = selection.apps_by_space(client, name)
            assert by_tag is not None and [a.app_id for a in by_tag] == [apps[i].id], name
            assert by_space is not None and [a.app_id for a in by_space] == [apps[i].id], name
        assert selection.apps_by_tag(client, "a&b=c&type=private") is None
        assert not sim.starts


# --- proxies and CAs --------------------------------------------------------------------------


def test_proxy_that_hangs_is_cut_by_the_deadline(cloud_sim: CloudSimulator) -> None:
    silent = SilentServer()
    try:
        client = client_for(cloud_sim, timeout=1.0, proxy=f"http://user:proxy-pw-123@127.0.0.1:{silent.port}")
        started = time.monotonic()
        with pytest.raises(CloudUnreachable) as caught:
            selection.space_id(client, "Sales")
        assert is_transient(caught.value) and time.monotonic() - started < 30
        assert silent.accepted >= 1 and "proxy-pw-123" not in str(caught.value)
    finally:
        silent.close()


def test_calls_go_through_a_connect_proxy_with_credentials(cloud_sim: CloudSimulator) -> None:
    import base64

    proxy = ConnectProxy(required_auth="Basic " + base64.b64encode(b"bob:pr%x y").decode())
    try:
        client = client_for(cloud_sim, proxy=f"http://bob:pr%25x%20y@127.0.0.1:{proxy.port}")
        assert selection.apps_by_tag(client, "nightly")
        assert proxy.connects and set(proxy.connects) == {f"127.0.0.1:{cloud_sim.port}"}
        wrong = client_for(cloud_sim, proxy=f"http://bob:nope@127.0.0.1:{proxy.port}", timeout=2.0)
        with pytest.raises(CloudUnreachable, match="proxy") as caught:
            selection.space_id(wrong, "Sales")
        assert "nope" not in str(caught.value)
    finally:
        proxy.close()


def test_https_proxy_variable_and_no_proxy(cloud_sim: CloudSimulator) -> None:
    silent = SilentServer()
    try:
        settings = settings_for(cloud_sim, timeout=1.0)
        hung = CloudClient(settings, transport=CloudTransport(settings, {"HTTPS_PROXY": f"http://127.0.0.1:{silent.port}"}))
        with pytest.raises(CloudUnreachable):
            selection.space_id(hung, "Sales")
        assert silent.accepted >= 1
        bypass = CloudTransport(settings, {"HTTPS_PROXY": f"http://127.0.0.1:{silent.port}", "NO_PROXY": "127.0.0.1"})
        assert selection.space_id(CloudClient(settings, transport=bypass), "Sales") is not None
    finally:
        silent.close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_extra_ca_bundle_for_a_certificate_from_another_ca(tmp_path: Path, cloud_sim: CloudSimulator) -> None:
    """A TLS-inspecting proxy re-signs the tenant's certificate with its own CA (trustme here)."""
    inspecting = trustme.CA()
    server = inspecting.issue_cert("127.0.0.1", "localhost")
    inspecting.cert_pem.write_to_path(str(tmp_path / "root.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server_key.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "client_key.pem"))
    with CloudSimulator(certs_dir=tmp_path) as sim:
        with pytest.raises(CloudTlsRejected, match="cloud.ca") as caught:
            selection.space_id(client_for(sim, ca=None), "Sales")
        assert not is_transient(caught.value)
        with pytest.raises(CloudTlsRejected):
            selection.space_id(client_for(sim, ca=cloud_sim.certs.root), "Sales")  # another CA
        assert selection.space_id(client_for(sim, ca=tmp_path / "root.pem"), "Sales") is not None
        assert selection.space_id(client_for(sim, ca=None, verify=False), "Sales") is not None


# --- reloads ----------------------------------------------------------------------------------


def _follow(client: CloudClient, reload_id: str, timeout: float = 10) -> reloads.CloudReload:
    end = time.monotonic() + timeout
    while True:
        r = reloads.get_reload(client, reload_id)
        if not r.active or time.monotonic() > end:
            return r
        time.sleep(0.05)


def test_failed_reload_with_options_and_failure_details(cloud_sim: CloudSimulator) -> None:
    client = client_for(cloud_sim)
    broken = next(a for a in cloud_sim.world.apps.values() if a.name == "Broken")
    with pytest.raises(RequestRejected, match="at most 20"):
        reloads.start_reload(client, broken.id, variables={f"v{i}": "x" for i in range(21)})
    with pytest.raises(RequestRejected, match="256"):
        reloads.start_reload(client, broken.id, variables={"v": "x" * 257})
    assert cloud_sim.starts == []  # checked before anything starts
    started = reloads.start_reload(client, broken.id, partial=True, variables={"region": "EMEA & 'NA'"})
    assert cloud_sim.world.reloads[started.id].partial is True
    assert cloud_sim.world.reloads[started.id].variables == {"region": "EMEA & 'NA'"}
    done = _follow(client, started.id)
    assert done.status == "FAILED" and done.final_status == "FinishedFail"
    tail = reloads.script_log_tail(client, broken.id, done.id, 40)
    assert "LOAD Amount FROM [lib://erp/orders.qvd]" in tail
    failure = reloads.failure(done, tail)
    assert failure["message"] == broken.error_message and failure["scriptLogTail"] == tail


def test_a_huge_script_log_is_tailed_in_flat_memory(cloud_certs: Path) -> None:
    lines = "\r\n".join(f"{i:07d} LOAD * FROM [lib://erp/t{i}.qvd]" for i in range(400_000))  # ~16 MB
    app = SimApp("00000000-0000-4000-a000-0000000007aa", "Huge", outcome="FAILED", run_seconds=0.01, script_log=lines)
    with running(World([], [], [app]), cloud_certs) as sim:
        client = client_for(sim, max_response_bytes=1024 * 1024, timeout=30.0)
        done = _follow(client, reloads.start_reload(client, app.id).id)
        reloads.script_log_tail(client, app.id, done.id, 5)  # the simulator builds its 16 MB answer once
        tracemalloc.start()
        try:
            tail = reloads.script_log_tail(client, app.id, done.id, 5)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert tail[2] == "0399999 LOAD * FROM [lib://erp/t399999.qvd]" and tail[-1] == "Execution Failed"
        assert len(tail) == 5
        assert peak < 8 * 1024 * 1024  # a 16 MB log, read with max_response_bytes of 1 MB


def test_exceeded_limit_maps_to_error(cloud_certs: Path) -> None:
    app = SimApp("00000000-0000-4000-a000-0000000003aa", "Heavy", outcome="EXCEEDED_LIMIT", run_seconds=0.05)
    with running(World([], [], [app]), cloud_certs) as sim:
        client = client_for(sim)
        done = _follow(client, reloads.start_reload(client, app.id).id)
        assert (done.status, done.final_status) == ("EXCEEDED_LIMIT", "Error")
        assert reloads.failure(done)["message"]


def test_cancel_and_a_reload_started_elsewhere(cloud_certs: Path) -> None:
    app = SimApp("00000000-0000-4000-a000-0000000004aa", "Long", run_seconds=30)
    with running(World([], [], [app]), cloud_certs) as sim:
        client = client_for(sim)
        hub = sim.world.start_elsewhere(app.id)
        assert [r.id for r in reloads.active_reloads(client, app.id)] == [hub.id]
        assert reloads.cancel_reload(client, hub.id) == "canceling"
        done = _follow(client, hub.id)
        assert (done.status, done.final_status) == ("CANCELED", "Aborted")
        assert reloads.cancel_reload(client, hub.id) == "not_running"
        assert reloads.cancel_reload(client, "0123456789abcdef01234567") == "not_found"
        assert reloads.active_reloads(client, app.id) == [] and sim.starts == []


def test_starts_are_paced_across_threads(cloud_certs: Path) -> None:
    apps = [SimApp(f"00000000-0000-4000-a000-0000000005{i:02d}", f"P{i}", run_seconds=0.01) for i in range(16)]
    with running(World([], [], apps, max_concurrent=0), cloud_certs, start_limit_per_minute=100_000) as sim:
        client = client_for(sim, reloads_per_minute=600, timeout=30.0)  # one start per 0.1 s
        todo = list(apps)
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    app = todo.pop()
                reloads.start_reload(client, app.id)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times = sorted(s.at for s in sim.starts)
        assert len(times) == 16
        # Counted from the simulator's log: in any 0.5 s window at most 1 + 5 starts (+2 for
        # requests that a loaded host delivered late, bunched together).
        assert max(sum(1 for u in times if t <= u < t + 0.5) for t in times) <= 8
        assert times[-1] - times[0] >= 15 * 0.1 * 0.8  # 16 paced starts span at least ~1.5 s


def test_tenant_wide_running_reloads_and_recent_reloads(cloud_certs: Path) -> None:
    apps = [SimApp(f"00000000-0000-4000-a000-0000000006{i:02d}", f"R{i}", run_seconds=30) for i in range(3)]
    with running(World([], [], apps, max_concurrent=1), cloud_certs) as sim:
        client = client_for(sim)
        first = reloads.start_reload(client, apps[0].id)
        second = reloads.start_reload(client, apps[1].id)
        busy = reloads.active_reloads_by_app(client)
        assert {k: [r.status for r in v] for k, v in busy.items()} == {apps[0].id: ["RELOADING"], apps[1].id: ["QUEUED"]}
        assert [r.id for r in reloads.recent_reloads(client, apps[1].id)] == [second.id]
        reloads.cancel_reload(client, first.id)
        assert [r.id for r in reloads.recent_reloads(client, apps[0].id)] == [first.id]
        assert reloads.recent_reloads(client, apps[2].id) == []


def test_check_lines(cloud_sim: CloudSimulator) -> None:
    lines = client_for(cloud_sim).check()
    assert [ok for ok, _ in lines] == [True, True] and "access token" in lines[0][1]
    assert client_for(cloud_sim, api_key=cloud_sim.api_key).check()[0] == (True, "Qlik Cloud credentials: API key set")
    cloud_sim.api_key_revoked = True
    bad = client_for(cloud_sim, api_key=cloud_sim.api_key).check()
    assert bad[-1][0] is False and "cloud.api_key" in bad[-1][1]
    _no_secret(cloud_sim, bad)


def test_resolve_union_matched_by_not_found_and_allow_list(cloud_sim: CloudSimulator) -> None:
    from butler_mqtt.backends.cloud.resolve import allowed, resolve

    client = client_for(cloud_sim)
    apps = {(a.name, cloud_sim.world.spaces[a.space_id or ""].name): a for a in cloud_sim.world.apps.values()}
    rev_fin, rev_sales = apps[("Revenue", "Finance")], apps[("Revenue", "Sales")]
    missing = "00000000-0000-4000-a000-00000000beef"
    sel = resolve(client, [rev_fin.id, missing], ["nightly", "no-such-tag", "generated"], ["Finance", "Nowhere"],
                  with_space_names=True)
    by_id = {s.app.app_id: s for s in sel.selected}
    assert by_id[rev_fin.id].matched_by == [f"appId:{rev_fin.id}", "tag:nightly", "space:Finance"]
    assert by_id[rev_sales.id].matched_by == ["tag:nightly"] and by_id[rev_sales.id].space_name == "Sales"
    assert sel.app_ids[0] == rev_fin.id and len(sel.app_ids) == len(set(sel.app_ids)) == 3  # + Broken (Finance)
    assert sel.not_found == [{"appId": missing}, {"tag": "no-such-tag"}, {"tag": "generated"}, {"space": "Nowhere"}]
    assert by_id[rev_sales.id].app.tag_names == ("nightly", "hourly")
    assert allowed(by_id[rev_sales.id], [], ["hourly"], [])
    assert allowed(by_id[rev_sales.id], [], [], ["Sales"]) and not allowed(by_id[rev_sales.id], [], ["Hourly"], ["sales"])
    assert allowed(by_id[rev_fin.id], [rev_fin.id.upper()], [], [])
    assert not cloud_sim.starts


def test_started_since_finds_the_reload_a_lost_answer_created(cloud_certs: Path) -> None:
    app = SimApp("00000000-0000-4000-a000-0000000008aa", "Resume", run_seconds=0.05)
    with running(World([], [], [app]), cloud_certs) as sim:
        client = client_for(sim)
        claimed = time.time()
        assert reloads.started_since(client, app.id, claimed) is None  # nothing reached Qlik Cloud
        sim.world.start_elsewhere(app.id, "chronos")  # a schedule's reload is not ours
        assert reloads.started_since(client, app.id, claimed) is None
        ours = reloads.start_reload(client, app.id)  # "sent, answer lost"
        found = reloads.started_since(client, app.id, claimed)
        assert found is not None and found.id == ours.id
        assert reloads.started_since(client, app.id, time.time() + 3600) is None  # claimed later than it
