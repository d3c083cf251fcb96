"""Channels to other chatmesh processes, and the deadlines passed along them.

Create one channel per target per process and reuse it. Python gRPC does not pass a caller's
deadline on by itself, so every downstream call takes `timeout=` from `downstream_timeout`.
"""

import json

import grpc

from chatmesh.runtime import tls
from chatmesh.runtime.grpc_server import transport_options
from chatmesh.runtime.interceptors import client_interceptors, observed
from chatmesh.runtime.metrics import metered_channel
from chatmesh.runtime.propagation import PropagatingChannel
from chatmesh.runtime.settings import ServiceSettings

# With a `dns:///` target that resolves to several pods, spread calls over all of them. A call that found
# no process to take it (connection refused or lost before any answer, as when one restarts) is tried again,
# on another replica if there is one, for about a second before the caller gets UNAVAILABLE. Answers that a
# chatmesh process gave on purpose are never retried: `status.abort` sends gRPC's retry pushback with them.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "0.4s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
# A process that comes back is reconnected to within half a second, not gRPC's default backoff of up to 120 s.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def open_channel(target: str, settings: ServiceSettings) -> grpc.aio.Channel:
    """A channel to another chatmesh process: mutual TLS when the settings name certificates, else
    plaintext. Its stubs pass on the request id and trace context of the call being served."""
    options = [*transport_options(settings), *_RECONNECT_OPTIONS, ("grpc.service_config", _SERVICE_CONFIG)]
    interceptors = client_interceptors(settings) or None
    pair = tls.client_pair(settings)
    channel: grpc.aio.Channel
    if pair is None:
        channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    else:

        def open_secure(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
            return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

        channel = tls.ReloadingChannel(
            pair,
            open_secure,
            reload_seconds=settings.tls_reload_seconds,
            drain_seconds=settings.default_deadline_seconds,
        )
    return PropagatingChannel(metered_channel(channel, observed), observed)


def downstream_timeout(context: grpc.aio.ServicerContext, default_seconds: float) -> float:
    """Seconds left for the call being served: the caller's deadline, or `default_seconds` if it set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return default_seconds
    return max(0.0, remaining)
