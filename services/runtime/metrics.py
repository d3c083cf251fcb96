"""Prometheus metrics: what every chatmesh process measures, in one place; the services only call it.

Each process (gateway, dialogue, safety, cache) serves `/metrics` on its own port
(`CHATMESH_<PROCESS>_METRICS_PORT`, 9101-9104 by default, on `CHATMESH_BIND_HOST`; 0 turns the
process's metrics off). prometheus-client's default collectors add `process_*` (CPU, memory, file
descriptors) and `python_*`.

gRPC, under go-grpc-prometheus's names and labels, so that dashboards and alerts written for it work:

    grpc_server_started_total{grpc_type, grpc_service, grpc_method}
    grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}      (histogram)
    grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_type, grpc_service, grpc_method}
    grpc_client_…                                                            (the same, for calls made)

`grpc_type` is unary, client_stream, server_stream or bidi_stream; `grpc_code` is Go's name of the
status code (OK, Canceled, InvalidArgument, NotFound, DeadlineExceeded, Unavailable, …), as
go-grpc-prometheus writes it. A stream's code and duration are recorded when it ends (a caller that
stops reading and cancels before the status arrives counts its call Canceled, as dialogue does with
ScreenOutput once safety has answered). Health checks and reflection are not counted. The served
methods' series exist from the start, at 0, for every code, so that `rate()` and `increase()` see a
method's first call and its first failure.

Served calls are measured by ServerMetricsInterceptor (in `interceptors.server_interceptors`); calls
made, by MeteredChannel, which `open_channel` wraps around every channel (a grpc.aio client
interceptor would cost far more: see MeteredChannel).

The hot path: a streamed message costs one counter increment and one coroutine step (together about
0.5 µs). Everything a call needs (its labelled children) is bound once per method, when the server
starts or when a stub is made.

Model calls, cache and safety (label values from closed sets only, never an id or text):

    chatmesh_model_requests_total{operation, model, outcome}       one per call, retries included; outcome:
                                                                   ok, cancelled, rate_limited, unavailable,
                                                                   timeout, rejected, error
    chatmesh_model_request_duration_seconds{operation, model}      (histogram) a call, retries included
    chatmesh_model_time_to_first_token_seconds{model}              (histogram) to the first text delta
    chatmesh_model_tokens_total{model, kind}                       kind: input, output
    chatmesh_model_cost_usd_total{model}                           from `model_prices_usd_per_million`
    chatmesh_model_retries_total{operation, kind}                  attempts retried, by why
    chatmesh_model_upstream_errors_total{operation, kind}          failed attempts, by kind
    chatmesh_model_deployment_attempts_total{deployment, outcome}  chat attempts by deployment (model.deployments);
                                                                   outcome: ok, rate_limited, unauthorized,
                                                                   server_error, connection_error, timeout,
                                                                   first_token_timeout, rejected
    chatmesh_model_breaker_state{deployment}                       0 closed, 1 half-open (a probe is due), 2 open
    chatmesh_model_key_state{deployment, key}                      key: its index; 0 usable, 1 cooling, 2 retired
    chatmesh_model_healthy_deployments{model}                      deployments of a model entry whose breaker is
                                                                   not open and that have a key not retired
    chatmesh_cache_lookups_total{tier}                             tier: memory, redis, miss (cache)
    chatmesh_cache_redis_errors_total{operation}                   lookup, store, erase, subscribe (cache)
    chatmesh_dialogue_cache_lookups_total{outcome}                 hit, miss, error, skipped (dialogue)
    chatmesh_server_tool_calls_total{tool, outcome}                server-side tool calls (dialogue); tool: a
                                                                   built-in's or the tools file's name; outcome:
                                                                   ok, error, invalid_arguments, timeout
    chatmesh_server_tool_duration_seconds{tool}                    (histogram) a server-side tool call
    chatmesh_safety_screens_total{stage, verdict}                  stage: input, output; allowed, blocked
    chatmesh_safety_blocked_total{stage, source, category}         one per category of a blocked verdict
    chatmesh_safety_pii_found_total{stage, kind}                   personal information found (safety); stage:
                                                                   input, output; kind: a PII policy kind it
                                                                   does not leave (email, phone, cn_id, …)
    chatmesh_review_cases_opened_total{stage, action}              review cases opened (safety); action:
                                                                   block_and_review, allow_and_review
    chatmesh_review_case_failures_total{stage}                     cases not opened: the store failed (safety)

Tenants (label `tenant`: a tenant the gateway verified, at most `metrics_max_tenants` per process, then
"other"):

    chatmesh_tenant_requests_total{tenant}                         calls admitted (gateway)
    chatmesh_tenant_tokens_total{tenant, kind}                     tokens settled, input or output (dialogue)
    chatmesh_tenant_cost_usd_total{tenant}                         cost settled (dialogue)
    chatmesh_limit_rejections_total{limit}                         RESOURCE_EXHAUSTED by a tenant limit
    chatmesh_auth_failures_total{reason}                           missing, malformed, unknown, revoked, unavailable
    chatmesh_ledger_errors_total{operation}                        admit, release, reserve, settle (Redis down)

The human-review queue (gateway: chatmesh.gateway.review). Every gateway reports the whole queue, so take the
max over instances:

    chatmesh_review_open_cases                                     cases not decided, as of the last sweep
    chatmesh_review_oldest_open_age_seconds                        the oldest of them's age, now (0: none)
    chatmesh_review_decisions_total{decision}                      approve, block, escalate

`model` is a model name of the price table (a dated snapshot counts as its family, as it is priced),
anything else is "other"; `category` is capped at MAX_CATEGORIES distinct values per process.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings
from chatmesh.runtime.status import served_code
from chatmesh.runtime.wrapped_channel import WrappedChannel

log = get_logger(__name__)

# go-grpc-prometheus writes no `_created` series; neither do we (it would double every counter's series).
disable_created_metrics()

# Seconds. Prometheus's default buckets, with 0.75, 1.5, 2 and 3 added (the latency objective is P90
# under 1.5 s, so 1.5 must be a bound) and 30, 60 and 120 for long streams.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER = "other"
MAX_CATEGORIES = 64

# Go's names of the status codes (codes.Code.String()), which go-grpc-prometheus puts in `grpc_code`.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_METHOD_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class _GrpcFamilies:
    """The five go-grpc-prometheus metrics of one side (server or client)."""

    def __init__(self, side: str, received_help: str, sent_help: str) -> None:
        self.started = Counter(f"grpc_{side}_started_total", f"RPCs started on the {side}.", _METHOD_LABELS)
        self.handled = Counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed on the {side}, whatever their status.",
            (*_METHOD_LABELS, "grpc_code"),
        )
        self.handling_seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            f"Seconds from the start of an RPC to its status, on the {side}.",
            _METHOD_LABELS,
            buckets=LATENCY_BUCKETS,
        )
        self.msg_received = Counter(f"grpc_{side}_msg_received_total", received_help, _METHOD_LABELS)
        self.msg_sent = Counter(f"grpc_{side}_msg_sent_total", sent_help, _METHOD_LABELS)


_SERVER = _GrpcFamilies("server", "Messages received from clients (requests).", "Messages sent to clients (responses).")
_CLIENT = _GrpcFamilies("client", "Messages received from servers (responses).", "Messages sent to servers (requests).")


class _MethodMetrics:
    """One method's labelled children, bound once, so that a call or a message costs no label lookup."""

    __slots__ = ("handled", "handling_seconds", "msg_received", "msg_sent", "started")

    def __init__(self, families: _GrpcFamilies, grpc_type: str, method_path: str) -> None:
        service, _, method = method_path.lstrip("/").rpartition("/")
        labels = (grpc_type, service, method)
        self.started = families.started.labels(*labels)
        self.handled = {code: families.handled.labels(*labels, name) for code, name in GO_CODE_NAMES.items()}
        self.handling_seconds = families.handling_seconds.labels(*labels)
        self.msg_received = families.msg_received.labels(*labels)
        self.msg_sent = families.msg_sent.labels(*labels)

    def finish(self, code: grpc.StatusCode, started_at: float) -> None:
        self.handling_seconds.observe(time.perf_counter() - started_at)
        self.handled[code].inc()


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


