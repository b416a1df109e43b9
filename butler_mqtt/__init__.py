"""butler-mqtt: start Qlik Sense reload tasks from MQTT messages and Butler's REST endpoint."""

__version__ = "0.1.0"
