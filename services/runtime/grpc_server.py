"""The gRPC server every process runs: health, reflection, transport limits, and a graceful stop."""

import asyncio
import ipaddress
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatmesh.runtime import tls
from chatmesh.runtime.interceptors import server_interceptors
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.metrics import initialize_server_metrics
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.tracing import shutdown_tracing

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Servicer:
    """One gRPC service to host: its full name (for health and reflection), how to add it, and what it does when the
    process starts draining (chatmesh.runtime.multiplex ends its long-lived streams)."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    drain: Callable[[], None] | None = None


def transport_options(settings: ProcessSettings) -> list[tuple[str, int]]:
    """Message-size and keepalive options shared by servers and channels."""
    return [
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(settings: ProcessSettings) -> list[tuple[str, int]]:
    return [
        *transport_options(settings),
        # Accept the pings our own channels send; the default minimum (5 min) would answer them with GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", settings.grpc_keepalive_time_ms // 2),
        ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_seconds * 1000)),
        # Two processes must never share a port silently.
        ("grpc.so_reuseport", 0),
    ]


def _listen(server: grpc.aio.Server, settings: ProcessSettings, port: int, public_tls: tls.KeyPair | None) -> str:
    """Adds the port, with TLS when the settings name a certificate for it; returns how it is secured."""
    address = f"{settings.bind_host}:{port}"
    pair = public_tls if public_tls is not None else tls.internal_pair(settings)
    if pair is None:
        server.add_insecure_port(address)
        return "plaintext"
    server.add_secure_port(address, tls.server_credentials(pair))
    return "mutual_tls" if pair.ca_file else "tls"


async def serve(
    settings: ProcessSettings,
    *,
    port: int,
    health_port: int,
    servicers: Sequence[Servicer],
    public_tls: tls.KeyPair | None = None,
    on_stopped: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then drains: health NOT_SERVING, new calls refused, in-flight
    calls given `shutdown_grace_seconds` to finish; then `on_stopped` releases the service's resources.

    `public_tls` is the certificate of the gateway's public port (tls.public_pair), which asks for no client
    certificate; every other port asks for one when TLS is on (tls.internal_pair; without TLS, both are None
    and the port is plaintext). A `health_port` (0: none) serves grpc.health.v1 alone, in plaintext, for probes
    that cannot present a certificate."""
    server = grpc.aio.server(options=server_options(settings), interceptors=server_interceptors(settings))
    for servicer in servicers:
        servicer.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [servicer.full_name for servicer in servicers]
    initialize_server_metrics(names)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    transport = _listen(server, settings, port, public_tls)
    await server.start()
    health_server = await _start_health_server(settings, health_port, health_servicer)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening", extra={"address": f"{settings.bind_host}:{port}", "transport": transport})
    if transport == "plaintext" and not is_loopback(settings.bind_host):
        log.warning("plaintext_beyond_loopback", extra={"address": f"{settings.bind_host}:{port}"})

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()

    log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await health_servicer.enter_graceful_shutdown()
    for servicer in servicers:
        if servicer.drain is not None:
            servicer.drain()
    if settings.shutdown_delay_seconds > 0:
        await asyncio.sleep(settings.shutdown_delay_seconds)
    await server.stop(settings.shutdown_grace_seconds)
    if health_server is not None:
        await health_server.stop(None)
    if on_stopped is not None:
        await on_stopped()
    # The spans of the last calls are still queued for export: send them before the process exits.
    await asyncio.to_thread(shutdown_tracing)
    log.info("stopped")


async def _start_health_server(
    settings: ProcessSettings, port: int, health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server | None:
    """A plaintext server with grpc.health.v1 only, sharing the main port's health states."""
    if port == 0:
        return None
    server = grpc.aio.server(options=server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.bind_host}:{port}"
    server.add_insecure_port(address)
    await server.start()
    log.info("health_listening", extra={"address": address, "transport": "plaintext"})
    return server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
