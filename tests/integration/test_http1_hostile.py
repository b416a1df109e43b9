"""Hostile answers to the lean HTTP/1.1 client (butler_mqtt/ops/http1.py), over real mTLS.

A tiny TLS server on 127.0.0.1 (`ScriptedServer`, below) reads each request and answers it with
scripted raw bytes (or drips them, or closes), so that every malformed, truncated, oversized or
slow answer can be sent. Most tests go through `PoolTransport.send`, the real consumer: it may
raise only QrsError subclasses with a message naming the cause, never hang past `qrs.timeout`,
never return a wrong body. Tests of the pool itself (connection reuse, `maxsize`, `close`) use
`Http1Pool` directly on urllib3 connections. The server counts accepted connections, so reuse and
non-reuse are asserted, not assumed.
"""

from __future__ import annotations

import gzip
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from urllib3.connection import HTTPSConnection

from butler_mqtt.backends.qrs.transport import PoolTransport
from butler_mqtt.config import QrsConfig
from butler_mqtt.errors import QrsError, QrsRefused, QrsTlsRejected, QrsUnreachable
from butler_mqtt.ops.http1 import MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_INTERIM, Http1Pool

pytestmark = pytest.mark.integration

#: The smallest qrs.max_response_bytes (config.py): the cap of the byte-cap tests.
CAP = 64 * 1024
#: qrs.timeout of every transport here: a hang costs at most this.
TIMEOUT = 3.0
#: What the server answers when its script is empty.
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# ------------------------------------------------------------------ the scripted TLS server

#: One scripted answer: gets the connection's socket, returns True to keep the connection open.
Action = Callable[[ssl.SSLSocket, threading.Event], bool]