# Which processes measure: set once at start by `serve_metrics`.
_enabled = False
_lock = threading.Lock()
_server_methods: dict[str, _MethodMetrics] = {}


def enabled() -> bool:
    """Whether this process serves metrics (and so whether its servers and channels are instrumented)."""
    return _enabled


def serve_metrics(settings: Settings, process: str) -> bool:
    """Serves `/metrics` for `process` on `<process>_metrics_port` at `bind_host`, from a thread.

    A thread rather than a handler on the event loop: the stdlib HTTP server sleeps in accept() between
    scrapes, costs the loop nothing, and still answers while the loop is stuck, when metrics matter
    most. Returns False, and leaves metrics off, when the port setting is 0 (or the process has none)."""
    global _enabled
    port = getattr(settings, f"{process}_metrics_port", 0)
    if not port:
        return False
    start_http_server(port, addr=settings.bind_host)
    _enabled = True
    log.info("metrics_listening", extra={"address": f"{settings.bind_host}:{port}"})
    return True


def initialize_server_metrics(service_names: Iterable[str]) -> None:
    """Creates every method's series of these services at 0 (every code included), as
    go-grpc-prometheus's InitializeMetrics does, so that the first call and first failure show in rates."""
    if not _enabled:
        return
    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            _server_method(path, grpc_type(method.client_streaming, method.server_streaming))


