"""Every exception butler-mqtt raises on purpose, in one place.

    ButlerError
    ├── ConfigError            bad configuration or usage (exit code 2); names the key
    ├── RequestRejected        a start request that is invalid; nothing is started
    └── QrsError               talking to the Qlik Sense Repository Service failed
        ├── QrsUnreachable     no answer: connection refused, TLS failure, timeout
        ├── QrsRefused         QRS answered with an error status (4xx/5xx other than 404)
        └── QrsNotFound        QRS answered 404 for the entity asked for
    JournalError               the durable journal cannot be read or written

Callers catch the narrowest class they can handle; anything else is a bug.
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
    """QRS did not answer (connection refused or reset, TLS handshake failure, timeout)."""


class QrsRefused(QrsError):
    """QRS answered with an error status."""


class QrsNotFound(QrsError):
    """QRS answered 404."""


class JournalError(ButlerError):
    """The request journal could not be read or written (the request is then not acked)."""