def answer(raw: bytes, *, close: bool = False) -> Action:
    """Send `raw` as it is; then close the connection if `close`, else wait for the next request."""

    def act(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        sock.sendall(raw)
        return not close

    return act


def answer_then_write(raw: bytes, later: bytes, after_s: float) -> Action:
    """Answer, then write `later` unasked on the idle connection after `after_s` seconds."""

    def act(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        sock.sendall(raw)
        if not stop.wait(after_s):
            sock.sendall(later)
        return True

    return act


def close_now() -> Action:
    """Read the request, answer nothing, close."""

    def act(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        return False

    return act


def drip(prefix: bytes, every_s: float, byte: bytes = b"x", max_s: float = 15.0) -> Action:
    """Send `prefix`, then one `byte` every `every_s` seconds until the peer goes (or `max_s`)."""

    def act(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        if prefix:
            sock.sendall(prefix)
        end = time.monotonic() + max_s
        while time.monotonic() < end and not stop.wait(every_s):
            sock.sendall(byte)  # raises once the peer has closed: the connection ends
        return False

    return act


@dataclass
class Request:
    conn: int  # which accepted connection (0, 1, ...) carried it
    head: bytes  # request line and headers, without the blank line
    body: bytes

    @property
    def lines(self) -> list[str]:
        return self.head.decode("latin-1").split("\r\n")


@dataclass
class ScriptedServer:
    """TLS on 127.0.0.1 (a free port), client certificate required; each request, in the order
    they arrive, is answered by the next scripted action (`OK` once the script is empty)."""

    certs: Path
    script: list[Action] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    accepted: int = 0  # TCP connections accepted
    ended: int = 0  # connections over (closed by either side)
    peers: dict[int, bytes] = field(default_factory=dict)  # connection -> client certificate (DER)

    def __post_init__(self) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(self.certs / "server.pem"), str(self.certs / "server_key.pem"))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(str(self.certs / "root.pem"))
        self.lock = threading.Condition()
        self.stop_event = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="scripted-accept").start()

    def then(self, *actions: Action) -> ScriptedServer:
        with self.lock:
            self.script.extend(actions)
        return self

    def wait_ended(self, n: int, timeout: float = 5.0) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.ended >= n, timeout), f"{self.ended} connections ended, {n} expected"

    def stop(self) -> None:
        self.stop_event.set()
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:  # wakes a serving thread blocked in recv; that thread closes the socket
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.stop_event.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                n = self.accepted
                self.accepted += 1
            threading.Thread(target=self._serve, args=(raw, n), daemon=True, name=f"scripted-{n}").start()

    def _serve(self, raw: socket.socket, n: int) -> None:
        sock: Any = raw
        try:
            raw.settimeout(10)
            sock = self.ctx.wrap_socket(raw, server_side=True)
            with self.lock:
                self.socks.append(sock)
                self.peers[n] = sock.getpeercert(binary_form=True)
            buf = bytearray()
            while not self.stop_event.is_set():
                req = _read_request(sock, buf, n)
                if req is None:
                    return
                with self.lock:
                    self.requests.append(req)
                    act = self.script.pop(0) if self.script else answer(OK)
                if not act(sock, self.stop_event):
                    return
        except (OSError, ValueError):
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            with self.lock:
                self.ended += 1
                self.lock.notify_all()


def _read_request(sock: Any, buf: bytearray, n: int) -> Request | None:
    """One request (head and Content-Length body); None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    del buf[: end + 4]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return Request(n, head, body)


@pytest.fixture
def server(qrs_certs: Path) -> Iterator[ScriptedServer]:
    s = ScriptedServer(qrs_certs)
    yield s
    s.stop()


def qrs_config(certs: Path, port: int, **kw: Any) -> QrsConfig:
    base: dict[str, Any] = {
        "host": "localhost", "port": port, "cert": certs / "client.pem", "key": certs / "client_key.pem",
        "ca": certs / "root.pem", "timeout": TIMEOUT, "retries": 0,
    }
    return QrsConfig.model_validate({**base, **kw})


@pytest.fixture
def make_transport(qrs_certs: Path) -> Iterator[Callable[..., PoolTransport]]:
    made: list[PoolTransport] = []

    def make(port: int, **kw: Any) -> PoolTransport:
        t = PoolTransport(qrs_config(qrs_certs, port, **kw))
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def transport(server: ScriptedServer, make_transport: Callable[..., PoolTransport]) -> PoolTransport:
    return make_transport(server.port)


@pytest.fixture
def make_pool(qrs_certs: Path) -> Iterator[Callable[..., Http1Pool]]:
    """`Http1Pool` on urllib3 HTTPS connections with the client certificate (mTLS)."""
    ctx = ssl.create_default_context(cafile=str(qrs_certs / "root.pem"))
    ctx.load_cert_chain(str(qrs_certs / "client.pem"), str(qrs_certs / "client_key.pem"))
    made: list[Http1Pool] = []

    def make(port: int, maxsize: int = 4) -> Http1Pool:
        pool = Http1Pool(
            lambda: HTTPSConnection("localhost", port, timeout=TIMEOUT, ssl_context=ctx),
            f"localhost:{port}", maxsize=maxsize, read_timeout=TIMEOUT,
        )
        made.append(pool)
        return pool

    yield make
    for p in made:
        p.close()


def get(t: PoolTransport, target: str = "/qrs/about") -> bytes:
    answer_ = t.send("GET", target, None, {})
    assert answer_.status_code == 200
    return answer_.content


def fails(t: PoolTransport, kind: type[QrsError] = QrsUnreachable, target: str = "/qrs/about") -> QrsError:
    """The error of one GET, which must be exactly of `kind` (or a subclass)."""
    with pytest.raises(QrsError) as info:
        t.send("GET", target, None, {})
    assert isinstance(info.value, kind), f"{type(info.value).__name__}: {info.value}"
    return info.value


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


BINARY = bytes(range(256)) * 5 + b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"  # a body that looks like a head


# ------------------------------------------------------------------ 1. framings, reuse


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BINARY), BINARY), id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x;name=value;other\r\n%s\r\n" % (len(BINARY[:700]), BINARY[:700])
            + b"1\r\n%s\r\n" % BINARY[700:701]
            + b"%X ; ext=\"quoted;x\"\r\n%s\r\n" % (len(BINARY[701:]), BINARY[701:])
            + b"0\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n",
            id="chunked-extensions-trailers",
        ),
    ],
)
def test_framed_bodies_come_back_exactly_and_the_connection_is_reused(server, transport, raw):
    server.then(answer(raw))
    assert get(transport) == BINARY
    assert get(transport) == b"ok"
    assert server.accepted == 1
    assert [r.conn for r in server.requests] == [0, 0]


def test_close_delimited_body_comes_back_exactly_then_a_new_connection(server, transport):
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + BINARY, close=True))
    assert get(transport) == BINARY
    assert get(transport) == b"ok"
    assert server.accepted == 2
    assert [r.conn for r in server.requests] == [0, 1]


def test_many_small_chunks_arriving_one_by_one(server, transport):
    """Each chunk in its own TLS record (the reader must not expect the whole body in one read)."""
    parts = [b"part%02d;" % i for i in range(30)]

    def act(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p in parts:
            sock.sendall(b"%x\r\n" % len(p))
            sock.sendall(p + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        return True

    server.then(act)
    assert get(transport) == b"".join(parts)
    assert get(transport) == b"ok"
    assert server.accepted == 1


# ------------------------------------------------------------------ 2. Connection: close, HTTP/1.0


@pytest.mark.parametrize(
    "raw, reused",
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\none", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 3\r\n\r\none", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\none", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\none", True),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\none", True),
    ],
    ids=["close", "close-in-a-list", "http10", "http10-keep-alive", "http11-keep-alive"],
)
def test_connection_close_and_http10_open_a_new_connection(server, transport, raw, reused):
    # The server itself keeps the connection open: only the answer's words say "close".
    server.then(answer(raw))
    assert get(transport) == b"one"
    assert get(transport) == b"ok"
    assert server.accepted == (1 if reused else 2)


# ------------------------------------------------------------------ 3. idle connection closed by the server


def test_an_idle_connection_the_server_closed_is_not_reused(server, transport):
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", close=True))
    assert get(transport) == b"first"
    server.wait_ended(1)
    time.sleep(0.05)  # the FIN is on the client's side by now (loopback)
    assert get(transport) == b"ok"
    assert server.accepted == 2


def test_an_idle_connection_the_server_wrote_to_unasked_is_not_reused(server, transport):
    """Bytes the server wrote after its answer are never taken for the next request's answer."""
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG"
    server.then(answer_then_write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", stale, 0.05))
    assert get(transport) == b"first"
    time.sleep(0.3)
    assert get(transport) == b"ok"
    assert server.accepted == 2


def test_extra_bytes_after_a_content_length_body_close_the_connection(server, transport):
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG"))
    assert get(transport) == b"first"
    assert get(transport) == b"ok"
    assert server.accepted == 2


# ------------------------------------------------------------------ 4. interim answers


def test_100_continue_then_the_real_answer(server, transport):
    server.then(answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: b\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"))
    assert get(transport) == b"real"
    assert get(transport) == b"ok"
    assert server.accepted == 1


def test_the_most_interim_answers_allowed_then_the_real_one(server, transport):
    server.then(answer(b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"))
    assert get(transport) == b"real"


def test_more_than_ten_interim_answers_is_an_error(server, transport):
    server.then(answer(b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1) + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"))
    exc = fails(transport)
    assert "interim" in str(exc)
    assert get(transport) == b"ok"


def test_101_switching_protocols_is_an_error(server, transport):
    server.then(answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
    exc = fails(transport)
    assert "101" in str(exc)
    assert get(transport) == b"ok"
    assert server.accepted == 2


# ------------------------------------------------------------------ 5. malformed answers

MALFORMED = {
    "not-http": (b"SSH-2.0-OpenSSH_9.6\r\nX: y\r\n\r\n", "not an HTTP/1.x status line"),
    "html": (b"<html><body>hello</body></html>\r\n\r\n", "not an HTTP/1.x status line"),
    "http2-version": (b"HTTP/2 200\r\nContent-Length: 2\r\n\r\nok", "not an HTTP/1.x status line"),
    "two-digit-status": (b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", "not an HTTP/1.x status line"),
    "four-digit-status": (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "not an HTTP/1.x status line"),
    "status-below-100": (b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", "not an HTTP status"),
    "header-without-colon": (b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok", "not a header line"),
    "header-name-with-space": (b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok", "not a header line"),
    "too-many-headers": (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"Content-Length: 2\r\n\r\nok",
        f"more than {MAX_HEADERS} header lines",
    ),
    "conflicting-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "conflicting Content-Length"),
    "non-numeric-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello", "not a Content-Length"),
    "negative-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", "not a Content-Length"),
    "huge-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999999\r\n\r\nhello", "not a Content-Length"),
    "bad-chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "not a chunk size"),
    "empty-chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n", "not a chunk size"),
    "chunk-without-crlf": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "not followed by CRLF"),
    "chunk-line-over-4k": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * (MAX_CHUNK_LINE + 10) + b"\r\nhello\r\n0\r\n\r\n",
        f"longer than {MAX_CHUNK_LINE}",
    ),
    "chunk-line-over-4k-no-newline": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * (MAX_CHUNK_LINE + 10),
        f"longer than {MAX_CHUNK_LINE}",
    ),
    "transfer-encoding-gzip": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello", "unsupported Transfer-Encoding"),
    "transfer-encoding-chunked-then-gzip": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "unsupported Transfer-Encoding",
    ),
    "gzip-that-is-not-gzip": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello", "gzip body does not decode"),
}


@pytest.mark.parametrize("raw, words", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_answer_is_unreachable_and_the_next_request_works(server, transport, raw, words):
    server.then(answer(raw))
    exc = fails(transport)
    assert words in str(exc), str(exc)
    assert f"localhost:{server.port}" in str(exc)
    assert exc.never_sent is False
    assert get(transport) == b"ok"
    assert server.accepted == 2  # the connection that carried the bad answer is never used again


def test_a_head_over_64k_without_an_end(server, transport):
    # The server keeps the connection open after the endless head: the cap ends the read, not EOF.
    server.then(answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 8192)))
    started = time.monotonic()
    exc = fails(transport)
    assert f"larger than {MAX_HEAD} bytes" in str(exc)
    assert time.monotonic() - started < TIMEOUT - 0.5  # refused on size, not cut by the deadline
    assert get(transport) == b"ok"


def test_a_head_of_exactly_100_headers_is_read(server, transport):
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(MAX_HEADERS - 1))
    server.then(answer(head + b"Content-Length: 4\r\n\r\nbody"))
    assert get(transport) == b"body"


#: Found by these tests and fixed in ops/http1.py: ASCII digits only, only `chunked` as a transfer
#: coding, gzip decoded to its end (every member) or refused, printable-ASCII targets only.


def test_a_header_with_a_superscript_digit_content_length_is_unreachable(server, transport):
    """`Content-Length: ²` (0xB2 in latin-1): str.isdigit() says yes, int() says no. Whatever
    the answer, PoolTransport.send may raise only QrsError."""
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nhi"))
    with pytest.raises(Exception) as info:
        transport.send("GET", "/qrs/about", None, {})
    assert isinstance(info.value, QrsUnreachable), f"{type(info.value).__name__}: {info.value}"
    assert get(transport) == b"ok"


def test_a_status_with_a_superscript_digit_is_unreachable(server, transport):
    """`HTTP/1.1 2\xb20`: str.isdigit() is true for '²', int() raises ValueError."""
    server.then(answer(b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 2\r\n\r\nhi"))
    with pytest.raises(Exception) as info:
        transport.send("GET", "/qrs/about", None, {})
    assert isinstance(info.value, QrsUnreachable), f"{type(info.value).__name__}: {info.value}"


def test_gzip_transfer_coding_under_chunked_never_returns_the_compressed_bytes(server, transport):
    """`Transfer-Encoding: gzip, chunked` (we never sent TE: gzip): the chunked framing is read,
    but the body is still gzip. Returning those bytes as the answer is returning a wrong body:
    the client must decode them or refuse the answer."""
    payload = b'{"name": "QRS"}'
    server.then(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked(gzip.compress(payload))))
    try:
        body = get(transport)
    except QrsError:
        return  # refused: fine
    assert body == payload


GZ_PAYLOAD = b"".join(b'{"id": %d, "name": "task %d"},' % (i, i) for i in range(2000))


@pytest.mark.parametrize(
    "z",
    [
        gzip.compress(GZ_PAYLOAD)[:-200],  # cut short: no end of stream, no CRC, no length
        gzip.compress(GZ_PAYLOAD[:1000]) + gzip.compress(GZ_PAYLOAD[1000:]),  # two members (RFC 1952 2.2)
    ],
    ids=["truncated", "two-members"],
)
def test_a_gzip_body_is_decoded_whole_or_refused(server, transport, z):
    """Only a gzip stream decoded to its end is the answer: a stream cut short (the Content-Length
    matching the cut bytes) or a second member left undecoded gives a prefix of the body."""
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(z), z)))
    try:
        body = get(transport)
    except QrsError:
        return  # refused: fine
    assert body == GZ_PAYLOAD


