"""A lean HTTP/1.1 client for the request path: one request, one bounded answer, keep-alive.

Why: a QRS call through urllib3 and http.client cost about 0.36 ms of CPU here (header objects,
the `email` parser for the answer's head, a file object per response), most of the daemon's
CPU per single-task request; this one costs about a quarter of that. It writes the request in
one `sendall` and parses the answer from one buffer.

What it keeps from the urllib3 path: the connection is urllib3's `HTTPSConnection` (its
`connect()` does the TLS handshake, the hostname check and raises urllib3's connect errors, so
the backends' error tables stay as they are); every call has a TOTAL deadline (each blocking
send or read may take only what is left of it, so a peer dripping a byte at a time is cut at the
deadline, head and body together, with no watcher thread); answers are read with a byte cap and
never buffered beyond it; an idle connection that the server closed (or wrote to unasked) is
not reused. What it reads, strictly: a status line, at most `MAX_HEADERS` header lines in at
most `MAX_HEAD` bytes, bodies framed by `Content-Length`, `Transfer-Encoding: chunked` or the
end of the connection, interim 1xx answers skipped, gzip/deflate decoded within the cap. Anything
else raises urllib3's `ProtocolError`, which the error tables already name.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from dataclasses import dataclass
from http.client import RemoteDisconnected
from typing import Any

from urllib3.connection import HTTPConnection
from urllib3.exceptions import ProtocolError, ReadTimeoutError
from urllib3.util.wait import wait_for_read

from butler_mqtt.ops.outbound import CHUNK

#: The most bytes of a response head (status line and headers) that are read.
MAX_HEAD = 64 * 1024
#: The most header lines in one head.
MAX_HEADERS = 100
#: The most bytes of one chunk-size line (with its extensions).
MAX_CHUNK_LINE = 4096
#: Interim (1xx) answers skipped before the real one, at most.
MAX_INTERIM = 10

#: What a request target may not hold (controls, space); what a header may not (controls but tab).
_BAD_TARGET = re.compile(r"[^\x21-\x7e]")  # printable ASCII only: the caller percent-encodes
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes "²"
_BAD_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class Reply:
    """One answer: status, headers (lower-case names; repeated ones joined by ", "), body and
    whether the body was longer than the cap (then `body` is its first `cap` bytes)."""

    status: int
    headers: dict[str, str]
    body: bytes
    over: bool = False


class _Conn:
    """A connected urllib3 connection and the bytes read from it but not yet used."""

    __slots__ = ("conn", "buf", "sock", "until")

    def __init__(self, conn: HTTPConnection) -> None:
        self.conn = conn
        self.sock: Any = conn.sock
        self.buf = bytearray()
        self.until = 0.0  # time.monotonic() of the current call's total deadline

    def allow(self) -> None:
        """The next blocking send or read may take what is left of the deadline, no more."""
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError("the total deadline passed")
        self.sock.settimeout(left)

    def fill(self) -> bool:
        """Read what the socket has (at most CHUNK); False at the end of the connection."""
        self.allow()
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class Http1Pool:
    """Keep-alive connections to one server, made by `connect()` (a urllib3 connection, not yet
    connected), at most `maxsize` kept idle; thread-safe (a call takes a connection of its own)."""

    def __init__(self, connect: Any, host_header: str, maxsize: int, read_timeout: float) -> None:
        self._connect = connect
        self._host = host_header
        self._maxsize = maxsize
        self._read_timeout = read_timeout
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for c in idle:
            c.close()

    def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None, cap: int, until: float | None = None
    ) -> Reply:
        """Send one request and read its answer (at most `cap` bytes of body), all of it by
        `until` (time.monotonic(); default: the pool's read timeout from now). Raises urllib3's
        connect errors, `ProtocolError`, `ReadTimeoutError` (the deadline passed) or OSError/ssl
        errors."""
        data = self._encode(method, target, headers, body)
        until = until if until is not None else time.monotonic() + self._read_timeout
        c = self._checkout()
        c.until = until
        try:
            c.allow()
            c.sock.sendall(data)
            reply, reusable = _read_reply(c, method, cap)
        except TimeoutError as exc:
            c.close()
            raise ReadTimeoutError(None, target, "the total deadline passed") from exc  # type: ignore[arg-type]
        except BaseException:
            c.close()
            raise
        if reusable and not c.buf:
            self._checkin(c)
        else:
            c.close()
        return reply

    def _encode(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
        if not target.startswith("/") or _BAD_TARGET.search(target):
            raise ValueError(f"not a request target: {target[:80]!r}")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host}", "Accept-Encoding: identity"]
        for name, value in headers.items():
            if _BAD_HEADER.search(name) or _BAD_HEADER.search(value) or ":" in name or not name.strip():
                raise ValueError(f"header {name!r} holds a control character")
            lines.append(f"{name}: {value}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def _checkout(self) -> _Conn:
        while True:
            with self._lock:
                c = self._idle.pop() if self._idle else None
            if c is None:
                break
            # An idle connection with something to read: the server closed it (or wrote to it
            # unasked); either way it is not ours to send on.
            if not c.buf and not wait_for_read(c.sock, timeout=0.0):
                return c
            c.close()
        conn = self._connect()
        try:
            conn.connect()
            conn.sock.settimeout(self._read_timeout)
        except BaseException:
            conn.close()  # a failed handshake leaves the TCP socket open otherwise (until collected)
            raise
        return _Conn(conn)

    def _checkin(self, c: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._maxsize:
                self._idle.append(c)
                return
        c.close()


# ---------------------------------------------------------------------- reading an answer


def _read_reply(c: _Conn, method: str, cap: int) -> tuple[Reply, bool]:
    """The answer (1xx skipped) and whether the connection may carry another request."""
    for _ in range(MAX_INTERIM + 1):
        version, status, headers = _read_head(c)
        if status >= 200 or status == 101:
            break
    else:
        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
    if status == 101:
        raise ProtocolError("the server switched protocols (101): not an HTTP answer")
    keep = _keep_alive(version, headers)
    if method == "HEAD" or status in (204, 304):
        return Reply(status, headers, b""), keep
    te = headers.get("transfer-encoding")
    if te is not None:
        if te.strip().lower() != "chunked":  # another transfer coding (gzip, chunked) is not decoded here
            raise ProtocolError(f"unsupported Transfer-Encoding: {te[:80]}")
        body, over = _read_chunked(c, cap)
        keep = keep and not over
    elif "content-length" in headers:
        body, over = _read_length(c, _content_length(headers["content-length"]), cap)
        keep = keep and not over
    else:
        body, over = _read_to_end(c, cap)
        keep = False
    return _decoded(headers, body, over, cap, status), keep


def _read_head(c: _Conn) -> tuple[str, int, dict[str, str]]:
    while True:
        end = c.buf.find(b"\r\n\r\n")
        lf = c.buf.find(b"\n\n")
        if lf >= 0 and (end < 0 or lf < end):
            head, skip = c.buf[:lf], lf + 2
            break
        if end >= 0:
            head, skip = c.buf[:end], end + 4
            break
        if len(c.buf) > MAX_HEAD:
            raise ProtocolError(f"the answer's head is larger than {MAX_HEAD} bytes")
        if not c.fill():
            if c.buf:
                raise ProtocolError("Connection aborted: the answer's head was cut short")
            raise ProtocolError("Connection aborted.", RemoteDisconnected("Remote end closed connection without response"))
    if len(head) > MAX_HEAD:
        raise ProtocolError(f"the answer's head is larger than {MAX_HEAD} bytes")
    lines = bytes(head).decode("latin-1").split("\n")
    del c.buf[:skip]
    version, status = _status_line(lines[0].rstrip("\r"))
    return version, status, _header_lines(lines[1:])


def _status_line(line: str) -> tuple[str, int]:
    parts = line.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not _DIGITS.fullmatch(parts[1]) or len(parts[1]) != 3:
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    status = int(parts[1])
    if status < 100:
        raise ProtocolError(f"not an HTTP status: {status}")
    return parts[0], status


def _header_lines(lines: list[str]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in lines:
        line = raw.rstrip("\r")
        if line[:1] in (" ", "\t") and last is not None:  # obsolete line folding
            headers[last] = f"{headers[last]} {line.strip()}"
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or _BAD_TARGET.search(name):
            raise ProtocolError(f"not a header line: {line[:80]!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        last = name
    return headers


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _content_length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}  # repeated headers were joined by ", "
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length headers: {value[:80]}")
    (v,) = values
    if not _DIGITS.fullmatch(v) or len(v) > 18:
        raise ProtocolError(f"not a Content-Length: {v[:80]!r}")
    return int(v)


def _read_length(c: _Conn, n: int, cap: int) -> tuple[bytes, bool]:
    want = min(n, cap + 1)
    while len(c.buf) < want:
        if not c.fill():
            raise ProtocolError(f"IncompleteRead: {len(c.buf)} bytes read, {n - len(c.buf)} more expected")
    return c.take(min(n, cap)), n > cap


def _read_to_end(c: _Conn, cap: int) -> tuple[bytes, bool]:
    while len(c.buf) <= cap and c.fill():
        pass
    return c.take(cap), len(c.buf) > 0


def _read_chunked(c: _Conn, cap: int) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    total = 0
    while True:
        size = _chunk_size(_read_line(c))
        if size == 0:
            break
        if total + size > cap:
            return b"".join(parts), True  # the rest is never read: the connection is closed
        while len(c.buf) < size + 2:
            if not c.fill():
                raise ProtocolError("IncompleteRead: the answer ended inside a chunk")
        parts.append(c.take(size))
        if c.take(2) != b"\r\n":
            raise ProtocolError("a chunk not followed by CRLF")
        total += size
    for _ in range(MAX_HEADERS + 1):  # trailers, up to an empty line
        if not _read_line(c):
            return b"".join(parts), False
    raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")


def _read_line(c: _Conn) -> str:
    while True:
        i = c.buf.find(b"\n")
        if i >= 0:
            if i > MAX_CHUNK_LINE:
                raise ProtocolError(f"a chunk line longer than {MAX_CHUNK_LINE} bytes")
            return c.take(i + 1).decode("latin-1").rstrip("\r\n")
        if len(c.buf) > MAX_CHUNK_LINE:
            raise ProtocolError(f"a chunk line longer than {MAX_CHUNK_LINE} bytes")
        if not c.fill():
            raise ProtocolError("IncompleteRead: the answer ended inside a chunked body")


def _chunk_size(line: str) -> int:
    text = line.split(";", 1)[0].strip()
    if not text or len(text) > 15 or any(ch not in "0123456789abcdefABCDEF" for ch in text):
        raise ProtocolError(f"not a chunk size: {line[:40]!r}")
    return int(text, 16)


def _decoded(headers: dict[str, str], body: bytes, over: bool, cap: int, status: int) -> Reply:
    """gzip/deflate bodies decoded whole (every gzip member), at most `cap` bytes out: a small
    bomb stays small; a stream cut short or corrupt is an error, never a part of the body."""
    coding = headers.get("content-encoding", "").strip().lower()
    if over or coding not in ("gzip", "x-gzip", "deflate"):
        return Reply(status, headers, body, over)
    if coding == "deflate":
        out = _inflate(body, zlib.MAX_WBITS, cap)  # zlib-wrapped, as the RFC says
        if out is None:
            out = _inflate(body, -zlib.MAX_WBITS, cap)  # raw deflate, as some servers send it
    else:
        out = _inflate(body, 16 + zlib.MAX_WBITS, cap)
    if out is None:
        raise ProtocolError(f"the {coding} body does not decode (corrupt or cut short)")
    return Reply(status, headers, out[:cap], len(out) > cap)


def _inflate(data: bytes, wbits: int, cap: int) -> bytes | None:
    """`data` decoded (at most cap + 1 bytes; more means over the cap), None when it is not a
    complete stream of this kind. gzip members follow one another (RFC 1952)."""
    out = b""
    try:
        while True:
            d = zlib.decompressobj(wbits)
            out += d.decompress(data, cap + 1 - len(out))
            if len(out) > cap:  # the output limit was reached: over the cap, decoding stops here
                return out
            if not d.eof:
                return None
            data = d.unused_data
            if not data or wbits <= 0 or wbits == zlib.MAX_WBITS:
                return out if not data else None
    except zlib.error:
        return None