def _server_method(path: str, kind: str) -> _MethodMetrics:
    metrics = _server_methods.get(path)
    if metrics is None:
        with _lock:
            metrics = _server_methods.get(path)
            if metrics is None:
                metrics = _server_methods[path] = _MethodMetrics(_SERVER, kind, path)
    return metrics


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every served call that `observed(method)` admits.

    Wraps the method's handler once and reuses the wrapper while the service hands out the same handler,
    which it does when this interceptor is the innermost (last) one. Handlers are async functions and
    async generators, as every chatmesh servicer's are; a streaming handler written as a coroutine (with
    `context.write`) is timed and counted, but its messages sent are not."""

    def __init__(self, observed: Callable[[str], bool]) -> None:
        self._observed = observed
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = (
            _wrap_handler(
                handler, _server_method(method, grpc_type(handler.request_streaming, handler.response_streaming))
            )
            if self._observed(method)
            else handler
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap_handler(handler: grpc.RpcMethodHandler, metrics: _MethodMetrics) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    if inspect.isasyncgenfunction(behavior):
        wrapped = _response_stream(behavior, metrics, handler.request_streaming)
    elif inspect.iscoroutinefunction(behavior):
        wrapped = _single_response(behavior, metrics, handler.request_streaming, handler.response_streaming)
    else:
        return handler  # a synchronous handler (run in a thread by grpc.aio); chatmesh has none
    return factory(
        wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _single_response(
    behavior: Callable[..., Any], metrics: _MethodMetrics, request_streaming: bool, response_streaming: bool
) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics.started.inc()
        started_at = time.perf_counter()
        if request_streaming:
            request = _Counted(request, metrics.msg_received.inc)
        else:
            metrics.msg_received.inc()
        error: BaseException | None = None
        try:
            response = await behavior(request, context)
        except BaseException as caught:
            error = caught
            raise
        finally:
            code = served_code(context, error)
            metrics.finish(code, started_at)
        if code is grpc.StatusCode.OK and not response_streaming:
            metrics.msg_sent.inc()
        return response

    return handle


def _response_stream(
    behavior: Callable[..., AsyncIterator[Any]], metrics: _MethodMetrics, request_streaming: bool
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        metrics.started.inc()
        started_at = time.perf_counter()
        if request_streaming:
            request = _Counted(request, metrics.msg_received.inc)
        else:
            metrics.msg_received.inc()
        sent = metrics.msg_sent.inc
        responses = behavior(request, context)
        error: BaseException | None = None
        try:
            async for response in responses:
                sent()
                yield response
        except BaseException as caught:
            error = caught
            if isinstance(caught, GeneratorExit):
                await responses.aclose()
            raise
        finally:
            metrics.finish(served_code(context, error), started_at)

    return handle


class MeteredChannel(WrappedChannel):
    """A grpc.aio channel whose stubs' calls are counted and timed (the grpc_client_* metrics), for the
    methods that `observed(method)` admits. A call costs a few µs, and a streamed message one counter
    increment and one function call. A call's status and duration come from a done callback of the call
    itself, so they are right however the caller ends it (reading a stream to its end, or dropping it
    and cancelling)."""

    def __init__(self, channel: grpc.aio.Channel, observed: Callable[[str], bool]) -> None:
        super().__init__(channel)
        self._observed = observed

    def _wrap(self, callable_: Any, method: str, request_streaming: bool, response_streaming: bool) -> Any:
        if not self._observed(method):
            return callable_
        metrics = _MethodMetrics(_CLIENT, grpc_type(request_streaming, response_streaming), method)
        return _MeteredMultiCallable(callable_, metrics, request_streaming, response_streaming)


class _MeteredMultiCallable:
    """A stub's method whose calls are counted: `streamed` requests, `streaming` responses."""

    __slots__ = ("_callable", "_metrics", "_streamed", "_streaming")

    def __init__(self, callable_: Any, metrics: _MethodMetrics, streamed: bool, streaming: bool) -> None:
        self._callable = callable_
        self._metrics = metrics
        self._streamed = streamed
        self._streaming = streaming

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        metrics = self._metrics
        metrics.started.inc()
        if not self._streamed:
            metrics.msg_sent.inc()
        elif args and args[0] is not None:  # a request iterator (else the caller writes)
            args = (_Counted(args[0], metrics.msg_sent.inc), *args[1:])
        elif kwargs.get("request_iterator") is not None:
            kwargs["request_iterator"] = _Counted(kwargs["request_iterator"], metrics.msg_sent.inc)
        started_at = time.perf_counter()
        call = self._callable(*args, **kwargs)
        call.add_done_callback(functools.partial(_client_call_done, metrics, started_at, self._streaming))
        if self._streamed or self._streaming:
            return _MeteredStreamCall(call, metrics)
        return call


class _MeteredStreamCall:
    """A streaming call whose messages read and written are counted; everything else is the call's."""

    __slots__ = ("_call", "_received", "_sent")

    def __init__(self, call: Any, metrics: _MethodMetrics) -> None:
        self._call = call
        self._received = metrics.msg_received.inc
        self._sent = metrics.msg_sent.inc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __aiter__(self) -> AsyncIterator[Any]:
        return _CountedResponses(self._call, self._received)

    def __await__(self) -> Any:  # a stream-unary call's response
        return self._call.__await__()

    async def read(self) -> Any:
        message = await self._call.read()
        if message is not grpc.aio.EOF:
            self._received()
        return message

    async def write(self, request: Any) -> None:
        await self._call.write(request)
        self._sent()


