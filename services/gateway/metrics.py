"""The gateway's own metrics: the time to first token of a stream, which the latency objective reads.

    chatmesh_time_to_first_token_seconds{grpc_method}   (histogram) from the start of a StreamChat call to the first
                                                        Delta handed to gRPC for the caller

The objective (deploy/prometheus/chatmesh.rules.yml) is a P90 under 1.5 s of this for StreamChat and of
grpc_server_handling_seconds for Chat: a whole stream's duration grows with the reply's length, its first token
does not. The label is named `grpc_method`, as in grpc_server_*, so that the rule takes both by method; only
StreamChat is recorded (Chat answers in one message, its whole call is its first token).

A turn answered without any Delta records nothing here: a refused input (CONTENT_FILTER), a turn that ends in
tool calls only, and a call that fails before its first Delta (which counts against the success objective
instead). The buckets are runtime.metrics.LATENCY_BUCKETS, which have a bound at 1.5 s, so the objective is
decided by counts, not by interpolation. The series exists at 0 from the start, so that rates see the first call.
"""

from prometheus_client import Histogram

from chatmesh.runtime.metrics import LATENCY_BUCKETS

_TIME_TO_FIRST_TOKEN = Histogram(
    "chatmesh_time_to_first_token_seconds",
    "Seconds from the start of a StreamChat call at the gateway to the first Delta sent to the caller; turns "
    "without a Delta (refusals, tool calls only, failures) are not counted.",
    ("grpc_method",),
    buckets=LATENCY_BUCKETS,
)
_STREAM_CHAT = _TIME_TO_FIRST_TOKEN.labels("StreamChat")


def stream_first_token(seconds: float) -> None:
    """A StreamChat call sent its first Delta `seconds` after it started."""
    _STREAM_CHAT.observe(seconds)