# ------------------------------------------------------------------ 6. the server closes mid-answer


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"", "closed connection without response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "head was cut short"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", "10 bytes read, 90 more expected"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhalf", "ended inside a chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfull\r\n", "ended inside a chunked body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfull\r\n0\r\nX-Trailer: t\r\n", "ended inside a chunked body"),
    ],
    ids=["before-answering", "inside-the-head", "inside-content-length", "inside-a-chunk", "between-chunks", "inside-trailers"],
)
def test_the_server_closing_mid_answer_is_unreachable_not_never_sent(server, transport, raw, words):
    server.then(answer(raw, close=True) if raw else close_now())
    exc = fails(transport)
    assert words in str(exc), str(exc)
    assert exc.never_sent is False  # the request did reach the server
    assert len(server.requests) == 1
    assert get(transport) == b"ok"


# ------------------------------------------------------------------ 7. the byte cap


def _framed(framing: str, body: bytes) -> Action:
    if framing == "content-length":
        return answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    if framing == "chunked":
        pieces = [body[i : i + 10000] for i in range(0, len(body), 10000)]
        return answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(*pieces))
    return answer(b"HTTP/1.1 200 OK\r\n\r\n" + body, close=True)


FRAMINGS = ["content-length", "chunked", "close-delimited"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_an_answer_over_the_cap_is_refused_naming_the_setting(server, make_transport, framing):
    t = make_transport(server.port, max_response_bytes=CAP)
    server.then(_framed(framing, b"y" * (CAP + 1)))
    exc = fails(t, QrsRefused)
    assert "qrs.max_response_bytes" in str(exc) and str(CAP) in str(exc)
    assert exc.status == 200
    assert get(t) == b"ok"
    assert server.accepted == 2  # the rest was never read: that connection is gone


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_much_larger_answer_is_refused_without_reading_it_all(server, make_transport, framing):
    t = make_transport(server.port, max_response_bytes=CAP)
    server.then(_framed(framing, b"z" * (CAP * 64)))  # 4 MiB
    exc = fails(t, QrsRefused)
    assert "qrs.max_response_bytes" in str(exc)
    assert get(t) == b"ok"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_an_answer_of_exactly_the_cap_is_returned_whole(server, make_transport, framing):
    t = make_transport(server.port, max_response_bytes=CAP)
    body = (BINARY * (CAP // len(BINARY) + 1))[:CAP]
    server.then(_framed(framing, body))
    assert get(t) == body
    assert get(t) == b"ok"


def test_a_gzip_bomb_is_refused_at_the_cap(server, make_transport):
    t = make_transport(server.port, max_response_bytes=CAP)
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))  # 16 MiB out of about 16 KB in
    assert len(bomb) < CAP
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb)))
    exc = fails(t, QrsRefused)
    assert "qrs.max_response_bytes" in str(exc)
    assert get(t) == b"ok"


