"""Commands of contract section 1. Exit codes: 0 ok, 1 runtime failure, 2 bad config/usage."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from butler_mqtt import __version__
from butler_mqtt.config import Config, config_path, load_config
from butler_mqtt.errors import ButlerError, ConfigError, QrsError, RequestRejected
from butler_mqtt.model import CustomPropertyCriterion, StartRequest, validate_request

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: $BUTLER_MQTT_CONFIG, else etc/butler.yaml)")


def _add_selectors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-id", action="append", default=[], metavar="ID", help="task GUID (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="NAME", help="tag name (repeatable)")
    p.add_argument(
        "--custom-property", action="append", default=[], metavar="NAME=VALUE", help="custom property pair (repeatable)"
    )
    p.add_argument("--all-task-ids-must-exist", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="butler-mqtt",
        description="Start Qlik Sense reload tasks from MQTT messages (and Butler's REST endpoint).",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.",
    )
    parser.add_argument("--version", action="version", version=f"butler-mqtt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the daemon: MQTT listener (+ REST API when enabled)")
    _add_config(p)

    p = sub.add_parser("check", help="validate config, reach the broker and QRS")
    _add_config(p)

    p = sub.add_parser("resolve", help="dry run: print the tasks that would start, as JSON")
    _add_config(p)
    _add_selectors(p)

    p = sub.add_parser("request", help="publish a start request over MQTT and print the replies")
    _add_config(p)
    _add_selectors(p)
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    p.add_argument("--wait", action="store_true", help="follow every reload to its end")
    p.add_argument("--dry-run", action="store_true", help="report what would start; start nothing")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replies (default 30)")

    p = sub.add_parser("sim", help="the QRS simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4242)
    p.add_argument("--certs", type=Path, default=Path("certs"), help="certificate dir (generated when empty)")
    p.add_argument("--tasks", type=Path, help="JSON file of tasks (default: the demo data set)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--demo", action="store_true", help="serve the demo data set")

    p = sub.add_parser(
        "init",
        help="write the starter configuration (or one imported from Butler's) to PATH; never overwrites",
        description="Write the documented starter configuration to PATH. With --from-butler, fill it in from a "
        "Butler config file (QRS, certificates, broker, start topic, REST port and TLS, start-task allow-list) and "
        "print, key by key, what was carried, what was set differently and why, and what was left out.",
    )
    p.add_argument("path", nargs="?", type=Path, default=Path("etc/butler.yaml"), metavar="PATH",
                   help="where to write (default etc/butler.yaml); an existing file is never overwritten")
    p.add_argument("--from-butler", type=Path, metavar="BUTLER.yaml", help="Butler's YAML config file to import")

    p = sub.add_parser("demo", help="simulator + broker + daemon + a sample request, all local")
    p.add_argument("--once", action="store_true", help="stop right after the sample requests")
    return parser


def selectors_request(args: argparse.Namespace, **extra: Any) -> StartRequest:
    """Build the StartRequest from command-line selectors, with the same validation as MQTT."""
    cps: list[dict[str, str]] = []
    for item in args.custom_property:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--custom-property", f"expected NAME=VALUE, got {item!r}")
        cps.append(CustomPropertyCriterion(name=name, value=value).model_dump())
    data: dict[str, Any] = {"taskId": args.task_id, "tag": args.tag, "customProperty": cps, **extra}
    if args.all_task_ids_must_exist:
        data["allTaskIdsMustExist"] = True
    return validate_request({k: v for k, v in data.items() if v not in ([], None)})


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_resolve(args: argparse.Namespace) -> int:
    from butler_mqtt.qrs.client import QrsClient
    from butler_mqtt.selection import plan

    cfg = _load(args)
    cfg.check_qrs_files()
    req = selectors_request(args, dryRun=True)
    from butler_mqtt.service import StartService

    qrs = QrsClient(cfg.qrs)
    service = StartService(cfg, qrs)
    try:
        selection = service.resolve(req)
    finally:
        service.close()
        qrs.close()
    allow = cfg.start_filter.allow if cfg.start_filter.enabled else None
    outcomes = plan(selection, req, allow)
    out = {
        "tasks": [
            {"taskId": o.task_id, "taskName": o.task_name, "matchedBy": o.matched_by, "status": o.status}
            | ({"reason": o.reason} if o.reason else {})
            for o in outcomes
        ],
        "tasksNotFound": selection.not_found,
        "total": sum(1 for o in outcomes if o.status == "wouldStart"),
    }
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return EXIT_OK


def cmd_sim(args: argparse.Namespace) -> int:
    from butler_mqtt.sim import serve

    return serve(args.host, args.port, args.certs, args.tasks, args.latency_ms, args.demo)


def cmd_run(args: argparse.Namespace) -> int:
    from butler_mqtt.daemon import run

    return run(config_path(args.config))


def cmd_request(args: argparse.Namespace) -> int:
    from butler_mqtt.mqtt.requester import Requester

    cfg = load_config(config_path(args.config), missing_ok=True)
    extra: dict[str, Any] = {"requestId": args.request_id or str(uuid.uuid4())}
    if args.wait:
        extra["wait"] = True
    if args.dry_run:
        extra["dryRun"] = True
    req = selectors_request(args, **extra)
    body = req.model_dump(exclude_defaults=True)
    failed = False

    def show(ev: dict[str, Any]) -> None:
        nonlocal failed
        print(json.dumps(ev, ensure_ascii=False), flush=True)
        if ev.get("event") == "error" or (ev.get("event") == "summary" and ev.get("tasksFailed")):
            failed = True
        if ev.get("event") == "taskFinished" and ev.get("status") != "FinishedSuccess":
            failed = True

    try:
        with Requester(cfg.mqtt) as r:
            r.request(body, timeout=args.timeout, on_event=show)
    except TimeoutError as exc:
        print(f"butler-mqtt: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"butler-mqtt: cannot reach the broker at {cfg.mqtt.host}:{cfg.mqtt.port}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL if failed else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from butler_mqtt.check import run_checks

    return run_checks(config_path(args.config))


_EXISTS = "exists and is not overwritten: choose another PATH or move the file away"


def _write_new(text: str, path: Path) -> None:
    """Create `path` with `text`; an existing file is an error, never overwritten."""
    if path.exists():
        raise ConfigError(str(path), _EXISTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as f:  # "x": a file that appeared meanwhile is not replaced either
            f.write(text)
    except FileExistsError:
        raise ConfigError(str(path), _EXISTS) from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot write: {exc.strerror or exc}") from None


def cmd_init(args: argparse.Namespace) -> int:
    from butler_mqtt import butler_import

    path: Path = args.path
    if path.exists():  # said before anything else is read: there is nothing to do either way
        raise ConfigError(str(path), _EXISTS)
    if args.from_butler is None:
        _write_new(butler_import.starter_template(), path)
        print(f"wrote {path}: the documented starter configuration; edit it, then run: butler-mqtt check --config {path}")
        return EXIT_OK
    result = butler_import.convert(butler_import.load_butler(args.from_butler), source=str(args.from_butler))
    _write_new(result.yaml_text, path)
    print(f"wrote {path} from Butler's {args.from_butler}\n")
    print(result.report())
    print(f"Next: butler-mqtt check --config {path}; then point Butler's callers at butler-mqtt, and compare what "
          f"starts with: butler-mqtt resolve --config {path} --tag <tag>")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from butler_mqtt.demo import run_demo

    return run_demo(once=args.once)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "run": cmd_run,
        "check": cmd_check,
        "resolve": cmd_resolve,
        "request": cmd_request,
        "sim": cmd_sim,
        "demo": cmd_demo,
        "init": cmd_init,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"butler-mqtt: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RequestRejected as exc:
        print(f"butler-mqtt: {exc.error}: {exc.details}", file=sys.stderr)
        return EXIT_USAGE
    except QrsError as exc:
        print(f"butler-mqtt: QRS error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except ButlerError as exc:  # e.g. the journal cannot be opened
        print(f"butler-mqtt: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_OK
