"""The interceptors of every chatmesh server and channel, in one place.

`serve()` builds its server with `server_interceptors(settings)` and `open_channel()` its channels
with `client_interceptors(settings)`; add an interceptor here and every process has it. The first
in a list is the outermost: tracing comes first, so that what runs inside it (the call observer's access
log and metrics, and anything that logs) sees the call's span as current.

Health checks and reflection are not observed (`observed`): they are probes and tooling, not traffic; nor are
multiplexed streams, whose calls are observed one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from chatmesh.runtime import metrics, tracing
from chatmesh.runtime.call_observer import CallObserver, UnaryBehavior
from chatmesh.runtime.decoding import DecodeGuardInterceptor
from chatmesh.runtime.settings import ProcessSettings

UNOBSERVED_SERVICES = (
    "grpc.health.v1.Health/",
    "grpc.reflection.v1alpha.ServerReflection/",
    "grpc.reflection.v1.ServerReflection/",
    # Each call on a multiplexed stream is traced, logged and counted under its own method
    # (chatmesh.runtime.multiplex); the long-lived stream that carries them is plumbing.
    "chatmesh.v1.MultiplexService/",
)


def observed(method: str | bytes) -> bool:
    """Whether calls of `method` ("/package.Service/Method") are traced, logged and counted."""
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(UNOBSERVED_SERVICES)


def server_interceptors(settings: ProcessSettings) -> list[grpc.aio.ServerInterceptor]:
    return [
        *tracing.server_interceptors(observed),
        # One wrapper per call for its access-log line and its grpc_server_* metrics.
        CallObserver(settings, observed, metered=metrics.enabled()),
        # Innermost: it ends an undecodable request with INVALID_ARGUMENT, which the observer then logs and
        # counts like any other answer. It hands out one wrapper per method, so the observer's stays cached.
        DecodeGuardInterceptor(observed),
    ]


def unary_call_observer(settings: ProcessSettings) -> Callable[[str, UnaryBehavior], UnaryBehavior]:
    """What the server interceptors put around a unary method's handler (its span, its access line, its metrics),
    for unary calls served without a gRPC call of their own: those that come on a multiplexed stream
    (chatmesh.runtime.multiplex). Given the method ("/package.Service/Method") and its handler, returns the handler
    observed."""
    observer = CallObserver(settings, observed, metered=metrics.enabled())

    def observe(method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        return tracing.traced_unary(method, observer.unary(method, behavior))

    return observe


def client_interceptors(settings: ProcessSettings) -> list[grpc.aio.ClientInterceptor]:
    # The request id and the trace context are not sent by an interceptor but by the channel's stubs
    # (chatmesh.runtime.propagation, wrapped around every channel by open_channel): any client interceptor
    # moves a channel's calls onto grpc.aio's intercepted path, about 40 µs of CPU per message written
    # on a client stream and 20-30 µs per unary call. The grpc_client_* metrics are counted the same way
    # (chatmesh.runtime.metrics.MeteredChannel, also wrapped around every channel by open_channel).
    return []
