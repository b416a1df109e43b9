"""Commands of contract section 1. Exit codes: 0 ok, 1 runtime failure, 2 bad config/usage."""

from __future__ import annotations

import argparse
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from butler_mqtt import __version__, replies
from butler_mqtt.config import DEFAULT_CONFIG, Config, config_path, load_config
from butler_mqtt.errors import ButlerError, ConfigError, QrsError, RequestRejected
from butler_mqtt.model import CustomPropertyCriterion, StartRequest, validate_request, validate_stop
from butler_mqtt.replies import Event
from butler_mqtt.terminal import json_text

_T = TypeVar("_T")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: `request` only: what was asked for did not (all) happen, though nothing failed.
EXIT_NOT_FOUND, EXIT_DENIED = 3, 4


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="config file (default: $BUTLER_MQTT_CONFIG, else etc/butler.yaml)"
    )


def _add_selectors(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task selection (the union of all criteria; at least one)")
    g.add_argument("--task-id", action="append", default=[], metavar="ID", help="a task GUID (repeatable)")
    g.add_argument("--tag", action="append", default=[], metavar="NAME", help="every task with this tag (repeatable)")
    g.add_argument("--app-id", action="append", default=[], metavar="ID",
                   help="an app GUID (repeatable): qrs: the app's reload tasks; cloud: the app")
    g.add_argument("--space", action="append", default=[], metavar="NAME",
                   help="backend: cloud: every app in the space of this exact name (repeatable)")
    g.add_argument(
        "--custom-property",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="every task whose custom property NAME has VALUE (repeatable)",
    )
    g.add_argument(
        "--all-task-ids-must-exist",
        action="store_true",
        help="if any --task-id does not exist, start none of the tasks selected by ID (tags and "
        "custom properties are unaffected); the others are reported denied",
    )


def _number(text: str, unit: str, *, positive: bool = False, most: float = math.inf) -> float:
    """A finite number of `unit` (seconds, milliseconds), 0 or more (or > 0), at most `most`,
    for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = f"a number of {unit} greater than 0" if positive else f"0 or more {unit}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    if value > most:  # no timer holds more (time.sleep overflows), and no test needs it
        raise argparse.ArgumentTypeError(f"must be at most {most:g} {unit}, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds greater than 0."""
    return _number(text, "seconds", positive=True)


#: The simulator's delays and run times: a week at most.
SIM_MAX_SECONDS = 7 * 86400.0


def non_negative_ms(text: str) -> float:
    """argparse type: milliseconds, 0 or more (at most a week)."""
    return _number(text, "milliseconds", most=SIM_MAX_SECONDS * 1000)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


EXIT_CODES = "Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage (naming the key and where its value came from)."

REQUEST_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  every selected task was started (with --dry-run: would start; with --wait: and
     every reload finished with FinishedSuccess). A task QRS accepted but did not start
     (disabled: "notStarted") does not change the exit code.
  {EXIT_FAIL}  no final reply within --timeout, the broker unreachable or refusing the connection,
     an error reply, a task QRS failed to start, or (--wait) a reload that did not succeed
  {EXIT_USAGE}  bad usage or configuration (e.g. a task ID that is not a GUID, --timeout <= 0)
  {EXIT_NOT_FOUND}  a criterion matched no task (listed in the summary's tasksNotFound)
  {EXIT_DENIED}  a task was denied (start_filter, or --all-task-ids-must-exist)
When several apply, the first in the order 1, 4, 3 wins. The replies are printed on stdout
as JSON lines; what was sent where, and hints when no answer came, go to stderr."""

DEMO_HELP = """\
Starts, all on this machine and in a temporary folder removed at the end: the QRS simulator
with the demo data set and generated certificates, a private mosquitto on a free port (or the
broker of the config when mosquitto is not installed), and the daemon. Then sends five sample
requests and prints every reply:
  1. every task tagged 'Butler 5.0 demo', followed to the end (wait): three succeed, one fails;
  2. a custom property (taskGroup=financial-reports), a tag that matches nothing, as a dry run;
  3. an invalid task ID: rejected with an error reply, nothing started;
  4. the tag hourly-reload with policies.max_running 2: two start, the others wait in the queue;
  5. the tag startTask1 with ifRunning 'queue' while those run: one rerun queued per running task.
Then it keeps running, printing ready-made mosquitto_pub/mosquitto_rr lines to try, until
Ctrl-C (or stops right away with --once)."""

SIM_HELP = """\
A stand-in for the Qlik Sense Repository Service (QRS) over HTTPS with client certificates,
for tests, demos and upstream developers without a Sense server. Certificates with Qlik's
file names (root.pem, client.pem, client_key.pem, server.pem, server_key.pem) are generated
into --certs when missing. Tasks: the demo data set (tags 'Butler 5.0 demo', startTask1,
hourly-reload, financial-reports, daily-refresh; custom property taskGroup) unless --tasks
is given; --tasks together with --demo serves both."""


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """argparse type: a number of seconds, 0 or more (at most a week)."""
    return _number(text, "seconds", most=SIM_MAX_SECONDS)


def _task_setting(kind: Callable[[str], _T]) -> Callable[[str], tuple[str, _T]]:
    """argparse type for NAME=VALUE (split at the last '='): (NAME, kind(VALUE))."""

    def parse(text: str) -> tuple[str, _T]:
        name, sep, value = text.rpartition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE (a task name or id), got {text!r}")
        return name, kind(value)

    return parse


def _add_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=4242, help="port to listen on (default 4242, like QRS)")
    p.add_argument(
        "--certs", type=Path, default=Path("certs"), metavar="DIR",
        help="certificate folder; missing files are generated (default ./certs, where etc/butler.yaml looks)",
    )
    p.add_argument(
        "--tasks", type=Path, metavar="FILE",
        help="JSON file of tasks to serve instead of the demo set (format: butler_mqtt/sim/data.py)",
    )
    p.add_argument(
        "--latency-ms", type=non_negative_ms, default=0.0, metavar="N",
        help="extra delay added to every answer, in milliseconds (default 0)",
    )
    p.add_argument(
        "--demo", action="store_true",
        help="serve the demo data set (the default without --tasks; with --tasks: both)",
    )
    g = p.add_argument_group("scheduler (what QMC sets under Schedulers, Advanced)")
    g.add_argument(
        "--max-concurrent", type=non_negative_int, default=0, metavar="N",
        help="reloads running at once; more wait Queued (status 3) and start in trigger order "
        "(default 0 = unlimited; QRS's own default is 4)",
    )
    g.add_argument(
        "--queue-timeout", type=non_negative_seconds, default=0.0, metavar="SECONDS",
        help="a reload Queued longer than this is cancelled and ends Aborted (status 6) without "
        "running (default 0 = never; QRS's own default is 1800, 30 minutes)",
    )
    g.add_argument(
        "--already-running", choices=("same", "409"), default="same",
        help="answer to starting a task still running or queued: 'same' = 204/201 with the running "
        "execution's id, '409' = 409 Conflict; never a second run (default same)",
    )
    t = p.add_argument_group("task runs (NAME: a task name, case-insensitive, or id; NAME= options are repeatable)")
    t.add_argument(
        "--run-seconds", type=non_negative_seconds, metavar="SECONDS",
        help="run time of every demo task, and of --tasks tasks without runSeconds "
        "(default: the demo tasks' own 1-2 s; 0.2 for a tasks-file task)",
    )
    t.add_argument(
        "--task-run-seconds", type=_task_setting(non_negative_seconds), action="append", default=[],
        metavar="NAME=SECONDS", help="run time of one task (default: as above)",
    )
    t.add_argument(
        "--fail-first", type=_task_setting(non_negative_int), action="append", default=[],
        metavar="NAME=K", help="the first K runs of the task end FinishedFail (8), later ones as usual (default 0)",
    )
    t.add_argument(
        "--max-retries", type=_task_setting(non_negative_int), action="append", default=[],
        metavar="NAME=N", help="QRS's maxRetries: a failed run shows Retry (10) and runs again, up to N "
        "times, in the same execution (default 0)",
    )
    _add_sim_failure_options(p)


def _text_setting(text: str) -> tuple[str, str]:
    """argparse type for NAME=TEXT (split at the first '=': the text may hold '=')."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=TEXT (a task name or id), got {text!r}")
    return name, value


def _stop_seconds(text: str) -> tuple[float, float]:
    first, sep, second = text.partition(",")
    try:
        return non_negative_seconds(first), non_negative_seconds(second if sep else first)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or SECONDS,SECONDS, got {text!r}") from None


def _add_sim_failure_options(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("failures, script logs and stop (qrs-api.md section 13)")
    f.add_argument(
        "--failure-message", type=_text_setting, action="append", default=[], metavar="NAME=TEXT",
        help="the Error detail of the task's failed runs, also written in their script logs "
        "(default \"Field 'Amount' not found\")",
    )
    f.add_argument(
        "--log-bytes", type=_task_setting(non_negative_int), action="append", default=[], metavar="NAME=N",
        help="pad each script log of the task to at least N bytes, generated while it is sent (default 0)",
    )
    f.add_argument(
        "--log-encoding", type=_text_setting, action="append", default=[], metavar="NAME=ENCODING",
        help="the task's script logs in utf-8 (with BOM, as QRS), utf-8-nobom, utf-16-le, utf-16-be "
        "or invalid-utf-8 (default utf-8)",
    )
    f.add_argument(
        "--log-fault", type=_text_setting, action="append", default=[], metavar="ROUTE=FAULT",
        help="make a script-log route (scriptlogfile, scriptlog, download) answer 404, 500, hang, garbage, deepjson, "
        "badticket, bareticket, drip or first404 (repeatable; default: all work)",
    )
    f.add_argument(
        "--no-file-references", action="store_true",
        help="leave the deprecated fileReferenceID empty, so the older scriptlog route cannot be used",
    )
    f.add_argument(
        "--stop-seconds", type=_stop_seconds, default=None, metavar="SECONDS[,SECONDS]",
        help="a stopped reload shows AbortInitiated (4) for the first, then Aborting (5) for the second "
        "time before it ends Aborted (6) (default 0.5,1.0)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="butler-mqtt",
        description="Start Qlik Sense reload tasks from MQTT messages (and Butler's REST endpoint).",
        epilog=EXIT_CODES + " Start with `butler-mqtt init`, then `butler-mqtt check`.",
    )
    parser.add_argument("--version", action="version", version=f"butler-mqtt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_operator_commands, _add_request_command, _add_sim_command, _add_local_commands, _add_history):
        add(sub)
    return parser


if TYPE_CHECKING:  # what add_subparsers returns (argparse has no public name for it)
    from butler_mqtt.replies.types import SummaryEvent

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def _command(
    sub: Subcommands, name: str, summary: str, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description or summary,
        epilog=epilog or EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_operator_commands(sub: Subcommands) -> None:
    """run, check and resolve."""
    p = _command(
        sub,
        "run",
        "the daemon: MQTT listener (+ REST API when enabled) until SIGTERM/SIGINT",
        "The daemon: listens for start requests on MQTT (and the REST API when http.enabled), "
        "until SIGTERM or SIGINT; SIGHUP reloads start_filter and logging.level. One daemon per "
        "state_dir: a second one with the same state_dir exits 2 before it connects to the broker.",
    )
    _add_config(p)

    p = _command(
        sub,
        "check",
        "validate the config, reach the broker and QRS; one line per check",
        "Validates the config, reads the certificate files (days left), connects to the broker with "
        "the configured credentials and subscribes to the start topic, and calls QRS (GET /qrs/about). "
        "One line per check, saying what to fix; exit 0 only if all pass.",
    )
    _add_config(p)

    p = _command(
        sub,
        "resolve",
        "dry run against QRS: print (JSON) the tasks that would start, and why; starts nothing",
    )
    _add_config(p)
    _add_selectors(p)


def _add_request_command(sub: Subcommands) -> None:
    """request: the client for upstream users."""
    p = _command(
        sub,
        "request",
        "publish a start request over MQTT and print the replies as they arrive",
        "A client for upstream users: publishes one start request on mqtt.topics.start of the "
        "configured broker (the config file is optional here: defaults and BUTLER_MQTT__ variables "
        "apply) and prints the replies as JSON lines until the summary (with --wait: until "
        "requestFinished).",
        REQUEST_EXIT_CODES,
    )
    _add_config(p)
    _add_selectors(p)
    p.add_argument("--request-id", metavar="ID", help="idempotency key, echoed in every reply (default: a new UUID)")
    p.add_argument("--wait", action="store_true", help="follow every reload to its end (taskFinished, requestFinished)")
    p.add_argument("--dry-run", action="store_true", help="report what would start (wouldStart); start nothing")
    p.add_argument("--stop", action="store_true",
                   help="stop the running reloads of the selected tasks instead (mqtt.topics.stop; with --wait: "
                        "follow each stopped execution to its end); starts nothing")
    p.add_argument("--caller", type=caller_level, metavar="LEVEL",
                   help="publish as a caller: on <mqtt.topics.start>/LEVEL (with --stop: <mqtt.topics.stop>/LEVEL; callers[].topic, docs/callers.md)")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for the final reply, > 0 (default 30; with --wait allow for the reloads)",
    )


def _add_sim_command(sub: Subcommands) -> None:
    """sim: the QRS simulator (`sim --cloud`: the Qlik Cloud one, its own options)."""
    p = _command(sub, "sim", "the QRS simulator (HTTPS with client certificates)", SIM_HELP)
    p.add_argument("--cloud", action="store_true",
                   help="a Qlik Cloud tenant stand-in instead (its options: butler-mqtt sim --cloud --help)")
    _add_sim(p)


def _add_local_commands(sub: Subcommands) -> None:
    """demo, init and token."""
    p = _command(sub, "demo", "simulator + broker + daemon + five sample requests, all local", DEMO_HELP)
    p.add_argument("--once", action="store_true", help="stop right after the sample requests")
    p.add_argument("--cloud", action="store_true", help="against the Qlik Cloud simulator (backend: cloud) instead of QRS")

    p = _command(
        sub,
        "init",
        "write the documented starter configuration, or one imported from Butler's (refuses to overwrite)",
        "Writes the documented starter configuration (every key with its default and a comment; "
        "the content of etc/butler.yaml shipped in the package) to PATH, creating its folder. "
        "With --from-butler, fills it in from a Butler config file (QRS, certificates, broker, start "
        "topic, REST port and TLS, start-task allow-list) and prints, key by key, what was carried, "
        "what was set differently and why, and what was left out. Refuses to overwrite an existing file.",
    )
    p.add_argument(
        "path", nargs="?", type=Path, default=None, metavar="PATH",
        help=f"where to write it (default: $BUTLER_MQTT_CONFIG, else {DEFAULT_CONFIG})",
    )
    p.add_argument("--from-butler", type=Path, metavar="BUTLER.yaml", help="Butler's YAML config file to import")

    p = _command(sub, "token", "print a new random REST token for a caller, and its SHA-256 for tokens_sha256", TOKEN_HELP)
    p.add_argument("--caller", metavar="NAME", help="the caller it is for (named in the line to paste)")
    p.add_argument("--hash", action="store_true",
                   help="read an existing token from stdin (one line) and print only its SHA-256")


HISTORY_HELP = """\
The request history from the journal of the configured daemon (state_dir, or journal.url), read
directly: it works while the daemon runs, and writes nothing. One row per request, oldest first:
when it came (UTC), its ingress and source (MQTT topic or REST client), its caller (contract
section 10; "-": the anonymous caller), the requestId, the
criteria, what happened to the tasks (started, denied, failed, not found, ...), the final states
(FinishedSuccess 2, FinishedFail 1; "running" while followed), the state (handling, answered,
following, finished) and how often it came again as a duplicate. With --request-id, one line per
task follows. The journal keeps journal.retention_hours (24 h by default); GET /v4/requests on
the REST API answers the same records."""


def since_arg(text: str) -> float:
    """argparse type: --since (30m, 2h, 1d, 1w, 45s, or an ISO 8601 date / date-time, UTC)."""
    from butler_mqtt.journal.history import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("since: ")) from None


def task_guid(text: str) -> str:
    """argparse type: a task GUID (any case)."""
    from butler_mqtt.model import is_guid

    if not is_guid(text.strip()):
        raise argparse.ArgumentTypeError(f"not a task GUID: {text!r}")
    return text.strip().lower()


def caller_level(text: str) -> str:
    """argparse type: a caller's topic level (callers[].topic)."""
    from butler_mqtt.config import topic_level_problem

    problem = topic_level_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def caller_name(text: str) -> str:
    """argparse type: a caller name ([a-z0-9_-]{1,64})."""
    from butler_mqtt.config import CALLER_NAME

    if not CALLER_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a caller name (1 to 64 of a-z, 0-9, '_' and '-'): {text[:70]!r}")
    return text


def history_limit(text: str) -> int:
    """argparse type: 1..1000."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1000, got {text!r}")
    return int(text)


def _add_history(sub: Subcommands) -> None:
    """history: the request history from the journal."""
    p = _command(sub, "history", "the request history from the journal (a table, or JSON lines with --json)", HISTORY_HELP)
    _add_config(p)
    p.add_argument("--since", type=since_arg, metavar="WHEN",
                   help="only requests received since: 30m, 2h, 1d, 1w, or an ISO date / date-time (UTC unless it has an offset)")
    p.add_argument("--request-id", metavar="ID", help="only this requestId (and show its tasks)")
    p.add_argument("--task", type=task_guid, metavar="ID", help="only requests that selected or named this task GUID")
    p.add_argument("--caller", type=caller_name, metavar="NAME", help="only this caller's requests (callers[].name)")
    p.add_argument("--limit", type=history_limit, default=100, metavar="N", help="the newest N requests (default 100, at most 1000)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (the records of GET /v4/requests)")


def cmd_history(args: argparse.Namespace) -> int:
    from butler_mqtt.history import run_history
    from butler_mqtt.journal.history import HistoryQuery, check_query

    try:  # checked before the journal is opened, with the words GET /v4/requests answers
        query = check_query(HistoryQuery(since=args.since, request_id=args.request_id, task_id=args.task, limit=args.limit,
                                         caller=args.caller))
    except ValueError as exc:
        raise RequestRejected("Invalid query", str(exc)) from None
    return run_history(_load(args), query, args.json)


def selectors_request(args: argparse.Namespace, **extra: Any) -> StartRequest:
    """Build the StartRequest from command-line selectors, with the same validation as MQTT."""
    cps: list[dict[str, str]] = []
    for item in args.custom_property:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--custom-property", f"expected NAME=VALUE, got {item!r}")
        cps.append(CustomPropertyCriterion(name=name, value=value).model_dump())
    data: dict[str, Any] = {"taskId": args.task_id, "tag": args.tag, "customProperty": cps,
                            "appId": args.app_id, "space": args.space, **extra}
    if args.all_task_ids_must_exist:
        data["allTaskIdsMustExist"] = True
    return validate_request({k: v for k, v in data.items() if v not in ([], None)})


def stop_body(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """`request --stop`: a stop request from the selectors, validated as the daemon does."""
    if extra.get("dryRun") or args.all_task_ids_must_exist:
        raise ConfigError("--stop", "a stop takes only selectors, --request-id and --wait (no --dry-run, "
                                    "--all-task-ids-must-exist)")
    req = selectors_request(args, **extra)
    stop = validate_stop({k: v for k, v in req.model_dump(mode="json", exclude_defaults=True).items()
                          if k in ("requestId", "taskId", "tag", "customProperty", "wait")})
    return stop.model_dump(mode="json", exclude_defaults=True)


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_resolve(args: argparse.Namespace) -> int:
    from butler_mqtt.replies import on_wire, without_event
    from butler_mqtt.runtime import backend
    from butler_mqtt.selection import check_for_backend, plan

    cfg = _load(args)
    cfg.check_qrs_files()
    req = selectors_request(args, dryRun=True)
    check_for_backend(req, cfg.backend)
    from butler_mqtt.service import StartService

    qrs = backend(cfg)
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
            without_event(on_wire(cast("Event", {"event": "task", "taskId": o.task_id, "taskName": o.task_name,
                                                "matchedBy": o.matched_by, "status": o.status}
                                          | ({"reason": o.reason} if o.reason else {})), cfg.backend))
            for o in outcomes
        ],
        "tasksNotFound": selection.not_found,
        "total": sum(1 for o in outcomes if o.status == "wouldStart"),
    }
    print(json_text(out, indent=2))  # task names come from QRS: escaped for the terminal
    return EXIT_OK


def cmd_sim(args: argparse.Namespace) -> int:
    from butler_mqtt.sim import serve

    return serve(
        args.host,
        args.port,
        args.certs,
        args.tasks,
        args.latency_ms,
        args.demo,
        max_concurrent=args.max_concurrent,
        queue_timeout=args.queue_timeout or None,
        already_running=args.already_running,
        run_seconds=args.run_seconds,
        task_run_seconds=args.task_run_seconds,
        fail_first=args.fail_first,
        max_retries=args.max_retries,
        failure_message=args.failure_message,
        log_bytes=args.log_bytes,
        log_encoding=args.log_encoding,
        log_faults=args.log_fault,
        stop_seconds=args.stop_seconds,
        file_references=not args.no_file_references,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from butler_mqtt.daemon import run

    return run(config_path(args.config))


class RequestOutcome:
    """What the replies of one `request` say, turned into its exit code (see REQUEST_EXIT_CODES)."""

    def __init__(self, stop: bool = False) -> None:
        self.failed = self.denied = self.not_found = False
        self.stop = stop  # a stopped reload ends Aborted: that is what was asked

    def add(self, ev: Event) -> None:
        kind = replies.kind(ev)
        if kind == replies.ERROR or (replies.reload_failed(ev) and not self.stop):
            self.failed = True
        if kind == replies.SUMMARY:
            summary = cast("SummaryEvent", ev)
            self.failed |= bool(summary.get("tasksFailed"))
            self.denied |= bool(summary.get("tasksDenied"))
            self.not_found |= bool(summary.get("tasksNotFound"))

    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAIL
        if self.denied:
            return EXIT_DENIED
        return EXIT_NOT_FOUND if self.not_found else EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    from butler_mqtt.mqtt.requester import Requester, no_answer_hint

    cfg = load_config(config_path(args.config), missing_ok=True)
    extra: dict[str, Any] = {"requestId": args.request_id or str(uuid.uuid4())}
    if args.wait:
        extra["wait"] = True
    if args.dry_run:
        extra["dryRun"] = True
    body = stop_body(args, extra) if args.stop else selectors_request(args, **extra).model_dump(exclude_defaults=True)
    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    topic = m.topics.stop if args.stop else m.topics.start
    outcome = RequestOutcome(stop=args.stop)

    def show(ev: Event) -> None:
        print(json_text(ev), flush=True)  # a reply is anyone's message on the topic
        outcome.add(ev)

    requester = Requester(m)
    try:
        requester.connect(timeout=min(10.0, args.timeout))
    except (OSError, TimeoutError) as exc:
        print(
            f"butler-mqtt: cannot use the broker at {where} ({exc}); check mqtt.host, mqtt.port, "
            "mqtt.username/password and mqtt.tls, and that the broker runs",
            file=sys.stderr,
        )
        return EXIT_FAIL
    replies = "a private response topic (MQTT 5)" if requester.v5 else f"{m.topics.reply} (MQTT 3.1.1)"
    topic = f"{topic}/{args.caller}" if args.caller else topic  # a caller's: <topics.start|stop>/LEVEL
    print(
        f"butler-mqtt: request {body['requestId']} sent to topic {topic} on broker {where}; "
        f"replies on {replies}",
        file=sys.stderr,
        flush=True,
    )
    try:
        requester.request(body, timeout=args.timeout, on_event=show, topic=topic)
    except TimeoutError as exc:
        print(f"butler-mqtt: {exc}", file=sys.stderr)
        print(f"butler-mqtt: {no_answer_hint(requester, m, args.timeout)}", file=sys.stderr)
        print(
            f"butler-mqtt: to ask again, retry with the same --request-id {body['requestId']}: the broker may "
            "still deliver this request, and the daemon starts its tasks once and answers the retry from its journal",
            file=sys.stderr,
        )
        return EXIT_FAIL
    finally:
        requester.close()
    return outcome.exit_code()


def cmd_check(args: argparse.Namespace) -> int:
    from butler_mqtt.check import run_checks

    return run_checks(config_path(args.config))


def cmd_init(args: argparse.Namespace) -> int:
    """Write the starter configuration (or Butler's, imported) to PATH (default: the config
    path `run` reads); never overwrites."""
    from butler_mqtt import butler_import
    from butler_mqtt.starter import refuse_existing, starter_text, write_config

    path: Path = args.path if args.path is not None else config_path(None)
    refuse_existing(path)  # said before anything else is read: there is nothing to do either way
    flag = "" if path == DEFAULT_CONFIG else f" --config {path}"
    if args.from_butler is None:
        write_config(starter_text(), path)
        print(f"butler-mqtt: wrote the starter configuration to {path}")
        print(
            "Next: set mqtt.host and qrs.host, put the QMC-exported certificates where qrs.cert, qrs.key "
            f"and qrs.ca say, then run `butler-mqtt check{flag}`."
        )
        return EXIT_OK
    result = butler_import.convert(butler_import.load_butler(args.from_butler), source=str(args.from_butler))
    write_config(result.yaml_text, path)
    print(f"wrote {path} from Butler's {args.from_butler}\n")
    print(result.report())
    print(f"Next: butler-mqtt check{flag}; then point Butler's callers at butler-mqtt, and compare what "
          f"starts with: butler-mqtt resolve{flag} --tag <tag>")
    return EXIT_OK


TOKEN_HELP = """\
Prints a new random bearer token (256 bits, URL-safe) and its SHA-256. The token goes to the
caller's system, once: it is printed only now and stored nowhere. The SHA-256 goes into the
caller's entry in the configuration (callers[].tokens_sha256, contract section 10): the file
never holds a token. With --hash, reads an existing token from stdin instead (e.g. to move a
system that uses http.token to its own caller) and prints only its SHA-256."""


def cmd_token(args: argparse.Namespace) -> int:
    """A new caller token and its SHA-256 (or, with --hash, the SHA-256 of one read from stdin)."""
    import secrets

    from butler_mqtt.callers import token_sha256

    if args.hash:
        token = sys.stdin.readline().strip()
        if not token or not token.isascii() or not token.isprintable():
            raise ConfigError("--hash", "expected one token on stdin: printable ASCII, not empty")
        print(token_sha256(token))
        return EXIT_OK
    from butler_mqtt.config import CALLER_NAME

    if args.caller is not None and not CALLER_NAME.fullmatch(args.caller):
        raise ConfigError("--caller", "a caller name is 1 to 64 of a-z, 0-9, '_' and '-'")
    token = secrets.token_urlsafe(32)
    digest = token_sha256(token)
    who = args.caller or "<caller>"
    print(f"token:  {token}")
    print(f"sha256: {digest}")
    print(f"Give the token to {who} (shown only now, stored nowhere); put the sha256 in butler.yaml under "
          f"callers, in {who}'s entry: tokens_sha256: [\"{digest}\"]")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from butler_mqtt.demo import run_demo

    return run_demo(once=args.once, cloud=args.cloud)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["sim"] and "--cloud" in given[1:]:  # the Qlik Cloud simulator has its own options
        from butler_mqtt.sim.cloud.app import main as cloud_sim

        return cloud_sim([a for a in given[1:] if a != "--cloud"])
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
        "history": cmd_history,
        "token": cmd_token,
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
    except BrokenPipeError:  # e.g. `butler-mqtt check | head -3`: the reader went away
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
