"""Script logs of simulated executions: generated on demand, streamed, never held whole.

A log is a pure function of its :class:`LogSpec` (the task, the execution result, its times
and outcome), so the bytes of one execution's log are the same on every download and the
logs of two executions always differ: every line names the execution result and the run
number. The shape follows qrs-api.md 13.7: a UTF-8 BOM, CRLF line ends, a header of
``timestamp + padded label`` lines, then script lines with a 4-digit line number; a failed
run ends with the failing statement, the error and ``Execution Failed``.

Knobs (per task, :class:`~butler_mqtt.sim.store.SimTask`): ``log_lines`` script lines,
``log_bytes`` (pad the log with filler lines to at least that many bytes: a 200 MB log is
produced lazily, 64 KiB at a time), ``log_encoding``: ``"utf-8"`` (with BOM, QRS's),
``"utf-8-nobom"``, ``"utf-16-le"`` / ``"utf-16-be"`` (with their BOM), ``"invalid-utf-8"``
(a BOM, then UTF-8 with invalid byte sequences in the last lines).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

ENCODINGS = ("utf-8", "utf-8-nobom", "utf-16-le", "utf-16-be", "invalid-utf-8")
DEFAULT_FAILURE_MESSAGE = "Field 'Amount' not found"
CHUNK = 64 * 1024
_BOMS = {"utf-8": b"\xef\xbb\xbf", "invalid-utf-8": b"\xef\xbb\xbf", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}
_CODECS = {"utf-16-le": "utf-16-le", "utf-16-be": "utf-16-be"}
#: Bytes that are never valid UTF-8 (a lone continuation byte, an overlong form, 0xFF).
INVALID_UTF8 = b"\x80\xc0\xaf\xff"


@dataclass(frozen=True)
class LogSpec:
    """Everything one execution's log is made of.

    ``run`` counts the task's attempts (1 = first); ``status`` is the attempt's final
    TaskExecutionStatus (7 success, 8 fail, 6 aborted).
    """

    task_name: str
    app_id: str
    result_id: str
    run: int
    start: float
    stop: float
    status: int
    failure_message: str
    lines: int
    min_bytes: int
    encoding: str


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _head(spec: LogSpec) -> list[str]:
    t = _stamp(spec.start)
    lines = [
        f"{t}      ReloadCodebase                Classic",
        f"{t}      Reload Executed By            UserDirectory=INTERNAL; UserId=sa_scheduler",
        f"{t}      Process Executing             Qlik Sense Server",
        f"{t}      Process ID                    4940",
        f"{t}      Execution result              {spec.result_id} (run {spec.run})",
        f"{t} 0001 // {spec.task_name}: app {spec.app_id}",
    ]
    for n in range(max(0, spec.lines)):
        lines.append(
            f"{t} {(n + 2) % 10000:04d}  LOAD * FROM [lib://data/part_{n:05d}.qvd] (qvd)"
            f"  // execution {spec.result_id} run {spec.run} line {n + 1}"
        )
    return lines


def _filler_line(spec: LogSpec) -> str:
    return f"{_stamp(spec.start)} 0999  // padding of execution {spec.result_id}: " + "x" * 40


def _tail(spec: LogSpec) -> list[str]:
    t = _stamp(spec.stop)
    ident = f"execution {spec.result_id} run {spec.run}"
    if spec.status == 8:
        lines = [
            f"{t} 9000  LOAD Amount FROM [lib://erp/orders.qvd]  // {ident}",
            f"{t}      Error: {spec.failure_message}",
            f"{t}      Execution Failed  // {ident}",
            f"{t}      Execution finished.",
        ]
    elif spec.status == 6:
        lines = [f"{t}      Execution aborted by a user  // {ident}", f"{t}      Execution finished."]
    else:
        lines = [
            f"{t}      Lines fetched: {1000 + spec.run}  // {ident}",
            f"{t}      Execution finished.",
        ]
    if spec.encoding == "invalid-utf-8":
        lines.insert(0, f"{t}      Bad bytes follow  // {ident}")
    return lines


def _encode(spec: LogSpec, lines: list[str]) -> bytes:
    text = "".join(line + "\r\n" for line in lines)
    data = text.encode(_CODECS.get(spec.encoding, "utf-8"))
    return data


def _parts(spec: LogSpec) -> tuple[bytes, bytes, int, bytes]:
    """(head, filler block, filler block count, tail) of the log, BOM included in head."""
    head = _BOMS.get(spec.encoding, b"") + _encode(spec, _head(spec))
    tail = _encode(spec, _tail(spec))
    if spec.encoding == "invalid-utf-8":
        # The invalid bytes sit inside the last lines (before "Execution finished.").
        cut = tail.rfind(b"\r\n", 0, len(tail) - 2) + 2
        tail = tail[:cut] + b"bad " + INVALID_UTF8 + b" bytes\r\n" + tail[cut:]
    filler = b""
    count = 0
    missing = spec.min_bytes - len(head) - len(tail)
    if missing > 0:
        line = _encode(spec, [_filler_line(spec)])
        filler = line * max(1, CHUNK // len(line))
        count = -(-missing // len(filler))
    return head, filler, count, tail


def log_length(spec: LogSpec) -> int:
    """Size of the log in bytes (cheap: nothing is generated)."""
    head, filler, count, tail = _parts(spec)
    return len(head) + len(filler) * count + len(tail)


def log_chunks(spec: LogSpec) -> Iterator[bytes]:
    """The log's bytes, at most a few 64 KiB blocks at a time (a 200 MB log costs no memory)."""
    head, filler, count, tail = _parts(spec)
    yield head
    for _ in range(count):
        yield filler
    yield tail


def log_bytes(spec: LogSpec) -> bytes:
    """The whole log (for small logs and tests)."""
    return b"".join(log_chunks(spec))
