"""Issue 20, classes 5, 7 and 9 (check's exit code): what a careless operator or a hostile file
hands the commands. Real processes (`run`, `check`, `init --from-butler`) and their exit codes,
stderr and stdout; no timing assertions (a subprocess timeout is only a guard)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MEMORY_GUARD = 1024 * 1024 * 1024  # address space of the child: a bomb must not need more


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_GUARD, MEMORY_GUARD))


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_MQTT") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "butler_mqtt", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env=base | {"PYTHONPATH": str(REPO)} | (env or {}), preexec_fn=_limit_memory,
    )


def billion_laughs(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join([*lines, "Butler:", "  startTaskFilter:", "    enable: true", "    allowTask:", f"      tag: *a{levels - 1}"]) + "\n"


def test_init_from_butler_refuses_an_alias_bomb(tmp_path):
    bomb = tmp_path / "butler.yaml"
    bomb.write_text(billion_laughs())
    out = cli("init", str(tmp_path / "new.yaml"), "--from-butler", str(bomb), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "alias" in out.stderr and str(bomb) in out.stderr
    assert not (tmp_path / "new.yaml").exists()


def test_init_from_butler_refuses_a_100000_deep_sequence(tmp_path):
    deep = tmp_path / "butler.yaml"
    deep.write_text("Butler: " + "[" * 100_000 + "]" * 100_000 + "\n")
    out = cli("init", str(tmp_path / "new.yaml"), "--from-butler", str(deep), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "nested deeper than" in out.stderr and "line 1" in out.stderr


def test_init_from_butler_refuses_an_oversize_file_before_parsing_it(tmp_path):
    big = tmp_path / "butler.yaml"
    big.write_text("Butler:\n  logLevel: info\n" + "# padding\n" * 1_000_000)
    out = cli("init", str(tmp_path / "new.yaml"), "--from-butler", str(big), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "larger than" in out.stderr


def test_the_config_file_goes_through_the_same_loader(tmp_path):
    """etc/butler.yaml (run and check) is read by the same bounded loader."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs().replace("Butler:\n  startTaskFilter:\n    enable: true\n    allowTask:\n      tag:",
                                             "start_filter:\n  allow:\n    tags:"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("callers: " + "[" * 100_000 + "]" * 100_000 + "\n")
    for path, words in ((bomb, "alias"), (deep, "nested deeper than")):
        for command in ("check", "run"):
            out = cli(command, "--config", str(path), cwd=tmp_path)
            assert out.returncode == 2, (command, path.name, out.stderr[-2000:])
            said = out.stdout + out.stderr  # check prints its lines on stdout
            assert words in said and "Traceback" not in said, (command, said[-2000:])


def test_a_small_alias_still_works(tmp_path):
    """Aliases within the budget (a shared list) are read as before."""
    from butler_mqtt import yamlsafe

    text = "common: &c [a, b]\nButler:\n  x: *c\n  y: *c\n"
    assert yamlsafe.load(text) == yaml.safe_load(text)


SECRETS = ("pwSECRET", "SECRETPATH", "tokSECRET")
BAD_VALUES = [
    ("alerts.webhook.url", {"alerts": {"webhook": {"url": "https://user:pwSECRET@hooks.example:99999/services/SECRETPATH?token=tokSECRET"}}}),
    ("alerts.webhook.url", {"alerts": {"webhook": {"url": "https://user:pwSECRET@hooks.example:8x/SECRETPATH?token=tokSECRET"}}}),
    ("alerts.webhook.url", {"alerts": {"webhook": {"url": "ftp://user:pwSECRET@hooks.example/SECRETPATH"}}}),
    ("alerts.webhook.url", {"alerts": {"webhook": {"url": "https:///SECRETPATH?token=tokSECRET"}}}),
    ("journal.url", {"journal": {"url": "postgresql://u:pwSECRET@db.example:70000/butler?password=tokSECRET"}}),
    ("state_dir", {"state_dir": "state\u0000SECRETPATH"}),
    ("qrs.cert", {"qrs": {"cert": "certs/\u0000SECRETPATH.pem"}}),
    ("mqtt.password", {"mqtt": {"password": "pwSECRET\u0000"}}),
    ("alerts.webhook.headers", {"alerts": {"webhook": {"url": "https://h.example/x", "headers": {"Authorization": "Bearer tokSECRET\u0000"}}}}),
    ("alerts.webhook.headers", {"alerts": {"webhook": {"url": "https://h.example/x", "headers": {"X-Key": "tokSECRET\r\nX-Evil: 1"}}}}),
    ("alerts.webhook.headers", {"alerts": {"webhook": {"url": "https://h.example/x", "headers": {"Bad Name": "tokSECRET"}}}}),
    ("mqtt.host", {"mqtt": {"host": "broker.example/SECRETPATH"}}),
    ("qrs.host", {"qrs": {"host": "qrs.example:4242"}}),
    ("tracking.poll_interval", {"tracking": {"poll_interval": float("inf")}}),
    ("qrs.timeout", {"qrs": {"timeout": float("nan")}}),
    ("qrs.max_response_bytes", {"qrs": {"max_response_bytes": 10**30}}),
    ("mqtt.session_expiry", {"mqtt": {"session_expiry": 2**32}}),
    ("http.port", {"http": {"port": 70000}}),
]


