"""`butler-mqtt check`: the operator's first aid. One line per check, each saying what to fix.

Exit 0 only when every check passes; 2 when the configuration is wrong (it does not load, or a
certificate file it names is missing or unusable: every line is still printed first); else 1.
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from butler_mqtt.config import Config, MqttConfig, load_config
from butler_mqtt.errors import ConfigError, QrsError
from butler_mqtt.http.tls import http_ssl_context, listener_warnings
from butler_mqtt.mqtt.listener import apply_credentials

OK, FAIL, WARN = "ok  ", "FAIL", "warn"


def _line(state: str, what: str, detail: str) -> None:
    print(f"[{state}] {what}: {detail}", flush=True)


def cert_days_left(path: Path) -> int:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days


def check_cert_files(cfg: Config) -> bool:
    good = True
    files: list[tuple[str, Path | None]] = [("qrs.cert", cfg.qrs.cert), ("qrs.key", cfg.qrs.key), ("qrs.ca", cfg.qrs.ca)]
    if cfg.backend == "cloud":
        files = [("cloud.ca", cfg.cloud.ca)]
    if cfg.mqtt.tls.enabled:
        files += [("mqtt.tls.ca", cfg.mqtt.tls.ca), ("mqtt.tls.cert", cfg.mqtt.tls.cert), ("mqtt.tls.key", cfg.mqtt.tls.key)]
    http_files = cfg.http_tls_files()
    files += list(http_files.items())
    for key, path in files:
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            _line(FAIL, f"{key} ({cfg.source(key)})", f"cannot read {path} ({exc.strerror}); export it from the QMC or fix the path")
            good = False
            continue
        if key.endswith("key"):
            ok = b"PRIVATE KEY" in data
            _line(OK if ok else FAIL, key, f"{path} readable" if ok else f"{path} holds no PEM private key")
            good &= ok
            continue
        try:
            days = cert_days_left(path)
        except ValueError:
            _line(FAIL, key, f"{path} is not a PEM certificate")
            good = False
            continue
        if days < 0:
            _line(FAIL, key, f"{path} expired {-days} days ago; export a new certificate")
            good = False
        else:
            _line(OK if days >= 30 else WARN, key, f"{path} valid, {days} days left")
    if good and "http.tls.cert" in http_files:
        try:
            http_ssl_context(cfg.http.tls)
        except ConfigError as exc:
            _line(FAIL, exc.key, exc.reason)
            good = False
    if good:
        _rotation_line(files)
    return good


def _rotation_line(files: list[tuple[str, Path | None]]) -> None:
    """Which certificate files a running daemon re-reads on SIGHUP (reload.py)."""
    reread = [key for key, path in files if path is not None and not key.startswith("mqtt.")]
    later = [key for key, path in files if path is not None and key.startswith("mqtt.")]
    _line(OK, "certificate rotation", f"{', '.join(reread)} are re-read on SIGHUP (systemctl reload butler-mqtt): "
          "replace the files, no restart needed; a file that does not load keeps the one in use (tls_reload_failed)"
          + (f"; {', '.join(later)} are read at start only" if later else ""))


def check_http(cfg: Config) -> bool:
    """How the REST API listens, and what is unsafe about it; warns, never fails."""
    if not cfg.http.enabled:
        return True
    http = cfg.http
    auth = [a for a, on in (("bearer token", http.token is not None), ("client certificates", http.tls.client_ca is not None)) if on]
    detail = f"{'https' if http.tls.enabled else 'http'}://{http.host}:{http.port}, {' and '.join(auth) or 'no authentication'}"
    warnings = listener_warnings(http)
    _line(WARN if warnings else OK, "http", "; ".join([detail, *(w for _, w in warnings)]))
    return True


def check_callers(cfg: Config) -> bool:
    """Callers (contract section 10): who they are and where they publish; warns about a caller
    that may start nothing and about bare topics still open. Never fails (the config is valid)."""
    if not cfg.callers:
        return True
    t = cfg.mqtt.topics
    names = ", ".join(f"{c.name} ({t.start}/{c.topic})" for c in cfg.callers[:5])
    more = f" and {len(cfg.callers) - 5} more" if len(cfg.callers) > 5 else ""
    _line(OK, "callers", f"{len(cfg.callers)}: {names}{more}; the broker ACL must give each level to one broker user "
          "(docs/callers.md)")
    for i, c in enumerate(cfg.callers):
        a = c.allow
        if not (a.task_ids or a.tags or a.custom_properties):
            _line(WARN, f"callers[{i}].allow", f"{c.name}'s allow-list is empty: it may start nothing")
    if not cfg.callers_only:
        _line(WARN, "callers_only", f"false: {t.start} and http.token still start tasks as the anonymous caller "
              "(start_filter only); set it to true once every system has its caller")
    return True


def check_broker(cfg: MqttConfig, timeout: float = 10.0) -> bool:
    """Connect with the configured credentials and subscribe to the start topic."""
    answers = _ask_broker(cfg, timeout)
    return answers is not None and _judge_broker(cfg, answers, timeout)


def _ask_broker(cfg: MqttConfig, timeout: float) -> dict[str, str] | None:
    """What the broker answered to CONNECT and SUBSCRIBE (keys connect, subscribe,
    subscribe_ok); None, with the FAIL line printed, when it could not be reached at all."""
    result: dict[str, str] = {}
    done = threading.Event()
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{cfg.client_id}-check-{uuid.uuid4().hex[:6]}",  # never take over the daemon's session
        protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311,
    )
    apply_credentials(c, cfg)
    if cfg.tls.enabled and not cfg.tls.verify:
        _line(WARN, "mqtt.tls.verify", "the broker certificate is not verified; set mqtt.tls.ca and mqtt.tls.verify: true")

    def on_connect(client: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        result["connect"] = str(rc)
        if rc.is_failure:
            done.set()
            return
        topic = cfg.topics.start if not cfg.shared_group else f"$share/{cfg.shared_group}/{cfg.topics.start}"
        client.subscribe(topic, qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: int, rcs: list[ReasonCode], _p: object) -> None:
        result["subscribe"] = ",".join(str(r) for r in rcs)
        result["subscribe_ok"] = "yes" if not any(r.is_failure for r in rcs) else "no"
        done.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    where = f"{cfg.host}:{cfg.port}"
    try:
        c.connect(cfg.host, cfg.port, keepalive=30)
    except ssl.SSLError as exc:
        _line(
            FAIL, "broker", f"TLS with {where} failed ({exc.reason or exc}); mqtt.tls.ca must be the CA that signed "
            "the broker certificate, mqtt.host a name in it, and mqtt.port the broker's TLS port",
        )
        return None
    except OSError as exc:
        _line(FAIL, "broker", f"cannot reach {where} ({exc}); check mqtt.host/mqtt.port and that the broker runs")
        return None
    c.loop_start()
    done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return result


def _judge_broker(cfg: MqttConfig, result: dict[str, str], timeout: float) -> bool:
    """The broker's answers as check lines, each saying what to fix."""
    where = f"{cfg.host}:{cfg.port}"
    if "connect" not in result:
        _line(FAIL, "broker", f"no answer from {where} within {timeout:.0f} s; TLS on a plain port, or a firewall?")
        return False
    if "subscribe" not in result and result["connect"] == "Success":
        _line(FAIL, "start topic", f"{where} did not answer the subscription to {cfg.topics.start} within {timeout:.0f} s")
        return False
    if "subscribe" not in result:
        if cfg.username:
            fix = (f"check mqtt.username ({cfg.username}) and mqtt.password (under systemd: the mqtt_password "
                   "credential) against the broker's password_file")
        else:
            fix = "the broker wants a user name: set mqtt.username and mqtt.password"
        _line(FAIL, "broker", f"{where} refused the connection: {result['connect']}; {fix}")
        return False
    _line(OK, "broker", f"connected to {where} as {'user ' + cfg.username if cfg.username else 'anonymous'}")
    if result.get("subscribe_ok") != "yes":
        _line(FAIL, "start topic", f"subscribing to {cfg.topics.start} refused ({result['subscribe']}); grant read in the broker ACL")
        return False
    _line(OK, "start topic", f"{cfg.topics.start} subscribable")
    return True


