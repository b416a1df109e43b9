"""ops/pem.py: a certificate or key file re-read on SIGHUP is checked before it is loaded; a
wrong one is named by its key and refused at once, without blocking or quoting the file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trustme

from butler_mqtt.errors import ConfigError
from butler_mqtt.ops.pem import MAX_PEM_BYTES, check_pem


@pytest.fixture
def leaf(tmp_path: Path) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("localhost")
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(c))
    cert.private_key_pem.write_to_path(str(k))
    return c, k


def test_a_good_certificate_and_key_pass(leaf):
    check_pem("qrs.cert", leaf[0], "certificate")
    check_pem("qrs.key", leaf[1], "private key")


def test_a_key_where_the_certificate_belongs_is_named_not_quoted(leaf):
    with pytest.raises(ConfigError) as err:
        check_pem("qrs.cert", leaf[1], "certificate")
    assert err.value.key == "qrs.cert" and "holds no PEM certificate" in err.value.reason
    assert "PRIVATE KEY" not in str(err.value)


def test_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_pem("http.tls.key", tmp_path / "gone.pem", "private key")
    assert err.value.key == "http.tls.key" and "cannot read" in err.value.reason


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(result, "qrs.key", fifo), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "check_pem blocked on a FIFO"
    assert isinstance(result[0], ConfigError) and "not a regular file" in str(result[0])


def test_a_device_behind_a_symlink_is_refused(tmp_path):
    link = tmp_path / "cert.pem"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_pem("qrs.cert", link, "certificate")


def test_a_huge_file_is_refused_unread(tmp_path):
    big = tmp_path / "ca.pem"
    with big.open("wb") as f:
        f.truncate(MAX_PEM_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ConfigError, match="larger than"):
        check_pem("qrs.ca", big, "certificate")


def test_an_encrypted_key_is_refused_before_openssl_could_ask_for_a_pass_phrase(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pass phrase")))
    with pytest.raises(ConfigError, match="is encrypted") as err:
        check_pem("qrs.key", path, "private key")
    assert err.value.key == "qrs.key"


def _catch(out: list[BaseException], key: str, path: Path) -> None:
    try:
        check_pem(key, path, "private key")
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        out.append(exc)