def test_gzip_of_one_byte_over_the_cap_is_refused(server, make_transport):
    t = make_transport(server.port, max_response_bytes=CAP)
    z = gzip.compress(b"q" * (CAP + 1))
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(z)))
    fails(t, QrsRefused)


@pytest.mark.parametrize(
    "coding, encode",
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send it
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw"],
)
def test_a_compressed_body_under_the_cap_is_returned_decoded(server, make_transport, coding, encode):
    t = make_transport(server.port, max_response_bytes=CAP)
    payload = b"".join(b'{"id": %d},' % i for i in range(3000))
    assert CAP // 2 < len(payload) <= CAP
    z = encode(payload)
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (coding.encode(), len(z), z)))
    assert get(t) == payload


def test_gzip_decoding_to_exactly_the_cap_is_returned_whole(server, make_transport):
    t = make_transport(server.port, max_response_bytes=CAP)
    payload = (BINARY * (CAP // len(BINARY) + 1))[:CAP]
    z = gzip.compress(payload)
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(z), z)))
    assert get(t) == payload


# ------------------------------------------------------------------ 8. the total deadline


@pytest.mark.parametrize(
    "prefix, byte",
    [
        (b"HTTP/1.1 200 OK\r\n", b"X"),  # a head that never ends (no colon: never a valid line either)
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x"),  # a body that never ends
    ],
    ids=["drips-the-head", "drips-the-body"],
)
def test_a_dripping_server_is_cut_at_the_total_deadline(server, make_transport, prefix, byte):
    timeout = 2.0
    t = make_transport(server.port, timeout=timeout)
    server.then(drip(prefix, 0.3, byte))
    started = time.monotonic()
    exc = fails(t)
    took = time.monotonic() - started
    assert f"did not answer within {timeout:g} s" in str(exc), str(exc)
    assert took < timeout + 3.0
    assert took > 0.3 * 3  # it did wait for the drip (the reads were not refused at once)
    assert get(t) == b"ok"


