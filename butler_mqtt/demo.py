"""`butler-mqtt demo`: the whole thing on one machine, with nothing to configure.

QRS simulator (demo data, generated certificates) + a private Mosquitto on a free port (or the
broker of the config when no `mosquitto` is on PATH) + the daemon + the sample requests of
SAMPLES, whose replies are printed. Everything stops on Ctrl-C (or right after the sample with `--once`).
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from butler_mqtt.config import Config, config_path, load_config
from butler_mqtt.errors import ConfigError
from butler_mqtt.ops.logging import setup_logging
from butler_mqtt.ops.mosquitto import Mosquitto, find_mosquitto
from butler_mqtt.replies import Event

SAMPLES: list[tuple[str, dict[str, Any]]] = [
    (
        "start every task tagged 'Butler 5.0 demo' and follow them to the end (one fails: its taskFinished"
        " says why, with the last lines of that execution's script log)",
        {"requestId": "demo-1", "tag": ["Butler 5.0 demo"], "wait": True},
    ),
    (
        "a custom property, a tag that matches nothing and a dry run",
        {
            "requestId": "demo-2",
            "customProperty": [{"name": "taskGroup", "value": "financial-reports"}],
            "tag": ["no-such-tag"],
            "dryRun": True,
        },
    ),
    ("an invalid task ID: rejected, nothing started", {"requestId": "demo-3", "taskId": ["not-a-guid"]}),
    (
        "the ERP's hourly load is done: start the hourly apps (policies.max_running is 2 in this demo:"
        " two start, the others wait in butler-mqtt's queue and start as slots free)",
        {"requestId": "demo-4", "tag": ["hourly-reload"]},
    ),
    (
        "the ERP notifies again while those still run: ifRunning 'queue' queues one rerun per running"
        " task, started when the running reload ends (the disabled one waits for a slot, then QRS does not start it)",
        {"requestId": "demo-5", "tag": ["startTask1"], "ifRunning": "queue"},
    ),
]


#: Start the finance reloads, then stop them (contract section 8; the stop on topics.stop).
STOP_SAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("start the finance reloads (tag 'financial-reports', no wait)", {"requestId": "demo-6", "tag": ["financial-reports"]}),
    ("...and stop them at once (topics.stop, wait): a running one is 'stopping' and ends Aborted, the others are"
     " 'notRunning'; a stop never starts anything", {"requestId": "demo-7", "tag": ["financial-reports"], "wait": True}),
)
#: `demo --cloud`: start the hourly apps, then stop them (a stop cancels the running reload).
CLOUD_STOP_SAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("start the apps tagged 'hourly' (no wait)", {"requestId": "cloud-5", "tag": ["hourly"]}),
    ("...and stop them at once (topics.stop, wait): a reload still running is cancelled ('stopping', then"
     " Aborted with cloudStatus CANCELED), a finished one is 'notRunning'", {"requestId": "cloud-6", "tag": ["hourly"], "wait": True}),
)
#: `demo --cloud`: the same kind of requests against the Qlik Cloud simulator (backend: cloud).
CLOUD_SAMPLES: list[tuple[str, dict[str, Any]]] = [
    (
        "start every app tagged 'nightly' (two apps named Revenue, in two spaces) and follow them to the end",
        {"requestId": "cloud-1", "tag": ["nightly"], "wait": True},
    ),
    (
        "the apps of the space 'Sales', a space that does not exist, and a dry run",
        {"requestId": "cloud-2", "space": ["Sales", "No such space"], "dryRun": True},
    ),
    (
        "an app whose reload fails: taskFinished with cloudStatus FAILED and why (failure)",
        {"requestId": "cloud-3", "tag": ["broken"], "wait": True},
    ),
    (
        "a custom property: Qlik Cloud has none, the error says what to use instead",
        {"requestId": "cloud-4", "customProperty": [{"name": "taskGroup", "value": "finance"}]},
    ),
]


def _print_event(ev: Event) -> None:
    print("    <- " + json.dumps(ev, ensure_ascii=False), flush=True)
    failure = ev.get("failure")
    if ev.get("event") == "taskFinished" and isinstance(failure, dict):
        print(f"       why '{ev.get('taskName') or ev.get('appName')}' failed: {failure.get('message')}", flush=True)
        for line in (failure.get("scriptLogTail") or [])[-6:]:
            print(f"       | {line}", flush=True)
        if failure.get("scriptLogError"):
            print(f"       (script log: {failure['scriptLogError']})", flush=True)


def run_demo(once: bool = False, workdir: Path | None = None, cloud: bool = False) -> int:
    """Run the demo (`cloud`: against the Qlik Cloud simulator, backend: cloud). Its temporary
    folder (certificates with private keys, journal, broker data) is removed at the end, also
    after Ctrl-C or SIGTERM; a given `workdir` is kept."""
    work = Path(workdir or tempfile.mkdtemp(prefix="butler-mqtt-demo-"))

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every cleanup, whatever is running

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    sim: Any = None
    broker: Mosquitto | None = None
    try:
        from butler_mqtt.sim import QrsSimulator, demo_tasks, ensure_certs

        certs = ensure_certs(work / "certs")
        if cloud:
            from butler_mqtt.sim.cloud import CloudSimulator, demo_world

            sim = CloudSimulator(demo_world(), certs_dir=work / "certs").start()
        else:
            sim = QrsSimulator(demo_tasks(), certs_dir=work / "certs").start()
        if find_mosquitto() is not None:
            broker = Mosquitto(work / "broker").start()
        return _run(work, once, sim, certs, broker, cloud)
    finally:
        if sim is not None:
            sim.stop()
        if broker is not None:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, once: bool, sim: Any, certs: Any, broker: Mosquitto | None, cloud: bool = False) -> int:
    from butler_mqtt.daemon import Daemon
    from butler_mqtt.mqtt.requester import Requester
    from butler_mqtt.sim import demo_tasks

    cfg = _demo_config(work, sim, certs, broker, cloud)
    setup_logging(cfg.logging.level, cfg.logging.format)
    if cloud:
        print(f"Qlik Cloud sim  {sim.base_url}  ({sim.world.app_count()} demo apps, CA {certs.root})")
    else:
        print(f"QRS simulator   {sim.base_url}/qrs  ({len(demo_tasks())} demo tasks, certificates in {work / 'certs'})")
    print(f"work folder     {work}  (removed when the demo ends)")
    mqtt_host, mqtt_port = cfg.mqtt.host, cfg.mqtt.port
    print(f"MQTT broker     {mqtt_host}:{mqtt_port}" + ("  (private mosquitto)" if broker else "  (from the config)"))
    daemon = Daemon(cfg)
    daemon.startup()
    stop = threading.Event()
    try:
        if not daemon.listener.subscribed.wait(15):
            print(f"cannot connect to the broker at {mqtt_host}:{mqtt_port}")
            return 1
        print(f"butler-mqtt     listening on '{cfg.mqtt.topics.start}', '{cfg.mqtt.topics.start_plain}'"
              f" and '{cfg.mqtt.topics.stop}'\n")
        with Requester(cfg.mqtt) as requester:
            for title, request in CLOUD_SAMPLES if cloud else SAMPLES:
                print(f"--> {title}\n    -> {json.dumps(request)}", flush=True)
                requester.request(request, timeout=60, on_event=_print_event)
                print()
            stops = CLOUD_STOP_SAMPLES if cloud else STOP_SAMPLES
            for (title, request), topic in zip(stops, (cfg.mqtt.topics.start, cfg.mqtt.topics.stop), strict=True):
                print(f"--> {title}\n    -> {json.dumps(request)}  (on {topic})", flush=True)
                requester.request(request, timeout=60, on_event=_print_event, topic=topic)
                print()
        if once:
            return 0
        print("Try it yourself (Ctrl-C stops everything):")
        print(
            f"  mosquitto_rr -h {mqtt_host} -p {mqtt_port} -t {cfg.mqtt.topics.start} -e my/replies "
            "-m '{\"tag\": \"startTask1\"}' -W 10"
        )
        print(f"  mosquitto_sub -h {mqtt_host} -p {mqtt_port} -t '{cfg.mqtt.topics.reply}' -v")
        print(
            f"  mosquitto_pub -h {mqtt_host} -p {mqtt_port} -q 1 -t {cfg.mqtt.topics.start} "
            "-m '{\"requestId\": \"r42\", \"tag\": [\"hourly-reload\"]}'"
        )
        try:
            stop.wait()
        except KeyboardInterrupt:  # Ctrl-C: the normal way to end the demo
            pass
        return 0
    finally:
        daemon.shutdown(drain_timeout=5)


def _demo_config(work: Path, sim: Any, certs: Any, broker: Mosquitto | None, cloud: bool = False) -> Config:
    """The demo's daemon: the simulator, the private broker (else the config's), quick polls,
    and `policies.max_running: 2` so the queue shows at work."""
    try:
        base = load_config(config_path(None), missing_ok=True)
    except ConfigError:
        base = Config()
    mqtt_host, mqtt_port = base.mqtt.host, base.mqtt.port
    if broker is not None:
        mqtt_host, mqtt_port = "127.0.0.1", broker.port
    if cloud:  # the Qlik Cloud simulator: backend cloud, its OAuth client
        return Config.model_validate({
            "mqtt": {"host": mqtt_host, "port": mqtt_port, "client_id": "butler-mqtt-demo-cloud"},
            "backend": "cloud",
            "cloud": {"tenant": sim.base_url, "client_id": sim.client_id, "client_secret": sim.client_secret,
                      "ca": str(certs.root)},
            "tracking": {"poll_interval": 0.5, "first_poll": 0.3},
            "logging": {"level": "error", "format": "console"},
            "state_dir": str(work / "state"),
        })
    return Config.model_validate(
        {
            "mqtt": {"host": mqtt_host, "port": mqtt_port, "client_id": "butler-mqtt-demo"},
            "qrs": {
                "host": "localhost",
                "port": sim.port,
                "cert": str(certs.client),
                "key": str(certs.client_key),
                "ca": str(certs.root),
            },
            "tracking": {"poll_interval": 0.5, "first_poll": 0.3},
            "logging": {"level": "error", "format": "console"},
            "state_dir": str(work / "state"),
            "policies": {"max_running": 2},
        }
    )
