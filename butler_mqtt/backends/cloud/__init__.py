"""The Qlik Cloud backend's client pieces (contract section 9): settings, transport, credentials,
start pacing, paging, selection and reloads. The Backend protocol adapter is wired on top."""

from .client import CloudClient
from .reloads import CloudReload
from .selection import CloudApp
from .settings import CloudSettings

__all__ = ["CloudApp", "CloudClient", "CloudReload", "CloudSettings"]
