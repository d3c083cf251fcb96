"""Requests whose bytes are not a valid message: INVALID_ARGUMENT saying so, not gRPC's UNKNOWN.

Left to itself, grpc answers a request its deserializer cannot decode (random bytes, a truncated
message, invalid UTF-8 in a string field) with UNKNOWN "Unexpected <class …DecodeError>", and logs an
error line each time. The interceptor here gives each method a deserializer that returns a marker
instead of raising, and ends such a call with INVALID_ARGUMENT before the handler runs.

Methods that take a stream of requests (only the internal ScreenOutput) keep grpc's own behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from chatmesh.runtime.status import abort


class _Undecodable:
    """What the guarded deserializer returns for bytes that are not a valid message."""


_UNDECODABLE = _Undecodable()


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, observed: Callable[[str], bool]) -> None:
        self._observed = observed
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or not self._observed(method):
            return handler
        if handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guard(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    # The deserializer is the request class's FromString.
    message_name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    refusal = f"the request is not a valid {message_name.full_name if message_name else 'message'}"

    def guarded(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _UNDECODABLE

    if handler.response_streaming:
        behavior = handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is _UNDECODABLE:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, refusal)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            streaming, request_deserializer=guarded, response_serializer=handler.response_serializer
        )

    unary_behavior = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _UNDECODABLE:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, refusal)
        return await unary_behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=guarded, response_serializer=handler.response_serializer
    )
