"""File descriptors: the process limit, and naming "too many open files" as such.

Every socket (a REST connection, the QRS pool, the broker) and every open file (the journal)
is a descriptor. systemd's default soft limit is 1024; the unit sets `LimitNOFILE=` and the
daemon raises its soft limit to the hard one at start. The REST server's connection cap is
kept well below whatever limit results (`http_connection_cap`), so idle HTTP clients can never
take the descriptors QRS and the broker need.
"""

from __future__ import annotations

import errno

import structlog

log = structlog.get_logger("butler_mqtt.ops")

#: The words every log line and error reply uses for EMFILE/ENFILE.
FD_HINT = "too many open files (raise LimitNOFILE)"
#: Descriptors kept for everything that is not a REST connection: the QRS pool, the broker
#: connections, the journal, log output, Python itself (about 40 in practice), with margin.
FD_RESERVE = 128
#: Soft limits below this are logged as a warning naming LimitNOFILE.
FD_LOW = 4096


def is_fd_exhaustion(exc: BaseException | None) -> bool:
    """The process (EMFILE) or the system (ENFILE) is out of file descriptors."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def describe_os_error(exc: OSError) -> str:
    """`strerror`, except that running out of descriptors says what to do about it."""
    return FD_HINT if is_fd_exhaustion(exc) else (exc.strerror or str(exc))


def fd_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_fd_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log and return the resulting soft limit.

    Raising the soft limit up to the hard one needs no privilege. An unlimited hard limit is
    not taken literally (the kernel refuses more than fs.nr_open): the soft limit is then
    raised as far as the kernel accepts.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16]
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        soft = target
        break
    limit = None if soft == resource.RLIM_INFINITY else int(soft)
    hard_shown = None if hard == resource.RLIM_INFINITY else int(hard)
    log.info("fd_limit", limit=limit, hard_limit=hard_shown, raised_from=int(before) if before != soft else None)
    if limit is not None and limit < FD_LOW:
        log.warning(
            "fd_limit_low",
            limit=limit,
            detail=f"at most {limit} open files; set LimitNOFILE=65536 in the systemd unit (or ulimit -n)",
        )
    return limit


def http_connection_cap(configured: int, limit: int | None) -> int:
    """The REST connection cap actually used: the configured one, lowered when the descriptor
    limit leaves less than twice that much room beside FD_RESERVE (at least 8)."""
    if limit is None:
        return configured
    room = max(8, (limit - FD_RESERVE) // 2)
    return min(configured, room)