class _Counted:
    """Passes `messages` on, counting each. A class rather than an async generator: a generator that its
    reader leaves unfinished (safety stops reading at the `final` piece) costs a finalizer task when it
    is collected; this costs nothing."""

    __slots__ = ("_inc", "_messages")

    def __init__(self, messages: Any, inc: Callable[[], None]) -> None:
        self._messages = messages.__aiter__()
        self._inc = inc

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> Any:
        message = await self._messages.__anext__()
        self._inc()
        return message


class _CountedResponses:
    """A call's responses read with `read()`, counting each: unlike iterating the call, this leaves no
    generator to finalize when the caller stops before the end (dialogue does with ScreenOutput)."""

    __slots__ = ("_call", "_inc")

    def __init__(self, call: Any, inc: Callable[[], None]) -> None:
        self._call = call
        self._inc = inc

    def __aiter__(self) -> _CountedResponses:
        return self

    async def __anext__(self) -> Any:
        message = await self._call.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        self._inc()
        return message


def _client_call_done(metrics: _MethodMetrics, started_at: float, streaming: bool, call: Any) -> None:
    code = _finished_code(call)
    metrics.finish(code, started_at)
    if code is grpc.StatusCode.OK and not streaming:
        metrics.msg_received.inc()


def _finished_code(call: Any) -> grpc.StatusCode:
    """The status of a call that is done, read without awaiting: `code()` of a finished call returns at its
    first step. Should it ever have to wait, the call counts as cancelled or unknown."""
    step = call.code()
    try:
        step.send(None)
    except StopIteration as stop:
        return stop.value
    except Exception:
        return grpc.StatusCode.UNKNOWN
    step.close()
    return grpc.StatusCode.CANCELLED if call.cancelled() else grpc.StatusCode.UNKNOWN


def server_interceptors(observed: Callable[[str], bool]) -> list[grpc.aio.ServerInterceptor]:
    """The metrics interceptor of servers when this process measures; keep it inside the others (only the
    decode guard, which hands out one wrapper per method, may come after it)."""
    return [ServerMetricsInterceptor(observed)] if _enabled else []


def metered_channel(channel: grpc.aio.Channel, observed: Callable[[str], bool]) -> grpc.aio.Channel:
    """`channel` with its calls counted (MeteredChannel) when this process measures; else `channel`."""
    return MeteredChannel(channel, observed) if _enabled else channel


# Model calls.

_MODEL_REQUESTS = Counter(
    "chatmesh_model_requests_total",
    "Calls to the model provider, retries included, by how they ended: ok, cancelled, or the failure kind.",
    ("operation", "model", "outcome"),
)
_MODEL_DURATION = Histogram(
    "chatmesh_model_request_duration_seconds",
    "Seconds from the start of a model call (its first attempt) to its end, retries included; cancelled "
    "calls are left out.",
    ("operation", "model"),
    buckets=LATENCY_BUCKETS,
)
_MODEL_TTFT = Histogram(
    "chatmesh_model_time_to_first_token_seconds",
    "Seconds from the start of a streamed chat call (its first attempt) to its first text delta.",
    ("model",),
    buckets=LATENCY_BUCKETS,
)
_MODEL_TOKENS = Counter(
    "chatmesh_model_tokens_total", "Tokens the model provider reported, by kind: input, output.", ("model", "kind")
)
_MODEL_COST = Counter(
    "chatmesh_model_cost_usd_total",
    "Cost of the model's tokens in USD, by the price table (model_prices_usd_per_million).",
    ("model",),
)
_MODEL_RETRIES = Counter(
    "chatmesh_model_retries_total",
    "Model call attempts that failed and were retried, by failure kind.",
    ("operation", "kind"),
)
_MODEL_ERRORS = Counter(
    "chatmesh_model_upstream_errors_total",
    "Model call attempts that failed (retried or not), by failure kind.",
    ("operation", "kind"),
)
MODEL_OUTCOMES = ("ok", "cancelled", "rate_limited", "unavailable", "timeout", "rejected", "error")
_MODEL_FAILURE_KINDS = ("rate_limited", "unavailable", "timeout", "rejected")


def model_attempt_failed(operation: str, kind: str, retried: bool) -> None:
    """An attempt at the model provider failed with `kind` (a ModelErrorKind value); `retried` when
    another attempt follows."""
    _MODEL_ERRORS.labels(operation, kind).inc()
    if retried:
        _MODEL_RETRIES.labels(operation, kind).inc()


class _ModelChildren:
    __slots__ = ("cost", "duration", "input_tokens", "outcomes", "output_tokens", "ttft")

    def __init__(self, operation: str, model: str) -> None:
        self.outcomes = {outcome: _MODEL_REQUESTS.labels(operation, model, outcome) for outcome in MODEL_OUTCOMES}
        self.duration = _MODEL_DURATION.labels(operation, model)
        self.ttft = _MODEL_TTFT.labels(model)
        self.input_tokens = _MODEL_TOKENS.labels(model, "input")
        self.output_tokens = _MODEL_TOKENS.labels(model, "output")
        self.cost = _MODEL_COST.labels(model)


