"""Certificates for HTTPS tests: trustme CAs written as PEM files."""

from __future__ import annotations

from pathlib import Path

import trustme


class Pki:
    """A server certificate for 127.0.0.1 from one CA, client certificates from a client CA and
    from an unrelated CA, all written as PEM files."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
        server = server_ca.issue_cert("127.0.0.1", "localhost")
        self.cert, self.key = d / "http_cert.pem", d / "http_key.pem"
        server.cert_chain_pems[0].write_to_path(str(self.cert))
        server.private_key_pem.write_to_path(str(self.key))
        self.server_ca = d / "server_ca.pem"
        server_ca.cert_pem.write_to_path(str(self.server_ca))
        self.client_ca = d / "client_ca.pem"
        client_ca.cert_pem.write_to_path(str(self.client_ca))
        self.client = self._client(client_ca, "erp-caller", d / "client.pem")
        self.stranger = self._client(other_ca, "erp-caller", d / "stranger.pem")
        other = other_ca.issue_cert("127.0.0.1")
        self.other_key = d / "other_key.pem"
        other.private_key_pem.write_to_path(str(self.other_key))

    @staticmethod
    def _client(ca: trustme.CA, name: str, path: Path) -> Path:
        leaf = ca.issue_cert(name)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))  # key + cert in one file
        return path
