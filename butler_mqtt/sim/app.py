"""Blocking entry point behind ``butler-mqtt sim``."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .data import demo_tasks, load_tasks_file
from .server import QrsSimulator
from .store import SimTask

#: ``(task name or id, value)`` pairs, e.g. from ``--fail-first NAME=K``.
TaskSettings = Sequence[tuple[str, float]]


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
) -> int:
    """Run the simulator until SIGINT or SIGTERM; return the process exit code.

    Tasks come from ``tasks_file``, from the demo set when ``demo`` is set or no file is
    given, or from both. ``run_seconds`` replaces the run time of every demo task and the
    default of tasks-file tasks without ``runSeconds``; ``task_run_seconds``, ``fail_first``
    and ``max_retries`` then set single tasks, named by name (case-insensitive, every task of
    that name) or id. The scheduler knobs are those of :class:`QrsSimulator`. Exit codes follow
    the CLI contract: 0 after a clean stop, 2 for an unusable tasks file, certificate
    directory or setting (an unknown task name is named), 1 when the port cannot be bound.
    """
    sys.setswitchinterval(0.001)  # answer promptly under load (see daemon.run)
    try:
        tasks = load_tasks(tasks_file, demo, run_seconds)
        apply_task_settings(tasks, "--task-run-seconds", "run_seconds", task_run_seconds)
        apply_task_settings(tasks, "--fail-first", "fail_first", fail_first)
        apply_task_settings(tasks, "--max-retries", "max_retries", max_retries)
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
    except (OSError, ValueError) as error:
        print(f"butler-mqtt sim: {error}", file=sys.stderr)
        return 2
    try:
        sim.start()
    except OSError as error:
        print(f"butler-mqtt sim: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1
    return _run_until_signal(sim, certs_dir, len(tasks))


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
            raise ValueError(f"{option} {name}={value:g}: no task has that name or id")
        for task in matched:
            setattr(task, field, value)


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