def test_a_silent_server_is_cut_at_the_total_deadline(server, make_transport):
    timeout = 1.0
    t = make_transport(server.port, timeout=timeout)
    server.then(drip(b"", 30.0))  # reads the request, says nothing
    started = time.monotonic()
    exc = fails(t)
    assert "did not answer within" in str(exc), str(exc)
    assert time.monotonic() - started < timeout + 3.0


# ------------------------------------------------------------------ 9. the request as sent


def test_the_request_line_and_headers_are_exactly_http11(server, transport):
    transport.send("GET", "/qrs/about?xrfkey=0123456789abcdef", None, {"X-Qlik-Xrfkey": "0123456789abcdef", "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_api"})
    (req,) = server.requests
    assert req.lines == [
        "GET /qrs/about?xrfkey=0123456789abcdef HTTP/1.1",
        f"Host: localhost:{server.port}",
        "Accept-Encoding: identity",
        "X-Qlik-Xrfkey: 0123456789abcdef",
        "X-Qlik-User: UserDirectory=INTERNAL; UserId=sa_api",
    ]
    assert req.body == b""


def test_a_post_without_body_sends_content_length_0(server, transport):
    transport.send("POST", "/qrs/task/start/synchronous?name=x", None, {})
    (req,) = server.requests
    assert req.lines[0] == "POST /qrs/task/start/synchronous?name=x HTTP/1.1"
    assert "Content-Length: 0" in req.lines
    assert req.body == b""


