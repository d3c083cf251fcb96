"""Prometheus metrics: serving `/metrics`, and the gRPC metrics every chatmesh process shares.

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

Served calls are measured by chatmesh.runtime.call_observer.CallObserver (in
`interceptors.server_interceptors`), in the same wrapper as their access-log line; calls made, by
MeteredChannel, which `open_channel` wraps around every channel (a grpc.aio client interceptor would
cost far more: see MeteredChannel).

The hot path: a message a server streams costs one coroutine step, and is added to
grpc_server_msg_sent_total when its stream ends; any other streamed message costs one counter increment
and one coroutine step (together about 0.5 µs). Everything a call needs (its labelled children) is bound
once per method, when the server starts or when a stub is made.

The domains' metrics live with their owners, each module listing its series: chatmesh.model.metrics
(model calls, deployments and the router: dialogue, safety, cache), chatmesh.cache.metrics (the cache),
chatmesh.dialogue.metrics (dialogue's cache lookups and savings, server-side tools), chatmesh.safety.metrics
(verdicts, PII, review cases opened), chatmesh.review.metrics (the review queue: gateway) and
chatmesh.tenancy.metrics (tenants, keys, limits: gateway and dialogue). Importing one registers its series, so
a process exports only those of the modules it uses. Their label values come from closed sets only, never an id
or text; a label bounded only by use (a tenant, a category) is a CappedLabel.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.wrapped_channel import WrappedChannel

log = get_logger(__name__)

# go-grpc-prometheus writes no `_created` series; neither do we (it would double every counter's series).
disable_created_metrics()

# Seconds. Prometheus's default buckets, with 0.75, 1.5, 2 and 3 added (the latency objective is P90
# under 1.5 s, so 1.5 must be a bound) and 30, 60 and 120 for long streams.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER = "other"

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


class MethodMetrics:
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
_server_methods: dict[str, MethodMetrics] = {}


def enabled() -> bool:
    """Whether this process serves metrics (and so whether its servers and channels are instrumented)."""
    return _enabled


def serve_metrics(settings: ProcessSettings, process: str) -> bool:
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
            server_method(path, grpc_type(method.client_streaming, method.server_streaming))


def server_method(path: str, kind: str) -> MethodMetrics:
    """The labelled children of the served method `path` ("/package.Service/Method") of type `kind`, made
    at its first use and shared after that."""
    metrics = _server_methods.get(path)
    if metrics is None:
        with _lock:
            metrics = _server_methods.get(path)
            if metrics is None:
                metrics = _server_methods[path] = MethodMetrics(_SERVER, kind, path)
    return metrics


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
        metrics = MethodMetrics(_CLIENT, grpc_type(request_streaming, response_streaming), method)
        return _MeteredMultiCallable(callable_, metrics, request_streaming, response_streaming)


class _MeteredMultiCallable:
    """A stub's method whose calls are counted: `streamed` requests, `streaming` responses."""

    __slots__ = ("_callable", "_metrics", "_streamed", "_streaming")

    def __init__(self, callable_: Any, metrics: MethodMetrics, streamed: bool, streaming: bool) -> None:
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
            args = (Counted(args[0], metrics.msg_sent.inc), *args[1:])
        elif kwargs.get("request_iterator") is not None:
            kwargs["request_iterator"] = Counted(kwargs["request_iterator"], metrics.msg_sent.inc)
        started_at = time.perf_counter()
        call = self._callable(*args, **kwargs)
        call.add_done_callback(functools.partial(_client_call_done, metrics, started_at, self._streaming))
        if self._streamed or self._streaming:
            return _MeteredStreamCall(call, metrics)
        return call


class _MeteredStreamCall:
    """A streaming call whose messages read and written are counted; everything else is the call's."""

    __slots__ = ("_call", "_received", "_sent")

    def __init__(self, call: Any, metrics: MethodMetrics) -> None:
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


class Counted:
    """Passes `messages` on, counting each. A class rather than an async generator: a generator that its
    reader leaves unfinished (safety stops reading at the `final` piece) costs a finalizer task when it
    is collected; this costs nothing."""

    __slots__ = ("_inc", "_messages")

    def __init__(self, messages: Any, inc: Callable[[], None]) -> None:
        self._messages = messages.__aiter__()
        self._inc = inc

    def __aiter__(self) -> Counted:
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


def _client_call_done(metrics: MethodMetrics, started_at: float, streaming: bool, call: Any) -> None:
    _client_call_ended(metrics, _finished_code(call), started_at, streaming)


def _client_call_ended(metrics: MethodMetrics, code: grpc.StatusCode, started_at: float, streaming: bool) -> None:
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


_client_unary_methods: dict[str, MethodMetrics] = {}


def client_unary_call(method: str) -> Callable[[grpc.StatusCode], None]:
    """Counts a unary call of `method` made without a stub (chatmesh.runtime.multiplex sends it on a stream) in the
    grpc_client_* metrics, as MeteredChannel counts a stub's; returns what records how it ended."""
    if not _enabled:
        return _ignore_code
    metrics = _client_unary_methods.get(method)
    if metrics is None:
        metrics = _client_unary_methods[method] = MethodMetrics(_CLIENT, "unary", method)
    metrics.started.inc()
    metrics.msg_sent.inc()
    started_at = time.perf_counter()

    def done(code: grpc.StatusCode) -> None:
        _client_call_ended(metrics, code, started_at, streaming=False)

    return done


def _ignore_code(code: grpc.StatusCode) -> None:
    pass


def metered_channel(channel: grpc.aio.Channel, observed: Callable[[str], bool]) -> grpc.aio.Channel:
    """`channel` with its calls counted (MeteredChannel) when this process measures; else `channel`."""
    return MeteredChannel(channel, observed) if _enabled else channel


class CappedLabel:
    """A label of at most `limit` distinct values per process; later new ones become "other" (OTHER)."""

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
