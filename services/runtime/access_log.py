"""One JSON line per served call, in every process, and the request id that ties a request's lines together.

The server interceptor opens a RequestRecord when a call starts (its request id from the caller's
`x-request-id` metadata, its trace and span id from the server span when tracing is on) and writes
the line when the call ends, however it ends:

    {"timestamp": …, "level": "info", "service": "dialogue", "event": "request",
     "method": "chatmesh.v1.DialogueService/RunTurn", "request_id": …, "trace_id": …, "span_id": …,
     "user_id": "<HMAC-SHA256 of the id, 16 hex>", "model": …, "input_tokens": …, "output_tokens": …,
     "latency_ms": …, "grpc_code": "OK", "error": null}

Handlers add what only they know with `chatmesh.runtime.logs.annotate(...)`. Channels pass the current
request id on as `x-request-id` (chatmesh.runtime.propagation), so dialogue's, safety's and cache's
lines carry the id the gateway chose. Never message text, replies, or keys: only ids, counts and closed sets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any

import grpc

from chatmesh.runtime.logs import REQUEST_ID_KEY, RequestRecord, begin_request
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.status import served_code
from chatmesh.runtime.tracing import current_trace_ids

# The tenant of the call being served, passed downstream for log lines only: services take the tenant
# they act for from their requests' fields, never from this. The gateway replaces what a caller sends.
TENANT_KEY = "x-chatmesh-tenant"
# What a request id received in metadata must look like to be kept (the gateway's rule for callers' ids).
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")

log = logging.getLogger("chatmesh.access")


class ErrorKind(StrEnum):
    """What went wrong, for the `error` field: set by a handler when it knows more than the status code,
    else the status code's name in lower case (`not_found`, `deadline_exceeded`, …)."""

    MODEL_RATE_LIMITED = "model_rate_limited"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_REJECTED = "model_rejected"
    SAFETY_UNAVAILABLE = "safety_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    DIALOGUE_UNAVAILABLE = "dialogue_unavailable"
    KNOWLEDGE_UNAVAILABLE = "knowledge_unavailable"


# Server-side failures are warnings, bugs are errors; a caller's own mistakes are routine.
_LEVELS = {
    grpc.StatusCode.UNKNOWN: logging.ERROR,
    grpc.StatusCode.INTERNAL: logging.ERROR,
    grpc.StatusCode.DATA_LOSS: logging.ERROR,
    grpc.StatusCode.UNIMPLEMENTED: logging.ERROR,
    grpc.StatusCode.UNAVAILABLE: logging.WARNING,
    grpc.StatusCode.DEADLINE_EXCEEDED: logging.WARNING,
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.WARNING,
}


class UserIdHasher:
    """HMAC-SHA256 of a user id under the `log_user_id_salt` setting, truncated to 64 bits (16 hex digits):
    the same user gets the same value in every process and across restarts."""

    def __init__(self, salt: str) -> None:
        self._key = hmac.new(salt.encode(), digestmod=hashlib.sha256)

    def __call__(self, user_id: str) -> str:
        digest = self._key.copy()
        digest.update(user_id.encode())
        return digest.hexdigest()[:16]


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return ""


_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _tenant(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == TENANT_KEY and isinstance(value, str) and _TENANT.fullmatch(value):
            return value
    return ""


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Writes one `request` line per call that `observed(method)` admits, whatever its outcome.

    Each method's handler is wrapped once and the wrapper reused: a call costs its record and its line."""

    def __init__(self, settings: ProcessSettings, observed: Callable[[str], bool]) -> None:
        self._hash_user_id = UserIdHasher(settings.log_user_id_salt.get_secret_value())
        self._observed = observed
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._observed(method):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method.lstrip("/"))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
            factory = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            wrapped = self._streaming(behavior, method)
        else:
            behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
            factory = (
                grpc.stream_unary_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            wrapped = self.unary(behavior, method)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        """`behavior`, a unary handler of `method` ("package.Service/Method"), writing its call's line."""

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = self._begin(method, context)
            try:
                response = await behavior(request, context)
            except BaseException as error:
                self._end(record, context, error)
                raise
            self._end(record, context, None)
            return response

        return unary

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = self._begin(method, context)
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as failure:
                error = failure
                raise
            finally:
                self._end(record, context, error)

        return streaming

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> RequestRecord:
        trace_id, span_id = current_trace_ids()
        metadata = context.invocation_metadata()
        record = RequestRecord(
            method=method,
            started=time.perf_counter(),
            request_id=_request_id(metadata),
            tenant=_tenant(metadata),
            trace_id=trace_id,
            span_id=span_id,
        )
        begin_request(record)
        return record

    def _end(self, record: RequestRecord, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        latency_ms = (time.perf_counter() - record.started) * 1000
        code = served_code(context, error)
        kind = None if code is grpc.StatusCode.OK else (record.error or code.name.lower())
        log.log(
            _LEVELS.get(code, logging.INFO),
            "request",
            extra={
                "method": record.method,
                "request_id": record.request_id,
                "trace_id": record.trace_id,
                "span_id": record.span_id,
                "tenant": record.tenant or None,
                "user_id": None if record.user_id is None else self._hash_user_id(record.user_id),
                "model": record.model,
                "input_tokens": record.input_tokens,
                "output_tokens": record.output_tokens,
                "latency_ms": round(latency_ms, 3),
                "grpc_code": code.name,
                "error": kind,
            },
        )
