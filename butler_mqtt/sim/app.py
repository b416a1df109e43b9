"""Blocking entry point behind ``butler-mqtt sim``."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .data import demo_tasks, load_tasks_file
from .server import QrsSimulator
from .store import SimTask


def serve(
    host: str,
    port: int,
    certs_dir: Path,
    tasks_file: Path | None,
    latency_ms: float,
    demo: bool,
) -> int:
    """Run the simulator until SIGINT or SIGTERM; return the process exit code.

    Tasks come from ``tasks_file``, from the demo set when ``demo`` is set or no file is
    given, or from both. Exit codes follow the CLI contract: 0 after a clean stop, 2 for an
    unusable tasks file or certificate directory, 1 when the port cannot be bound.
    """
    sys.setswitchinterval(0.001)  # answer promptly under load (see daemon.run)
    tasks: list[SimTask] = []
    try:
        if demo or tasks_file is None:
            tasks.extend(demo_tasks())
        if tasks_file is not None:
            tasks.extend(load_tasks_file(tasks_file))
        sim = QrsSimulator(tasks, certs_dir=certs_dir, host=host, port=port, latency_ms=latency_ms)
    except (OSError, ValueError) as error:
        print(f"butler-mqtt sim: {error}", file=sys.stderr)
        return 2
    try:
        sim.start()
    except OSError as error:
        print(f"butler-mqtt sim: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"QRS simulator listening on {sim.base_url}/qrs "
            f"(certificates in {certs_dir.resolve()}, {len(tasks)} tasks)",
            flush=True,
        )
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    return 0
