"""What a call made while serving another carries downstream: its request id, its tenant (for log lines)
and, with tracing on, its trace context (W3C `traceparent`) in a CLIENT span of its own.

`open_channel()` wraps every channel in a PropagatingChannel. Its stubs' calls add `x-request-id`
(and `traceparent`) to their metadata, and start the call's span, before handing the call to grpc.
This is done around the stub rather than in a grpc.aio client interceptor (see wrapped_channel.py):
it costs a few µs per call and nothing per message. opentelemetry-instrumentation-grpc's aio client
interceptors would also end a streaming call's span only when the caller reads the stream to its end,
which dialogue does not do with ScreenOutput (it stops at the message that completes it); here the
span ends when the call is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from chatmesh.runtime import metrics, tracing
from chatmesh.runtime.access_log import TENANT_KEY
from chatmesh.runtime.logs import REQUEST_ID_KEY, current_request
from chatmesh.runtime.wrapped_channel import WrappedChannel


class _PropagatingMultiCallable:
    """A stub's method: the call, with the request id and trace context of the call being served."""

    __slots__ = ("_callable", "_method", "_traced")

    def __init__(self, callable_: Any, method: str, traced: bool) -> None:
        self._callable = callable_
        self._method = method
        self._traced = traced

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        span = tracing.start_rpc_client_span(self._method) if self._traced else None
        carried = _carried_downstream(span)
        if not carried:
            return self._callable(*args, metadata=metadata, **kwargs)
        pairs = list(metadata) if metadata else []
        if any(key == REQUEST_ID_KEY for key, _ in pairs):  # the caller's own request id stands
            carried = [(key, value) for key, value in carried if key != REQUEST_ID_KEY]
        pairs.extend(carried)
        call = self._callable(*args, metadata=tuple(pairs), **kwargs)
        if span is not None:
            tracing.end_when_done(span, call)
        return call


class PropagatingChannel(WrappedChannel):
    """A grpc.aio channel whose stubs pass the request id and trace context on (see the module's doc)."""

    def __init__(self, channel: grpc.aio.Channel, observed: Callable[[str], bool]) -> None:
        super().__init__(channel)
        self._observed = observed

    def _wrap(
        self, callable_: Any, method: str, request_streaming: bool, response_streaming: bool
    ) -> _PropagatingMultiCallable:
        return _PropagatingMultiCallable(callable_, method, self._observed(method))


def _carried_downstream(span: Any) -> list[tuple[str, str]]:
    """What a call made while serving one carries downstream: the served call's request id and tenant, and the
    trace context of the call's own CLIENT `span` (None: tracing is off, or the method is not observed)."""
    record = current_request()
    pairs: list[tuple[str, str]] = []
    if record is not None:
        if record.request_id:
            pairs.append((REQUEST_ID_KEY, record.request_id))
        if record.tenant:
            pairs.append((TENANT_KEY, record.tenant))
    if span is not None:
        pairs.extend(tracing.inject_headers(span).items())
    return pairs


def observe_multiplexed_call(method: str, metadata: dict[str, str]) -> Callable[[grpc.StatusCode], None]:
    """For a unary call sent on a multiplexed stream (chatmesh.runtime.multiplex): adds to its `metadata` what a
    stub's call of `method` carries (the request id, the tenant, the trace context of a CLIENT span of its own) and
    counts it in the grpc_client_* metrics as a unary call; returns what ends both with the call's status."""
    span = tracing.start_rpc_client_span(method)
    metadata.update(_carried_downstream(span))
    counted = metrics.client_unary_call(method)

    def done(code: grpc.StatusCode) -> None:
        if span is not None:
            tracing.end_rpc_span(span, code)
        counted(code)

    return done