class ModelCall:
    """One model call's metrics, its children bound when it starts (see ModelMetrics.call)."""

    __slots__ = ("_children", "_started_at")

    def __init__(self, children: _ModelChildren) -> None:
        self._children = children
        self._started_at = time.perf_counter()

    def first_token(self) -> None:
        self._children.ttft.observe(time.perf_counter() - self._started_at)

    def completed(self, input_tokens: int = 0, output_tokens: int = 0, cost_usd: float = 0.0) -> None:
        """The call ended with the provider's answer (and, for a chat, its usage and what it cost)."""
        self.tokens(input_tokens, output_tokens, cost_usd)
        children = self._children
        children.outcomes["ok"].inc()
        children.duration.observe(time.perf_counter() - self._started_at)

    def tokens(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        """Tokens the call spent and what they cost; for a call that ended without the provider's usage, as
        chatmesh counted them (ModelClient.record_unfinished)."""
        children = self._children
        if input_tokens:
            children.input_tokens.inc(input_tokens)
        if output_tokens:
            children.output_tokens.inc(output_tokens)
        if cost_usd:
            children.cost.inc(cost_usd)

    def failed(self, outcome: str) -> None:
        """The call ended without an answer: "cancelled" (its caller went away), a ModelErrorKind value, or
        anything else, counted as "error"."""
        children = self._children
        counter = children.outcomes.get(outcome) or children.outcomes["error"]
        counter.inc()
        if outcome != "cancelled":
            children.duration.observe(time.perf_counter() - self._started_at)


class ModelMetrics:
    """The model calls of a process, labelled by the price table's model names (`models`) and "other".
    Every chat model's series exist from the start, at 0; `call` binds a call's children by one lookup."""

    def __init__(self, models: Iterable[str]) -> None:
        self._models = frozenset(models)
        self._children: dict[tuple[str, str], _ModelChildren] = {}
        for model in (*self._models, OTHER):
            self._bind("chat", model)
        for operation in ("chat", "moderation"):
            for kind in _MODEL_FAILURE_KINDS:
                _MODEL_ERRORS.labels(operation, kind)
                _MODEL_RETRIES.labels(operation, kind)

    def call(self, operation: str, model: str | None) -> ModelCall:
        """`model`: a name of the price table (a call's price family), or None for any other."""
        label = model if model in self._models else OTHER
        children = self._children.get((operation, label)) or self._bind(operation, label)
        return ModelCall(children)

    def _bind(self, operation: str, model: str) -> _ModelChildren:
        children = self._children[operation, model] = _ModelChildren(operation, model)
        return children


# The model router (chatmesh.model.router): deployments, their key pools and breakers. Labels are the names
# of the deployments file (bounded by it); the gauges are read from the router when scraped.

_DEPLOYMENT_ATTEMPTS = Counter(
    "chatmesh_model_deployment_attempts_total",
    "Chat attempts at a model deployment, by outcome.",
    ("deployment", "outcome"),
)
_BREAKER_STATE = Gauge(
    "chatmesh_model_breaker_state",
    "A deployment's circuit breaker: 0 closed, 1 half-open (a probe is due), 2 open.",
    ("deployment",),
)
_KEY_STATE = Gauge(
    "chatmesh_model_key_state",
    "A deployment's API key, by its index in the deployments file: 0 usable, 1 cooling down (429), 2 retired "
    "(401 or 403).",
    ("deployment", "key"),
)
_HEALTHY_DEPLOYMENTS = Gauge(
    "chatmesh_model_healthy_deployments",
    "Deployments of a model entry whose breaker is not open and that have a key not retired.",
    ("model",),
)
DEPLOYMENT_ATTEMPT_OUTCOMES = (
    "ok",
    "rate_limited",
    "unauthorized",
    "server_error",
    "connection_error",
    "timeout",
    "first_token_timeout",
    "rejected",
)


class DeploymentAttempts:
    """The attempt counters of one deployment, bound once."""

    __slots__ = ("_children",)

    def __init__(self, deployment: str) -> None:
        self._children = {
            outcome: _DEPLOYMENT_ATTEMPTS.labels(deployment, outcome) for outcome in DEPLOYMENT_ATTEMPT_OUTCOMES
        }

    def attempt(self, outcome: str) -> None:
        self._children[outcome].inc()


def watch_model_router(router: Any) -> None:
    """Serves the breaker, key and health gauges of `router` (a chatmesh.model.router.Router) from its state
    at each scrape; the latest router of a process wins."""
    for route in router.deployments.models.values():
        _HEALTHY_DEPLOYMENTS.labels(route.name).set_function(functools.partial(router.healthy_count, route))
    for name, breaker in router.breakers.items():
        _BREAKER_STATE.labels(name).set_function(lambda breaker=breaker: int(breaker.state))
        pool = router.pools[name]
        for index in range(len(pool)):
            _KEY_STATE.labels(name, str(index)).set_function(functools.partial(_key_state, pool, index))


def _key_state(pool: Any, index: int) -> int:
    return int(pool.state(index))


# Cache (the cache process) and the dialogue's view of it.

_CACHE_LOOKUPS = Counter(
    "chatmesh_cache_lookups_total", "Cache lookups, by the tier that answered: memory, redis, or miss.", ("tier",)
)
_CACHE_REDIS_ERRORS = Counter(
    "chatmesh_cache_redis_errors_total", "Redis commands of the cache that failed, by operation.", ("operation",)
)
CACHE_TIERS = ("memory", "redis", "miss")
_CACHE_LOOKUP_TIERS = {tier: _CACHE_LOOKUPS.labels(tier) for tier in CACHE_TIERS}
for _operation in ("lookup", "store", "erase", "subscribe"):
    _CACHE_REDIS_ERRORS.labels(_operation)


def cache_lookup(tier: str) -> None:
    """`tier`: memory, redis or miss."""
    _CACHE_LOOKUP_TIERS[tier].inc()


def cache_redis_error(operation: str) -> None:
    """`operation`: lookup, store, erase, subscribe (following other processes' announcements), or the semantic
    cache's semantic_store and semantic_load."""
    _CACHE_REDIS_ERRORS.labels(operation).inc()


_SEMANTIC_LOOKUPS = Counter(
    "chatmesh_cache_semantic_lookups_total",
    "Semantic lookups after an exact miss, by outcome: hit, miss (no question of the scope close enough), guarded "
    "(close enough, but a guard refused every candidate), error (the embedding endpoint failed or was too slow).",
    ("outcome",),
)
SEMANTIC_LOOKUP_OUTCOMES = ("hit", "miss", "guarded", "error")
_SEMANTIC_LOOKUP_OUTCOMES = {outcome: _SEMANTIC_LOOKUPS.labels(outcome) for outcome in SEMANTIC_LOOKUP_OUTCOMES}
_SEMANTIC_GUARD_REFUSALS = Counter(
    "chatmesh_cache_semantic_guard_refusals_total",
    "Candidates above the similarity threshold that a guard refused, by guard: numbers, negation, entities, contrast.",
    ("guard",),
)
for _guard in ("numbers", "negation", "entities", "contrast"):
    _SEMANTIC_GUARD_REFUSALS.labels(_guard)
_SEMANTIC_BEST_SIMILARITY = Histogram(
    "chatmesh_cache_semantic_best_similarity",
    "The cosine similarity of the nearest question of the scope, above the threshold or not, per semantic lookup "
    "in a scope that had questions: where the threshold sits among real questions.",
    buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0),
)
_SEMANTIC_VECTORS = Gauge(
    "chatmesh_cache_semantic_vectors", "Question vectors the semantic cache holds in this process's memory."
)


