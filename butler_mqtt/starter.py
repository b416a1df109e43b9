"""The starter configuration `butler-mqtt init` writes: `etc/butler.yaml`, shipped in the package.

`butler_mqtt/butler.yaml` is a symlink to `etc/butler.yaml` in the source tree (one source);
a built wheel holds the file itself. `write_config` never overwrites: an operator's edited
config is worth more than any default.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from butler_mqtt.errors import ConfigError

STARTER = "butler.yaml"
EXISTS = "exists and is not overwritten (it already exists: choose another PATH, or move the file away first)"


def refuse_existing(path: Path) -> None:
    """ConfigError (exit 2) naming `path` when it exists: a config is never overwritten."""
    if path.exists() or path.is_symlink():
        raise ConfigError(str(path), EXISTS)


def starter_text() -> str:
    """The documented default configuration, every key with its default."""
    return resources.files("butler_mqtt").joinpath(STARTER).read_text(encoding="utf-8")


def write_config(text: str, path: Path) -> None:
    """Write `text` to `path`, creating parent folders; refuse when `path` exists.

    Raises ConfigError (exit code 2) naming the path when it exists or cannot be written.
    The mode follows the umask: under systemd (DynamicUser) the service must be able to read
    it, and secrets belong in credentials or the environment, not in this file.
    """
    refuse_existing(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": fails instead of overwriting a file created since the check above.
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(str(path), EXISTS) from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot write: {exc.strerror or exc}") from None