def test_a_post_with_a_body_sends_it_exactly(server, transport):
    body = b'{"name": "\xc3\xa9t\xc3\xa9", "raw": "\\r\\n"}' + bytes(range(256))
    transport.send("POST", "/qrs/reloadtask/full", body, {"Content-Type": "application/json"})
    transport.send("POST", "/qrs/reloadtask/full", b"second", {"Content-Type": "application/json"})
    first, second = server.requests
    assert f"Content-Length: {len(body)}" in first.lines and first.body == body
    assert "Content-Length: 6" in second.lines and second.body == b"second"
    assert second.conn == first.conn  # the same connection: the first body was framed exactly


@pytest.mark.parametrize(
    "target, headers",
    [
        ("/qrs/about x", {}),
        ("/qrs/about\r\nX-Injected: yes", {}),
        ("/qrs/about\nX-Injected: yes", {}),
        ("/qrs/about\x00", {}),
        ("http://elsewhere/qrs/about", {}),
        ("", {}),
        ("/qrs/about", {"X-Qlik-User": "UserId=sa_api\r\nX-Injected: yes"}),
        ("/qrs/about", {"X-Qlik-User": "UserId=sa_api\nX-Injected: yes"}),
        ("/qrs/about", {"X-Qlik-User": "UserId=sa_api\r"}),
        ("/qrs/about", {"X-Bad\r\nName": "v"}),
        ("/qrs/about", {"X:Colon": "v"}),
        ("/qrs/about", {"": "v"}),
    ],
    ids=[
        "space-in-target", "crlf-in-target", "lf-in-target", "nul-in-target", "absolute-target", "empty-target",
        "crlf-in-value", "lf-in-value", "cr-in-value", "crlf-in-name", "colon-in-name", "empty-name",
    ],
)
def test_an_unsafe_target_or_header_is_refused_before_anything_is_sent(server, transport, target, headers):
    assert get(transport) == b"ok"  # an idle connection in the pool: nothing may be sent on it either
    with pytest.raises(ValueError):
        transport.send("GET", target, None, headers)
    time.sleep(0.02)
    assert len(server.requests) == 1
    assert get(transport) == b"ok"
    assert server.accepted == 1  # the idle connection was not touched
    assert len(server.requests) == 2