def semantic_lookup(outcome: str) -> None:
    """`outcome`: one of SEMANTIC_LOOKUP_OUTCOMES."""
    _SEMANTIC_LOOKUP_OUTCOMES[outcome].inc()


def semantic_guard_refusal(guard: str) -> None:
    _SEMANTIC_GUARD_REFUSALS.labels(guard).inc()


def semantic_best_similarity(similarity: float) -> None:
    _SEMANTIC_BEST_SIMILARITY.observe(similarity)


def watch_semantic_vectors(count: Callable[[], int]) -> None:
    """Serves the vector gauge from `count` at each scrape."""
    _SEMANTIC_VECTORS.set_function(count)


_DIALOGUE_LOOKUPS = Counter(
    "chatmesh_dialogue_cache_lookups_total",
    "Dialogue's cache lookups, by outcome: hit, miss, error (failed or too slow: answered by the model), "
    "stale (a reply screened under another safety policy version: answered by the model), skipped (the request "
    "may not be cached).",
    ("outcome",),
)
DIALOGUE_LOOKUP_OUTCOMES = ("hit", "miss", "error", "stale", "skipped")
_DIALOGUE_LOOKUP_OUTCOMES = {outcome: _DIALOGUE_LOOKUPS.labels(outcome) for outcome in DIALOGUE_LOOKUP_OUTCOMES}


def dialogue_cache_lookup(outcome: str) -> None:
    """`outcome`: one of DIALOGUE_LOOKUP_OUTCOMES."""
    _DIALOGUE_LOOKUP_OUTCOMES[outcome].inc()


_CACHE_HITS = Counter(
    "chatmesh_dialogue_cache_hits_total",
    "Turns answered from the cache, by how the question matched: exact, or semantic.",
    ("match",),
)
_CACHE_SAVED_TOKENS = Counter(
    "chatmesh_cache_saved_tokens_total",
    "Model tokens the cache saved (the prompt as counted, and the reply as first made), by model (a price "
    "table's name, or other) and match.",
    ("model", "match"),
)
_CACHE_SAVED_USD = Counter(
    "chatmesh_cache_saved_usd_total",
    "What the saved tokens would have cost at the price table's prices, in USD, by model and match.",
    ("model", "match"),
)
CACHE_MATCHES = ("exact", "semantic")
for _match in CACHE_MATCHES:
    _CACHE_HITS.labels(_match)


def bind_cache_savings(models: Iterable[str]) -> None:
    """Creates the savings series of every model of the price table (and "other") at 0, so that a rate sees the
    first hit."""
    for model in (*models, OTHER):
        for match in CACHE_MATCHES:
            _CACHE_SAVED_TOKENS.labels(model, match)
            _CACHE_SAVED_USD.labels(model, match)


