"""OpenTelemetry traces: one trace per request across every process, exported over OTLP/gRPC.

Every process calls `setup_tracing(name)` once at start. Tracing is on only when the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and neither
`OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` turns it off). Then spans go through a
BatchSpanProcessor to an OTLP/gRPC exporter, both configured by the SDK from the other `OTEL_*`
variables (`OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, …). Otherwise no
provider is installed, no interceptor is added, and the model client skips its span: tracing
costs one boolean test per request.

Context crosses processes in gRPC metadata (W3C `traceparent`, through the global propagator):
servers take it with opentelemetry-instrumentation-grpc's aio server interceptor; channels send it
from a CLIENT span of each call (chatmesh.runtime.propagation says why not from a client
interceptor). It reaches the model provider in the HTTP request's headers
(chatmesh.model.client). The spans of a process are flushed when `serve()` stops it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.status import served_code

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = get_logger(__name__)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
# The opentelemetry API modules, imported only once tracing is on (importing them costs ~40 ms at start).
_trace_api: Any = None
_propagate_api: Any = None


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def setup_tracing(service: str) -> bool:
    """Installs the global tracer provider for this process when tracing is requested; returns whether it is on.

    `service.name` is the process's name (gateway, dialogue, safety, cache), whatever `OTEL_SERVICE_NAME`
    says, since one environment usually starts them all; `OTEL_RESOURCE_ATTRIBUTES` adds to it."""
    global _provider, _tracer, _trace_api, _propagate_api
    if _provider is not None or not tracing_requested():
        return _provider is not None
    from opentelemetry import propagate, trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(name, "").strip()
        if protocol and protocol != "grpc":
            log.warning("otlp_protocol_unsupported", extra={"variable": name, "protocol": protocol, "using": "grpc"})
            break
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.namespace": "chatmesh"}),
        # serve() shuts it down on stop; the hook below covers an exit that skips serve()'s end, once.
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _trace_api, _propagate_api = trace, propagate
    _provider = provider
    _tracer = provider.get_tracer("chatmesh")
    atexit.register(shutdown_tracing)
    log.info("tracing_enabled", extra={"service_name": service})
    return True


def tracing_enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Exports the spans still queued, then stops the exporter (at process stop; blocks for at most the
    exporter's timeout)."""
    global _provider, _tracer
    if _provider is None:
        return
    provider, _provider, _tracer = _provider, None, None
    provider.shutdown()


def server_interceptors(observed: Callable[[str], bool]) -> list[grpc.aio.ServerInterceptor]:
    """OpenTelemetry's aio server interceptor (a SERVER span per call that `observed` admits, its parent
    taken from the caller's `traceparent`), or nothing when tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=lambda details: observed(details.method))]


def start_rpc_client_span(method: str) -> Span | None:
    """The CLIENT span of a gRPC call about to be made ("/package.Service/Method"), child of the current
    span; None when tracing is off. chatmesh.runtime.propagation sends its context and ends it."""
    if _tracer is None:
        return None
    service, _, name = method.lstrip("/").partition("/")
    return _tracer.start_span(
        method,
        kind=_trace_api.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


_finishing: set[asyncio.Task[None]] = set()


def end_when_done(span: Span, call: grpc.aio.Call) -> None:
    """Ends `span` when `call` is done, however it ends and whether or not its caller read it to the end,
    with the call's status code (`rpc.grpc.status_code`; ERROR for any code but OK)."""

    async def finish(finished: grpc.aio.Call) -> None:
        try:
            code = await finished.code()
        except Exception:  # no status: cancelled here before it had one, or it never started
            code = grpc.StatusCode.CANCELLED if finished.cancelled() else grpc.StatusCode.UNKNOWN
        end_rpc_span(span, code)

    def done(finished: grpc.aio.Call) -> None:
        task = asyncio.ensure_future(finish(finished))
        _finishing.add(task)
        task.add_done_callback(_finishing.discard)

    call.add_done_callback(done)


def traced_unary(method: str, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """`behavior`, a unary handler of `method` served without a gRPC call of its own (one that came on a
    multiplexed stream, chatmesh.runtime.multiplex), in a SERVER span named and described as the aio server
    interceptor's are: child of the caller's span (`traceparent` in the call's metadata), current while the handler
    runs, with the call's status. `behavior` itself when tracing is off."""
    if _tracer is None:
        return behavior
    tracer = _tracer
    service, _, name = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    async def traced(request: Any, context: Any) -> Any:
        error: BaseException | None = None
        with tracer.start_as_current_span(
            method,
            context=_propagate_api.extract(dict(context.invocation_metadata())),
            kind=_trace_api.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await behavior(request, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                set_rpc_status(span, served_code(context, error))

    return traced


def set_rpc_status(span: Span, code: grpc.StatusCode) -> None:
    """A gRPC call's status code on its span (`rpc.grpc.status_code`; ERROR for any code but OK)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(_trace_api.Status(_trace_api.StatusCode.ERROR))


def end_rpc_span(span: Span, code: grpc.StatusCode) -> None:
    """Ends a gRPC call's span with its status code."""
    set_rpc_status(span, code)
    span.end()


def current_trace_ids() -> tuple[str, str]:
    """(trace_id, span_id) in hex of the span current here, or ("", "") when there is none."""
    if _provider is None:
        return "", ""
    context = _trace_api.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def inject_headers(span: Span) -> dict[str, str]:
    """The W3C trace-context headers that make `span` the parent of what the receiver does."""
    headers: dict[str, str] = {}
    _propagate_api.inject(headers, context=_trace_api.set_span_in_context(span))
    return headers


def start_client_span(name: str, attributes: dict[str, Any]) -> Span | None:
    """A CLIENT span, child of the current one, that the caller ends; None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, kind=_trace_api.SpanKind.CLIENT, attributes=attributes)


def mark_error(span: Span) -> None:
    """Sets the span's status to ERROR, without a description (error.type says which error)."""
    span.set_status(_trace_api.Status(_trace_api.StatusCode.ERROR))
