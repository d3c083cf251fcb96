"""What every served call is observed by: its access-log line and its grpc_server_* metrics, in one wrapper.

A call of a method that `observed(method)` admits runs inside one wrapper that opens the call's request
record (chatmesh.runtime.access_log.AccessLog), counts and times the call and each message it receives and
sends (chatmesh.runtime.metrics, when this process measures), and writes the call's `request` line when it
ends, however it ends. Each method's wrapper is built once and reused while the service hands out the
same handler, which it does when the interceptors inside this one do the same (the decode guard does).

`CallObserver.unary` wraps a bare unary handler the same way, for unary calls that arrive as messages of
another call (a multiplexed stream) rather than as calls of their own.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from chatmesh.runtime import metrics
from chatmesh.runtime.access_log import AccessLog
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.status import served_code

UnaryBehavior = Callable[[Any, Any], Awaitable[Any]]


class CallObserver(grpc.aio.ServerInterceptor):
    """Logs, and when `metered` counts and times, every served call that `observed(method)` admits.

    Handlers are async functions and async generators, as every chatmesh servicer's are. A streaming
    handler written as a coroutine (with `context.write`) is logged, counted and timed, but its messages
    sent are not counted; a synchronous handler (run in a thread by grpc.aio; chatmesh has none) is left
    as it is."""

    def __init__(self, settings: ProcessSettings, observed: Callable[[str], bool], *, metered: bool) -> None:
        self._access_log = AccessLog(settings)
        self._observed = observed
        self._metered = metered
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, method) if self._observed(method) else handler
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        """`behavior`, an `async (request, context) -> response`, observed as a served unary call of `method`
        ("package.Service/Method") is: its `request` line and its grpc_server_* metrics under that method.

        `context` needs only `invocation_metadata()`, `time_remaining()`, an `abort()` that raises a
        grpc.aio.AbortError, and `code()`: None, or the code `abort()` was given. Make the wrapper once per
        method and keep it. Run each call in its own task, as grpc.aio runs each served call: the call's
        request record is set in the task's context."""
        if not self._observed(method):
            return behavior
        return self._single_response(behavior, method.lstrip("/"), False, False)

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        request_streaming, response_streaming = handler.request_streaming, handler.response_streaming
        if request_streaming and response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        method = method.lstrip("/")
        if inspect.isasyncgenfunction(behavior):
            wrapped = self._response_stream(behavior, method, request_streaming)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._single_response(behavior, method, request_streaming, response_streaming)
        else:
            return handler
        return factory(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _method_metrics(
        self, method: str, request_streaming: bool, response_streaming: bool
    ) -> metrics.MethodMetrics | None:
        if not self._metered:
            return None
        return metrics.server_method(f"/{method}", metrics.grpc_type(request_streaming, response_streaming))

    def _single_response(
        self, behavior: Callable[..., Awaitable[Any]], method: str, request_streaming: bool, response_streaming: bool
    ) -> Callable[..., Awaitable[Any]]:
        access_log = self._access_log
        counted = self._method_metrics(method, request_streaming, response_streaming)

        async def observed_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = access_log.begin(method, context.invocation_metadata())
            request = _count_start(counted, request, request_streaming)
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                code = served_code(context, error)
                if counted is not None:
                    counted.finish(code, record.started)
                    if error is None and code is grpc.StatusCode.OK and not response_streaming:
                        counted.msg_sent.inc()
                access_log.end(record, code, error)
            return response

        return observed_call

    def _response_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str, request_streaming: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        access_log = self._access_log
        counted = self._method_metrics(method, request_streaming, True)

        async def observed_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = access_log.begin(method, context.invocation_metadata())
            request = _count_start(counted, request, request_streaming)
            responses = behavior(request, context)
            # Messages sent are added to their counter once, when the stream ends: a counter increment takes
            # a lock, and a reply streams tens of messages.
            sent = 0
            error: BaseException | None = None
            try:
                async for response in responses:
                    sent += 1
                    yield response
            except BaseException as caught:
                error = caught
                if isinstance(caught, GeneratorExit):
                    await responses.aclose()
                raise
            finally:
                code = served_code(context, error)
                if counted is not None:
                    counted.msg_sent.inc(sent)
                    counted.finish(code, record.started)
                access_log.end(record, code, error)

        return observed_stream


def _count_start(counted: metrics.MethodMetrics | None, request: Any, request_streaming: bool) -> Any:
    """Counts a served call's start and its request (each message of a request stream as it is read); returns the
    request to hand to the handler."""
    if counted is None:
        return request
    counted.started.inc()
    if request_streaming:
        return metrics.Counted(request, counted.msg_received.inc)
    counted.msg_received.inc()
    return request
