"""How one HTTPS request reaches the Qlik Cloud tenant, and how its failures are named.

* Only the tenant's origin (`cloud.tenant`: scheme, host, port) is ever called: a `links.next`
  or any other URL pointing elsewhere is refused before a byte (or a token) leaves.
* A **total** deadline per call (the caller's monotonic `deadline`): connect and every read
  get what is left, and the body is read in chunks with the clock checked between them, so a
  peer that drips bytes is cut at the deadline. A peer dripping the status line and headers
  (or a TLS handshake) is cut by the watchdog (watchdog.py), which shuts the call's socket
  down at its deadline.
* A byte cap on every answer (`cap`, default `cloud.max_response_bytes`).
* TLS verified by default against the system store plus `cloud.ca` (an extra bundle, for a
  TLS-inspecting proxy); `cloud.verify: false` turns verification off.
* Proxy: `cloud.proxy`, else the standard `HTTPS_PROXY`/`https_proxy` variables unless
  `NO_PROXY`/`no_proxy` exempts the tenant's host. Proxy credentials in the URL are sent as
  `Proxy-Authorization` and never appear in an error text.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import urllib3

from butler_mqtt.errors import CloudRefused, CloudTlsRejected, CloudUnreachable, ConfigError
from butler_mqtt.ops.outbound import causes as causes_of

from .settings import CloudSettings
from .watchdog import Watchdog, WatchedHTTPSConnectionPool

_CHUNK = 64 * 1024


@dataclass
class Answer:
    """One answer: status, body and headers (names lower-cased)."""

    status: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`; ("", "", 0) when it has none (never the tenant's)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "", "", 0
    if parts.username is not None or parts.password is not None:
        return "", "", 0
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def redact_url(url: str) -> str:
    """`url` without user info, query or fragment (for messages)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        netloc = host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def proxy_for(settings: CloudSettings, environ: Mapping[str, str]) -> str | None:
    """The proxy URL to use for the tenant: `cloud.proxy`, else HTTPS_PROXY unless NO_PROXY
    names the tenant's host."""
    if settings.proxy:
        return settings.proxy
    proxy = environ.get("https_proxy") or environ.get("HTTPS_PROXY")
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host = urlsplit(settings.tenant).netloc
    bypass = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009 (untyped in typeshed)
    if no_proxy and bypass(host, {"no": no_proxy}):
        return None
    return proxy


