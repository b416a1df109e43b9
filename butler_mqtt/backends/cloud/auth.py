"""Credentials for Qlik Cloud: an OAuth 2.0 client (machine-to-machine) or an API key.

Both give `header(deadline)` (the `Authorization` value) and `refused(header)`, called when an
API call using that header answered 401:

* `OAuthClient` caches one access token for the whole daemon (threads share it; one fetch at a
  time), fetches a new one when less than `cloud.token_margin` (at most a tenth of its life) is
  left, and on a 401 drops the token that was refused so that the next `header()` fetches a new
  one. The caller retries its call once; a second 401 is `CloudAuthRefused` naming
  `cloud.client_id`. The token endpoint refusing the credentials (400/401/403) is that error at
  once. Lifetime: `expires_in`, else `expires_at`, else 6 h (qlik-cloud-api.md 1.3).
* `ApiKey` cannot be fetched again: its first refusal is `CloudAuthRefused` naming `cloud.api_key`.

Secrets (the client secret, the key, tokens) never enter an error text or a log line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

from butler_mqtt.errors import CloudAuthRefused, CloudRefused, CloudUnreachable

from .settings import CloudSettings
from .transport import Answer, CloudTransport

#: A token answer is small; anything bigger is not one.
TOKEN_ANSWER_CAP = 64 * 1024
_DEFAULT_LIFETIME = 6 * 3600.0
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")  # printable ASCII, no spaces or line breaks (header-safe)
OAUTH_KEY = "cloud.client_id"
API_KEY = "cloud.api_key"


class Credentials(Protocol):
    key: str  # the cloud.* key named when they are refused

    def header(self, deadline: float) -> str: ...

    def refused(self, header: str, status: int) -> None:
        """The call made with `header` answered 401; raise CloudAuthRefused if a retry cannot help."""
        ...


class ApiKey:
    key = API_KEY

    def __init__(self, api_key: str) -> None:
        self._header = f"Bearer {api_key}"

    def header(self, deadline: float) -> str:
        return self._header

    def refused(self, header: str, status: int) -> None:
        raise CloudAuthRefused(
            f"Qlik Cloud refused the API key ({status}): {API_KEY} is wrong, expired or revoked;"
            " an API key cannot be fetched again, create a new one",
            API_KEY,
            status,
        )


class OAuthClient:
    key = OAUTH_KEY

    def __init__(
        self, settings: CloudSettings, transport: CloudTransport, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._clock = clock
        self._lock = threading.Lock()
        self._header: str | None = None
        self._renew_at = 0.0
        self.fetches = 0  # tokens fetched so far (metrics, tests)

    def header(self, deadline: float) -> str:
        # One fetch at a time; the others wait for its token, but never past their own deadline.
        if not self._lock.acquire(timeout=max(0.0, deadline - self._clock())):
            raise CloudUnreachable("no Qlik Cloud access token within the call's deadline (the token endpoint is slow)")
        try:
            if self._header is None or self._clock() >= self._renew_at:
                self._fetch(deadline)
            assert self._header is not None
            return self._header
        finally:
            self._lock.release()

    def refused(self, header: str, status: int) -> None:
        with self._lock:
            if self._header == header:
                self._header = None  # refused: expired or revoked early; the next header() fetches

    def _fetch(self, deadline: float) -> None:
        body = {
            "grant_type": "client_credentials",
            "client_id": self._settings.client_id,
            "client_secret": self._settings.client_secret,
        }
        if self._settings.scope:
            body["scope"] = self._settings.scope
        answer = self._transport.request(
            "POST",
            f"{self._settings.base_url}/oauth/token",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            deadline=deadline,
            cap=TOKEN_ANSWER_CAP,
        )
        token, lifetime = self._parse(answer)
        self.fetches += 1
        self._header = f"Bearer {token}"
        margin = min(self._settings.token_margin, lifetime / 10)
        self._renew_at = self._clock() + lifetime - margin

    def _parse(self, answer: Answer) -> tuple[str, float]:
        if answer.status in (400, 401, 403):
            raise CloudAuthRefused(
                f"Qlik Cloud refused the OAuth client credentials ({answer.status} from /oauth/token):"
                f" check {OAUTH_KEY} and cloud.client_secret (a machine-to-machine client with the consent"
                " method Trusted)",
                OAUTH_KEY,
                answer.status,
            )
        if answer.status != 200:
            raise CloudRefused(f"the Qlik Cloud token endpoint answered {answer.status}", answer.status)
        try:
            payload = json.loads(answer.content)
        except (ValueError, RecursionError):
            payload = None
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise CloudRefused(
                "the Qlik Cloud token endpoint answered 200 with something that is not an OAuth token"
                " (is cloud.tenant the tenant's URL, or is a proxy answering in its place?)",
                200,
            )
        return token, _lifetime(payload)


def _lifetime(payload: dict[str, object]) -> float:
    """Seconds the token lives: `expires_in`, else `expires_at`, else 6 h; at least 1 s, at most 24 h."""
    seconds: float | None = None
    expires_in = payload.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        seconds = float(expires_in)
    elif isinstance(payload.get("expires_at"), str):
        try:
            at = dt.datetime.fromisoformat(str(payload["expires_at"]).replace("Z", "+00:00"))
            at = at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
            seconds = (at - dt.datetime.now(dt.UTC)).total_seconds()
        except ValueError:
            seconds = None
    if seconds is None or seconds != seconds:  # missing or NaN
        seconds = _DEFAULT_LIFETIME
    return min(max(seconds, 1.0), 24 * 3600.0)


def credentials(settings: CloudSettings, transport: CloudTransport) -> Credentials:
    """The credentials the settings name (validated by CloudSettings: exactly one kind)."""
    if settings.api_key:
        return ApiKey(settings.api_key)
    return OAuthClient(settings, transport)
