"""Callers (contract section 10), pure: who a request comes from, what it may start, how often.

A caller is named only by what the transport says about the request, never by its body:
- MQTT: the topic it arrived on (`<topics.start>/<level>`, `<topics.stop>/<level>`; the bare
  topics are the anonymous caller, refused with `callers_only`);
- REST: the bearer token (its SHA-256 compared in constant time with every configured hash) or
  the CN of the client certificate (mutual TLS).
The anonymous caller is `None` throughout: sections 3-9 unchanged, start_filter only.

A caller's allow-list is judged on each task's own ID, tags and custom properties by the same
function as start_filter (`selection.allowed`); start_filter still applies on top. The rate
limiter is one object per daemon, shared by every ingress, with state only for configured
callers that have a `requests_per_minute`.

No I/O here (import-linter's pure-core contract); the ingresses and the use case call it.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from butler_mqtt.config import CallerConfig, Config, MqttConfig, daemon_topics
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import QrsTask, TaskOutcome
from butler_mqtt.selection import Selection, allowed

#: The rate window: `requests_per_minute` is the most requests admitted in any 60 seconds.
WINDOW_SECONDS = 60.0
#: Longer bearer tokens are not hashed, just refused (tokens from `butler-mqtt token` have 43).
MAX_TOKEN_CHARS = 4096
#: An unknown topic level is quoted in the error reply cut to this many characters.
QUOTE_CHARS = 64
#: The `Authorization` challenge of a 401 (the same as with http.token alone).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="butler-mqtt"'}

Action = Literal["start", "start_plain", "stop"]


class CallerRejected(RequestRejected):
    """A request no caller may make: an unknown caller topic, a bare topic or the legacy token
    with `callers_only`, a wrong token, a caller over its rate. Nothing is started.

    MQTT: an `error` reply (`error`, `details`), acked. REST: `http_status` (401 for who-are-you
    problems, with CHALLENGE; 429 over the rate, with `Retry-After: retry_after` seconds).
    """

    def __init__(self, error: str, details: str, *, http_status: int, retry_after: float | None = None) -> None:
        super().__init__(error, details)
        self.http_status = http_status
        self.retry_after = retry_after


@dataclass(frozen=True)
class TopicRoute:
    """What a message on an MQTT topic is: a start (JSON), a plain start (Butler's task GUID)
    or a stop, and whose (`caller` None: the anonymous caller)."""

    action: Action
    caller: CallerConfig | None


@dataclass(frozen=True)
class Subscription:
    """One extra subscription for the caller topics. `topic` is the filter to subscribe to
    (under `$share/<group>/` with shared_group); `no_local`: set MQTT 5's No Local option (the
    daemon's own replies can arrive on `<topics.start>/+`; not allowed on a shared subscription)."""

    topic: str
    action: Literal["start", "stop"]
    no_local: bool


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token as `tokens_sha256` lists it (UTF-8 bytes of the token)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def label(caller: CallerConfig | None) -> str:
    """The caller's metrics label / audit value: its name, "" for the anonymous caller."""
    return caller.name if caller is not None else ""


def caller_labels(cfg: Config) -> tuple[str, ...]:
    """Every value the `caller` metrics label can take (`Callers.labels` without building one)."""
    return ("", *(c.name for c in cfg.callers))


def quote_level(level: str) -> str:
    """A topic level for an error reply: repr-escaped (control characters visible), cut short."""
    cut = level[:QUOTE_CHARS]
    return repr(cut) + (f" (cut, {len(level)} characters)" if len(level) > QUOTE_CHARS else "")


def caller_subscriptions(mqtt: MqttConfig, callers: Sequence[CallerConfig]) -> list[Subscription]:
    """The subscriptions callers add to the bare topics: `<topics.start>/+` and
    `<topics.stop>/+` (under `$share/<group>/` with shared_group); none without callers."""
    if not callers:
        return []
    share = f"$share/{mqtt.shared_group}/" if mqtt.shared_group else ""
    no_local = not mqtt.shared_group and mqtt.protocol == "5"
    return [
        Subscription(f"{share}{mqtt.topics.start}/+", "start", no_local),
        Subscription(f"{share}{mqtt.topics.stop}/+", "stop", no_local),
    ]


def caller_topic_filters(mqtt: MqttConfig, callers: Sequence[CallerConfig]) -> list[str]:
    """The same filters without the share prefix: for the checks that a response topic is not
    one the daemon listens on (mqtt/topics.py)."""
    return [f"{mqtt.topics.start}/+", f"{mqtt.topics.stop}/+"] if callers else []


def client_cert_cn(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a verified client certificate in `ssl.SSLSocket.getpeercert()`'s shape
    (`{"subject": ((("commonName", "erp"),), ...)}`); None without one, or when the subject holds
    several CNs (ambiguous: it names no caller)."""
    if not peercert:
        return None
    found: list[str] = []
    subject = peercert.get("subject") or ()
    try:
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName" and isinstance(value, str):
                    found.append(value)
    except (TypeError, ValueError):
        return None
    return found[0] if len(found) == 1 else None


def denial(task: QrsTask, caller: CallerConfig | None) -> str | None:
    """Why `caller` may not start or stop `task` (its allow-list), or None when it may. The
    anonymous caller has no allow-list of its own (start_filter alone decides)."""
    if caller is None or allowed(task, caller.allow):
        return None
    return f"not on caller {caller.name}'s allow-list"


def deny(o: TaskOutcome, task: QrsTask, caller: CallerConfig | None) -> bool:
    """Mark `o` (a candidate start of `task`) `denied` when `caller` may not start it; whether it was."""
    why = denial(task, caller)
    if why is not None:
        o.status, o.reason = "denied", why
    return why is not None


def restrict(outcomes: list[TaskOutcome], selection: Selection, caller: CallerConfig | None) -> list[TaskOutcome]:
    """Apply the caller's allow-list on top of `selection.plan`'s outcomes (start_filter and
    allTaskIdsMustExist already applied): a candidate (`started`, `wouldStart`) whose task the
    caller may not start becomes `denied` with the reason. Changes `outcomes` in place and
    returns it; outcomes already denied keep their reason."""
    if caller is None:
        return outcomes
    tasks = {s.task.id: s.task for s in selection.selected}
    for o in outcomes:
        task = tasks.get(o.task_id)
        if o.status in ("started", "wouldStart") and task is not None:
            why = denial(task, caller)
            if why is not None:
                o.status, o.reason = "denied", why
    return outcomes


class CallerRateLimiter:
    """`requests_per_minute` per caller: a sliding window of the last N admitted requests'
    times (exact: at most N in any WINDOW_SECONDS). One per daemon, shared by MQTT and REST, so
    switching ingress does not reset a caller's count. Thread-safe. Memory: at most N floats
    per configured caller that has a limit; other names are admitted and never stored."""

    def __init__(self, limits: Mapping[str, int], *, clock: Callable[[], float] = time.monotonic,
                 window: float = WINDOW_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._limits = dict(limits)
        self._times: dict[str, deque[float]] = {name: deque(maxlen=n) for name, n in limits.items()}
        self._locks = {name: threading.Lock() for name in limits}

    def take(self, name: str) -> float | None:
        """Count one request of `name`: None when admitted, else the seconds until one would be."""
        times = self._times.get(name)
        if times is None:
            return None
        with self._locks[name]:
            now = self._clock()
            if len(times) == times.maxlen and now - times[0] < self._window:
                return self._window - (now - times[0])
            times.append(now)  # the oldest falls out (maxlen)
            return None

    def limit(self, name: str) -> int | None:
        return self._limits.get(name)


class Callers:
    """The configured callers, indexed for the ingresses: route an MQTT topic, identify a REST
    client, count a request against its caller's rate. Built once per daemon from the Config
    (`Callers(cfg)`); immutable except for the rate limiter's counts."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.callers: tuple[CallerConfig, ...] = tuple(cfg.callers)
        self.callers_only = cfg.callers_only
        self._topics = cfg.mqtt.topics
        self._own = frozenset(daemon_topics(cfg.mqtt, cfg.alerts))
        self._bare: dict[str, Action] = {self._topics.start: "start", self._topics.stop: "stop"}
        if self._topics.start_plain:
            self._bare[self._topics.start_plain] = "start_plain"
        self._by_level = {c.topic: c for c in self.callers}
        self._by_cn = {c.client_cert_cn: c for c in self.callers if c.client_cert_cn is not None}
        self._hashes = [(h, c) for c in self.callers for h in c.tokens_sha256]
        # http.token is kept as its hash too: every comparison is of two 64-digit digests.
        self._legacy = token_sha256(cfg.http.token.get_secret_value()) if cfg.http.token is not None else None
        self.limiter = CallerRateLimiter(
            {c.name: c.requests_per_minute for c in self.callers if c.requests_per_minute is not None}, clock=clock
        )

    @property
    def enabled(self) -> bool:
        """Callers are configured (the daemon subscribes to the caller topics)."""
        return bool(self.callers)

    def labels(self) -> tuple[str, ...]:
        """Every value the `caller` metrics label can take: "" (anonymous) and the names."""
        return ("", *(c.name for c in self.callers))  # = caller_labels(cfg)

    def stored(self, name: str | None) -> CallerConfig | None:
        """The caller a journal record names (a chain stage, retry or queued start resumed
        later, maybe after a restart): None for the anonymous caller; a caller no longer
        configured comes back as a stand-in with its name and an empty allow-list, so its
        pending work is denied, never run as the anonymous caller."""
        if name is None:
            return None
        found = next((c for c in self.callers if c.name == name), None)
        return found if found is not None else CallerConfig.model_construct(name=name, topic=name)

    # -- MQTT -------------------------------------------------------------------------------

    def route_topic(self, topic: str) -> TopicRoute | None:
        """What a message on `topic` is and whose. None: one of the daemon's own topics (its
        reply, status or alert topic, matched by `<topics.start>/+`): ack it, answer nothing (an
        answer would loop). Raises CallerRejected for an unknown caller level, a bare topic with
        callers_only, or a topic that is none of the daemon's."""
        t = self._topics
        bare = self._bare
        if topic in bare:
            if self.callers_only:
                raise CallerRejected(
                    "Caller required",
                    f"callers_only is set: publish on {t.start}/<caller> or {t.stop}/<caller>, not on {topic}",
                    http_status=401,
                )
            return TopicRoute(bare[topic], None)
        if topic in self._own:
            return None
        under: tuple[tuple[str, Action], ...] = ((t.start, "start"), (t.stop, "stop"))
        for base, action in under:
            if topic.startswith(base + "/"):
                return TopicRoute(action, self._caller_at(topic[len(base) + 1 :], base))
        raise CallerRejected("Unknown caller", "the request came on a topic the daemon does not serve", http_status=401)

    def _caller_at(self, level: str, base: str) -> CallerConfig:
        caller = self._by_level.get(level)
        if caller is None:
            raise CallerRejected(
                "Unknown caller", f"no caller has the topic level {quote_level(level)} under {base}", http_status=401
            )
        return caller

    # -- REST -------------------------------------------------------------------------------

    def identify_rest(self, authorization: str | None, cert_cn: str | None) -> CallerConfig | None:
        """The caller of a REST call from its `Authorization` header (None: absent) and the CN
        of its verified client certificate (None: none, or no mutual TLS); None = anonymous.

        A bearer token is this caller when its SHA-256 is in the caller's tokens_sha256; the
        legacy http.token is the anonymous caller (refused with callers_only); a client
        certificate whose CN is a caller's client_cert_cn is that caller, on its own or beside
        http.token. With no token configured anywhere the header is ignored, as before callers.
        Raises CallerRejected (401) otherwise: no caller, a wrong token, or a token and a
        certificate naming two callers."""
        by_cn = self._by_cn.get(cert_cn) if cert_cn is not None else None
        token = self._bearer(authorization)
        if token is not None:
            by_token, legacy = self._match_token(token)
            if by_token is not None:
                if by_cn is not None and by_cn is not by_token:
                    raise _unauthorized("the bearer token and the client certificate name different callers")
                return by_token
            if not legacy:
                raise _unauthorized("wrong bearer token")
            if by_cn is not None:
                return by_cn  # the certificate names the caller: its allow-list applies
            if self.callers_only:
                raise _unauthorized("callers_only is set: http.token alone is not accepted; use a caller's token")
            return None
        if by_cn is not None:
            return by_cn
        if self._legacy is not None:
            raise _unauthorized("send 'Authorization: Bearer <token>' (http.token)")
        if self.callers_only:
            raise _unauthorized("callers_only is set: send a caller's bearer token or client certificate")
        return None

    def _bearer(self, authorization: str | None) -> str | None:
        """The bearer token of the header, or None: no header, another scheme, an empty token,
        or no token configured anywhere (the header is then ignored, as before callers)."""
        if self._legacy is None and not self._hashes:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return None
        return given

    def _match_token(self, token: str) -> tuple[CallerConfig | None, bool]:
        """(the caller whose hash matches, whether it is http.token). Every configured hash is
        compared, in constant time, whatever matched before; so is http.token."""
        if len(token) > MAX_TOKEN_CHARS:
            return None, False
        digest = token_sha256(token)
        matches = [c for h, c in self._hashes if hmac.compare_digest(digest, h)]
        legacy = self._legacy is not None and hmac.compare_digest(digest, self._legacy)
        return (matches[0] if matches else None), legacy

    # -- rate -------------------------------------------------------------------------------

    def admit(self, caller: CallerConfig | None) -> None:
        """Count one request of `caller` (a start or a stop, whatever its ingress). Raises
        CallerRejected (429, `retry_after`) when it is over its requests_per_minute."""
        if caller is None:
            return
        wait = self.limiter.take(caller.name)
        if wait is not None:
            raise CallerRejected(
                "Rate limited",
                f"caller {caller.name} is over its requests_per_minute ({caller.requests_per_minute}); "
                f"try again in {max(1, round(wait))} s",
                http_status=429,
                retry_after=wait,
            )


def _unauthorized(details: str) -> CallerRejected:
    return CallerRejected("Unauthorized", details, http_status=401)
