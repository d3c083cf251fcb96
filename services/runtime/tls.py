"""TLS for gRPC ports and channels, from PEM files that are reloaded when they change.

cert-manager and Kubernetes Secrets rotate certificates by replacing the mounted files, so nothing here is
read once: a server asks for its certificate again on every new connection (gRPC's dynamic server
credentials), and a channel to another chatmesh process is rebuilt when its client certificate, key or CA
change (`ReloadingChannel`), while calls already running finish on the old one.

The TLS versions are gRPC core's: a secure port accepts TLS 1.2 and 1.3 only (grpc's C-core minimum
is TLS 1.2); tests/integration/test_tls.py checks that a TLS 1.0 or 1.1 handshake is refused.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings, ProcessSettings
from chatmesh.runtime.tasks import BackgroundTasks

log = get_logger(__name__)

# The identity of a file's current content, as cheap to take as one stat: Kubernetes swaps a Secret's
# files by renaming a symlink, which changes the inode and mtime that `os.stat` (following links) sees.
_FileStamp = tuple[int, int, int] | None


def _stamp(path: str) -> _FileStamp:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True, slots=True)
class KeyPair:
    """PEM files: a certificate chain and its private key, and the CA that peers must chain to (if any)."""

    cert_file: str
    key_file: str
    ca_file: str = ""

    def paths(self) -> tuple[str, ...]:
        return tuple(path for path in (self.cert_file, self.key_file, self.ca_file) if path)

    def stamps(self) -> tuple[_FileStamp, ...]:
        return tuple(_stamp(path) for path in self.paths())

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, key, CA or None). Raises ValueError, naming the file, if one is missing,
        unreadable, or the key does not belong to the certificate (as in a half-written rotation)."""
        try:
            # The ssl module checks that the key matches the certificate; gRPC would only fail handshakes.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            if self.ca_file:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(self.ca_file)
            contents = [_read(path) for path in (self.cert_file, self.key_file)]
            ca = _read(self.ca_file) if self.ca_file else None
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"cannot use TLS files {', '.join(self.paths())}: {error}") from error
        return contents[0], contents[1], ca


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def internal_pair(settings: ProcessSettings) -> KeyPair | None:
    """The certificate of every process's own gRPC port, and the CA its callers' certificates chain to."""
    if not settings.internal_tls:
        return None
    return KeyPair(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def public_pair(settings: GatewaySettings) -> KeyPair | None:
    """The certificate of the gateway's public port, which asks callers for no certificate."""
    if settings.gateway_tls_cert_file:
        return KeyPair(settings.gateway_tls_cert_file, settings.gateway_tls_key_file)
    if settings.internal_tls:
        return KeyPair(settings.tls_cert_file, settings.tls_key_file)
    return None


def client_pair(settings: ProcessSettings) -> KeyPair | None:
    """What channels to other chatmesh processes present, and the CA they verify those processes against."""
    if not settings.internal_tls:
        return None
    if settings.tls_client_cert_file:
        return KeyPair(settings.tls_client_cert_file, settings.tls_client_key_file, settings.tls_ca_file)
    return KeyPair(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def server_credentials(pair: KeyPair) -> grpc.ServerCredentials:
    """Credentials that serve `pair`'s certificate, and with a CA in it, require a client certificate
    that chains to that CA. The files are looked at again on every new connection and used from then on
    once they have changed and form a valid pair again."""
    cert, key, ca = pair.load()
    current = {"stamps": pair.stamps()}

    def configuration(cert: bytes, key: bytes, ca: bytes | None) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch_if_changed() -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before each new connection's handshake; None keeps the current certificate.
        stamps = pair.stamps()
        if stamps == current["stamps"]:
            return None
        try:
            loaded = pair.load()
        except ValueError as error:
            log.warning("tls_reload_failed", extra={"files": list(pair.paths()), "error": str(error)})
            return None
        current["stamps"] = stamps
        log.info("tls_server_reloaded", extra={"files": list(pair.paths())})
        return configuration(*loaded)

    return grpc.dynamic_ssl_server_credentials(
        configuration(cert, key, ca), fetch_if_changed, require_client_authentication=ca is not None
    )


def channel_credentials(pair: KeyPair) -> grpc.ChannelCredentials:
    cert, key, ca = pair.load()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _CurrentCallable:
    """A stub's callable that makes each call on the channel current at the time of the call."""

    __slots__ = ("_args", "_callable", "_generation", "_kind", "_kwargs", "_method", "_owner")

    def __init__(self, owner: ReloadingChannel, kind: str, method: str, args: Any, kwargs: Any) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._generation = -1
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._generation != self._owner.generation:
            self._callable = getattr(self._owner.channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._generation = self._owner.generation
        return self._callable(*args, **kwargs)


class ReloadingChannel(grpc.aio.Channel):
    """A secure channel that is replaced by a new one when its certificate files change (looked at every
    `reload_seconds`). Calls made after the change use the new channel; the old one is closed once its
    calls have ended, or after `drain_seconds`."""

    def __init__(
        self,
        pair: KeyPair,
        open_secure: Callable[[grpc.ChannelCredentials], grpc.aio.Channel],
        *,
        reload_seconds: float,
        drain_seconds: float,
    ) -> None:
        self._pair = pair
        self._open_secure = open_secure
        self._drain_seconds = drain_seconds
        self._stamps = pair.stamps()
        self.channel = open_secure(channel_credentials(pair))
        self.generation = 0
        self._tasks = BackgroundTasks()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(reload_seconds))

    async def _watch(self, reload_seconds: float) -> None:
        while True:
            await asyncio.sleep(reload_seconds)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Replaces the channel if the files changed and form a valid pair; whether it did."""
        stamps = self._pair.stamps()
        if stamps == self._stamps:
            return False
        try:
            credentials = channel_credentials(self._pair)
        except ValueError as error:
            log.warning("tls_reload_failed", extra={"files": list(self._pair.paths()), "error": str(error)})
            return False
        self._stamps = stamps
        old, self.channel = self.channel, self._open_secure(credentials)
        self.generation += 1
        self._tasks.spawn(old.close(self._drain_seconds), "close_replaced_channel")
        log.info("tls_channel_reloaded", extra={"files": list(self._pair.paths())})
        return True

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _CurrentCallable(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _CurrentCallable(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _CurrentCallable(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _CurrentCallable(self, "stream_stream", method, args, kwargs)

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        self._watcher.cancel()
        await self.channel.close(grace)
        await self._tasks.wait()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.channel.channel_ready()
