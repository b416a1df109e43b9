"""Blocking entry point behind ``butler-mqtt sim``."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .data import demo_tasks, load_tasks_file
from .server import LOG_FAULTS, LOG_ROUTES, QrsSimulator
from .store import SimTask

#: ``(task name or id, value)`` pairs, e.g. from ``--fail-first NAME=K``.
TaskSettings = Sequence[tuple[str, Any]]


def serve(
    host: str,
    port: int,
    certs_dir: Path,
    tasks_file: Path | None,
    latency_ms: float,
    demo: bool,
    *,
    max_concurrent: int = 0,
    queue_timeout: float | None = None,
    already_running: str = "same",
    run_seconds: float | None = None,
    task_run_seconds: TaskSettings = (),
    fail_first: TaskSettings = (),
    max_retries: TaskSettings = (),
    failure_message: TaskSettings = (),
    log_bytes: TaskSettings = (),
    log_encoding: TaskSettings = (),
    log_faults: Sequence[tuple[str, str]] = (),
    stop_seconds: tuple[float, float] | None = None,
    file_references: bool = True,
) -> int:
    """Run the simulator until SIGINT or SIGTERM; return the process exit code.

    Tasks come from ``tasks_file``, from the demo set when ``demo`` is set or no file is
    given, or from both. ``run_seconds`` replaces the run time of every demo task and the
    default of tasks-file tasks without ``runSeconds``; the per-task settings (``task_run_seconds``
    to ``log_encoding``, SimTask fields) then set single tasks, named by name (case-insensitive,
    every task of that name) or id. ``log_faults``: ``(route, fault)`` pairs (``QrsSimulator.
    log_faults``); ``stop_seconds``: AbortInitiated and Aborting times; ``file_references=False``
    leaves ``fileReferenceID`` empty. Scheduler knobs: :class:`QrsSimulator`. Exit codes follow
    the CLI contract: 0 after a clean stop, 2 for an unusable tasks file, certificate
    directory or setting (an unknown task name is named), 1 when the port cannot be bound.
    """
    sys.setswitchinterval(0.001)  # answer promptly under load (see daemon.run)
    try:
        tasks = load_tasks(tasks_file, demo, run_seconds)
        per_task = (task_run_seconds, fail_first, max_retries, failure_message, log_bytes, log_encoding)
        for (option, field), settings in zip(_TASK_OPTIONS, per_task, strict=True):
            apply_task_settings(tasks, option, field, settings)
        sim = QrsSimulator(
            tasks,
            certs_dir=certs_dir,
            host=host,
            port=port,
            latency_ms=latency_ms,
            already_running=already_running,
            max_concurrent=max_concurrent,
            queue_timeout=queue_timeout,
        )
        _set_failure_knobs(sim, log_faults, stop_seconds, file_references)
    except (OSError, ValueError) as error:
        print(f"butler-mqtt sim: {error}", file=sys.stderr)
        return 2
    try:
        sim.start()
    except OSError as error:
        print(f"butler-mqtt sim: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1
    return _run_until_signal(sim, certs_dir, len(tasks))


#: The per-task options of ``serve``, in its argument order: (option, SimTask field).
_TASK_OPTIONS = (
    ("--task-run-seconds", "run_seconds"),
    ("--fail-first", "fail_first"),
    ("--max-retries", "max_retries"),
    ("--failure-message", "failure_message"),
    ("--log-bytes", "log_bytes"),
    ("--log-encoding", "log_encoding"),
)


def _set_failure_knobs(
    sim: QrsSimulator, log_faults: Sequence[tuple[str, str]], stop_seconds: tuple[float, float] | None, file_references: bool
) -> None:
    sim.log_faults.update(checked_log_faults(log_faults))
    if stop_seconds is not None:
        sim.store.abort_initiated_seconds, sim.store.aborting_seconds = stop_seconds
    sim.store.file_references = file_references


def load_tasks(tasks_file: Path | None, demo: bool, run_seconds: float | None) -> list[SimTask]:
    """The demo set and/or the tasks file (see :func:`serve`); ValueError/OSError if unusable."""
    tasks: list[SimTask] = []
    if demo or tasks_file is None:
        for task in demo_tasks():
            if run_seconds is not None:
                task = dataclasses.replace(task, run_seconds=run_seconds)
            tasks.append(task)
    if tasks_file is not None:
        tasks.extend(load_tasks_file(tasks_file, run_seconds))
    return tasks


def apply_task_settings(tasks: list[SimTask], option: str, field: str, settings: TaskSettings) -> None:
    """Set ``field`` on the tasks named in ``settings``; ValueError names an unknown task."""
    for name, value in settings:
        wanted = name.strip().casefold()
        matched = [t for t in tasks if wanted in (t.id.casefold(), t.name.casefold())]
        if not matched:
            shown = f"{value:g}" if isinstance(value, int | float) else str(value)
            raise ValueError(f"{option} {name}={shown}: no task has that name or id")
        for task in matched:
            setattr(task, field, value)


def checked_log_faults(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """``--log-fault ROUTE=FAULT`` pairs as ``QrsSimulator.log_faults``; ValueError names a bad one."""
    faults: dict[str, str] = {}
    for route, fault in pairs:
        route, fault = route.strip().lower(), fault.strip().lower()
        if route not in LOG_ROUTES or fault not in LOG_FAULTS:
            raise ValueError(
                f"--log-fault {route}={fault}: ROUTE is one of {', '.join(LOG_ROUTES)}, "
                f"FAULT one of {', '.join(LOG_FAULTS)}"
            )
        faults[route] = fault
    return faults


def _run_until_signal(sim: QrsSimulator, certs_dir: Path, task_count: int) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        capacity = f"max {sim.max_concurrent}" if sim.max_concurrent else "unlimited"
        timeout = f"queue timeout {sim.queue_timeout:g} s" if sim.queue_timeout else "no queue timeout"
        print(
            f"QRS simulator listening on {sim.base_url}/qrs "
            f"(certificates in {certs_dir.resolve()}, {task_count} tasks; "
            f"scheduler: {capacity} concurrent reloads, {timeout})",
            flush=True,
        )
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    return 0
