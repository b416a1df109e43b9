"""Waiting on what a collector (an MQTT inbox, the webhook server) has received."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def first_match(
    cond: threading.Condition, items: Callable[[], Iterable[T]], pred: Callable[[T], bool], timeout: float, what: str
) -> T:
    """The first of `items()` that satisfies `pred`, waiting on `cond` (notified on every new
    item) for at most `timeout` s; else AssertionError naming `what` and the last items."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            seen = list(items())
            for item in seen:
                if pred(item):
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching {what} within {timeout} s; got {seen[-5:]}")
            cond.wait(left)
