"""Why a QRS reload failed: the execution result's details and the tail of THAT execution's
script log (contract section 8, qrs-api.md section 13).

:func:`failure_details` builds the contract's ``failure`` object from an ExecutionResult;
:class:`ScriptLogReader` reads one execution's script log tail:

1. ``GET /qrs/reloadtask/{task}/scriptlogfile?executionresultid={result id}`` -> a download
   ticket (``{"value": "<uuid>"}`` or a bare JSON string); on any failure the older
   ``GET /qrs/reloadtask/{task}/scriptlog?filereferenceid={fileReferenceID}`` when that
   reference is not the empty GUID (13.4). The route that worked is tried first next time
   when the newer one answered 400/404 (a server without it).
2. ``GET /qrs/download/reloadtask/{ticket}/scriptlog.txt`` streamed into a
   :class:`~butler_mqtt.backends.qrs.logtail.TailBuffer`: only the last lines are kept, whatever the
   size of the log. A 404 (asked too soon after the run, Butler #1499) is tried once more
   after half a second.

Bounded: one wall-clock deadline (``deadline_s``) covers the ticket, the fallback and the
whole download; every read waits at most what is left of it, and a download still running
at the deadline is cut (a peer that drips one byte a second is cut too). The reader has a
connection pool of its own, so downloads never hold connections the request path needs.
Nothing raises: every failure becomes ``scriptLogError`` text (no secrets in it: only
routes, statuses and sizes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import urllib3

from butler_mqtt.backends.qrs.client import CallObserver, new_xrfkey
from butler_mqtt.backends.qrs.logtail import MESSAGE_CHARS, TailBuffer, clean, failure_texts
from butler_mqtt.backends.qrs.transport import PoolTransport, route_name
from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import QrsError
from butler_mqtt.model import EMPTY_GUID, is_guid

#: Default total time for one execution's log (ticket, fallback and download together).
LOG_DEADLINE_S = 30.0
TICKET_BYTES = 4096
READ_CHUNK = 64 * 1024
FINISHED_SUCCESS = 7
_RETRY_404_AFTER_S = 0.5


class StreamTransport(Protocol):
    """What the reader needs of a transport (PoolTransport.open)."""

    def open(self, method: str, target: str, headers: dict[str, str], timeout: float) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LogTail:
    """One log read: ``lines`` (None when not read) or ``error``; ``calls`` made to QRS."""

    lines: list[str] | None
    error: str | None
    calls: int


class _Failed(Exception):
    """A step of a log read failed; the message is what scriptLogError says."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def has_script_log(result: Mapping[str, Any]) -> bool:
    """False only when QRS says plainly there is none (not available, size 0, no file
    reference): ``scriptLogAvailable`` alone is not trusted (a real QRS showed it false on a
    run with a log, qrs-samples 3)."""
    size = result.get("scriptLogSize")
    ref = result.get("fileReferenceID")
    return bool(
        result.get("scriptLogAvailable") is True
        or (isinstance(size, int) and size > 0)
        or (isinstance(ref, str) and is_guid(ref) and ref != EMPTY_GUID)
    )


