"""`butler-mqtt init --from-butler`: a Butler configuration, turned into butler-mqtt's.

Butler keeps everything this daemon needs (QRS host, port and certificates, the broker, the
plain-GUID start topic, the REST port and TLS, the start-task allow-list) under `Butler:` in its
YAML file. `convert` maps those keys to the same meaning here and writes them into the
documented starter configuration (`etc/butler.yaml`, comments kept), and says key by key what it
carried, what it set differently and why, and what it left out. It does no I/O: `load_butler`
reads the file, the CLI writes the result.

Every problem with Butler's file is a `ConfigError` naming the Butler key
(`Butler.configQRS.port: expected a port number (1-65535), got 'abc'`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml
from pydantic import ValidationError

from butler_mqtt import yamlsafe
from butler_mqtt.config import Config
from butler_mqtt.errors import ConfigError
from butler_mqtt.model import is_guid

ROOT = "Butler"

#: Butler's log levels -> ours.
LOG_LEVELS = {"silly": "debug", "debug": "debug", "verbose": "debug", "info": "info", "warn": "warning",
              "warning": "warning", "error": "error"}

#: Why a Butler key is not carried (keys relative to `Butler.`); the rest: NOT_ABOUT_STARTS.
LEFT_OUT_WHY = {
    "configEngine": "butler-mqtt starts tasks through QRS only; it never talks to the engine",
    "configQRS.useSSL": "QRS is always called over HTTPS with the client certificate",
    "fileLogging": "butler-mqtt logs JSON lines to stdout (journald under systemd); see logging.*",
    "logDirectory": "butler-mqtt logs JSON lines to stdout (journald under systemd); see logging.*",
    "mqttConfig.subscriptionRootTopic": "butler-mqtt subscribes to exactly its own topics (mqtt.topics.start, start_plain)",
    "mqttConfig.qlikSenseCloud": "Qlik Cloud events, not starting Qlik Sense tasks",
    "restServerConfig.backgroundServerPort": "butler-mqtt serves the API itself on one port (no internal proxy port)",
    "restServerConfig.tls.ca": "Butler used it only to complete the certificate chain it sent (it never asked clients "
    "for certificates); append intermediate CAs to http.tls.cert instead. http.tls.client_ca is different: it makes "
    "client certificates mandatory",
    "restServerEndpointsEnable.keyValueStore": "butler-mqtt has no key-value store: keyvaluestore items in a start "
    "body are refused with 400",
    "keyValueStore": "butler-mqtt has no key-value store",
    "qlikSenseCloud": "Qlik Cloud, not Qlik Sense Enterprise tasks",
    "scheduler": "Butler's cron schedules are not carried: schedule the tasks in the QMC, or publish start requests "
    "from cron",
    "udpServerConfig": "Butler's reload-failure events from Sense's log appenders: butler-mqtt follows executions "
    "through QRS instead (wait: true)",
}
#: Butler sections (relative to `Butler.`) whose other keys share one reason.
LEFT_OUT_SECTION_WHY = {
    "mqttConfig": "Butler's event publishing (task failures, aborts, services, licenses); butler-mqtt publishes its "
    "replies on mqtt.topics.reply",
    "restServerEndpointsEnable": "another Butler endpoint: butler-mqtt serves only the start endpoint (plus /healthz, "
    "/metrics, /docs)",
    "mqttConfig.azureEventGrid": "used only with azureEventGrid.enable: true",
}
NOT_ABOUT_STARTS = "not about starting tasks"


@dataclass(frozen=True)
class Note:
    """One line of the report: a Butler key, where it went (if anywhere), and why."""

    butler_key: str
    target: str | None = None
    value: Any = None
    why: str = ""

    def line(self, width: int) -> str:
        head = self.butler_key.ljust(width)
        if self.target is None:
            return f"  {head}  {self.why}"
        text = f"  {head}  -> {self.target}: {_scalar(self.value)}"
        return f"{text}  ({self.why})" if self.why else text


@dataclass
class ImportResult:
    yaml_text: str
    carried: list[Note] = field(default_factory=list)
    changed: list[Note] = field(default_factory=list)
    left_out: list[Note] = field(default_factory=list)

    def report(self) -> str:
        """Key by key: carried, set differently (and why), left out (and why)."""
        notes = self.carried + self.changed + self.left_out
        width = min(max((len(n.butler_key) for n in notes), default=0), 48)
        out: list[str] = []
        for title, group in (
            ("Carried over, same meaning:", self.carried),
            ("Set differently, and why:", self.changed),
            ("Left out, and why:", self.left_out),
        ):
            out.append(title)
            previous = None
            for n in group:  # a run of keys left out for one reason gives the reason once
                same = n.target is None and n.why == previous
                out.append(n.line(width) if not same else Note(n.butler_key, why="(as above)").line(width))
                previous = n.why if n.target is None else None
            if not group:
                out.append("  (nothing)")
            out.append("")
        return "\n".join(out)


# --------------------------------------------------------------------------- reading Butler's file


def load_butler(path: Path) -> dict[str, Any]:
    """Butler's YAML file as a mapping; a missing file or bad YAML is a ConfigError."""
    try:
        text = yamlsafe.read_text(path, encoding="utf-8-sig")
        data = yamlsafe.load(text)
    except FileNotFoundError:
        raise ConfigError("--from-butler", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--from-butler", f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), yamlsafe.describe(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(ROOT, f"missing: {path} is not a Butler configuration (its keys sit under 'Butler:')")
    return data


_MISSING: Any = object()


class _Butler:
    """Typed access to `Butler.*` that names the key at fault and remembers what was read."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        root = doc.get(ROOT, _MISSING) if isinstance(doc, Mapping) else _MISSING
        if root is _MISSING:
            raise ConfigError(ROOT, "missing: this is not a Butler configuration (its keys sit under 'Butler:')")
        if not isinstance(root, Mapping):
            raise ConfigError(ROOT, f"expected a mapping of Butler's settings, got {_show(root)}")
        self.root: Mapping[str, Any] = root
        self.used: set[str] = set()

    def raw(self, path: str, mark: bool = True) -> Any:
        if mark:
            self.used.add(path)
        node: Any = self.root
        walked = ROOT
        for part in path.split("."):
            if node is None:
                return _MISSING
            if not isinstance(node, Mapping):
                raise ConfigError(walked, f"expected a mapping, got {_show(node)}")
            walked += "." + part
            node = node.get(part, _MISSING)
            if node is _MISSING:
                return _MISSING
        return node

    def has(self, path: str) -> bool:
        """Whether the key is set; does not count as reading it."""
        return self.raw(path, mark=False) not in (_MISSING, None)

    def text(self, path: str, default: str | None = None, mark: bool = True) -> str | None:
        v = self.raw(path, mark)
        if v is _MISSING or v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(f"{ROOT}.{path}", f"expected text, got {_show(v)}")
        return str(v).strip()

    def flag(self, path: str, default: bool) -> bool:
        v = self.raw(path)
        if v is _MISSING or v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise ConfigError(f"{ROOT}.{path}", f"expected true or false, got {_show(v)}")

    def port(self, path: str) -> int | None:
        v = self.raw(path)
        if v is _MISSING or v is None:
            return None
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise ConfigError(f"{ROOT}.{path}", f"expected a port number (1-65535), got {_show(v)}")
        return v

    def items(self, path: str) -> list[Any]:
        v = self.raw(path)
        if v is _MISSING or v is None:  # Butler's template leaves the allow-lists empty (null)
            return []
        if not isinstance(v, list):
            raise ConfigError(f"{ROOT}.{path}", f"expected a list, got {_show(v)}")
        return v


def _show(v: Any) -> str:
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- the conversion


class _Out:
    """The values to write (dotted butler-mqtt keys), their comments, and the report."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.comments: dict[str, str] = {}
        self.above: dict[str, list[str]] = {}
        self.result = ImportResult("")

    def carry(self, bkey: str, target: str, value: Any, why: str = "") -> None:
        self.values[target] = value
        self.result.carried.append(Note(f"{ROOT}.{bkey}", target, value, why))

    def same(self, bkey: str, why: str) -> None:
        """A Butler key that needs nothing written: butler-mqtt already behaves so."""
        self.result.carried.append(Note(f"{ROOT}.{bkey}", None, None, why))

    def change(self, bkey: str, target: str | None, value: Any, why: str) -> None:
        if target is not None:
            self.values[target] = value
        self.result.changed.append(Note(f"{ROOT}.{bkey}", target, value, why))


def convert(doc: Mapping[str, Any], template: str | None = None, source: str = "a Butler configuration") -> ImportResult:
    """Butler's configuration (the whole document, `Butler:` at the top) -> ImportResult.

    `template`: the starter configuration to fill in (default: the documented one).
    """
    b = _Butler(doc)
    out = _Out()
    _logging(b, out)
    _qrs(b, out)
    _mqtt(b, out)
    _rest(b, out)
    _start_filter(b, out)
    out.result.left_out = _left_out(b)
    header = (
        f"# Imported from {source} by `butler-mqtt init --from-butler`.\n"
        "# Keys Butler had are filled in below; every other key keeps its documented default.\n"
        "# Check it with: butler-mqtt check\n#\n"
    )
    text = fill_template(template if template is not None else starter_template(), out.values, out.comments, out.above)
    out.result.yaml_text = header + text
    _verify(out.result.yaml_text, out.values, out.result.carried + out.result.changed)
    return out.result


def _logging(b: _Butler, out: _Out) -> None:
    level = b.text("logLevel")
    if level is None:
        return
    ours = LOG_LEVELS.get(level.lower())
    if ours is None:
        raise ConfigError(f"{ROOT}.logLevel", f"unknown log level {level!r}; Butler's are {', '.join(LOG_LEVELS)}")
    if ours == level.lower():
        out.carry("logLevel", "logging.level", ours)
    else:
        out.change("logLevel", "logging.level", ours, f"Butler's {level!r} is {ours!r} here")


def _cert_path(b: _Butler, out: _Out, bkey: str, target: str, base: str) -> None:
    """A certificate path: carried as written, with a note when it will not mean the same."""
    path = b.text(bkey)
    if path is None or path == "":
        out.change(bkey, None, None, f"not set in Butler; {target} keeps its default")
        return
    if path.startswith("<") and path.endswith(">"):
        out.change(bkey, None, None, f"still the template's placeholder {path}; {target} keeps its default: "
                   "set it to the file exported from the QMC")
        return
    if Path(path).is_absolute() or PureWindowsPath(path).is_absolute():
        out.carry(bkey, target, path)
    else:
        out.change(bkey, target, path, f"relative: Butler read it from {base}, butler-mqtt reads it from its working "
                   "directory; make it absolute (butler-mqtt check tells whether it is found)")


def _qrs(b: _Butler, out: _Out) -> None:
    host = b.text("configQRS.host")
    if host:
        out.carry("configQRS.host", "qrs.host", host)
    port = b.port("configQRS.port")
    if port is not None:
        out.carry("configQRS.port", "qrs.port", port)
    if b.flag("configQRS.useSSL", True):
        if b.has("configQRS.useSSL"):
            out.same("configQRS.useSSL", "HTTPS, as always here")
    else:
        out.change("configQRS.useSSL", None, None, "Butler called QRS over plain HTTP; butler-mqtt always uses HTTPS "
                   "with the client certificate (port 4242)")
    auth = b.text("configQRS.authentication")
    if auth is not None and auth.lower() == "certificates":
        out.same("configQRS.authentication", "client certificate (Butler.cert), the only way here")
    elif auth is not None:
        out.change("configQRS.authentication", None, None, f"{auth!r}: butler-mqtt authenticates with the client "
                   "certificate (Butler.cert) only")
    _qlik_user(b, out)
    # rejectUnauthorized: Butler's template ships false (Qlik's self-signed certificates).
    reject = b.flag("configQRS.rejectUnauthorized", True)
    if reject:
        out.carry("configQRS.rejectUnauthorized", "qrs.verify", True)
    else:
        out.change("configQRS.rejectUnauthorized", "qrs.verify", False,
                   "WARNING: as in Butler, the QRS server certificate is not verified; set qrs.verify: true once "
                   "qrs.host is a name in the Sense server certificate (qrs.ca is Qlik's root.pem)")
        out.comments["qrs.verify"] = "WARNING: the QRS server certificate is NOT verified"
        out.above["qrs.verify"] = [
            "WARNING: imported from Butler's configQRS.rejectUnauthorized: false. butler-mqtt does not",
            "know it is talking to the real QRS (and logs this at every start). Set verify: true once",
            "qrs.host is a name in the Sense server certificate and qrs.ca is Qlik's root.pem.",
        ]
    base = "Butler's own src/ folder"
    _cert_path(b, out, "cert.clientCert", "qrs.cert", base)
    _cert_path(b, out, "cert.clientCertKey", "qrs.key", base)
    _cert_path(b, out, "cert.clientCertCA", "qrs.ca", base)


def _qlik_user(b: _Butler, out: _Out) -> None:
    headers = b.items("configQRS.headers.static")
    bkey = "configQRS.headers.static"
    found = False
    for i, item in enumerate(headers):
        where = f"{ROOT}.{bkey}[{i}]"
        if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
            raise ConfigError(where, "expected {name: ..., value: ...}")
        name, value = str(item["name"]).strip(), item["value"]
        if name.lower() != "x-qlik-user":
            out.change(f"{bkey}[{i}]", None, None, f"header {name!r} is not sent: butler-mqtt sends X-Qlik-User and "
                       "the Xrfkey only")
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{where}.value", f"expected 'UserDirectory=...; UserId=...', got {_show(value)}")
        parts: dict[str, str] = {}
        for piece in value.split(";"):
            k, sep, v = piece.partition("=")
            if sep:
                parts[k.strip().lower()] = v.strip()
        directory, user = parts.get("userdirectory"), parts.get("userid")
        if not directory or not user:
            raise ConfigError(f"{where}.value", f"expected 'UserDirectory=...; UserId=...', got {value!r}")
        out.carry(f"{bkey}[{i}]", "qrs.user_directory", directory, "X-Qlik-User")
        out.carry(f"{bkey}[{i}]", "qrs.user_id", user, "X-Qlik-User")
        found = True
    if not found:
        out.change(bkey, None, None, "no X-Qlik-User header in Butler: qrs.user_directory/qrs.user_id keep their "
                   "defaults (INTERNAL\\sa_api)")


def _topic_matches(filt: str, topic: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest)."""
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def _mqtt(b: _Butler, out: _Out) -> None:
    enabled = b.flag("mqttConfig.enable", False)
    host = b.text("mqttConfig.brokerHost")
    port = b.port("mqttConfig.brokerPort")
    if host:
        out.carry("mqttConfig.brokerHost", "mqtt.host", host)
    if port is not None:
        out.carry("mqttConfig.brokerPort", "mqtt.port", port)
    start_topic = b.text("mqttConfig.taskStartTopic")
    if not enabled:
        if start_topic:
            out.change("mqttConfig.taskStartTopic", None, None, "not carried: Butler's MQTT was off")
        out.change("mqttConfig.enable", "mqtt.topics.start_plain", None,
                   "Butler's MQTT was off, so nobody sends plain task GUIDs: the plain topic is off. butler-mqtt "
                   "itself always needs a broker: check mqtt.host and mqtt.port")
    elif start_topic:
        out.same("mqttConfig.enable", "MQTT on (always, here)")
        why = "Butler's plain-GUID start topic"
        root = b.text("mqttConfig.subscriptionRootTopic", mark=False)  # left out, with its reason
        if root and not _topic_matches(root, start_topic):
            why += (f"; Butler never received it (not under subscriptionRootTopic {root!r}), butler-mqtt subscribes "
                    "to it directly")
        out.carry("mqttConfig.taskStartTopic", "mqtt.topics.start_plain", start_topic, why)
        out.result.changed.append(Note(f"{ROOT}.mqttConfig", None, None, "butler-mqtt speaks MQTT 5 with QoS 1 and a "
                                       "persistent session under mqtt.client_id (Butler: 3.1.1, QoS 0, a random client "
                                       "id); set mqtt.protocol: 3.1.1 for a broker older than Mosquitto 1.6"))
    event_grid = b.flag("mqttConfig.azureEventGrid.enable", False)
    if not event_grid and b.has("mqttConfig.azureEventGrid.enable"):
        out.same("mqttConfig.azureEventGrid.enable", "not Azure Event Grid: mqtt.tls stays as documented")
    if event_grid:
        client_id = b.text("mqttConfig.azureEventGrid.clientId")
        if not client_id:
            raise ConfigError(f"{ROOT}.mqttConfig.azureEventGrid.clientId", "required with azureEventGrid.enable: true")
        out.carry("mqttConfig.azureEventGrid.enable", "mqtt.tls.enabled", True, "Azure Event Grid: TLS, client certificate")
        out.carry("mqttConfig.azureEventGrid.clientId", "mqtt.client_id", client_id)
        out.carry("mqttConfig.azureEventGrid.clientId", "mqtt.username", client_id, "Event Grid authenticates the "
                  "client id as user name")
        base = "Butler's src/lib folder"
        _cert_path(b, out, "mqttConfig.azureEventGrid.clientCertFile", "mqtt.tls.cert", base)
        _cert_path(b, out, "mqttConfig.azureEventGrid.clientKeyFile", "mqtt.tls.key", base)


def _rest(b: _Butler, out: _Out) -> None:
    api_on = b.flag("restServerConfig.enable", False)
    start_on = b.flag("restServerEndpointsEnable.senseStartTask", False)
    if not (api_on and start_on):
        if not api_on:
            why = "Butler's REST API was off"
            out.change("restServerConfig.enable", "http.enabled", False, f"{why}: the REST API stays off")
            if b.has("restServerEndpointsEnable.senseStartTask"):
                b.raw("restServerEndpointsEnable.senseStartTask")
                out.same("restServerEndpointsEnable.senseStartTask", f"not used: {why[0].lower()}{why[1:]}")
        else:
            why = "Butler's start endpoint (restServerEndpointsEnable.senseStartTask) was off"
            out.change("restServerEndpointsEnable.senseStartTask", "http.enabled", False, f"{why}: the REST API stays off")
            out.same("restServerConfig.enable", "on in Butler, but not its start endpoint, the only one here")
        for key in ("serverHost", "serverPort", "tls.enable", "tls.cert", "tls.key"):
            if b.raw(f"restServerConfig.{key}") is not _MISSING:
                out.change(f"restServerConfig.{key}", None, None, f"not carried: {why[0].lower()}{why[1:]}; "
                           "http.* keep their defaults")
        return
    out.carry("restServerConfig.enable", "http.enabled", True, "with restServerEndpointsEnable.senseStartTask: true")
    out.same("restServerEndpointsEnable.senseStartTask", "the start endpoint, with all three URL forms")
    host = b.text("restServerConfig.serverHost")
    if host:
        out.carry("restServerConfig.serverHost", "http.host", host)
    port = b.port("restServerConfig.serverPort")
    if port is not None:
        out.carry("restServerConfig.serverPort", "http.port", port, "Butler's public port: callers keep their URLs; "
                  "stop Butler's REST API first on the same host, or change http.port")
    tls = b.flag("restServerConfig.tls.enable", False)
    if b.has("restServerConfig.tls.enable"):
        out.same("restServerConfig.tls.enable", "HTTPS with http.tls.cert and http.tls.key" if tls else "plain HTTP")
    if tls:
        base = "Butler's working directory"
        for bkey, target in (("restServerConfig.tls.cert", "http.tls.cert"), ("restServerConfig.tls.key", "http.tls.key")):
            if not b.text(bkey):
                raise ConfigError(f"{ROOT}.{bkey}", "required with restServerConfig.tls.enable: true")
            _cert_path(b, out, bkey, target, base)
    else:
        for key in ("restServerConfig.tls.cert", "restServerConfig.tls.key"):
            if b.raw(key) is not _MISSING:
                out.same(key, "not used: TLS was off in Butler")
    if host and host not in ("127.0.0.1", "localhost", "::1"):
        out.result.changed.append(Note(
            f"{ROOT}.restServerConfig", None, None,
            "Butler's API had no authentication; butler-mqtt warns at every start until http.token (bearer) or "
            "http.tls.client_ca (client certificates) is set" + ("" if tls else ", and a token wants HTTPS (http.tls)"),
        ))


def _start_filter(b: _Butler, out: _Out) -> None:
    if not b.has("startTaskFilter"):
        return
    enabled = b.flag("startTaskFilter.enable", False)
    base = "startTaskFilter.allowTask"
    ids: list[str] = []
    for i, item in enumerate(b.items(f"{base}.taskId")):
        text = str(item).strip()
        if is_guid(text):
            ids.append(text.lower())
        else:
            out.change(f"{base}.taskId[{i}]", None, None, f"{text!r} is not a task GUID: Butler only warned and it "
                       "could never match; dropped")
    tags = [str(t) for t in b.items(f"{base}.tag") if t is not None and str(t).strip()]
    cps: list[dict[str, str]] = []
    for i, item in enumerate(b.items(f"{base}.customProperty")):
        if not isinstance(item, Mapping) or item.get("name") is None or item.get("value") is None:
            raise ConfigError(f"{ROOT}.{base}.customProperty[{i}]", "expected {name: ..., value: ...}")
        cps.append({"name": str(item["name"]), "value": str(item["value"])})
    out.carry("startTaskFilter.enable", "start_filter.enabled", enabled)
    out.carry(f"{base}.taskId", "start_filter.allow.task_ids", ids)
    out.carry(f"{base}.tag", "start_filter.allow.tags", tags)
    out.carry(f"{base}.customProperty", "start_filter.allow.custom_properties", cps)
    if enabled:
        out.result.changed.append(Note(
            f"{ROOT}.startTaskFilter", None, None,
            "the allow-list now applies to MQTT starts as well as REST (Butler filtered REST only), a task passes "
            "when its own ID, any of its tags or custom properties is allowed (what Butler's comment promised; "
            "Butler checked only the selector used), and names compare case-insensitively like QRS",
        ))


def _left_out(b: _Butler) -> list[Note]:
    """Every Butler key nothing read, grouped: a whole section untouched is one line."""
    notes: list[Note] = []

    def leaves(node: Any) -> int:
        if isinstance(node, Mapping):
            return sum(leaves(v) for v in node.values()) or 1
        return 1

    def why(rel: str) -> str:
        if rel in LEFT_OUT_WHY:
            return LEFT_OUT_WHY[rel]
        parent = rel.rsplit(".", 1)[0] if "." in rel else ""
        while parent:
            if parent in LEFT_OUT_SECTION_WHY:
                return LEFT_OUT_SECTION_WHY[parent]
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        return NOT_ABOUT_STARTS

    def walk(node: Mapping[str, Any], prefix: str) -> Iterator[Note]:
        for key, value in node.items():
            rel = f"{prefix}{key}"
            if rel in b.used:
                continue
            if any(u.startswith(rel + ".") for u in b.used) and isinstance(value, Mapping):
                yield from walk(value, rel + ".")
                continue
            n = leaves(value)
            label = f"{ROOT}.{rel}" + (f" ({n} keys)" if isinstance(value, Mapping) and n > 1 else "")
            yield Note(label, None, None, why(rel))

    notes.extend(walk(b.root, ""))
    return notes


# --------------------------------------------------------------------------- writing into the template


def starter_template() -> str:
    """The documented starter configuration, `etc/butler.yaml` (shipped in the package)."""
    from butler_mqtt.starter import starter_text

    return starter_text()


_PLAIN_UNSAFE = set(":#{}[],&*!|>'\"%@`")


def _scalar(v: Any) -> str:
    """One YAML scalar (or flow item) that reads back as exactly `v`."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    s = str(v)
    try:
        plain = bool(s) and s == s.strip() and not (_PLAIN_UNSAFE & set(s)) and yaml.safe_load(s) == s
    except yaml.YAMLError:
        plain = False
    return s if plain else json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _split_comment(rest: str) -> tuple[str, str]:
    """`value   # comment` -> (`value   `, `# comment`); the template's values hold no '#'."""
    at = rest.find("#")
    while at > 0 and not rest[at - 1].isspace():
        at = rest.find("#", at + 1)
    return (rest, "") if at < 0 else (rest[:at], rest[at:])


def fill_template(
    template: str,
    values: Mapping[str, Any],
    comments: Mapping[str, str] | None = None,
    above: Mapping[str, list[str]] | None = None,
) -> str:
    """Set dotted keys in a block-style YAML text, keeping every comment and the layout.

    Scalars replace the value in place (the comment column kept when it fits); a non-empty
    list becomes a block list under its key. `comments` replace a key's trailing comment,
    `above` adds comment lines before it. A key missing from the template is a bug here.
    """
    comments = comments or {}
    above = above or {}
    lines = template.splitlines()
    out: list[str] = []
    stack: list[tuple[int, str]] = []
    done: set[str] = set()
    for line in lines:
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        key, sep, rest = stripped.partition(":")
        if not stripped or stripped.startswith(("#", "-")) or not sep or not key.replace("_", "").isalnum():
            out.append(line)
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = ".".join(k for _, k in stack)
        if path not in values:
            out.append(line)
            continue
        done.add(path)
        value = values[path]
        out += [f"{' ' * indent}# {text}" for text in above.get(path, [])]
        old_value, comment = _split_comment(rest)
        if path in comments:
            comment = "# " + comments[path]
        prefix = f"{' ' * indent}{key}:"
        if isinstance(value, list) and value:
            out.append(f"{prefix}{'  ' + comment if comment else ''}")
            out += [f"{' ' * (indent + 2)}- {_scalar(item)}" for item in value]
            continue
        new = " " + _scalar(value)
        if comment:
            width = len(old_value)
            new = new.ljust(width) if len(new) < width else new + " "
            out.append(f"{prefix}{new}{comment}")
        else:
            out.append(f"{prefix}{new}")
    missing = set(values) - done
    if missing:
        raise RuntimeError(f"the starter configuration has no key {', '.join(sorted(missing))}")
    return "\n".join(out) + "\n"


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _verify(text: str, values: Mapping[str, Any], notes: list[Note]) -> None:
    """The written text must read back as exactly the values meant, and be a valid config."""
    data = yamlsafe.load(text)
    for key, want in values.items():
        got = _get(data, key)
        if got != want and not (isinstance(want, list) and not want and got == []):
            raise RuntimeError(f"{key} reads back as {got!r}, not {want!r}")
    try:
        Config.model_validate(data)
    except ValidationError as exc:  # a Butler value butler-mqtt cannot take
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        source = next((n.butler_key for n in notes if n.target is not None and key.startswith(n.target)), key)
        raise ConfigError(source, f"{first['msg']} (as {key} in butler-mqtt)") from None
