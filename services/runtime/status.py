"""gRPC error statuses with `google.rpc` details that callers can act on.

Every chatmesh handler ends a call with an error through `abort` or `abort_with`, which mark the
status as chatmesh's own. A caller one hop up can then tell a deliberate answer, whose message is
meant for the end caller, from a transport failure, whose message (addresses, socket errors) is not.
"""

import asyncio
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chatmesh.runtime.logs import REQUEST_ID_KEY, current_request


class Refused(Exception):
    """Raised by a step of a call that may not go on, with the status to end the call with (`abort_with`)."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


def retry_later(message: str, retry_after_seconds: float | None) -> grpc.Status:
    """RESOURCE_EXHAUSTED, with a RetryInfo detail when the wait is known."""
    details = [] if retry_after_seconds is None else [_retry_info(retry_after_seconds)]
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=details))


def quota_exceeded(subject: str, quota_id: str, description: str, retry_after_seconds: float | None) -> grpc.Status:
    """RESOURCE_EXHAUSTED for a limit of chatmesh's own: a QuotaFailure naming the limit (`quota_id`) and
    whose it is (`subject`), and a RetryInfo saying when capacity frees up (None: waiting cannot help)."""
    failure = any_pb2.Any()
    failure.Pack(
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description, quota_id=quota_id)
            ]
        )
    )
    if retry_after_seconds is None:
        message, details = f"{quota_id} exceeded: {description}", [failure]
    else:
        message = f"{quota_id} exceeded: {description}; retry in {math.ceil(retry_after_seconds)} s"
        details = [failure, _retry_info(retry_after_seconds)]
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=details))


def failure(code: grpc.StatusCode, message: str) -> grpc.Status:
    """A status without details, for `abort_with`."""
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message))


def _retry_info(retry_after_seconds: float) -> any_pb2.Any:
    detail = any_pb2.Any()
    seconds = math.floor(retry_after_seconds)
    detail.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_seconds - seconds) * 1e9))
        )
    )
    return detail


def invalid_argument(violations: list[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT naming every bad field, in the message and as a BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in violations
            ]
        )
    )
    message = "; ".join(f"{field}: {description}" for field, description in violations)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail]))


_ORIGIN_KEY = "chatmesh-status"
_ORIGIN = (_ORIGIN_KEY, "1")
# gRPC's retry pushback: a negative value tells the caller's channel not to retry this answer. Internal
# channels retry calls that found no process to take them (chatmesh.runtime.channels), never an answer one
# gave on purpose. The public services' answers carry none: what a caller's own retry policy does with
# them is the caller's choice.
_NO_RETRY = ("grpc-retry-pushback-ms", "-1")
_PUBLIC_SERVICES = ("chatmesh.v1.ChatService/", "chatmesh.v1.AdminService/")


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> None:
    """Ends the call with `code`; its trailers carry the call's request id, since a failed call's response
    headers may never reach the caller (an error before any message can be sent as trailers alone)."""
    record = current_request()
    extra: tuple[tuple[str, str], ...] = ()
    if record is not None:
        if record.request_id:
            extra = ((REQUEST_ID_KEY, record.request_id),)
        if not record.method.startswith(_PUBLIC_SERVICES):
            extra = (*extra, _NO_RETRY)
    await context.abort(code, message, (*trailing_metadata, *extra, _ORIGIN))


async def abort_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await abort(context, status.code, status.details, tuple(status.trailing_metadata))


def is_deliberate(error: grpc.aio.AioRpcError) -> bool:
    """Whether a chatmesh handler ended the call on purpose (rather than the transport failing)."""
    return any(key == _ORIGIN_KEY for key, _ in error.trailing_metadata() or ())


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def served_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a served call ended with, as its caller sees it, from its context and what the handler
    raised (None when it returned)."""
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()
        if code is None:
            return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        return code if isinstance(code, grpc.StatusCode) else _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