class ScriptLogReader:
    """Reads script log tails from one QRS. Thread-safe; :meth:`close` when done."""

    def __init__(
        self,
        cfg: QrsConfig,
        *,
        deadline_s: float = LOG_DEADLINE_S,
        observer: CallObserver | None = None,
        transport: StreamTransport | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        self._observer = observer
        self._transport: StreamTransport = transport if transport is not None else PoolTransport(cfg)
        self._headers = {
            "X-Qlik-User": f"UserDirectory={cfg.user_directory}; UserId={cfg.user_id}",
            "Accept": "application/json",
            "User-Agent": "butler-mqtt",
        }
        self.prefer_old_route = False

    def close(self) -> None:
        self._transport.close()

    def tail(self, task_id: str, result: Mapping[str, Any], lines: int) -> LogTail:
        """The last ``lines`` lines of the log of execution result ``result`` of ``task_id``."""
        if lines <= 0:
            return LogTail(None, None, 0)
        result_id = result.get("id")
        if not is_guid(task_id) or not isinstance(result_id, str) or not is_guid(result_id):
            return LogTail(None, "the execution result names no task or result id to read its script log by", 0)
        if not has_script_log(result):
            return LogTail(None, "QRS reports no script log for this execution", 0)
        routes = [("scriptlogfile", "executionresultid", result_id.lower())]
        ref = result.get("fileReferenceID")
        if isinstance(ref, str) and is_guid(ref) and ref != EMPTY_GUID:
            routes.append(("scriptlog", "filereferenceid", ref.lower()))
            if self.prefer_old_route:
                routes.reverse()
        run = _Run(self, time.monotonic() + self.deadline_s)
        return run.read(task_id.lower(), routes, lines)

    # --- one request ----------------------------------------------------------------------------

    def _open(self, run: _Run, path: str, params: dict[str, str]) -> Any:
        key = new_xrfkey()
        target = f"{path}?{urlencode({**params, 'xrfkey': key})}"
        remaining = run.remaining()
        if remaining <= 0:
            raise _Failed(f"no time left within {self.deadline_s:g} s")
        run.calls += 1
        t0 = time.perf_counter()
        status: int | None = None
        try:
            resp = self._transport.open("GET", target, {**self._headers, "X-Qlik-Xrfkey": key}, remaining)
            status = int(resp.status)
            return resp
        except QrsError as exc:
            if run.remaining() <= 0.05:
                raise _Failed(f"no answer within {self.deadline_s:g} s") from None
            raise _Failed(str(exc)) from None
        finally:
            if self._observer is not None:
                self._observer("GET", route_name(path), status, time.perf_counter() - t0)


class _Run:
    """One :meth:`ScriptLogReader.tail` call: its deadline and the calls it made."""

    def __init__(self, reader: ScriptLogReader, deadline: float) -> None:
        self.reader = reader
        self.deadline = deadline
        self.calls = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def read(self, task_id: str, routes: list[tuple[str, str, str]], lines: int) -> LogTail:
        errors: list[str] = []
        for index, (route, param, value) in enumerate(routes):
            try:
                ticket = self._ticket(f"/qrs/reloadtask/{task_id}/{route}", param, value)
            except _Failed as exc:
                errors.append(f"{route}: {exc}")
                continue
            if index > 0 or route == "scriptlog":
                self._learn(route, errors)
            try:
                return LogTail(self._download(ticket, lines), None, self.calls)
            except _Failed as exc:
                errors.append(f"download: {exc}")
                break  # the ticket was good: the other route would give the same file
        if not errors:
            errors.append("no route to read it by")
        return LogTail(None, clean("script log not read: " + "; ".join(errors), MESSAGE_CHARS), self.calls)

    def _learn(self, worked: str, errors: list[str]) -> None:
        """Remember the older route when the newer one is missing on this server (400/404)."""
        if worked == "scriptlog":
            newer_missing = any(e.startswith("scriptlogfile: QRS answered 40") for e in errors)
            if newer_missing:
                self.reader.prefer_old_route = True
        else:
            self.reader.prefer_old_route = False

    def _ticket(self, path: str, param: str, value: str) -> str:
        resp = self.reader._open(self, path, {param: value})
        body = self._read_all(resp, TICKET_BYTES)
        if resp.status != 200:
            raise _Failed(f"QRS answered {resp.status}", resp.status)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
            raise _Failed("the answer is not JSON") from None
        ticket = data.get("value") if isinstance(data, dict) else data
        if not isinstance(ticket, str) or not is_guid(ticket):
            raise _Failed("the answer holds no download ticket")
        return ticket.lower()

    def _download(self, ticket: str, lines: int) -> list[str]:
        path = f"/qrs/download/reloadtask/{ticket}/scriptlog.txt"
        for attempt in range(2):
            resp = self.reader._open(self, path, {})
            if resp.status == 200:
                return self._stream_tail(resp, lines)
            self._read_all(resp, TICKET_BYTES)
            if resp.status != 404 or attempt == 1 or self.remaining() <= _RETRY_404_AFTER_S:
                raise _Failed(f"QRS answered {resp.status}", resp.status)
            time.sleep(_RETRY_404_AFTER_S)
        raise AssertionError("unreachable")

    def _stream_tail(self, resp: Any, lines: int) -> list[str]:
        buffer = TailBuffer(lines)
        for chunk in self._chunks(resp):
            buffer.feed(chunk)
        return buffer.close()

    def _read_all(self, resp: Any, cap: int) -> bytes:
        """A small answer (at most ``cap`` bytes kept; a longer one is cut, not reused)."""
        data = bytearray()
        for chunk in self._chunks(resp, cap):
            data += chunk
        return bytes(data[:cap])

    def _chunks(self, resp: Any, cap: int | None = None) -> Any:
        """The answer's bytes as they arrive, until its end, ``cap`` bytes or the deadline."""
        seen = 0
        try:
            while True:
                remaining = self.remaining()
                if remaining <= 0:
                    raise _Failed(f"the answer did not end within {self.reader.deadline_s:g} s ({seen} bytes read)")
                _limit_next_read(resp, remaining)
                chunk = resp.read1(READ_CHUNK)
                if not chunk:
                    break
                seen += len(chunk)
                yield chunk
                if cap is not None and seen > cap:
                    resp.close()  # too long: neither read nor reuse the rest
                    return
        except _Failed:
            resp.close()
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            resp.close()
            if self.remaining() <= 0:
                raise _Failed(f"the answer did not end within {self.reader.deadline_s:g} s ({seen} bytes read)") from None
            raise _Failed(f"reading the answer failed after {seen} bytes ({type(exc).__name__})") from None
        resp.release_conn()


def _limit_next_read(resp: Any, seconds: float) -> None:
    """Let the next read wait at most ``seconds`` (what is left of the deadline), not the
    read timeout set when the request was sent."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(0.001, seconds))


def failure_details(
    reader: ScriptLogReader | None,
    execution_result: Mapping[str, Any],
    *,
    task_id: str | None = None,
    lines: int = 40,
) -> dict[str, Any] | None:
    """The contract's ``failure`` object for an execution result that did not succeed.

    ``{"message": str, "details": [str, ...]}`` plus ``"scriptLogTail": [str, ...]`` (the
    last ``lines`` lines of that execution's log) or ``"scriptLogError": str`` (why it could
    not be read). ``lines`` 0 (or no reader) reads no log. ``task_id`` defaults to the result's
    ``taskID`` (full results have it; ``operational.lastExecutionResult`` does not). None for
    a FinishedSuccess result: success costs nothing. Never raises.
    """
    if not isinstance(execution_result, Mapping) or execution_result.get("status") == FINISHED_SUCCESS:
        return None
    message, details = failure_texts(execution_result)
    out: dict[str, Any] = {"message": message, "details": details}
    if reader is None or lines <= 0:
        return out
    task = task_id if task_id is not None else execution_result.get("taskID")
    try:
        tail = reader.tail(task if isinstance(task, str) else "", execution_result, lines)
    except Exception as exc:  # a bug or an answer nobody foresaw must not cost the event its failure
        tail = LogTail(None, f"script log not read: unexpected {type(exc).__name__}", 0)
    if tail.lines is not None:
        out["scriptLogTail"] = tail.lines
    if tail.error is not None:
        out["scriptLogError"] = tail.error
    return out
