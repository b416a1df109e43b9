"""One check for a certificate or key file before it is (re)loaded: a regular file, small,
holding PEM of the expected kind. Used when SIGHUP re-reads the QRS and REST TLS files, where
a wrong file must be named (its key) and refused without blocking: a FIFO or a device in
place of a certificate would otherwise hang the reload, a huge file fill the memory."""

from __future__ import annotations

import stat
from pathlib import Path

from butler_mqtt.errors import ConfigError

#: Certificate chains and keys are a few KB; a CA bundle a few hundred.
MAX_PEM_BYTES = 1 << 20
_MARKERS = {"certificate": b"-----BEGIN CERTIFICATE-----", "private key": b"PRIVATE KEY-----"}


def check_pem(key: str, path: Path, kind: str) -> None:
    """ConfigError naming `key` unless `path` is a readable regular file of at most 1 MiB holding
    a PEM `kind` ("certificate" or "private key"). The message never quotes the file."""
    try:
        st = path.stat()  # follows symlinks (systemd credentials, /etc/ssl links)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"{path} is not a regular file")
        if st.st_size > MAX_PEM_BYTES:
            raise ConfigError(key, f"{path} is larger than {MAX_PEM_BYTES} bytes: not a PEM {kind}")
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if _MARKERS[kind] not in data:
        raise ConfigError(key, f"{path} holds no PEM {kind}")
    if kind == "private key" and b"ENCRYPTED" in data:
        # OpenSSL would ask for a pass phrase on the terminal, and the reload would hang there.
        raise ConfigError(key, f"{path} is encrypted: the key must be unencrypted PEM")
