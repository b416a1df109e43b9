"""Settings: YAML file + `BUTLER_MQTT__SECTION__KEY` environment overrides, validated.

Every problem is a `ConfigError` naming the dotted key (`mqtt.port: ...`), which the CLI turns
into exit code 2. Relative paths are taken relative to the working directory, like most
command-line tools; under systemd set `WorkingDirectory=` or use absolute paths.

Secrets can also come from systemd credentials: when `$CREDENTIALS_DIRECTORY` holds
`qrs_client.pem`, `qrs_client_key.pem`, `qrs_root.pem`, `mqtt_password`, `http_token`,
`http_cert.pem`, `http_key.pem`, `http_client_ca.pem`, `cloud_client_secret` or `cloud_api_key`,
they replace the matching keys (see
docs and `systemd/butler-mqtt.service`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from butler_mqtt import yamlsafe
from butler_mqtt.errors import ConfigError
from butler_mqtt.model import is_guid
from butler_mqtt.redaction import redact_url, url_problem, url_secrets

ENV_PREFIX = "BUTLER_MQTT__"
DEFAULT_CONFIG = Path("etc/butler.yaml")
POSTGRES_HINT = 'the PostgreSQL journal needs its driver: pip install "butler-mqtt[postgres]"'

#: Upper bounds of sizes and times: beyond them a value is a typo, and some would fail only
#: later (a read buffer of that size, a timer no clock can hold).
GIB = 1024 * 1024 * 1024
HOUR = 3600
DAY = 86400

#: Where each value came from: dotted key -> "etc/butler.yaml, line 3" / "environment variable ...".
Sources = dict[str, str]


class _Section(BaseModel):
    # No inf/nan: a timeout of .inf is no timeout, and nan compares false to every bound.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        """No text setting (path, host, topic, secret) can hold U+0000: the OS, the broker and
        the database all refuse it later, with a traceback. The value itself is never echoed."""
        texts = v if isinstance(v, list) else [v]  # a mapping is a section (checked key by key) or headers
        if any(isinstance(t, str) and "\x00" in t for t in texts):
            raise ValueError("contains a NUL character (\\0)")
        return v


class TlsConfig(_Section):
    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    verify: bool = True


class TopicsConfig(_Section):
    start: str = "qliksense/task/start"
    start_plain: str | None = "qliksense/start_task"
    reply: str = "qliksense/task/start/reply"
    status: str = "butler-mqtt/status"
    stop: str = "qliksense/task/stop"  # stop requests (contract section 8)


def _check_host(v: str) -> str:
    """A host name or IP address: no scheme, path, credentials, port or spaces."""
    if not v or any(c.isspace() or not c.isprintable() or c in "/@?#" for c in v):
        raise ValueError("expected a host name or IP address (no scheme, path, port, spaces or credentials)")
    if v.count(":") == 1:  # IPv6 addresses have two or more
        raise ValueError("expected a host name or IP address: the port goes in the port key of this section")
    return v


Host = Annotated[str, AfterValidator(_check_host)]


class MqttConfig(_Section):
    host: Host = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = Field(default="butler-mqtt", min_length=1, max_length=128)
    instance_id: str | None = None  # with shared_group: client id = <client_id>-<instance_id or host name>
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(default=60, ge=5, le=65535)
    session_expiry: int = Field(default=86400, ge=0, le=0xFFFFFFFF)  # MQTT 5: a four-byte integer
    tls: TlsConfig = TlsConfig()
    shared_group: str | None = None
    topics: TopicsConfig = TopicsConfig()
    receive_maximum: int = Field(default=32, ge=1, le=65535)
    workers: int = Field(default=16, ge=1, le=256)
    queue_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=GIB)
    response_topic_prefixes: list[str] | None = None

    def effective_client_id(self) -> str:
        """The client id this instance connects with (also its owner name in the journal).

        Several instances in a shared group need distinct, stable ids: the configured base
        plus the instance id, by default the host name.
        """
        if not self.shared_group:
            return self.client_id
        return f"{self.client_id}-{self.instance_id or platform.node()}"

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        # YAML reads `5` as an int and `3.1.1` as a string; accept both spellings.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


class QrsConfig(_Section):
    host: Host = "localhost"
    port: int = Field(default=4242, ge=1, le=65535)
    cert: Path = Path("certs/client.pem")
    key: Path = Path("certs/client_key.pem")
    ca: Path | None = Path("certs/root.pem")
    verify: bool = True
    user_directory: str = "INTERNAL"
    user_id: str = "sa_api"
    timeout: float = Field(default=30, gt=0, le=HOUR)
    start_concurrency: int = Field(default=8, ge=1, le=64)
    retries: int = Field(default=3, ge=0, le=10)
    max_filter_length: int = Field(default=6000, ge=200)
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024, le=GIB)

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"


class CustomPropertyAllow(_Section):
    name: str
    value: str


class AllowList(_Section):
    task_ids: list[str] = []
    tags: list[str] = []
    custom_properties: list[CustomPropertyAllow] = []
    app_ids: list[str] = []  # contract section 9 (both backends)
    spaces: list[str] = []  # Qlik Cloud only

    @field_validator("task_ids", "app_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for t in v:
            if not is_guid(t):
                raise ValueError(f"'{t}' is not a GUID")
        return [t.lower() for t in v]


class CloudConfig(_Section):
    """`cloud` (contract section 9): the Qlik Cloud tenant, used with `backend: cloud`."""

    tenant: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    api_key: SecretStr | None = None
    timeout: float = Field(default=30, gt=0, le=3600)
    start_concurrency: int = Field(default=4, ge=1, le=64)
    reloads_per_minute: float = Field(default=50, gt=0, le=100000)
    verify: bool = True
    ca: Path | None = None
    proxy: str | None = None  # may hold proxy credentials: scrubbed from every log line
    max_pages: int = Field(default=100, ge=1, le=10000)  # pages of 100 one listing may take (a tag's, a space's apps)


class StartFilterConfig(_Section):
    enabled: bool = False
    allow: AllowList = AllowList()


class HttpTlsConfig(_Section):
    """HTTPS for the REST API (and /metrics, /healthz). `client_ca`: mutual TLS, every client
    must present a certificate signed by it."""

    cert: Path | None = None
    key: Path | None = Field(default=None, validate_default=True)
    client_ca: Path | None = Field(default=None, validate_default=True)

    @field_validator("key")
    @classmethod
    def _pair(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("cert")
        if v is None and cert is not None:
            raise ValueError("http.tls.cert is set, so http.tls.key (its private key) is needed too")
        if v is not None and cert is None and "cert" in info.data:
            raise ValueError("http.tls.key is set but http.tls.cert is not: set both (HTTPS) or neither")
        return v

    @field_validator("client_ca")
    @classmethod
    def _needs_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("cert") is None and "cert" in info.data:
            raise ValueError("client certificates need HTTPS: set http.tls.cert and http.tls.key as well")
        return v

    @property
    def enabled(self) -> bool:
        return self.cert is not None


class HttpConfig(_Section):
    enabled: bool = False
    host: Host = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    token: SecretStr | None = None
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Every connection is a file descriptor: capped (and lowered at start when the process's
    # descriptor limit leaves too little room, see butler_mqtt/ops/fds.py).
    max_connections: int = Field(default=512, ge=1, le=65536)
    request_timeout: float = Field(default=10, gt=0, le=HOUR)  # head and body of a request (slowloris)
    keep_alive_timeout: int = Field(default=5, ge=1, le=HOUR)  # idle between two requests on a connection
    tls: HttpTlsConfig = HttpTlsConfig()


class MetricsConfig(_Section):
    port: int | None = Field(default=None, ge=0, le=65535)


class TrackingConfig(_Section):
    poll_interval: float = Field(default=5, gt=0, le=DAY)
    first_poll: float = Field(default=1, gt=0, le=DAY)
    max_wait: float = Field(default=21600, gt=0, le=31 * DAY)
    #: Contract section 8: the tail of a failed execution's script log (0: never fetched).
    script_log_lines: int = Field(default=40, ge=0, le=1000)
    #: The total time one script log read may take (ticket, fallback route and download).
    script_log_deadline: float = Field(default=15, gt=0, le=300)


class RetryConfig(_Section):
    attempts: int = Field(default=0, ge=0, le=10)
    delay: float = Field(default=60, ge=0, le=3600)


class PoliciesConfig(_Section):
    """Run policies (contract section 7): what a trigger does when it meets a busy Qlik Sense."""

    if_running: Literal["start", "attach", "skip", "queue", "restart"] = "start"
    max_running: int = Field(default=0, ge=0, le=10000)
    queue_timeout: float = Field(default=3600, gt=0, le=31 * DAY)
    retry: RetryConfig = RetryConfig()
    deadline: float | None = Field(default=None, gt=0, le=31 * DAY)
    #: Contract section 8: `stop` stops a followed execution still running at its deadline.
    on_deadline: Literal["notify", "stop"] = "notify"


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class JournalConfig(_Section):
    url: SecretStr | None = None  # a PostgreSQL URL may hold a password
    retention_hours: float = Field(default=24, gt=0, le=24 * 366)
    lease_seconds: float = Field(default=30, ge=2, le=HOUR)

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        url = v.get_secret_value()
        if url.startswith(("postgresql://", "postgres://")):
            problem = url_problem(url, ("postgresql", "postgres"), host_required=False)
            if problem is not None:
                raise ValueError(f"{problem} ({redact_url(url)})")
            if importlib.util.find_spec("psycopg") is None:
                raise ValueError(POSTGRES_HINT)
        elif not url.startswith("sqlite:///"):
            raise ValueError("expected sqlite:///path or postgresql://user@host/db")
        return v


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class WebhookConfig(_Section):
    """Where alerts are POSTed as JSON (ops/alerts.py). The URL and the header values may hold
    credentials: they are secrets, never logged (a failure names the URL's host only)."""

    url: SecretStr | None = None
    headers: dict[str, SecretStr] = {}
    timeout: float = Field(default=10, gt=0, le=HOUR)
    attempts: int = Field(default=6, ge=1, le=100)
    retry_delay: float = Field(default=1, gt=0, le=HOUR)
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    ca: Path | None = None
    verify: bool = True

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """Names are HTTP tokens, values have no line breaks or controls (no header injection);
        a value is never echoed."""
        for name, value in v.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name[:64]!r} is not an HTTP header name")
            if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value.get_secret_value()):
                raise ValueError(f"the value of {name} contains a line break or control character")
        return v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        problem = url_problem(v.get_secret_value(), ("http", "https"))
        if problem is not None:  # named with what can be shown of it: never userinfo, path or query
            raise ValueError(f"{problem} ({redact_url(v.get_secret_value())})")
        return v