def test_a_bad_config_value_is_named_never_echoes_a_secret_and_exits_2(tmp_path):
    """Issue 20, class 5: `run` and `check` refuse at load what would fail later, naming the key;
    the URL's password, path, and query values never appear; no traceback; exit 2."""
    for key, section in BAD_VALUES:
        config = tmp_path / "butler.yaml"
        config.write_text(yaml.safe_dump(section))
        for command in ("check", "run"):
            out = cli(command, "--config", str(config), cwd=tmp_path, timeout=60)
            said = out.stdout + out.stderr
            assert out.returncode == 2, (key, command, said[-1500:])
            assert key in said and "Traceback" not in said, (key, command, said[-1500:])
            assert not any(s in said for s in SECRETS), (key, command, said[-1500:])


def test_a_webhook_url_is_named_by_what_can_be_shown_of_it(tmp_path):
    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump(BAD_VALUES[0][1]))
    out = cli("check", "--config", str(config), cwd=tmp_path)
    assert "https://***@hooks.example:99999/***?token=***" in out.stdout and "port" in out.stdout


def test_check_prints_every_line_then_exits_2_when_a_certificate_file_is_missing(tmp_path):
    """Issue 20, class 9: a missing certificate file is a configuration error (exit 2), and the
    broker and QRS lines still follow it."""
    from butler_mqtt.ops.mosquitto import free_port

    config = tmp_path / "butler.yaml"
    config.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": free_port()},
                                      "qrs": {"cert": "missing/client.pem", "key": "missing/client_key.pem", "ca": "missing/root.pem"}}))
    out = cli("check", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("[FAIL] qrs.cert") and "missing/client.pem" in line for line in lines), lines
    assert any(line.startswith("[FAIL] broker") for line in lines) and any(line.startswith("[FAIL] qrs:") for line in lines)
    assert "Traceback" not in out.stderr


def test_the_simulator_refuses_control_options_it_could_not_honour(tmp_path):
    """The hardening checklist over `butler-mqtt sim`'s options: a port outside 0..65535, a
    delay or run time no timer can hold, a tasks file nested too deep, oversize, or with such a
    run time: exit 2 naming the option, never a traceback or a server that fails on its first
    request."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    huge_run = tmp_path / "huge-run.json"
    huge_run.write_text('[{"name": "x", "runSeconds": 1e400}]')
    oversize = tmp_path / "oversize.json"
    with oversize.open("wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: nothing written, 200 MB to read
    cases = [
        (["--port", "70000"], "--port"), (["--port", "-1"], "--port"),
        (["--latency-ms", "1e308"], "--latency-ms"), (["--run-seconds", "1e308"], "--run-seconds"),
        (["--queue-timeout", "1e308"], "--queue-timeout"), (["--task-run-seconds", "x=1e308"], "--task-run-seconds"),
        (["--tasks", str(deep)], "nested"), (["--tasks", str(huge_run)], "runSeconds"), (["--tasks", str(oversize)], "larger than"),
    ]
    for args, words in cases:
        out = cli("sim", "--port", "0", "--certs", str(tmp_path / "certs"), *args, cwd=tmp_path, timeout=60) if args[0] != "--port" \
            else cli("sim", "--certs", str(tmp_path / "certs"), *args, cwd=tmp_path, timeout=60)
        assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-1500:])
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-1500:])


def test_init_from_butler_refuses_what_is_no_regular_file(tmp_path):
    """A FIFO would block the read forever, a device never end: refused before reading."""
    fifo = tmp_path / "butler.fifo"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):
        out = cli("init", str(tmp_path / "new.yaml"), "--from-butler", str(source), cwd=tmp_path, timeout=60)
        assert out.returncode == 2 and "not a regular file" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_resolve_prints_a_hostile_qrs_task_name_escaped_for_the_terminal(tmp_path):
    """A task name from QRS is not ours: `resolve` (and `request`) print it as JSON that a
    terminal cannot act on (no ESC, C1 CSI or bidi override), and that reads back the same."""
    import json

    from butler_mqtt.ops.mosquitto import free_port, wait_port

    evil = "Evil\u001b]0;pwned\u0007\u009b2J\u202eemanlaer"
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": evil, "tags": ["evil"]}]))
    port, certs = free_port(), tmp_path / "certs"
    sim = subprocess.Popen([sys.executable, "-m", "butler_mqtt", "sim", "--port", str(port), "--certs", str(certs),
                            "--tasks", str(tasks)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_port(port, 30), "simulator did not start"
        env = {"BUTLER_MQTT__QRS__PORT": str(port), "BUTLER_MQTT__QRS__CERT": str(certs / "client.pem"),
               "BUTLER_MQTT__QRS__KEY": str(certs / "client_key.pem"), "BUTLER_MQTT__QRS__CA": str(certs / "root.pem")}
        out = cli("resolve", "--tag", "evil", cwd=REPO, env=env)  # etc/butler.yaml, as the README runs it
    finally:
        sim.terminate()
        sim.wait(10)
    assert out.returncode == 0, out.stderr
    assert not any(c in out.stdout for c in "\u001b\u0007\u009b\u202e")
    assert json.loads(out.stdout)["tasks"][0]["taskName"] == evil
