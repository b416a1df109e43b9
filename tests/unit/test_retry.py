"""ops/retry.py: the one backoff helper takes a server's hint (Retry-After), capped, jittered."""

from __future__ import annotations

from email.utils import formatdate

from butler_mqtt.ops.retry import RETRY_AFTER_CAP_S, Backoff, retry_after_seconds


def test_the_delay_doubles_up_to_the_cap_and_is_jittered_upwards_only():
    b = Backoff(0.5, 30.0)
    for attempt, plain in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0)]:
        for _ in range(50):
            assert plain <= b.delay(attempt) <= plain * 1.1


def test_a_servers_hint_is_a_floor_capped_at_the_hint_cap():
    b = Backoff(0.2, 2.0)
    assert 5.0 <= b.delay(0, 5.0) <= 5.5
    assert b.delay(0, 0.0) < 1.0  # "now" is no reason to wait longer than the plain backoff
    assert RETRY_AFTER_CAP_S <= b.delay(0, 86400.0) <= RETRY_AFTER_CAP_S * 1.1


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("999999") == RETRY_AFTER_CAP_S
    assert retry_after_seconds(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == 30.0
    assert retry_after_seconds(formatdate(1000.0 - 30, usegmt=True), now=1000.0) == 0.0  # in the past
    for bad in (None, "", "-5", "1.5", "soon", "x" * 100, "\x00"):
        assert retry_after_seconds(bad) is None