class AlertsConfig(_Section):
    topic: str | None = None
    webhook: WebhookConfig = WebhookConfig()
    qrs_outage_after: float = Field(default=30, ge=0, le=DAY)

    @field_validator("topic")
    @classmethod
    def _plain_topic(cls, v: str | None) -> str | None:
        if v is not None and (not v or "+" in v or "#" in v or v.startswith("$")):
            raise ValueError("an MQTT topic to publish on: not empty, no wildcards (+ #), not a $-topic")
        return v


# --- callers (contract section 10) ---------------------------------------------------------
# Each upstream system is a caller: its own topic level under topics.start / topics.stop, its
# REST tokens (by SHA-256), an optional client-certificate CN, its own allow-list and rate.
# The pure logic that uses these is butler_mqtt/callers.py.

#: `callers[].name`: also a metrics label value and a history column.
CALLER_NAME = re.compile(r"[a-z0-9_-]{1,64}")
#: Longest caller topic level, in characters (a topic level is a broker user name in the ACL).
MAX_TOPIC_LEVEL = 128
#: Most callers (each is a `caller` label value on /metrics: the label set stays bounded).
MAX_CALLERS = 1000
#: Most REST tokens one caller may have (each bearer token is hashed and compared to all).
MAX_CALLER_TOKENS = 32
#: Highest `requests_per_minute` (the limiter keeps one timestamp per admitted request).
MAX_REQUESTS_PER_MINUTE = 100_000
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def topic_level_problem(level: str) -> str | None:
    """None when `level` can be one MQTT topic level naming a caller, else why not.

    Not empty, no wildcard (`+`, `#`), no level separator (`/`), no `$` (broker-reserved
    topics), no NUL or other control character, valid UTF-8, at most MAX_TOPIC_LEVEL characters.
    """
    if not level:
        return "a topic level must not be empty"
    if len(level) > MAX_TOPIC_LEVEL:
        return f"a topic level is at most {MAX_TOPIC_LEVEL} characters"
    for bad, what in (("+", "a wildcard (+)"), ("#", "a wildcard (#)"), ("/", "a level separator (/)"),
                      ("$", "'$' (broker-reserved topics)")):
        if bad in level:
            return f"a topic level must not contain {what}"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in level):
        return "a topic level must not contain NUL or other control characters"
    try:
        level.encode("utf-8")
    except UnicodeEncodeError:
        return "a topic level must be valid UTF-8"
    return None


