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
