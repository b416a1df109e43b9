"""Blocking entry point behind ``butler-mqtt sim --cloud``: :func:`main` takes the options,
:func:`serve` runs until SIGINT/SIGTERM. The lead wires ``main`` into cli.py."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .server import CloudSimulator
from .world import demo_world


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="butler-mqtt sim --cloud", description="A Qlik Cloud tenant stand-in over HTTPS.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--certs", type=Path, default=Path("sim-certs"), help="certificate directory (clients trust root.pem)")
    p.add_argument("--client-id", default="sim-client")
    p.add_argument("--client-secret", default="sim-client-secret")
    p.add_argument("--api-key", default="sim-api-key")
    p.add_argument("--latency-ms", type=float, default=0)
    p.add_argument("--max-concurrent", type=int, default=4, help="tenant reload concurrency (0 = unlimited)")
    p.add_argument("--start-limit", type=float, default=50, help="POST /api/v1/reloads accepted per minute")
    p.add_argument("--rate-window", type=float, default=60, help="seconds over which the start limit is metered")
    p.add_argument("--token-lifetime", type=float, default=21600, help="access token lifetime in seconds")
    p.add_argument("--page-size", type=int, default=100, help="largest page served")
    p.add_argument("--generated-apps", type=int, default=0, help="extra apps in space/tag 'generated'")
    p.add_argument("--run-seconds", type=float, default=None, help="run time of every demo app's reload")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve; exit code 0 after a clean stop, 2 for bad options or
    certificates, 1 when the port cannot be bound."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    world = demo_world()
    world.max_concurrent = args.max_concurrent
    world.generated_apps = args.generated_apps
    if args.run_seconds is not None:
        for app in world.apps.values():
            app.run_seconds = args.run_seconds
    try:
        sim = CloudSimulator(
            world, certs_dir=args.certs, host=args.host, port=args.port, client_id=args.client_id,
            client_secret=args.client_secret, api_key=args.api_key, latency_ms=args.latency_ms,
            max_page_size=args.page_size, start_limit_per_minute=args.start_limit, rate_window=args.rate_window,
        )
        sim.token_lifetime = args.token_lifetime
    except (OSError, ValueError) as error:
        print(f"butler-mqtt sim --cloud: {error}", file=sys.stderr)
        return 2
    try:
        sim.start()
    except OSError as error:
        print(f"butler-mqtt sim --cloud: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return _run_until_signal(sim, args.certs)


def banner(sim: CloudSimulator, certs_dir: Path) -> str:
    """What the simulator prints at start: where it is and the credentials it accepts (the
    contract: the simulator prints its credentials' values; they are test values)."""
    return (
        f"Qlik Cloud simulator listening on {sim.base_url} (CA: {certs_dir.resolve() / 'root.pem'}; "
        f"{sim.world.app_count()} apps, tenant concurrency {sim.world.max_concurrent or 'unlimited'}, "
        f"{sim.start_limit_per_minute:g} starts/min)\n"
        f"  cloud.tenant: {sim.base_url}\n"
        f"  cloud.client_id: {sim.client_id}\n"
        f"  cloud.client_secret: {sim.client_secret}\n"
        f"  cloud.api_key: {sim.api_key}"
    )


def _run_until_signal(sim: CloudSimulator, certs_dir: Path) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(banner(sim, certs_dir), flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    return 0
