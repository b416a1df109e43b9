"""A real local HTTP server that answers badly on purpose (tests/integration/test_alerts.py):

* ``huge``: 200 with a body of `huge_bytes` (1 GiB by default), written as fast as the peer
  reads it, never held in memory here;
* ``drip``: the status line, then one byte of a header every `drip_s` seconds, for ever.

Each connection is recorded with when it was accepted and when the peer closed it
(``connections``), and with how many body bytes the peer took (``sent``)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Conn:
    accepted: float
    closed: float | None = None  # monotonic: the peer closed (or reset) the connection
    sent: int = 0


class HostileHttpServer:
    def __init__(self, mode: str, *, huge_bytes: int = 1 << 30, drip_s: float = 0.2, max_s: float = 600.0) -> None:
        self.mode = mode
        self.huge_bytes = huge_bytes
        self.drip_s = drip_s
        self.max_s = max_s
        self.connections: list[Conn] = []
        self.cond = threading.Condition()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> HostileHttpServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()

    def closed(self) -> list[Conn]:
        with self.cond:
            return [c for c in self.connections if c.closed is not None]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            rec = Conn(time.monotonic())
            with self.cond:
                self.connections.append(rec)
            threading.Thread(target=self._serve, args=(conn, rec), daemon=True).start()

    def _serve(self, conn: socket.socket, rec: Conn) -> None:
        try:
            _read_request(conn)
            if self.mode == "huge":
                self._huge(conn, rec)
            else:
                self._drip(conn, rec)
        except OSError:
            pass
        finally:
            with self.cond:
                rec.closed = time.monotonic()
                self.cond.notify_all()
            conn.close()

    def _huge(self, conn: socket.socket, rec: Conn) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {self.huge_bytes}\r\n\r\n".encode())
        chunk = b"x" * (1 << 20)
        while rec.sent < self.huge_bytes and not self._stop.is_set():
            n = conn.send(chunk[: self.huge_bytes - rec.sent])
            rec.sent += n

    def _drip(self, conn: socket.socket, rec: Conn) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        end = time.monotonic() + self.max_s
        conn.settimeout(self.drip_s)
        while time.monotonic() < end and not self._stop.is_set():
            conn.sendall(b"X-Drip: " if rec.sent == 0 else b"\r\nX-Drip: " if rec.sent % 40 == 0 else b"X")
            rec.sent += 1
            try:  # the peer closing is seen as EOF here
                if conn.recv(1) == b"":
                    return
            except TimeoutError:
                pass


def _read_request(conn: socket.socket) -> None:
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed before the request head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
