"""Certificates made in the tests (trustme): a CA, and PEM files under a folder that processes read and
that `rotate` replaces the way Kubernetes updates a mounted Secret (one atomic swap of a symlink)."""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from pathlib import Path

import trustme

# The names a loopback process is dialled by.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class CertificateFiles:
    """`tls.crt`, `tls.key` and `ca.crt` in `directory`, as a Kubernetes TLS Secret mounts them: each a symlink
    through `..data` to a folder of the current version."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._versions = 0

    @property
    def cert(self) -> str:
        return str(self.directory / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.directory / "tls.key")

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.crt")

    def write(self, leaf: trustme.LeafCert, ca: trustme.CA) -> None:
        """Makes `leaf` (and `ca`) the current files, all at once."""
        self._versions += 1
        version = self.directory / f"..version{self._versions}"
        version.mkdir()
        (version / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(version / "tls.key"))
        ca.cert_pem.write_to_path(str(version / "ca.crt"))
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.directory / "..data")
        for name in ("tls.crt", "tls.key", "ca.crt"):
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def served_by(self) -> bytes:
        """The DER of the current certificate, as a server presenting it sends it."""
        with open(self.cert, encoding="ascii") as file:
            pem = file.read()
        return ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN CERTIFICATE-----") :])


class TestPki:
    """A CA for chatmesh's own processes and one for its public port, with a file set for each."""

    __test__ = False

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="chatmesh-tls-"))
        self.internal_ca = trustme.CA(organization_name="chatmesh internal")
        self.public_ca = trustme.CA(organization_name="chatmesh public")
        self.internal = self.files("internal")
        self.internal.write(self.internal_ca.issue_cert(*LOOPBACK_NAMES), self.internal_ca)
        self.public = self.files("public")
        self.public.write(self.public_ca.issue_cert(*LOOPBACK_NAMES), self.public_ca)

    def files(self, name: str) -> CertificateFiles:
        directory = self._root / name
        directory.mkdir()
        return CertificateFiles(directory)

    def env(self) -> dict[str, str]:
        """The settings of every process: mutual TLS inside, the public certificate at the gateway."""
        return {
            "CHATMESH_TLS_CERT_FILE": self.internal.cert,
            "CHATMESH_TLS_KEY_FILE": self.internal.key,
            "CHATMESH_TLS_CA_FILE": self.internal.ca,
            "CHATMESH_GATEWAY_TLS_CERT_FILE": self.public.cert,
            "CHATMESH_GATEWAY_TLS_KEY_FILE": self.public.key,
        }

    def public_ca_pem(self) -> bytes:
        return self.public_ca.cert_pem.bytes()


def expired(ca: trustme.CA, *names: str) -> trustme.LeafCert:
    """A certificate of `ca` that expired yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_cert(
        *(names or LOOPBACK_NAMES),
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
