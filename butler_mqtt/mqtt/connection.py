"""How every MQTT client of ours connects: credentials and TLS, no Nagle, waiting for a PUBACK."""

from __future__ import annotations

import socket
import ssl
import time

import paho.mqtt.client as mqtt

from butler_mqtt.config import MqttConfig


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS from the config; every client of ours connects the same way."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
    if cfg.tls.enabled:
        client.tls_set(
            ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
            certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
            keyfile=str(cfg.tls.key) if cfg.tls.key else None,
            cert_reqs=ssl.CERT_REQUIRED if cfg.tls.verify else ssl.CERT_NONE,
        )
        if not cfg.tls.verify:
            client.tls_insecure_set(True)


def nodelay(client: mqtt.Client) -> None:
    """Disable Nagle's algorithm (paho does not): replies go out in bursts of small packets,
    and Nagle plus the peer's delayed ACK would hold each burst's second packet ~40 ms."""
    setsockopt = getattr(client.socket(), "setsockopt", None)
    try:
        if setsockopt is not None:
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket: nothing to tune


#: Longest single wait on a message's condition (the deadline is checked between waits).
_WAIT_SLICE_S = 0.25


def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    """Wait for the broker's PUBACK. Survives reconnects: paho resends queued QoS 1 messages
    after a reconnect but leaves `rc` at NO_CONN, so `wait_for_publish` would give up early.

    Woken by paho's own notification when the PUBACK is handled (the message's condition), not
    by polling: polling every 2 ms added a millisecond to each reply on average and a wake-up
    per tick, and on a busy host those wake-ups took the CPU from the QRS the request waits for
    (bench/ceiling.py)."""
    deadline = time.monotonic() + timeout
    cond = info._condition  # noqa: SLF001 - see docstring
    with cond:
        while not info._published:  # noqa: SLF001
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(min(left, _WAIT_SLICE_S))
    return True
