"""File descriptors: the REST connection cap leaves room for QRS and the broker; EMFILE named;
library loggers that can repeat an error in a tight loop are rate-limited."""

from __future__ import annotations

import errno
import io
import json
import logging
import resource

import structlog

from butler_mqtt.ops.fds import (
    FD_HINT,
    FD_RESERVE,
    describe_os_error,
    fd_limit,
    http_connection_cap,
    is_fd_exhaustion,
)
from butler_mqtt.ops.logging import setup_logging


def test_connection_cap_fits_the_descriptor_limit():
    assert http_connection_cap(512, 65536) == 512
    assert http_connection_cap(512, 1024) == (1024 - FD_RESERVE) // 2
    assert http_connection_cap(512, 256) == 64
    assert http_connection_cap(512, 100) == 8  # never zero: the API stays reachable
    assert http_connection_cap(512, None) == 512  # no limit known (Windows)


def test_too_many_open_files_is_named_with_its_fix():
    for code in (errno.EMFILE, errno.ENFILE):
        exc = OSError(code, "Too many open files")
        assert is_fd_exhaustion(exc) and describe_os_error(exc) == FD_HINT == "too many open files (raise LimitNOFILE)"
    other = OSError(errno.ECONNREFUSED, "Connection refused")
    assert not is_fd_exhaustion(other) and describe_os_error(other) == "Connection refused"
    assert not is_fd_exhaustion(None)


def test_fd_limit_is_the_soft_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fd_limit() == (None if soft == resource.RLIM_INFINITY else soft)


def test_asyncio_and_uvicorn_lines_are_rate_limited():
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info", "json", out)
        setup_logging("info", "json", out)  # again (SIGHUP): still one filter per logger
        for name in ("asyncio", "uvicorn.error"):
            assert sum(1 for f in logging.getLogger(name).filters if type(f).__name__ == "RateLimitFilter") == 1
            for _ in range(1000):
                logging.getLogger(name).error("socket.accept() out of system resource")
    finally:  # the rest of the test session logs as before
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.reset_defaults()
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert len([ln for ln in lines if "out of system resource" in ln["event"]]) == 2  # once per logger


def test_a_log_line_caused_by_emfile_names_the_fix():
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info", "json", out)
        log = structlog.get_logger("t")
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            log.exception("boom")
        log.warning("qrs_call_failed", error="cannot connect: [Errno 24] Too many open files")
        log.warning("other", error="Connection refused")
        logging.getLogger("uvicorn.error").error("accept failed", exc_info=OSError(errno.ENFILE, "Too many open files in system"))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.reset_defaults()
    lines = {ln["event"]: ln for ln in map(json.loads, out.getvalue().splitlines())}
    assert lines["boom"]["hint"] == lines["qrs_call_failed"]["hint"] == FD_HINT
    assert lines["accept failed"]["hint"] == FD_HINT
    assert "hint" not in lines["other"]
