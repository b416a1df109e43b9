"""Session takeover: another client connected to the broker with our client id.

MQTT 5 brokers may say so (DISCONNECT reason 0x8E); Mosquitto 2.0 just closes the socket, so the
other holder is looked for in our retained status topic. Reconnecting at once would take the
session back, and the two would kick each other off forever: the listener backs off instead.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.connection import apply_credentials

log = structlog.get_logger("butler_mqtt.mqtt")

#: MQTT 5 DISCONNECT reason 0x8E: another connection with our client id took the session.
SESSION_TAKEN_OVER = 0x8E
#: Reconnect delay after a takeover: doubles per takeover in a row, capped.
TAKEOVER_BACKOFF_S, TAKEOVER_BACKOFF_MAX_S = 30, 600
#: A connection that lasted this long ends a series of takeovers.
TAKEOVER_RESET_S = 600.0


class SessionTakeover:
    """Finds who took our session and backs off (the listener owns one)."""

    def __init__(self, cfg: MqttConfig, client_id: str, v5: bool, status_topic: str, instance: str) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.v5 = v5
        self.status_topic = status_topic
        self.instance = instance
        self.count = 0  # session takeovers in a row (see MqttListener._on_disconnect)

    def other_holder(self, wait: float = 1.5) -> dict[str, Any] | None:
        """After losing the connection: is our client id now online from another process?

        Read from our retained status with a throwaway client (another id, same credentials):
        an "online" with our client id but another `instance` is the connection that took our
        session. None when there is none, or the broker cannot be asked.
        """
        found: dict[str, Any] = {}
        done = threading.Event()
        probe = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id}-probe-{uuid.uuid4().hex[:6]}"[:128],
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        apply_credentials(probe, self.cfg)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            if rc.is_failure:
                done.set()
            else:
                c.subscribe(self.status_topic, qos=1)

        own = threading.Event()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                data = json.loads(msg.payload)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("instance") == self.instance:
                # Still our own status: the newcomer's "online" may be a moment behind its
                # connect (it publishes after its CONNACK). Keep listening until `wait` ends.
                own.set()
                return
            if isinstance(data, dict):
                found.clear()
                found.update(data)
            done.set()

        probe.on_connect = on_connect
        probe.on_message = on_message
        # A retained message comes right after the SUBACK: with none at all, give up soon.
        probe.on_subscribe = lambda *_a: threading.Timer(0.5, lambda: None if own.is_set() else done.set()).start()
        try:
            probe.connect(self.cfg.host, self.cfg.port, keepalive=10)
        except (OSError, ValueError):
            return None
        probe.loop_start()
        try:
            done.wait(wait)
        finally:
            probe.disconnect()
            probe.loop_stop()
        mine = found.get("clientId") == self.client_id and found.get("instance") != self.instance
        return found if found.get("status") == "online" and mine else None

    def taken_over(self, client: mqtt.Client, holder: dict[str, Any], connected_at: float) -> None:
        """Another client connected with our id. Reconnecting at once would take the session
        back, and the two would kick each other off forever: back off, loudly."""
        if time.monotonic() - connected_at > TAKEOVER_RESET_S:
            self.count = 0
        self.count += 1
        delay = min(TAKEOVER_BACKOFF_S * 2 ** (self.count - 1), TAKEOVER_BACKOFF_MAX_S)
        # paho waits min_delay before the first reconnect attempt, then doubles to max_delay.
        client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, TAKEOVER_BACKOFF_MAX_S))
        log.error(
            "mqtt_session_taken_over",
            client_id=self.client_id,
            other={k: holder.get(k) for k in ("reason", "host", "pid", "startedAt") if holder.get(k) is not None},
            takeovers=self.count,
            retry_in_s=delay,
            detail=f"another client connected to {self.cfg.host}:{self.cfg.port} with client id "
            f"{self.client_id}: a second butler-mqtt with the same mqtt.client_id (and no shared_group)? "
            "Give each daemon its own client id; this one backs off instead of taking the session back",
        )
