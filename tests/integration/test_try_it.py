"""docs/getting-started.md "Try it on one machine" runs as written (issue 25 item 2).

The commands are taken from the page itself and run in one bash, from the clone, as a reader
would. The test adds only what a reader does by looking: after each command sent to the
background it waits for what the page says to wait for (the broker's port, the simulator's
certificates and port, the daemon's retained `online` status). Ports: the page's "A port is
taken?" variants, with free ports, because other tests run beside this one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from butler_mqtt.ops.mosquitto import find_mosquitto, free_port
from tests.support.ops import REPO

pytestmark = pytest.mark.integration
PAGE = REPO / "docs" / "getting-started.md"


def try_it_commands() -> list[str]:
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index("## Try it on one machine"):]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert block is not None, "no sh block under 'Try it on one machine'"
    lines = []
    for line in block.group(1).splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()  # the comment, never a '#' inside the command
        if command:
            lines.append(command)
    return lines


def test_the_page_shows_the_steps_a_newcomer_needs():
    cmds = try_it_commands()
    assert cmds[0] == "CLONE=$PWD" and cmds[1].startswith('cd "$(mktemp -d)"')  # an empty folder for init
    assert any(".venv/bin/activate" in c for c in cmds)  # the venv's butler-mqtt
    assert "butler-mqtt init" in cmds
    assert "export BUTLER_MQTT__LOGGING__FORMAT=console" in cmds
    assert any(c.startswith("mosquitto -p ") for c in cmds)  # a private broker port
    text = " ".join(PAGE.read_text(encoding="utf-8").split())
    assert "persistent session" in text and "retained status" in text  # the warning about a broker that stays


def _script(cmds: list[str], mqtt_port: int, qrs_port: int, http_port: int) -> str:
    out = ["set -u", f"export BUTLER_MQTT__HTTP__PORT={http_port}"]
    for c in cmds:
        c = c.replace("1884", str(mqtt_port))
        if c.startswith("butler-mqtt sim --demo &"):
            out.append(f"export BUTLER_MQTT__QRS__PORT={qrs_port}")
            c = c.replace("sim --demo &", f"sim --demo --port {qrs_port} &")
        if c.endswith("&"):
            out.append(c)
            if c.startswith("mosquitto"):
                out.append(f"until (echo > /dev/tcp/127.0.0.1/{mqtt_port}) 2>/dev/null; do sleep 0.2; done")
            elif "butler-mqtt sim" in c:
                out.append(f"until [ -f certs/client.pem ] && (echo > /dev/tcp/127.0.0.1/{qrs_port}) 2>/dev/null;"
                           " do sleep 0.2; done")
            elif "butler-mqtt run" in c:
                out.append(f"until mosquitto_sub -p {mqtt_port} -t butler-mqtt/status -C 1 -W 2 2>/dev/null"
                           " | grep -q '\"online\"'; do sleep 0.3; done")
            continue
        if c.startswith("butler-mqtt ") and c.split()[1] in ("check", "request"):
            tag = c.split()[1].upper()
            out += [f"echo '=== {tag}'", c, f"echo \"=== {tag} RC $?\""]
            continue
        out.append(c)
    out += ["echo \"=== FOLDER $PWD\"", "kill $(jobs -p)", "wait"]
    return "\n".join(out) + "\n"


def test_try_it_on_one_machine_runs_as_written(tmp_path):
    if find_mosquitto() is None or shutil.which("mosquitto_sub") is None:
        pytest.fail("mosquitto and mosquitto-clients are needed: run scripts/setup --base")
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.fail("the clone has no .venv: run scripts/setup --base")
    clone_config = (REPO / "etc" / "butler.yaml").read_text(encoding="utf-8")
    script = _script(try_it_commands(), free_port(), free_port(), free_port())
    env = {"PATH": "/usr/sbin:/usr/bin:/bin:/usr/local/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    stdout = out.stdout
    assert "=== CHECK RC 0" in stdout, stdout + out.stderr
    assert "=== REQUEST RC 1" in stdout, stdout + out.stderr  # one demo reload fails: the caller must know
    request_part = stdout[stdout.index("=== REQUEST\n"):stdout.index("=== REQUEST RC")]
    events = [json.loads(line) for line in request_part.splitlines() if line.startswith('{"event"')]
    finished = [e for e in events if e["event"] == "taskFinished"]
    assert len(finished) == 4 and events[-1]["event"] == "requestFinished", request_part
    assert sorted(e["status"] for e in finished) == ["FinishedFail"] + ["FinishedSuccess"] * 3
    # Console logs for a terminal: the daemon's lines are not JSON.
    log_lines = [ln for ln in stdout.splitlines() if "mqtt_subscribed" in ln]
    assert log_lines and not any(ln.lstrip().startswith("{") for ln in log_lines), stdout
    # init wrote into the empty folder, not into the clone.
    folder = Path(re.search(r"=== FOLDER (.*)", stdout).group(1))  # type: ignore[union-attr]
    assert folder.parent == tmp_path and (folder / "etc" / "butler.yaml").is_file()
    assert (REPO / "etc" / "butler.yaml").read_text(encoding="utf-8") == clone_config


def _session_present(port: int, client_id: str, keep: bool) -> bool:
    """Connect as `client_id` with clean start off; whether the broker had a session for it.
    `keep`: leave a session behind (expiry 1 h), as the daemon does."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, flags: Any, _rc: Any, _p: Any) -> None:
        got["present"] = bool(flags.session_present)
        done.set()

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if keep else 0
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    assert done.wait(10)
    if keep:
        c.subscribe("butler-mqtt/test", qos=1)
        c.publish("butler-mqtt/status", '{"status": "offline"}', qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    return got["present"]


def test_the_documented_cleanup_removes_the_session_and_the_retained_status(broker):
    """getting-started.md: the two commands that remove what `run` leaves on a broker that stays."""
    page = PAGE.read_text(encoding="utf-8")
    part = page[page.index("To remove both:"):]
    block = part[part.index("```sh\n") + 6:part.index("```", part.index("```sh\n") + 6)]
    commands = [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in block.splitlines() if ln.strip()]
    assert [c.split()[0] for c in commands] == ["mosquitto_pub", "mosquitto_sub"]
    _session_present(broker.port, "butler-mqtt", keep=True)  # what a run leaves: a session, a retained status
    assert _session_present(broker.port, "butler-mqtt", keep=True)
    for c in commands:  # the page's commands, pointed at this test's broker
        out = subprocess.run(["bash", "-c", c.replace("mosquitto_pub ", f"mosquitto_pub -p {broker.port} ", 1)
                              .replace("mosquitto_sub ", f"mosquitto_sub -p {broker.port} ", 1)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    assert not _session_present(broker.port, "butler-mqtt", keep=False)
    retained = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "butler-mqtt/status", "-C", "1", "-W", "2"],
                              capture_output=True, text=True, timeout=30)
    assert retained.stdout == ""  # nothing retained any more (the subscriber timed out empty)
