"""structlog setup: JSON lines in production, readable lines on a terminal.

Every line logged while a request is handled carries its `requestId` (bound with
`structlog.contextvars` inside the worker thread that handles it). Secrets never reach the
output: values under secret-looking keys are replaced by a redaction processor, and every
configured secret value (`scrub_secrets`) is replaced wherever it appears (a token sent as a
requestId, a password inside an error text or a traceback) by the scrubber, the last step
before a line is rendered. Libraries that
can repeat one error in a tight loop (asyncio's accept loop, uvicorn) log each distinct line at
most once a minute, with a count of the repeats (`RateLimitFilter`).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from butler_mqtt.ops.fds import FD_HINT, is_fd_exhaustion
from butler_mqtt.ops.ratelimit import RateLimitFilter

#: stdlib loggers whose lines are rate-limited (a filter on a logger sees only its own records).
RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access")
_SECRET_KEYS = ("password", "token", "secret", "authorization", "key_pem", "private")


@functools.lru_cache(maxsize=4096)  # the keys are the code's own field names: a bounded set
def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(s in lowered for s in _SECRET_KEYS)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        if _secret_key(k):
            event[k] = "**********"
    return event


REDACTED = "**********"
#: Shorter values are not scrubbed: replacing every "ab" in every line would hide the log, and
#: such a value is no secret anyone could keep.
MIN_SECRET_LENGTH = 3
_secrets: re.Pattern[str] | None = None


def scrub_secrets(values: Iterable[str]) -> None:
    """From now on, every log line has each of `values` (the configured secrets: passwords,
    tokens, URLs with credentials and their parts) replaced, wherever it appears."""
    global _secrets
    found = sorted({v for v in values if len(v) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    _secrets = re.compile("|".join(re.escape(v) for v in found)) if found else None


def _scrub_value(pattern: re.Pattern[str], value: Any) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, dict):
        return {_scrub_value(pattern, k): _scrub_value(pattern, v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(pattern, v) for v in value]
    if isinstance(value, BaseException):  # not rendered yet (exc_info is, by format_exc_info)
        return _scrub_value(pattern, f"{type(value).__name__}: {value}")
    return value


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every configured secret value replaced, in every field (nested ones and the rendered
    exception included): a line never shows one, whichever field it came in."""
    pattern = _secrets
    if pattern is None:
        return event
    for k in list(event):
        if k != "exc_info":
            event[k] = _scrub_value(pattern, event[k])
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
        processors=[
            *shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info, _scrub, renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, _scrub,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.INFO) if lvl < logging.INFO else lvl)
    for name in RATE_LIMITED_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in lg.filters):  # setup runs again on SIGHUP
            lg.addFilter(RateLimitFilter(60.0))
