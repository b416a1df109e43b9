"""structlog setup: JSON lines in production, readable lines on a terminal.

Every line logged while a request is handled carries its `requestId` (bound with
`structlog.contextvars` inside the worker thread that handles it). Secrets never reach the
output: values under secret-looking keys are replaced by a redaction processor. Libraries that
can repeat one error in a tight loop (asyncio's accept loop, uvicorn) log each distinct line at
most once a minute, with a count of the repeats (`RateLimitFilter`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from butler_mqtt.ops.fds import FD_HINT, is_fd_exhaustion
from butler_mqtt.ops.ratelimit import RateLimitFilter

#: stdlib loggers whose lines are rate-limited (a filter on a logger sees only its own records).
RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access")
_SECRET_KEYS = ("password", "token", "secret", "authorization", "key_pem", "private")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        if any(s in k.lower() for s in _SECRET_KEYS):
            event[k] = "**********"
    return event


_FD_TEXTS = ("[Errno 24]", "[Errno 23]", "Too many open files")


def _name_fd_exhaustion(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A line caused by running out of file descriptors says so and names the fix (`hint`)."""
    exc = event.get("exc_info")
    if exc is True:
        exc = sys.exc_info()[1]
    elif isinstance(exc, tuple):
        exc = exc[1]
    error = event.get("error")
    if is_fd_exhaustion(exc if isinstance(exc, BaseException) else None) or (
        isinstance(error, str) and any(t in error for t in _FD_TEXTS)
    ):
        event.setdefault("hint", FD_HINT)
    return event


def setup_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog (and route stdlib logging, e.g. paho/uvicorn, through it)."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    out = stream or sys.stdout
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:
        # A string that is not valid Unicode (from a hostile payload or QRS) must never make a
        # log call raise: it is written with backslash escapes instead.
        reconfigure(errors="backslashreplace")
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _name_fd_exhaustion,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.INFO) if lvl < logging.INFO else lvl)
    for name in RATE_LIMITED_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in lg.filters):  # setup runs again on SIGHUP
            lg.addFilter(RateLimitFilter(60.0))
