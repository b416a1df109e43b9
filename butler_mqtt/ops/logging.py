"""structlog setup: JSON lines in production, readable lines on a terminal.

Every line logged while a request is handled carries its `requestId` (bound with
`structlog.contextvars` inside the worker thread that handles it). Secrets never reach the
output: values under secret-looking keys are replaced by a redaction processor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = ("password", "token", "secret", "authorization", "key_pem", "private")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        if any(s in k.lower() for s in _SECRET_KEYS):
            event[k] = "**********"
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
