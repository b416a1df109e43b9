"""TLS and exposure of the REST API's listener: pure decisions plus one loading check.

* `http_ssl_context` loads `http.tls` the way uvicorn will, turning a bad file into a
  ConfigError naming the key (exit 2 at start, a FAIL line in `check`).
* `uvicorn_tls_options` says how uvicorn serves HTTPS (and requires client certificates).
* `listener_warnings` says what is unsafe about where and how the API listens.
* `ServedTls` swaps the files a running listener serves (SIGHUP: certificate rotation).

No FastAPI or uvicorn here, so `check` and the daemon's start can use it cheaply.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

from butler_mqtt.config import HttpConfig, HttpTlsConfig
from butler_mqtt.errors import ConfigError
from butler_mqtt.ops.pem import check_pem


def http_ssl_context(tls: HttpTlsConfig) -> ssl.SSLContext:
    """The server-side TLS context of the HTTP listener, loaded as uvicorn will load it (the
    context itself is only a check: uvicorn builds its own from the same files).

    Raises ConfigError naming the key whose file is wrong, so a bad certificate stops the
    daemon at start (exit 2) instead of failing inside the server thread.
    """
    assert tls.cert is not None and tls.key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no system CAs: only client_ca vouches for clients
    try:
        # An encrypted key must fail here, not make OpenSSL prompt for a pass phrase on a tty.
        ctx.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise ConfigError("http.tls.key", f"{tls.key} is not the private key of {tls.cert}") from None
        raise ConfigError(
            "http.tls.cert", f"cannot load {tls.cert} with {tls.key} ({reason}): both must be PEM, the key unencrypted"
        ) from None
    except OSError as exc:
        raise ConfigError("http.tls.cert", f"cannot read {tls.cert} or {tls.key}: {exc.strerror or exc}") from None
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("http.tls.client_ca", f"{tls.client_ca} holds no PEM CA certificate ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServedTls:
    """The TLS files a running listener serves, replaceable without a restart (SIGHUP).

    uvicorn made the listener's context once; its server-name callback, called in every
    handshake (with or without SNI), moves each new connection to the context last loaded
    from the files. Connections already open keep theirs. A context is never changed once
    built, so a handshake never sees half of a rotation."""

    def __init__(self, served: ssl.SSLContext) -> None:
        self._current = served
        served.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, served: ssl.SSLContext) -> None:
        current = self._current
        if current is not served:
            conn.context = current

    def reload(self, tls: HttpTlsConfig) -> None:
        """Load `tls`'s files again; ConfigError naming the key when one is wrong (nothing changes)."""
        assert tls.cert is not None and tls.key is not None
        check_pem("http.tls.cert", tls.cert, "certificate")
        check_pem("http.tls.key", tls.key, "private key")
        if tls.client_ca is not None:
            check_pem("http.tls.client_ca", tls.client_ca, "certificate")
        self._current = http_ssl_context(tls)


def uvicorn_tls_options(tls: HttpTlsConfig | None) -> dict[str, Any]:
    """uvicorn's TLS settings: HTTPS with cert and key; with client_ca, a client certificate
    signed by it is required on every connection (the handshake fails without one)."""
    if tls is None or not tls.enabled:
        return {}
    opts: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        opts |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return opts


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listener_warnings(http: HttpConfig) -> list[tuple[str, str]]:
    """What is unsafe about the REST API's listener, as (log event, what to do) pairs.

    Beyond loopback a start call must be authenticated (token or client certificate), and a
    token must not cross the network in clear text. Used by `run` (log) and `check` (warn).
    """
    if is_loopback(http.host):
        return []
    out: list[tuple[str, str]] = []
    if http.token is not None and not http.tls.enabled:
        out.append(("http_token_in_clear", f"the bearer token travels unencrypted to {http.host}: "
                    "set http.tls.cert and http.tls.key (HTTPS)"))
    if http.token is None and http.tls.client_ca is None:
        out.append(("http_without_token", f"the REST API on {http.host} can start tasks without a token (http.token) "
                    "or client certificates (http.tls.client_ca)"))
    return out