def cache_hit_saved(model: str, match: str, tokens: int, cost_usd: float) -> None:
    """A turn answered from the cache: `model` a price table name or "other", `match` one of CACHE_MATCHES."""
    _CACHE_HITS.labels(match).inc()
    _CACHE_SAVED_TOKENS.labels(model, match).inc(tokens)
    _CACHE_SAVED_USD.labels(model, match).inc(cost_usd)


# Safety verdicts.

_SAFETY_SCREENS = Counter(
    "chatmesh_safety_screens_total",
    "Texts screened, by stage (input, output, tool) and verdict (allowed, blocked).",
    ("stage", "verdict"),
)
_SAFETY_BLOCKED = Counter(
    "chatmesh_safety_blocked_total",
    "Blocked verdicts, one per category named, by stage and source (keyword, moderation).",
    ("stage", "source", "category"),
)
SAFETY_STAGES = ("input", "output", "tool")
_SAFETY_SCREEN_CHILDREN = {
    (stage, verdict): _SAFETY_SCREENS.labels(stage, verdict)
    for stage in SAFETY_STAGES
    for verdict in ("allowed", "blocked")
}


class _CappedLabel:
    """At most `limit` distinct values; later new ones become "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value


_category = _CappedLabel(MAX_CATEGORIES)


def safety_categories(stage_sources: Iterable[tuple[str, str]], categories: Iterable[str]) -> None:
    """Creates the blocked series of these categories at 0 (e.g. the loaded keyword lists' categories)."""
    pairs = list(stage_sources)
    for category in categories:
        label = _category(category)
        for stage, source in pairs:
            _SAFETY_BLOCKED.labels(stage, source, label)


def safety_verdict(stage: str, categories: Iterable[str] = (), source: str = "keyword") -> None:
    """One screened text of `stage` (input, output, tool): allowed when `categories` is empty, else blocked by
    `source` (keyword, moderation) for each of them."""
    blocked = False
    for category in categories:
        blocked = True
        _SAFETY_BLOCKED.labels(stage, source, _category(category)).inc()
    _SAFETY_SCREEN_CHILDREN[stage, "blocked" if blocked else "allowed"].inc()


_SAFETY_PII_FOUND = Counter(
    "chatmesh_safety_pii_found_total",
    "Personal information found by safety's PII screen, by stage (input, output) and kind (email, phone, cn_id, "
    "payment_card, ip_address; only the kinds the PII policy does not leave are looked for).",
    ("stage", "kind"),
)


def safety_pii_kinds(kinds: Iterable[str]) -> None:
    """Creates the series of these kinds (those the PII policy does not leave) at 0, for both stages."""
    for kind in kinds:
        for stage in ("input", "output"):
            _SAFETY_PII_FOUND.labels(stage, kind)


def safety_pii_found(stage: str, kind: str, count: int = 1) -> None:
    """`count` items of `kind` found in one text of `stage` (input, output)."""
    _SAFETY_PII_FOUND.labels(stage, kind).inc(count)


_REVIEW_CASES_OPENED = Counter(
    "chatmesh_review_cases_opened_total",
    "Review cases safety opened, by stage (input, output, tool) and action (block_and_review, allow_and_review).",
    ("stage", "action"),
)
_REVIEW_CASE_FAILURES = Counter(
    "chatmesh_review_case_failures_total",
    "Review cases safety could not open (the store failed or was too slow; the verdict stood), by stage.",
    ("stage",),
)
for _stage in SAFETY_STAGES:
    _REVIEW_CASE_FAILURES.labels(_stage)
    for _action in ("block_and_review", "allow_and_review"):
        _REVIEW_CASES_OPENED.labels(_stage, _action)


def review_case_opened(stage: str, action: str) -> None:
    """`stage`: input, output, tool; `action`: block_and_review, allow_and_review."""
    _REVIEW_CASES_OPENED.labels(stage, action).inc()


def review_case_failed(stage: str) -> None:
    _REVIEW_CASE_FAILURES.labels(stage).inc()


# Tenants (gateway: requests and limits; dialogue: tokens and cost). `tenant` is the name of a tenant the
# gateway verified, at most `metrics_max_tenants` distinct ones per process, then "other".

_TENANT_REQUESTS = Counter(
    "chatmesh_tenant_requests_total", "Chat and StreamChat calls admitted, by tenant.", ("tenant",)
)
_TENANT_TOKENS = Counter(
    "chatmesh_tenant_tokens_total",
    "Model tokens settled against a tenant, by kind: input, output (estimated for interrupted streams).",
    ("tenant", "kind"),
)
_TENANT_COST = Counter("chatmesh_tenant_cost_usd_total", "Model cost settled against a tenant, in USD.", ("tenant",))
_LIMIT_REJECTIONS = Counter(
    "chatmesh_limit_rejections_total", "Calls refused with RESOURCE_EXHAUSTED by a tenant limit, by limit.", ("limit",)
)
_AUTH_FAILURES = Counter(
    "chatmesh_auth_failures_total",
    "ChatService calls refused before they started: missing, malformed, unknown or revoked API keys, and "
    "keys that could not be verified (unavailable).",
    ("reason",),
)
_LEDGER_ERRORS = Counter(
    "chatmesh_ledger_errors_total",
    "Usage-ledger operations that failed (Redis unreachable), by operation: admit, release, reserve, settle.",
    ("operation",),
)
LIMIT_NAMES = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "daily_budget_usd",
    "monthly_budget_usd",
)
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown", "revoked", "unavailable")
LEDGER_OPERATIONS = ("admit", "release", "reserve", "settle")
_LIMIT_REJECTION_CHILDREN = {limit: _LIMIT_REJECTIONS.labels(limit) for limit in LIMIT_NAMES}
_AUTH_FAILURE_CHILDREN = {reason: _AUTH_FAILURES.labels(reason) for reason in AUTH_FAILURE_REASONS}
_LEDGER_ERROR_CHILDREN = {operation: _LEDGER_ERRORS.labels(operation) for operation in LEDGER_OPERATIONS}