def check_cloud(cfg: Config) -> bool:
    """backend: cloud: a token obtained (or the API key accepted) and the tenant called, one line each."""
    from butler_mqtt.runtime import check_cloud as lines

    if not cfg.cloud.verify:
        _line(WARN, "cloud.verify", "the tenant's certificate is not verified; put a proxy's CA in cloud.ca instead")
    results = lines(cfg)
    for ok, text in results:
        _line(OK if ok else FAIL, "cloud", text)
    return len(results) == 2 and all(ok for ok, _ in results)


def check_qrs(cfg: Config) -> bool:
    from butler_mqtt.runtime import backend

    if cfg.backend == "cloud":
        return check_cloud(cfg)
    if not cfg.qrs.verify:
        _line(WARN, "qrs.verify", "server certificate verification is OFF; set qrs.ca to root.pem and qrs.verify: true")
    try:
        client = backend(cfg, retries=0)
    except ConfigError as exc:
        _line(FAIL, "qrs", f"not tried: {exc}; fix the certificate files first")
        return False
    try:
        about = client.about()
    except QrsError as exc:
        hint = "is QRS running and qrs.host/qrs.port right? is the client certificate the one exported from this site?"
        if exc.status == 403:
            hint = "the certificate or X-Qlik-User was refused; export client.pem/client_key.pem again"
        elif "qrs.port" in str(exc) or "qrs.host" in str(exc):
            hint = ""  # the message already says what to check
        _line(FAIL, "qrs", f"{cfg.qrs.base_url}/qrs/about failed: {exc}" + (f"; {hint}" if hint else ""))
        return False
    finally:
        client.close()
    _line(OK, "qrs", f"{cfg.qrs.base_url} answered, build {about.get('buildVersion', '?')}, certificate accepted")
    return True


def run_checks(config_file: Path) -> int:
    try:
        cfg = load_config(config_file)
        if cfg.backend == "cloud":
            from butler_mqtt.runtime import cloud_settings

            cloud_settings(cfg)  # names the cloud.* key that cannot work
    except ConfigError as exc:
        _line(FAIL, "config", f"{exc}")
        return 2
    _line(OK, "config", f"{config_file} valid")
    files_ok = check_cert_files(cfg)
    steps: list[Callable[[], bool]] = [
        lambda: check_http(cfg),
        lambda: check_callers(cfg),
        lambda: check_broker(cfg.mqtt),
        lambda: check_qrs(cfg),
    ]
    results = [step() for step in steps]  # every line is printed, whatever failed before
    if not files_ok:
        return 2  # a certificate file missing or unusable is a configuration error
    return 0 if all(results) else 1
