"""TLS credentials from files that rotate: a gRPC server and a channel in this process, over loopback."""

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError
from support.certificates import LOOPBACK_NAMES, CertificateFiles, TestPki

from chatmesh.runtime import tls
from chatmesh.runtime.settings import GatewaySettings, ProcessSettings

CALL_SECONDS = 5.0


@pytest.fixture
def pki() -> TestPki:
    return TestPki()


@pytest.fixture
async def server(pki: TestPki) -> AsyncIterator[int]:
    """A health server on the internal certificate, asking for client certificates; yields its port."""
    running = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), running)
    port = running.add_secure_port("127.0.0.1:0", tls.server_credentials(tls.internal_pair(settings_of(pki))))
    await running.start()
    try:
        yield port
    finally:
        await running.stop(None)


def settings_of(pki: TestPki) -> GatewaySettings:
    return GatewaySettings(**{name.removeprefix("CHATMESH_").lower(): value for name, value in pki.env().items()})


@pytest.fixture
def client(pki: TestPki) -> CertificateFiles:
    """A client certificate of the internal CA, apart from the server's files."""
    files = pki.files("client")
    files.write(pki.internal_ca.issue_cert("client"), pki.internal_ca)
    return files


async def served_certificate(port: int, client: CertificateFiles) -> bytes:
    """The certificate a new connection is served with."""
    context = client_context(client)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


def client_context(files: CertificateFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    context.set_alpn_protocols(["h2"])
    return context


def write_in_place(files: CertificateFiles, cert: bytes | None = None, key: bytes | None = None) -> None:
    """Overwrites the current files one by one, as a rotation that is caught halfway leaves them. Each
    write gets a later modification time than any before (the clock's tick can be coarser than two writes)."""
    for path, content in ((files.cert, cert), (files.key, key)):
        if content is not None:
            Path(path).write_bytes(content)
            later = max(os.stat(other).st_mtime_ns for other in (files.cert, files.key, files.ca)) + 1_000_000
            os.utime(path, ns=(later, later))


async def test_a_server_serves_rotated_files_from_the_next_connection_on(
    pki: TestPki, server: int, client: CertificateFiles
) -> None:
    first = await served_certificate(server, client)
    pki.internal.write(pki.internal_ca.issue_cert(*LOOPBACK_NAMES), pki.internal_ca)
    second = await served_certificate(server, client)
    assert first != second == pki.internal.served_by()


async def test_a_half_written_rotation_keeps_the_last_good_pair_until_it_is_whole(
    pki: TestPki, server: int, client: CertificateFiles, caplog: pytest.LogCaptureFixture
) -> None:
    first = await served_certificate(server, client)
    leaf = pki.internal_ca.issue_cert(*LOOPBACK_NAMES)
    write_in_place(pki.internal, cert=leaf.cert_chain_pems[0].bytes())
    with caplog.at_level(logging.WARNING):
        # The new certificate does not match the old key: the server goes on with the pair it has.
        assert await served_certificate(server, client) == first
    assert any(record.getMessage() == "tls_reload_failed" for record in caplog.records)

    write_in_place(pki.internal, key=leaf.private_key_pem.bytes())
    assert await served_certificate(server, client) == pki.internal.served_by() != first


async def test_a_reloading_channel_moves_new_calls_to_the_new_certificate_and_lets_open_ones_finish(
    pki: TestPki, server: int
) -> None:
    pair = tls.client_pair(settings_of(pki))
    assert pair is not None
    target = f"127.0.0.1:{server}"
    channel = tls.ReloadingChannel(
        pair,
        lambda credentials: grpc.aio.secure_channel(target, credentials),
        reload_seconds=3600,
        drain_seconds=CALL_SECONDS,
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        old = channel.channel

        assert channel.reload_if_changed() is False
        pki.internal.write(pki.internal_ca.issue_cert(*LOOPBACK_NAMES), pki.internal_ca)
        assert channel.reload_if_changed() is True

        assert channel.channel is not old
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_SECONDS)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The stream opened before the swap is still open on the old channel.
        assert not watch.done()
        watch.cancel()
    finally:
        await channel.close()


def test_tls_settings_come_in_pairs_and_mutual_tls_needs_its_ca(pki: TestPki) -> None:
    internal = pki.internal
    with pytest.raises(ValidationError, match="CHATMESH_TLS_CERT_FILE and CHATMESH_TLS_KEY_FILE must be set together"):
        ProcessSettings(tls_cert_file=internal.cert)
    with pytest.raises(ValidationError, match="needs CHATMESH_TLS_CA_FILE"):
        ProcessSettings(tls_cert_file=internal.cert, tls_key_file=internal.key)
    with pytest.raises(ValidationError, match="GATEWAY_TLS_CERT_FILE and CHATMESH_GATEWAY_TLS_KEY_FILE"):
        GatewaySettings(gateway_tls_key_file=internal.key)
    public_only = GatewaySettings(gateway_tls_cert_file=pki.public.cert, gateway_tls_key_file=pki.public.key)
    assert tls.public_pair(public_only) is not None and tls.internal_pair(public_only) is None


def test_unreadable_files_fail_at_start_naming_them(pki: TestPki, tmp_path: Path) -> None:
    missing = tls.KeyPair(pki.internal.cert, f"{tmp_path}/absent.key", pki.internal.ca)
    with pytest.raises(ValueError, match=r"absent\.key"):
        tls.server_credentials(missing)