class CloudTransport:
    """Thread-safe urllib3 pool (direct, or through a proxy) to the tenant."""

    def __init__(self, settings: CloudSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._origin = origin(settings.tenant)
        ctx = self._ssl_context(settings)
        proxy = proxy_for(settings, os.environ if environ is None else environ)
        self.proxy_shown = redact_url(proxy) if proxy else None
        common: dict[str, Any] = {
            "num_pools": 2,
            "maxsize": max(settings.start_concurrency * 2, 10),
            "block": False,
            "retries": False,
            "ssl_context": ctx,
            "cert_reqs": "CERT_REQUIRED" if settings.verify else "CERT_NONE",
            "assert_hostname": None if settings.verify else False,
        }
        self._pool: urllib3.PoolManager
        if proxy:
            parts = urlsplit(proxy)
            headers = {}
            if parts.username is not None:
                auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers = urllib3.make_headers(proxy_basic_auth=auth)
            bare = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))  # no credentials
            self._pool = urllib3.ProxyManager(bare, proxy_headers=headers, proxy_ssl_context=ctx, **common)
        else:
            self._pool = urllib3.PoolManager(**common)
        self._pool.pool_classes_by_scheme = {**self._pool.pool_classes_by_scheme, "https": WatchedHTTPSConnectionPool}
        self._watchdog = Watchdog(time.monotonic)

    @staticmethod
    def _ssl_context(settings: CloudSettings) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if not settings.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        if settings.ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(settings.ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("cloud.ca", f"cannot load the CA bundle {settings.ca}: {exc}") from None
        return ctx

    def close(self) -> None:
        self._watchdog.close()
        self._pool.clear()

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None,
        headers: dict[str, str],
        deadline: float,
        cap: int | None = None,
        sink: Callable[[bytes], None] | None = None,
    ) -> Answer:
        """One request to `url` (which must be on the tenant); raises Cloud* errors only.

        `sink`: a 200 answer's body is fed to it chunk by chunk instead of being kept (a script
        log of any size read in flat memory; the deadline still bounds it), other answers are
        read as usual."""
        if origin(url) != self._origin:
            raise CloudRefused(
                f"refusing to call {redact_url(url)}: not the tenant {redact_url(self.settings.tenant)} (cloud.tenant)"
            )
        what = f"{method} {urlsplit(url).path}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CloudUnreachable(f"Qlik Cloud did not answer within {self.settings.timeout:g} s ({what})", never_sent=True)
        timeout = urllib3.Timeout(connect=min(remaining, 10.0), read=remaining)
        with self._watchdog.guard(deadline) as guard:
            try:
                resp = self._pool.urlopen(
                    method, url, body=body, headers=headers, retries=False, redirect=False,
                    preload_content=False, timeout=timeout, assert_same_host=False,
                )
                return self._read(resp, what, deadline, cap or self.settings.max_response_bytes, sink)
            except (CloudRefused, CloudUnreachable):
                raise
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if guard.fired:  # the watchdog cut a peer that kept every read under the timeout
                    raise CloudUnreachable(f"Qlik Cloud did not answer within {self.settings.timeout:g} s ({what})") from None
                raise self._map(exc, what) from None

    def _read(self, resp: Any, what: str, deadline: float, cap: int, sink: Callable[[bytes], None] | None) -> Answer:
        chunks: list[bytes] = []
        size = 0
        streaming = sink is not None and resp.status == 200
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CloudUnreachable(f"Qlik Cloud did not finish its answer within {self.settings.timeout:g} s ({what})")
                conn = getattr(resp, "connection", None)
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    sock.settimeout(left)  # each read gets only what is left of the deadline
                chunk = resp.read1(_CHUNK if streaming else min(_CHUNK, cap + 1 - size))
                if not chunk:
                    break
                if streaming:
                    assert sink is not None
                    sink(chunk)
                    continue
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    raise CloudRefused(
                        f"{what}: the Qlik Cloud answer is larger than {cap} bytes (cloud.max_response_bytes)", resp.status
                    )
        except BaseException:
            resp.close()
            raise
        resp.release_conn()
        return Answer(resp.status, b"".join(chunks), {k.lower(): v for k, v in resp.headers.items()})

    def _map(self, exc: BaseException, what: str) -> Exception:
        """The one table from urllib3/ssl/socket errors to the Cloud errors."""
        causes = causes_of(exc)
        tenant = redact_url(self.settings.tenant)
        via = f" through the proxy {self.proxy_shown}" if self.proxy_shown else ""
        verify = next((c for c in causes if isinstance(c, ssl.SSLCertVerificationError)), None)
        if verify is not None:
            return CloudTlsRejected(
                f"the certificate of {tenant}{via} is not trusted ({verify.verify_message or 'verify failed'}): a"
                " TLS-inspecting proxy's CA goes in cloud.ca (cloud.verify: false turns the check off, not recommended)"
            )
        if isinstance(exc, urllib3.exceptions.ProxyError) and not any(
            isinstance(c, urllib3.exceptions.TimeoutError | socket.timeout) for c in causes
        ):
            return CloudUnreachable(f"the proxy {self.proxy_shown} failed ({what}); check cloud.proxy / HTTPS_PROXY", never_sent=True)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return CloudUnreachable(f"cannot connect to {tenant}{via} in time ({what})", never_sent=True)
        if any(isinstance(c, urllib3.exceptions.TimeoutError | socket.timeout | TimeoutError) for c in causes):
            return CloudUnreachable(f"Qlik Cloud did not answer within {self.settings.timeout:g} s ({what}{via})")
        oserr = next((c for c in causes if isinstance(c, OSError) and c.errno is not None), None)
        if isinstance(exc, urllib3.exceptions.NameResolutionError) or any(isinstance(c, socket.gaierror) for c in causes):
            return CloudUnreachable(f"cannot resolve the host of {tenant}{via} (cloud.tenant)", never_sent=True)
        if oserr is not None and oserr.errno == errno.ECONNREFUSED:
            return CloudUnreachable(f"cannot reach {tenant}{via}: connection refused", never_sent=True)
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            return CloudUnreachable(f"cannot connect to {tenant}{via}", never_sent=True)
        text = self.settings.scrub(str(exc))[:200]
        return CloudUnreachable(f"connection to {tenant}{via} failed ({what}): {text}")


