"""What the edges are handed: the parts of a running daemon, wired once, never the daemon.

The REST API (http/) gets a `Runtime`: the config, the one `StartService`, the tracker, the
journal, the QRS client, the metrics, and a narrow `Health` view of the MQTT side. It can be
served (and tested) on any such Runtime, and it cannot reach into the daemon's lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from butler_mqtt.config import Config
    from butler_mqtt.journal import Journal
    from butler_mqtt.ops.metrics import Metrics
    from butler_mqtt.qrs.client import QrsClient
    from butler_mqtt.service import StartService
    from butler_mqtt.tracking import Tracker


class Health(Protocol):
    """What /healthz and /metrics need to know about the MQTT side of the daemon."""

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def unacked(self) -> int: ...

    @property
    def qrs_problem(self) -> str | None: ...

    def waiting(self) -> tuple[int, float | None]: ...


@dataclass(frozen=True)
class Runtime:
    cfg: Config
    service: StartService
    tracker: Tracker
    journal: Journal
    qrs: QrsClient
    metrics: Metrics
    health: Health
