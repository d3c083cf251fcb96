"""One JSON line per served call, in every process, and the request id that ties a request's lines together.

AccessLog opens a RequestRecord when a call starts (its request id from the caller's `x-request-id`
metadata, its trace and span id from the server span when tracing is on) and writes the line when the
call ends, however it ends (chatmesh.runtime.call_observer calls it around every served call):

    {"timestamp": …, "level": "info", "service": "dialogue", "event": "request",
     "method": "chatmesh.v1.DialogueService/RunTurn", "request_id": …, "trace_id": …, "span_id": …,
     "user_id": "<HMAC-SHA256 of the id, 16 hex>", "model": …, "input_tokens": …, "output_tokens": …,
     "latency_ms": …, "grpc_code": "OK", "error": null}

A handler that fails unexpectedly (it raises, rather than aborting) adds `exception` and `traceback` to its
line: the exception's type and its frames, never its message (chatmesh.runtime.logs).

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
from enum import StrEnum
from typing import Any

import grpc

from chatmesh.runtime.logs import REQUEST_ID_KEY, RequestRecord, begin_request
from chatmesh.runtime.settings import ProcessSettings
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


_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _caller_ids(metadata: Any) -> tuple[str, str]:
    """The request id and the tenant a call's metadata carries, each "" when absent or malformed."""
    request_id = tenant = ""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if not request_id and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
                request_id = value
        elif key == TENANT_KEY and not tenant and isinstance(value, str) and _TENANT.fullmatch(value):
            tenant = value
    return request_id, tenant


class AccessLog:
    """The `request` line of each served call: `begin` when the call starts, `end` when it has its status.

    chatmesh.runtime.call_observer calls both, however the call ends."""

    def __init__(self, settings: ProcessSettings) -> None:
        self._hash_user_id = UserIdHasher(settings.log_user_id_salt.get_secret_value())

    def begin(self, method: str, metadata: Any) -> RequestRecord:
        """Opens the record of a call of `method` ("package.Service/Method") and makes it the current one
        (chatmesh.runtime.logs.current_request) in the calling task."""
        trace_id, span_id = current_trace_ids()
        request_id, tenant = _caller_ids(metadata)
        record = RequestRecord(
            method=method,
            started=time.perf_counter(),
            request_id=request_id,
            tenant=tenant,
            trace_id=trace_id,
            span_id=span_id,
        )
        begin_request(record)
        return record

    def end(self, record: RequestRecord, code: grpc.StatusCode, error: BaseException | None = None) -> None:
        """Writes the call's line, unless its level is off. `error` is what the handler raised, if anything:
        an unexpected one (not an abort, a cancellation or a closed stream) adds its type and traceback."""
        level = _LEVELS.get(code, logging.INFO)
        if not log.isEnabledFor(level):
            return
        latency_ms = (time.perf_counter() - record.started) * 1000
        unexpected = isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError)
        log.log(
            level,
            "request",
            exc_info=error if unexpected else None,
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
                "error": None if code is grpc.StatusCode.OK else (record.error or code.name.lower()),
            },
        )
