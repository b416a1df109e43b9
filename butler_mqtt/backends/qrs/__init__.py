"""The QRS edge: client, filters."""

from butler_mqtt.backends.qrs.client import QrsClient

__all__ = ["QrsClient"]
