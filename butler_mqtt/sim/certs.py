"""Certificates for the QRS simulator, named the way Qlik Sense exports them.

The QMC export of a real site holds ``root.pem`` (Qlik's self-signed CA), ``client.pem`` /
``client_key.pem`` (the certificate a service client presents on port 4242, subject CN
``QlikClient``) and ``server.pem`` / ``server_key.pem``. The simulator uses the same five file
names so that a client configured for the simulator is configured for a real site by pointing
it at another directory.

``ensure_certs`` is all-or-nothing: a directory holding all five files is used as it is (so a
real Qlik export, or certificates generated earlier, keep working); an empty directory gets a
fresh set; a partial set is refused, because completing it would need the CA's private key,
which a Qlik export does not contain.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Validity of generated certificates (about two years).
_VALIDITY = dt.timedelta(days=730)


@dataclass(frozen=True)
class CertPaths:
    """Paths of the five PEM files of a (simulated) Qlik Sense certificate export."""

    root: Path
    client: Path
    client_key: Path
    server: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertPaths:
        """The Qlik export file names inside ``directory``."""
        return cls(
            root=directory / "root.pem",
            client=directory / "client.pem",
            client_key=directory / "client_key.pem",
            server=directory / "server.pem",
            server_key=directory / "server_key.pem",
        )

    def all(self) -> tuple[Path, ...]:
        """All five paths."""
        return (self.root, self.client, self.client_key, self.server, self.server_key)


def default_hostnames() -> tuple[str, ...]:
    """Names a local client may use to reach the simulator."""
    return ("localhost", "127.0.0.1", socket.gethostname())


def ensure_certs(directory: Path, hostnames: Iterable[str] | None = None) -> CertPaths:
    """Return the certificate set in ``directory``, generating it when the directory has none.

    ``hostnames`` become the server certificate's subject alternative names (IP literals as IP
    entries, everything else as DNS entries); the default is :func:`default_hostnames`.
    Raises ``FileExistsError`` when only some of the five files exist.
    """
    paths = CertPaths.in_dir(directory)
    present = [p for p in paths.all() if p.exists()]
    if len(present) == len(paths.all()):
        return paths
    if present:
        missing = ", ".join(p.name for p in paths.all() if not p.exists())
        raise FileExistsError(
            f"{directory} holds an incomplete certificate set (missing {missing}); "
            "remove the files or supply all five (root.pem, client.pem, client_key.pem, "
            "server.pem, server_key.pem)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    names = tuple(dict.fromkeys(hostnames if hostnames is not None else default_hostnames()))
    _generate(paths, names)
    return paths


def _generate(paths: CertPaths, hostnames: tuple[str, ...]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = _Authority(now)
    server_cert, server_key = ca.leaf(
        hostnames[0] if hostnames else "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [_san(name) for name in hostnames],
    )
    client_cert, client_key = ca.leaf("QlikClient", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    _write(paths.root, ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.server, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.client, client_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.server_key, _key_pem(server_key), 0o600)
    _write(paths.client_key, _key_pem(client_key), 0o600)


def _key_usage(*, signs_certs: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certs,
        key_cert_sign=signs_certs,
        crl_sign=signs_certs,
        encipher_only=False,
        decipher_only=False,
    )


class _Authority:
    """A fresh self-signed CA ("Sim QRS CA") valid from a day before ``now``."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sim QRS CA")])
        self.ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certs=True), critical=True)
            .add_extension(self.ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def leaf(
        self, common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A certificate for ``common_name`` signed by this CA, with its new key."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(days=1))
            .not_valid_after(self.now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certs=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self.ski),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8, like Qlik's export: clients load it without a passphrase.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    # Create with the final mode so a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