class CallerConfig(_Section):
    """One upstream system (contract section 10). `topic` defaults to `name`."""

    name: str
    topic: str  # default: the name (filled in by _default_topic)
    tokens_sha256: list[str] = Field(default=[], max_length=MAX_CALLER_TOKENS)
    client_cert_cn: str | None = Field(default=None, min_length=1, max_length=64)
    allow: AllowList = AllowList()
    requests_per_minute: int | None = Field(default=None, ge=1, le=MAX_REQUESTS_PER_MINUTE, strict=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not CALLER_NAME.fullmatch(v):
            raise ValueError("a caller name is 1 to 64 of a-z, 0-9, '_' and '-'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_topic(cls, data: Any) -> Any:
        if isinstance(data, dict) and "topic" not in data and "name" in data:
            return {**data, "topic": data["name"]}
        return data

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        problem = topic_level_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("tokens_sha256")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _SHA256_HEX.fullmatch(h):
                raise ValueError("each entry is the SHA-256 of a token: 64 hex digits (butler-mqtt token prints one)")
        return list(dict.fromkeys(h.lower() for h in v))

    @field_validator("client_cert_cn")
    @classmethod
    def _cn(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in v)):
            raise ValueError("a certificate CN without surrounding spaces or control characters")
        return v


def check_callers(callers: list[CallerConfig], mqtt: MqttConfig | None, http: HttpConfig | None,
                  alerts: AlertsConfig | None) -> None:
    """Across callers: unique names, topic levels, token hashes and CNs; no caller topic that is
    one of the daemon's own (a reply, status or alert topic under topics.start/stop); no token
    that is also http.token (it would name two identities). Raises ValueError naming the entry."""
    seen: dict[str, dict[str, int]] = {"name": {}, "topic": {}, "token": {}, "client_cert_cn": {}}
    legacy = hashlib.sha256(http.token.get_secret_value().encode()).hexdigest() if http and http.token else None
    own = set(daemon_topics(mqtt, alerts)) if mqtt else set()
    for i, c in enumerate(callers):
        values = {"name": [c.name], "topic": [c.topic], "token": c.tokens_sha256,
                  "client_cert_cn": [c.client_cert_cn] if c.client_cert_cn else []}
        for kind, vals in values.items():
            for v in vals:
                if v in seen[kind]:
                    what = "a token (tokens_sha256)" if kind == "token" else f"{kind} {v!r}"
                    raise ValueError(f"callers[{i}] ({c.name}): {what} is callers[{seen[kind][v]}]'s already")
                seen[kind][v] = i
        if legacy is not None and legacy in c.tokens_sha256:
            raise ValueError(f"callers[{i}] ({c.name}): a token in tokens_sha256 is http.token; give the caller its own")
        if mqtt is not None:
            for base in (mqtt.topics.start, mqtt.topics.stop):
                if f"{base}/{c.topic}" in own:
                    raise ValueError(f"callers[{i}] ({c.name}): topic {c.topic!r} makes {base}/{c.topic}, one of the "
                                     "daemon's own topics (mqtt.topics.*, alerts.topic)")


def daemon_topics(mqtt: MqttConfig, alerts: AlertsConfig | None) -> list[str]:
    """The topics the daemon itself listens on or publishes to (without the per-instance status)."""
    t = mqtt.topics
    return [x for x in (t.start, t.start_plain, t.stop, t.reply, t.status, alerts.topic if alerts else None) if x]


class Config(_Section):
    mqtt: MqttConfig = MqttConfig()
    qrs: QrsConfig = QrsConfig()
    start_filter: StartFilterConfig = StartFilterConfig()
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracking: TrackingConfig = TrackingConfig()
    logging: LoggingConfig = LoggingConfig()
    state_dir: Path = Path("state")
    journal: JournalConfig = JournalConfig()
    policies: PoliciesConfig = PoliciesConfig()
    alerts: AlertsConfig = AlertsConfig()
    # callers (contract section 10): see CallerConfig and check_callers above
    callers: list[CallerConfig] = Field(default=[], max_length=MAX_CALLERS)
    callers_only: bool = False
    backend: Literal["qrs", "cloud"] = "qrs"  # contract section 9
    cpu_scheduling: Literal["batch", "normal"] = "batch"  # ops/scheduling.py
    cloud: CloudConfig = CloudConfig()
    _sources: Sources = PrivateAttr(default_factory=dict)

    def source(self, key: str) -> str:
        """Where the value of `key` (dotted) came from: file and line, environment variable,
        systemd credential, or "default"."""
        return _lookup(self._sources, key.split("."))

    @field_validator("callers")
    @classmethod
    def _callers(cls, v: list[CallerConfig], info: ValidationInfo) -> list[CallerConfig]:
        check_callers(v, info.data.get("mqtt"), info.data.get("http"), info.data.get("alerts"))
        return v

    @field_validator("callers_only")
    @classmethod
    def _callers_only(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("callers", True):
            raise ValueError("callers_only: true needs at least one caller in callers (else nothing can start)")
        return v

    @property
    def serves_http(self) -> bool:
        """The daemon opens an HTTP listener: the REST API, or /metrics alone."""
        return self.http.enabled or self.metrics.port is not None

    def http_tls_files(self) -> dict[str, Path]:
        """`http.tls.*` key -> file, for the listener the daemon will open (none without one)."""
        if not self.serves_http:
            return {}
        tls = self.http.tls
        files = {"http.tls.cert": tls.cert, "http.tls.key": tls.key, "http.tls.client_ca": tls.client_ca}
        return {k: p for k, p in files.items() if p is not None}

    def check_qrs_files(self) -> None:
        """Certificate files (QRS, broker TLS, the HTTPS listener's) must exist and be readable
        before anything starts; the daemon then loads the HTTPS pair (`http.tls`). With
        `backend: cloud` the QRS files are not used (cloud.ca is checked at load)."""
        files: dict[str, Path] = {}
        if self.backend == "qrs":
            files = {"qrs.cert": self.qrs.cert, "qrs.key": self.qrs.key}
        if self.backend == "qrs" and self.qrs.verify and self.qrs.ca is not None:
            files["qrs.ca"] = self.qrs.ca
        if self.mqtt.tls.enabled:
            for name in ("ca", "cert", "key"):
                p = getattr(self.mqtt.tls, name)
                if p is not None:
                    files[f"mqtt.tls.{name}"] = p
        files.update(self.http_tls_files())
        if self.alerts.webhook.url is not None and self.alerts.webhook.ca is not None:
            files["alerts.webhook.ca"] = self.alerts.webhook.ca
        for key, path in files.items():
            if not path.is_file():
                raise ConfigError(key, f"file not found: {path}", self.source(key))
            if not os.access(path, os.R_OK):
                raise ConfigError(key, f"file not readable: {path}", self.source(key))

    def secret_values(self) -> list[str]:
        """Every configured secret value (and the secret parts of URLs), for the log scrubber
        (ops/logging.scrub_secrets): none of them may appear in a log line, in any field."""
        found: list[str] = []
        for secret in (self.mqtt.password, self.http.token, self.cloud.client_secret, self.cloud.api_key,
                       *self.alerts.webhook.headers.values()):
            if secret is not None:
                found.append(secret.get_secret_value())
        for url in (self.journal.url, self.alerts.webhook.url):
            if url is not None:
                found += url_secrets(url.get_secret_value())
        if self.cloud.proxy:
            found += url_secrets(self.cloud.proxy)
        return found

    def redacted(self) -> dict[str, Any]:
        """The effective settings with secrets replaced, for logs and `check`."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'


def _lookup(sources: Sources, loc: list[str]) -> str:
    """The source of a key, or of the nearest enclosing key that has one."""
    for n in range(len(loc), 0, -1):
        found = sources.get(".".join(loc[:n]))
        if found:
            return found
    return "default"


def _file_sources(text: str, path: Path) -> Sources:
    """Dotted key (list items by index) -> "FILE, line N", from the YAML node tree."""
    out: Sources = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                out[key] = f"{path}, line {key_node.start_mark.line + 1}"
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = f"{prefix}{i}"
                out[key] = f"{path}, line {item.start_mark.line + 1}"
                walk(item, key + ".")

    root = yamlsafe.compose(text)
    if root is not None:
        walk(root, "")
    return out


def _env_overrides(environ: dict[str, str], sources: Sources | None = None) -> dict[str, Any]:
    """`BUTLER_MQTT__MQTT__TLS__ENABLED=true` -> {"mqtt": {"tls": {"enabled": True}}}."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = yamlsafe.load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, int | float | bool) and path[-1] in {"password", "token", "user_id", "username",
                                                                     "client_id", "client_secret", "api_key"}:
            value = raw  # secrets and ids stay strings even when they look like numbers
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), "conflicting environment overrides", f"environment variable {name}")
        node[path[-1]] = value
        if sources is not None:
            sources[".".join(path)] = f"environment variable {name}"
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section (nested dicts merged, other values replaced)."""
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _credentials(data: dict[str, Any], environ: dict[str, str], sources: Sources | None = None) -> dict[str, Any]:
    """systemd `LoadCredential=` files override the matching keys."""
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return data
    d = Path(cred_dir)
    extra: dict[str, Any] = {}
    for fname, (section, key) in {
        "qrs_client.pem": ("qrs", "cert"),
        "qrs_client_key.pem": ("qrs", "key"),
        "qrs_root.pem": ("qrs", "ca"),
    }.items():
        if (d / fname).is_file():
            extra.setdefault(section, {})[key] = str(d / fname)
    for fname, key in {
        "http_cert.pem": "cert",
        "http_key.pem": "key",
        "http_client_ca.pem": "client_ca",
    }.items():
        if (d / fname).is_file():
            extra.setdefault("http", {}).setdefault("tls", {})[key] = str(d / fname)
    if (d / "mqtt_password").is_file():
        extra.setdefault("mqtt", {})["password"] = (d / "mqtt_password").read_text().strip()
    if (d / "http_token").is_file():
        extra.setdefault("http", {})["token"] = (d / "http_token").read_text().strip()
    for fname in ("cloud_client_secret", "cloud_api_key"):
        if (d / fname).is_file():
            extra.setdefault("cloud", {})[fname.removeprefix("cloud_")] = (d / fname).read_text().strip()
    if sources is not None:
        names = {"cloud.client_secret": "cloud_client_secret", "cloud.api_key": "cloud_api_key","qrs.cert": "qrs_client.pem", "qrs.key": "qrs_client_key.pem", "qrs.ca": "qrs_root.pem",
                 "mqtt.password": "mqtt_password", "http.token": "http_token", "http.tls.cert": "http_cert.pem",
                 "http.tls.key": "http_key.pem", "http.tls.client_ca": "http_client_ca.pem"}
        for section, values in extra.items():
            for key, value in values.items():
                leaves = [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
                for leaf in leaves:
                    sources[f"{section}.{leaf}"] = f"systemd credential {d / names[f'{section}.{leaf}']}"
    return deep_merge(data, extra)


def config_path(arg: str | None, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(arg or env.get("BUTLER_MQTT_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path | None, environ: dict[str, str] | None = None, *, missing_ok: bool = False) -> Config:
    """Read, merge and validate the configuration.

    Raises ConfigError naming the key, where its value came from and the reason.
    """
    env = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    sources: Sources = {}
    if path is not None:
        if path.is_file():
            data = _read_yaml(path, sources)
        elif not missing_ok:
            init = "butler-mqtt init" if path == DEFAULT_CONFIG else f"butler-mqtt init {path}"
            raise ConfigError(
                "--config", f"file not found: {path}; run `{init}` to write the documented starter configuration"
            )
    data = deep_merge(data, _env_overrides(env, sources))
    data = _credentials(data, env, sources)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        elif first["type"] == "value_error":
            reason = reason.removeprefix("Value error, ")
        raise ConfigError(".".join(loc), reason, _lookup(sources, loc)) from None
    cfg._sources = sources
    return cfg


def _read_yaml(path: Path, sources: Sources) -> dict[str, Any]:
    try:
        text = yamlsafe.read_text(path)
        loaded = yamlsafe.load(text)
        sources.update(_file_sources(text, path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), yamlsafe.describe(exc)) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(str(path), "the top level must be a mapping (section: keys)")
    return loaded or {}
