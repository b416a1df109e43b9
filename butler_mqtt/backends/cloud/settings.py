"""The `cloud` section as the Qlik Cloud client needs it (contract section 9).

`CloudSettings` is a plain frozen dataclass so that the client does not depend on the config
model: the lead builds it from `config.CloudConfig` (secrets taken out of their SecretStr there).
Values that can fail later fail here, naming the `cloud.*` key (ConfigError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from butler_mqtt.errors import ConfigError

#: Most pages one listing may take (apps of a tag or space, spaces, tags, reloads). At the page
#: size of 100 that is 10,000 apps in one selection; past it the selection is refused with an
#: error naming this limit (`cloud.max_pages`), never truncated.
DEFAULT_MAX_PAGES = 100


@dataclass(frozen=True)
class CloudSettings:
    """`cloud.*` keys. Exactly one of (`client_id` and `client_secret`) or `api_key`."""

    tenant: str
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    start_concurrency: int = 4
    reloads_per_minute: float = 50.0
    verify: bool = True
    ca: Path | None = None
    proxy: str | None = field(default=None, repr=False)  # may carry proxy credentials
    max_response_bytes: int = 32 * 1024 * 1024
    max_pages: int = DEFAULT_MAX_PAGES
    page_size: int = 100
    token_margin: float = 300.0  # fetch a new token when less than this is left (capped at a tenth of its life)
    scope: str | None = None  # OAuth scope to ask for; None = what the client is assigned

    def __post_init__(self) -> None:
        parts = urlsplit(self.tenant)
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            raise ConfigError("cloud.tenant", "must be https://<tenant>.<region>.qlikcloud.com (https, no credentials)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("cloud.tenant", "must be the tenant's base URL, without a path or query")
        oauth = self.client_id is not None or self.client_secret is not None
        if oauth and self.api_key is not None:
            raise ConfigError("cloud.api_key", "set either cloud.client_id/cloud.client_secret or cloud.api_key, not both")
        if oauth and not (self.client_id and self.client_secret):
            missing = "cloud.client_secret" if self.client_id else "cloud.client_id"
            raise ConfigError(missing, "an OAuth client needs both cloud.client_id and cloud.client_secret")
        if not oauth and not self.api_key:
            raise ConfigError("cloud.client_id", "set cloud.client_id and cloud.client_secret (or cloud.api_key)")
        if self.proxy is not None:
            proxy = urlsplit(self.proxy)
            if proxy.scheme not in ("http", "https") or not proxy.hostname:
                raise ConfigError("cloud.proxy", "must be an http:// or https:// proxy URL")
        for key, value, low in (
            ("cloud.timeout", self.timeout, 0.1), ("cloud.reloads_per_minute", self.reloads_per_minute, 0.001),
            ("cloud.start_concurrency", self.start_concurrency, 1), ("cloud.max_pages", self.max_pages, 1),
            ("cloud.max_response_bytes", self.max_response_bytes, 1024),
        ):
            if value < low:
                raise ConfigError(key, f"must be at least {low}")
        if not 1 <= self.page_size <= 100:
            raise ConfigError("cloud.page_size", "must be between 1 and 100")

    @property
    def base_url(self) -> str:
        """`https://host[:port]`, no trailing slash."""
        return self.tenant.rstrip("/")

    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line or an error text."""
        values = [self.client_secret, self.api_key]
        if self.proxy is not None:
            proxy = urlsplit(self.proxy)
            values += [proxy.password, proxy.username and proxy.password and f"{proxy.username}:{proxy.password}"]
        return tuple(sorted({v for v in values if v}, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """`text` with every secret value replaced by `***`."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text
