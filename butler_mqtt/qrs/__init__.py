"""The QRS edge: client, filters."""

from butler_mqtt.qrs.client import QrsClient

__all__ = ["QrsClient"]