def test_a_non_ascii_target_is_refused_before_anything_is_sent(server, transport):
    """A request-target is ASCII (RFC 9112 3.2): a non-ASCII one is refused before anything is sent,
    never sent as raw bytes (the QRS client percent-encodes what it puts in a target)."""
    with pytest.raises(ValueError):
        transport.send("GET", "/qrs/\u20ac", None, {})
    try:
        transport.send("GET", "/qrs/\xe9", None, {})
    except ValueError:
        pass
    assert [r.lines[0] for r in server.requests] in ([], ["GET /qrs/%C3%A9 HTTP/1.1"])


# ------------------------------------------------------------------ 10. nothing listening, no TLS


def test_connection_refused_is_unreachable_and_never_sent(make_transport):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections to it are refused
        t = make_transport(port)
        started = time.monotonic()
        exc = fails(t)
    assert exc.never_sent is True
    assert "Connection refused" in str(exc)
    assert time.monotonic() - started < 2.0


@pytest.fixture
def tcp_only() -> Iterator[tuple[int, Callable[[bytes], None]]]:
    """A plain TCP listener: accepts, reads, and writes `reply` (bytes; nothing if empty) to
    each connection; never speaks TLS. Yields (port, set_reply)."""
    listener = socket.create_server(("127.0.0.1", 0))
    reply = [b""]
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if reply[0]:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(reply[0])
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1]), lambda b: reply.__setitem__(0, b)
    listener.close()
    for c in held:
        c.close()


def test_a_server_that_never_completes_the_tls_handshake_is_cut(tcp_only, make_transport):
    port, _ = tcp_only
    timeout = 1.0
    t = make_transport(port, timeout=timeout)
    started = time.monotonic()
    exc = fails(t)
    assert time.monotonic() - started < timeout + 3.0
    assert "timed out" in str(exc) or "did not answer within" in str(exc), str(exc)


def test_plain_http_on_the_tls_port_is_named(tcp_only, make_transport):
    port, set_reply = tcp_only
    set_reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    t = make_transport(port)
    exc = fails(t, QrsTlsRejected)
    assert "does not speak TLS" in str(exc) and "qrs.port" in str(exc), str(exc)


def test_failed_handshakes_leave_no_socket_open(make_transport):
    """Each failed TLS handshake closes its TCP socket at once (not when the garbage collector
    gets to it): 40 failures against a plain-HTTP server that closes its side, no descriptor
    more than before."""
    import gc
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    t = make_transport(int(listener.getsockname()[1]))
    try:
        fails(t, QrsTlsRejected)  # warm up (imports, the context)
        gc.disable()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(40):
            fails(t, QrsTlsRejected)
        time.sleep(0.1)  # the server's last close
        after = len(os.listdir("/proc/self/fd"))
    finally:
        gc.enable()
        listener.close()
    assert after <= before + 2, f"{after - before} descriptors left open by 40 failed handshakes"


# ------------------------------------------------------------------ the pool itself


