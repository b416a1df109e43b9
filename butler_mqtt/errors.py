"""Every exception butler-mqtt raises on purpose, in one place.

    ButlerError
    ├── ConfigError            bad configuration or usage (exit code 2); names the key
    ├── RequestRejected        a start request that is invalid; nothing is started
    └── QrsError               talking to the Qlik Sense Repository Service failed
        ├── QrsUnreachable     no answer: connection refused or reset, timeout   (transient)
        ├── QrsTlsRejected     the TLS handshake failed for good: the server's certificate is
        │                      not trusted, or QRS refused our client certificate (permanent)
        ├── QrsRefused         QRS answered with an error status, or an answer that is not
        │                      what the API returns (transient only for 5xx, 429)
        ├── QrsNotFound        QRS answered 404 for the entity asked for
        └── (Qlik Cloud, the same meanings so that is_transient needs no second table)
            CloudUnreachable(QrsUnreachable)   no answer from the tenant / proxy   (transient)
            CloudTlsRejected(QrsTlsRejected)   the tenant's certificate is not trusted
            CloudRefused(QrsRefused)           an error status or an answer that is not the
                                               API's (transient only for 5xx, 429)
            CloudAuthRefused(CloudRefused)     credentials refused for good; names the cloud.* key
            CloudRateLimited(CloudRefused)     429 not waited out within the call (transient)
            CloudNotFound(QrsNotFound)         404 for the app / reload asked for
    JournalError               the durable journal cannot be read or written (transient)
    BrokerUnavailable          the broker did not answer a check in time (transient)

`is_transient(exc)` is the one place that decides whether a failure is worth waiting for
(the request stays unacked and is retried) or permanent (the request is answered with an
error naming the cause). Callers catch the narrowest class they can handle; anything else is
a bug, which the daemon still answers ("Internal error") and acks.
"""

from __future__ import annotations


class ButlerError(Exception):
    """Base of every deliberate butler-mqtt error."""


class ConfigError(ButlerError):
    """The configuration (or command line) is invalid. `key` is the dotted path at fault;
    `source` says where its value came from ("etc/butler.yaml, line 3", "environment variable
    BUTLER_MQTT__MQTT__PORT", "default")."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        where = f"{key} ({source})" if key and source else key
        super().__init__(f"{where}: {reason}" if where else reason)
        self.key = key
        self.reason = reason
        self.source = source


class RequestRejected(ButlerError):
    """A start request was rejected before anything was started.

    `error` and `details` are the two fields of the contract's `error` reply.
    """

    def __init__(self, error: str, details: str) -> None:
        super().__init__(f"{error}: {details}")
        self.error = error
        self.details = details


class QrsError(ButlerError):
    """A QRS call failed."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class QrsUnreachable(QrsError):
    """QRS did not answer (connection refused or reset, timeout).

    `never_sent`: the connection itself was never opened, so the request cannot have reached
    QRS (a start may then be sent again without risking a double run).
    """

    def __init__(self, message: str, *, never_sent: bool = False) -> None:
        super().__init__(message)
        self.never_sent = never_sent


class QrsTlsRejected(QrsError):
    """The TLS handshake failed in a way waiting does not fix: the server certificate is not
    signed by `qrs.ca` (or names another host), or QRS refused our client certificate.

    `ambiguous`: QRS closed the connection right after the handshake without an alert; that is
    how a refused client certificate looks under TLS 1.3, so it is retried a few times first.
    """

    def __init__(self, message: str, *, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class QrsRefused(QrsError):
    """QRS answered with an error status."""


class QrsNotFound(QrsError):
    """QRS answered 404."""


class CloudUnreachable(QrsUnreachable):
    """The Qlik Cloud tenant (or the proxy in front of it) did not answer in time, or refused
    or reset the connection (transient)."""


class CloudTlsRejected(QrsTlsRejected):
    """The tenant's (or a TLS-inspecting proxy's) certificate is not trusted: `cloud.ca`."""


class CloudRefused(QrsRefused):
    """The tenant answered with an error status, or with something that is not its API's answer."""


class CloudAuthRefused(CloudRefused):
    """The credentials were refused for good (a token fetched again was refused too, or an API
    key was refused once). `key` names the setting to fix (`cloud.api_key`, `cloud.client_id`
    / `cloud.client_secret`). Permanent."""

    def __init__(self, message: str, key: str, status: int | None = None) -> None:
        super().__init__(message, status)
        self.key = key


class CloudRateLimited(CloudRefused):
    """429 that could not be waited out within the call's deadline (transient; nothing was
    started). `retry_after` is the server's hint in seconds, None without a Retry-After.
    `pending`: the 429 of a start that says "a pending reload request already exists for this
    app" (no Retry-After, no `HTTP-429` code): the app is busy, not the tenant."""

    def __init__(self, message: str, retry_after: float | None, *, pending: bool = False) -> None:
        super().__init__(message, 429)
        self.retry_after = retry_after
        self.pending = pending


class CloudNotFound(QrsNotFound):
    """The tenant answered 404 for the app or reload asked for."""


class JournalError(ButlerError):
    """The request journal could not be read or written (the request is then not acked)."""


class BrokerUnavailable(ButlerError):
    """The broker did not answer a question the daemon must ask before acting (the MQTT 3.1.1
    retain check): transient, the request stays unacked and is retried."""


def is_transient(exc: BaseException) -> bool:
    """True when the failure is expected to go away by itself: keep the request and retry.

    QRS unreachable (refused, reset, timeout), QRS answering 5xx or 429, the journal failing,
    the broker not answering the retain check. Everything else (certificate problems, 4xx,
    answers that are not QRS's) is permanent: the request is answered with an error and acked.
    """
    if isinstance(exc, QrsUnreachable | JournalError | BrokerUnavailable):
        return True
    if isinstance(exc, QrsRefused):
        return (exc.status or 0) >= 500 or exc.status == 429
    return False
