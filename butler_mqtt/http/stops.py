"""`POST|PUT /v4/reloadtask/{taskId}/stop` and `/v4/reloadtask/-/stop` (contract section 8): the
stop use case (stops.py) over REST. The body holds the selectors, `requestId` and `wait` of a
stop request (`{}` or none with a task ID in the path); the answer is 200 with the stop
`summary` without `event`, 400/401/413/415 as for starts, 503 when QRS or the journal cannot be
reached (nothing was stopped). With `wait`, the stopped executions' `taskFinished` go to the
MQTT reply topic, as a waited start's do."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from butler_mqtt.errors import RequestRejected
from butler_mqtt.http.bodies import with_path_task_id
from butler_mqtt.model import StopRequest, validate_stop

STOP_PATH = "/v4/reloadtask/{taskId}/stop"


def stop_request(data: Any, task_id: str | None) -> StopRequest:
    """A body plus the path's task ID -> one StopRequest (RequestRejected naming the problem)."""
    if not isinstance(data, dict):
        raise RequestRejected("Invalid request", "the body of a stop must be a JSON object")
    return validate_stop(with_path_task_id(data, task_id))


def add_stop_routes(app: FastAPI, handler: Callable[[Request], Awaitable[Response]], operation: dict[str, Any]) -> None:
    for method in ("POST", "PUT"):
        app.add_api_route(
            STOP_PATH, handler, methods=[method], name=f"stop_tasks_{method.lower()}",
            operation_id=f"stopTasks{method.title()}", summary="Stop running reloads", tags=["tasks"],
            response_model=None, openapi_extra=operation,
        )