def test_pool_reuses_one_connection_and_reports_headers(server, make_pool):
    pool = make_pool(server.port)
    server.then(answer(b"HTTP/1.1 201 Created\r\nX-A: one\r\nx-a: two\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Fold: a\r\n  b\r\nContent-Length: 3\r\n\r\nabc"))
    reply = pool.request("GET", "/x", {}, None, CAP)
    assert (reply.status, reply.body, reply.over) == (201, b"abc", False)
    assert reply.headers["x-a"] == "one, two"
    assert reply.headers["x-fold"] == "a b"
    assert reply.headers["date"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    for _ in range(5):
        assert pool.request("GET", "/x", {}, None, CAP).body == b"ok"
    assert server.accepted == 1
    assert {r.conn for r in server.requests} == {0}


@pytest.mark.parametrize(
    "method, raw",
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
    ],
    ids=["head", "204", "304"],
)
def test_pool_bodiless_answers_keep_the_connection(server, make_pool, method, raw):
    pool = make_pool(server.port)
    server.then(answer(raw))
    assert pool.request(method, "/x", {}, None, CAP).body == b""
    assert pool.request("GET", "/x", {}, None, CAP).body == b"ok"
    assert server.accepted == 1


def test_pool_over_the_cap_says_so_and_drops_the_connection(server, make_pool):
    pool = make_pool(server.port)
    server.then(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 100))
    reply = pool.request("GET", "/x", {}, None, 10)
    assert (reply.body, reply.over) == (b"a" * 10, True)
    assert pool.request("GET", "/x", {}, None, 10).body == b"ok"
    assert server.accepted == 2


def test_pool_keeps_at_most_maxsize_idle_connections(server, make_pool):
    pool = make_pool(server.port, maxsize=1)
    slow = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"

    def delayed(sock: ssl.SSLSocket, stop: threading.Event) -> bool:
        stop.wait(0.4)  # both requests are in flight at once: two connections
        sock.sendall(slow)
        return True

    server.then(delayed, delayed)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(pool.request("GET", "/x", {}, None, CAP).body)) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert results == [b"slow", b"slow"]
    assert server.accepted == 2
    server.wait_ended(1)  # one of the two was closed by the pool (maxsize 1), the other kept
    assert server.ended == 1
    assert pool.request("GET", "/x", {}, None, CAP).body == b"ok"
    assert server.accepted == 2


def test_pool_close_closes_idle_connections_and_later_ones(server, make_pool):
    pool = make_pool(server.port)
    assert pool.request("GET", "/x", {}, None, CAP).body == b"ok"
    pool.close()
    server.wait_ended(1)
    assert pool.request("GET", "/x", {}, None, CAP).body == b"ok"  # still answers, on a new connection
    server.wait_ended(2)  # which is not kept after close
    assert server.accepted == 2


# ------------------------------------------------------------------ certificate reload (SIGHUP)


@pytest.fixture
def rotating_certs(tmp_path: Path) -> dict[str, Any]:
    """A CA, a server certificate for localhost and two client certificates from that CA; the
    client files `client.pem` / `client_key.pem` hold the first one."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "root.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server_key.pem"))
    clients = [ca.issue_cert("client-one", common_name="client-one"), ca.issue_cert("client-two", common_name="client-two")]
    clients[0].cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    clients[0].private_key_pem.write_to_path(str(tmp_path / "client_key.pem"))
    ders = [ssl.PEM_cert_to_DER_cert(c.cert_chain_pems[0].bytes().decode()) for c in clients]
    return {"dir": tmp_path, "clients": clients, "ders": ders}


@pytest.mark.parametrize("first", [answer(OK), answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", close=True)], ids=["idle-connection-kept", "connection-closed"])
def test_send_after_reload_tls_presents_the_new_client_certificate(rotating_certs, first):
    """PoolTransport.reload_tls swaps both the urllib3 pool and the lean client built on it: every
    `send` after a reload presents the new client certificate, whether a connection of the old
    one was kept idle or not (found by this test: the lean client was first left on the old pool)."""
    d, clients, ders = rotating_certs["dir"], rotating_certs["clients"], rotating_certs["ders"]
    srv = ScriptedServer(d)
    t = PoolTransport(qrs_config(d, srv.port))
    try:
        srv.then(first)
        assert get(t) == b"ok"
        assert srv.peers[0] == ders[0]
        clients[1].cert_chain_pems[0].write_to_path(str(d / "client.pem"))
        clients[1].private_key_pem.write_to_path(str(d / "client_key.pem"))
        t.reload_tls()
        assert get(t) == b"ok"
        last = srv.requests[-1].conn
        assert srv.peers[last] == ders[1], "the request after reload_tls used the old client certificate"
    finally:
        t.close()
        srv.stop()
