"""A real local HTTP server standing in for an alert webhook (tests/integration/test_alerts.py):
it records every POST (headers and JSON body) and can answer the next ones with an error. Every
body is checked against the AsyncAPI document's alert schema (support/asyncapi_check.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import asyncapi_check
from tests.support.waiting import first_match


class WebhookServer:
    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], dict[str, Any]]] = []  # (path, headers, body)
        self.errors: list[int] = []  # statuses for the next POSTs (then 200)
        self.answered: list[int] = []  # every status answered, in order
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    def start(self, port: int = 0) -> WebhookServer:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                asyncapi_check.observe(body)
                with hook.cond:
                    status = hook.errors.pop(0) if hook.errors else 200
                    hook.answered.append(status)
                    if status == 200:
                        hook.received.append((self.path, dict(self.headers.items()), json.loads(body)))
                    hook.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def bodies(self) -> list[dict[str, Any]]:
        with self.cond:
            return [body for _path, _headers, body in self.received]

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        return first_match(self.cond, self.bodies, pred, timeout, "POST")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