class TenantMetrics:
    """The per-tenant counters of one process, with the tenant label capped at `max_tenants`."""

    def __init__(self, max_tenants: int) -> None:
        self._label = _CappedLabel(max_tenants)

    def request_admitted(self, tenant: str) -> None:
        _TENANT_REQUESTS.labels(self._label(tenant)).inc()

    def usage_settled(self, tenant: str, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        label = self._label(tenant)
        _TENANT_TOKENS.labels(label, "input").inc(input_tokens)
        _TENANT_TOKENS.labels(label, "output").inc(output_tokens)
        _TENANT_COST.labels(label).inc(cost_usd)


def limit_rejected(limit: str) -> None:
    """`limit`: one of LIMIT_NAMES."""
    _LIMIT_REJECTION_CHILDREN[limit].inc()


def auth_failed(reason: str) -> None:
    """`reason`: one of AUTH_FAILURE_REASONS."""
    _AUTH_FAILURE_CHILDREN[reason].inc()


def ledger_error(operation: str) -> None:
    """`operation`: one of LEDGER_OPERATIONS."""
    _LEDGER_ERROR_CHILDREN[operation].inc()


# Server-side tools (dialogue: chatmesh.dialogue.server_tools). `tool` is a built-in's name or one of the operator's
# tools file, so the label is bounded by that file.

_SERVER_TOOL_CALLS = Counter(
    "chatmesh_server_tool_calls_total",
    "Server-side tool calls, by tool and outcome: ok, error (the tool failed or answered an error), "
    "invalid_arguments (refused before the tool ran), timeout.",
    ("tool", "outcome"),
)
_SERVER_TOOL_DURATION = Histogram(
    "chatmesh_server_tool_duration_seconds",
    "Seconds a server-side tool call took, from its arguments' check to its result.",
    ("tool",),
    buckets=LATENCY_BUCKETS,
)
SERVER_TOOL_OUTCOMES = ("ok", "error", "invalid_arguments", "timeout")


def server_tools_declared(tools: Iterable[str]) -> None:
    """Creates the series of these tools at 0, so that a tool's first call and first failure show in rates."""
    for tool in tools:
        _SERVER_TOOL_DURATION.labels(tool)
        for outcome in SERVER_TOOL_OUTCOMES:
            _SERVER_TOOL_CALLS.labels(tool, outcome)


def server_tool_call(tool: str, outcome: str, seconds: float) -> None:
    """One server-side tool call of `tool` that ended with `outcome` (one of SERVER_TOOL_OUTCOMES)."""
    _SERVER_TOOL_CALLS.labels(tool, outcome).inc()
    _SERVER_TOOL_DURATION.labels(tool).observe(seconds)


# The human-review queue (gateway). The gauges exist only in the process that sweeps the queue.

_REVIEW_DECISIONS = Counter(
    "chatmesh_review_decisions_total", "Review decisions, by decision: approve, block, escalate.", ("decision",)
)
REVIEW_DECISIONS = ("approve", "block", "escalate")
_REVIEW_DECISION_CHILDREN = {decision: _REVIEW_DECISIONS.labels(decision) for decision in REVIEW_DECISIONS}


def review_decided(decision: str) -> None:
    """`decision`: one of REVIEW_DECISIONS."""
    _REVIEW_DECISION_CHILDREN[decision].inc()


@functools.cache
def _review_queue_gauges() -> tuple[Gauge, Gauge]:
    return (
        Gauge(
            "chatmesh_review_open_cases",
            "Review cases not decided (open, claimed or escalated), as of this gateway's last sweep of the queue.",
        ),
        Gauge(
            "chatmesh_review_oldest_open_age_seconds",
            "Age of the oldest review case not decided, 0 when there is none (the case as of the last sweep).",
        ),
    )


def review_queue_observed(open_cases: int, oldest_age_seconds: float | None) -> None:
    """The queue as a sweep found it. The oldest case's age goes on growing at every scrape until the next."""
    open_gauge, age_gauge = _review_queue_gauges()
    open_gauge.set(open_cases)
    opened_at = None if oldest_age_seconds is None else time.time() - oldest_age_seconds
    age_gauge.set_function(lambda: 0.0 if opened_at is None else time.time() - opened_at)
