"""Certificates for the simulator, named like a Qlik Sense export."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from butler_mqtt.sim import CertPaths, ensure_certs


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generates_a_qlik_style_set(tmp_path: Path) -> None:
    paths = ensure_certs(tmp_path / "certs", hostnames=("localhost", "127.0.0.1", "qlik-node"))
    assert paths == CertPaths.in_dir(tmp_path / "certs")
    assert [p.name for p in paths.all()] == [
        "root.pem",
        "client.pem",
        "client_key.pem",
        "server.pem",
        "server_key.pem",
    ]
    root, client, server = load(paths.root), load(paths.client), load(paths.server)
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Sim QRS CA"
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "QlikClient"
    for leaf in (client, server):
        assert leaf.issuer == root.subject
        leaf.verify_directly_issued_by(root)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "qlik-node"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 700 <= lifetime.days <= 740
    for key in (paths.client_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"ENCRYPTED" not in key.read_bytes()


def test_existing_set_is_reused_untouched(tmp_path: Path) -> None:
    first = ensure_certs(tmp_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.all()}
    second = ensure_certs(tmp_path)
    assert second == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in second.all()} == before


def test_partial_set_is_refused(tmp_path: Path) -> None:
    paths = ensure_certs(tmp_path)
    paths.client_key.unlink()
    with pytest.raises(FileExistsError, match="client_key.pem"):
        ensure_certs(tmp_path)
