"""`CloudClient`: one authenticated, paced, deadline-bounded call to the tenant, and paging.

Per call (`call`), within one total deadline (`cloud.timeout` unless given):

* `Authorization` from the credentials (auth.py); a 401 drops the token and the call is made
  once more with a new one; a second 401 (or an API key's first) is `CloudAuthRefused`.
* Starts (`start=True`) wait for their slot of the `StartPacer` (pacing.py).
* 429: `Retry-After` (seconds or an HTTP date; on a start it pauses every start) is waited out when it
  ends before the deadline, then the call is made again (a 429 started nothing, so this cannot
  start twice); without Retry-After, a jittered backoff (0.5 s doubling, at most 8 s). When the
  wait would pass the deadline: `CloudRateLimited` (transient). A 429 on a start without
  Retry-After and without Qlik's rate-limit code `HTTP-429` is the "pending reload request
  already exists for this app" answer: `CloudRateLimited(pending=True)` at once.
* Status mapping of `json()`: 2xx -> the parsed body; 404 -> `CloudNotFound`; others ->
  `CloudRefused` (transient for 5xx/429 through errors.is_transient), with Qlik's error code
  and title, never the request's secrets.

`pages(target)` follows `links.next.href` (also `links.Next.Href`) from page to page: the same
cursor never twice (a paging loop is an error, not an endless walk), only on the tenant, at most
`cloud.max_pages` pages (past it: an error naming `cloud.max_pages`, never a silent truncation).
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from butler_mqtt.errors import (
    CloudAuthRefused,
    CloudNotFound,
    CloudRateLimited,
    CloudRefused,
    QrsError,
)

from .auth import Credentials, credentials
from .pacing import StartPacer
from .settings import CloudSettings
from .transport import Answer, CloudTransport, redact_url

_MAX_BACKOFF = 8.0
_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}|[0-9a-fA-F]{24}|[A-Za-z0-9_-]{32,}")
#: Told of every call: (method, low-cardinality route, status or None when no answer, seconds);
#: the daemon's metrics and outage alerts (the same observer type as the QRS client's).
Observer = Callable[[str, str, int | None, float], None]


def route_of(url: str) -> str:
    """`/api/v1/reloads/{id}` from a URL: no query, ids (app GUIDs, reload and item ids) as `{id}`."""
    path = urlsplit(url).path or "/"
    return "/".join("{id}" if _ID.fullmatch(p) else p for p in path.split("/"))
_MAX_RETRY_AFTER = 3600.0


def query(**params: str | int | None) -> str:
    """`?a=b&…` with every value percent-encoded (`&`, `#`, `%`, `+`, quotes, unicode)."""
    kept = {k: str(v) for k, v in params.items() if v is not None}
    return "?" + urlencode(kept, quote_via=quote, safe="") if kept else ""


def retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds of a `Retry-After` header (delta-seconds or HTTP date), capped at an hour."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def error_summary(answer: Answer) -> str:
    """`HTTP-404 Not Found: detail` from Qlik's `{"errors": [...]}` body, short, one line."""
    try:
        body = json.loads(answer.content)
        first = body["errors"][0]
        parts = [str(first.get("code", "")), str(first.get("title", ""))]
        detail = first.get("detail") or first.get("details") or ""
        text = " ".join(p for p in parts if p) + (f": {detail}" if detail else "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        text = ""
    return " ".join(text.split())[:300]


class CloudClient:
    """Thread-safe; one per daemon (the token cache and the pacer are shared by every thread)."""

    def __init__(
        self,
        settings: CloudSettings,
        transport: CloudTransport | None = None,
        creds: Credentials | None = None,
        pacer: StartPacer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self._observer = observer
        self.transport = transport if transport is not None else CloudTransport(settings)
        self.creds = creds if creds is not None else credentials(settings, self.transport)
        self.pacer = pacer if pacer is not None else StartPacer(settings.reloads_per_minute)
        self._sleep = sleep
        self.rate_limited = 0  # 429 answers seen (metrics, bench)

    def close(self) -> None:
        self.transport.close()

    def deadline(self) -> float:
        return time.monotonic() + self.settings.timeout

    def url(self, target: str) -> str:
        """A path (`/api/...`) on the tenant, or an absolute URL as given (the transport calls
        only the tenant's origin, so any other is refused there)."""
        return self.settings.base_url + target if target.startswith("/") and not target.startswith("//") else target

    def call(
        self,
        method: str,
        target: str,
        *,
        body: Any = None,
        start: bool = False,
        deadline: float | None = None,
        sink: Callable[[bytes], None] | None = None,
    ) -> Answer:
        """One API call (`target`: a path with query, or a full tenant URL), auth, pacing,
        429 and 401 handled as the module says. Returns any non-401/429 answer."""
        end = deadline if deadline is not None else self.deadline()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"} | ({"Content-Type": "application/json"} if data else {})
        refused_once = False
        backoff = 0.5
        while True:
            if start:
                self.pacer.acquire(end)
            auth = self.creds.header(end)
            answer = self._observed(method, self.url(target), data, headers | {"Authorization": auth}, end, sink)
            if answer.status == 401:
                self.creds.refused(auth, 401)  # raises for an API key
                if refused_once:
                    raise self._refused_twice(answer)
                refused_once = True
                continue
            if answer.status != 429:
                return answer
            backoff = self._wait_429(answer, start, end, backoff)

    def _observed(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str], end: float,
        sink: Callable[[bytes], None] | None,
    ) -> Answer:
        """One request through the transport, told to the observer (status None: no answer)."""
        t0 = time.monotonic()
        status: int | None = None
        try:
            answer = self.transport.request(method, url, body=data, headers=headers, deadline=end, sink=sink)
            status = answer.status
            return answer
        finally:
            if self._observer is not None:
                self._observer(method, route_of(url), status, time.monotonic() - t0)

    def _refused_twice(self, answer: Answer) -> Exception:
        return CloudAuthRefused(
            f"Qlik Cloud refused a freshly fetched access token (401 {error_summary(answer)}): check that the"
            f" OAuth client of {self.creds.key} is still enabled and has the scopes it needs",
            self.creds.key,
            401,
        )

    def _wait_429(self, answer: Answer, start: bool, end: float, backoff: float) -> float:
        """Wait out a 429 (or raise CloudRateLimited); return the next backoff."""
        self.rate_limited += 1
        hint = retry_after(answer.headers.get("retry-after"))
        if start and hint is None and "HTTP-429" not in error_summary(answer):
            raise CloudRateLimited(
                f"Qlik Cloud: a pending reload request already exists for this app (429 {error_summary(answer)})",
                None,
                pending=True,
            )
        wait = hint if hint is not None else backoff * random.uniform(0.5, 1.0)
        until = time.monotonic() + wait
        if hint is not None and start:
            self.pacer.pause_until(until)  # the start tier is the tenant's: every start waits
        if until >= end:
            raise CloudRateLimited(
                f"Qlik Cloud rate limit (429): retry in {wait:.1f} s" + ("" if hint is not None else " (no Retry-After)"),
                hint if hint is not None else wait,
            )
        if not start or hint is None:
            self._sleep(wait)  # a start waits in pacer.acquire (paused until then)
        return min(backoff * 2, _MAX_BACKOFF)

    def check(self) -> list[tuple[bool, str]]:
        """`check` with `backend: cloud`: one line for the credentials (an OAuth token obtained,
        or the API key accepted) and one for the tenant answering; (ok, text) each."""
        lines: list[tuple[bool, str]] = []
        try:
            self.creds.header(self.deadline())
            what = "an access token obtained from /oauth/token" if self.creds.key == "cloud.client_id" else "API key set"
            lines.append((True, f"Qlik Cloud credentials: {what}"))
            self.json("GET", "/api/v1/spaces" + query(limit=1))
            lines.append((True, f"Qlik Cloud tenant {redact_url(self.settings.tenant)} answers GET /api/v1/spaces"))
        except (CloudRefused, QrsError) as exc:
            lines.append((False, self.settings.scrub(str(exc))))
        return lines

    def json(self, method: str, target: str, *, body: Any = None, start: bool = False, deadline: float | None = None) -> Any:
        """`call`, then the parsed JSON body of a 2xx answer; errors as the module says."""
        answer = self.call(method, target, body=body, start=start, deadline=deadline)
        what = f"{method} {redact_url(self.url(target))}"
        if answer.status == 404:
            raise CloudNotFound(f"{what}: 404 {error_summary(answer)}", 404)
        if not 200 <= answer.status < 300:
            raise CloudRefused(f"{what}: Qlik Cloud answered {answer.status} {error_summary(answer)}".rstrip(), answer.status)
        if answer.status == 204 or not answer.content:
            return None
        try:
            return json.loads(answer.content)
        except (ValueError, RecursionError):
            raise CloudRefused(
                f"{what}: the answer is not JSON (is cloud.tenant the tenant, or is a proxy answering?)", answer.status
            ) from None

    def pages(self, target: str, *, deadline: float | None = None) -> Iterator[list[dict[str, Any]]]:
        """The `data` of each page of a listing, following `links.next.href`."""
        seen: set[str] = set()
        url: str | None = self.url(target)
        count = 0
        while url is not None:
            if url in seen:
                raise CloudRefused(f"Qlik Cloud's paging of {redact_url(url)} came back to a page it had already given (a paging loop)")
            if count >= self.settings.max_pages:
                raise CloudRefused(
                    f"more than {self.settings.max_pages} pages of {self.settings.page_size} from {redact_url(url)}"
                    " (cloud.max_pages): narrow the selection (a tag or space with fewer apps)"
                )
            seen.add(url)
            count += 1
            payload = self.json("GET", url, deadline=deadline)
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list):
                raise CloudRefused(f"GET {redact_url(url)}: the answer has no 'data' list")
            yield [row for row in data if isinstance(row, dict)]
            url = _next_link(payload)


def _next_link(payload: dict[str, Any]) -> str | None:
    links = payload.get("links") or payload.get("Links")
    if not isinstance(links, dict):
        return None
    nxt = links.get("next") or links.get("Next")
    if not isinstance(nxt, dict):
        return None
    href = nxt.get("href") or nxt.get("Href")
    return href if isinstance(href, str) and href else None
