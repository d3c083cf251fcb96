"""ChatService: the public API. Names the call, authenticates its tenant, validates, admits it under the
tenant's limits, sets the deadline, relays dialogue."""

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from chatmesh.gateway import metrics
from chatmesh.gateway.admission import Admission
from chatmesh.gateway.auth import Authenticator, AuthError, Caller, record_failure
from chatmesh.gateway.usage import UsageReader, UsageUnavailable
from chatmesh.gateway.validation import (
    Violations,
    check_chat_request,
    check_conversation_id,
    check_page,
    check_user_id,
    is_well_formed_id,
)
from chatmesh.runtime import regions
from chatmesh.runtime.access_log import ErrorKind
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import REQUEST_ID_KEY, annotate, get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.runtime.status import Refused, abort, abort_with, invalid_argument, is_deliberate
from chatmesh.v1 import chat_pb2, chat_pb2_grpc, dialogue_pb2, dialogue_pb2_grpc

log = get_logger(__name__)


# Downstream codes a caller can act on pass through with dialogue's message; any other becomes INTERNAL.
_PASSED_THROUGH = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
# Only the rich-status detail is passed on from dialogue's trailers.
_DETAILS_KEY = "grpc-status-details-bin"


class ChatGateway(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        dialogue: dialogue_pb2_grpc.DialogueServiceStub,
        authenticator: Authenticator,
        admission: Admission,
        usage: UsageReader,
    ) -> None:
        self._settings = settings
        self._dialogue = dialogue
        self._authenticator = authenticator
        self._admission = admission
        self._usage = usage

    async def StreamChat(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext, *, time_first_token: bool = True
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The turn's events as dialogue sends them. Its time to first token (the latency objective's, see
        chatmesh.gateway.metrics) is recorded unless `time_first_token` is false: Chat reads the same events
        without a first token of its own."""
        started = time.perf_counter()
        annotate(user_id=request.user_id, model=request.options.model or self._settings.default_model)
        request_id = _name_call(context)
        caller = await self._authenticate(context, request_id)
        violations = check_chat_request(request, self._settings)
        if violations:
            await _reply_headers(context, request_id)
            await abort_with(context, invalid_argument(violations))
        if regions.foreign_home(request.conversation_id, self._settings.region) is not None:
            await _reply_headers(context, request_id)
            await self._refuse_other_regions(context, request.conversation_id)
        if not request.options.knowledge_bases:
            # A request that names no knowledge bases searches its tenant's defaults.
            request.options.knowledge_bases.extend(caller.knowledge_bases)
        timeout = downstream_timeout(context, self._settings.default_deadline_seconds)
        try:
            holds_slot = await self._admission.admit(caller, request_id, timeout)
        except Refused as refused:
            await _reply_headers(context, request_id)
            await abort_with(context, refused.status)
        # Creating the call sends it; the response headers go out while dialogue starts working.
        call = self._dialogue.RunTurn(
            dialogue_pb2.TurnRequest(
                request=request, request_id=request_id, tenant=caller.tenant, limits=caller.limits.to_proto()
            ),
            timeout=timeout,
        )
        try:
            await _reply_headers(context, request_id)
            event = None
            async for events in call:
                for event in events.events:
                    if time_first_token and event.HasField("delta"):
                        metrics.stream_first_token(time.perf_counter() - started)
                        time_first_token = False
                    yield event
            if event is not None and event.HasField("completed"):
                usage = event.completed.usage
                annotate(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
        except grpc.aio.AioRpcError as error:
            await _relay_failure(context, error, request_id)
        finally:
            call.cancel()
            if holds_slot:
                self._admission.release(caller.tenant, request_id)

    async def Chat(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> chat_pb2.ChatResponse:
        response = chat_pb2.ChatResponse()
        text: list[str] = []
        async for event in self.StreamChat(request, context, time_first_token=False):
            kind = event.WhichOneof("event")
            if kind == "delta":
                text.append(event.delta.text)
            elif kind == "started":
                response.conversation_id = event.started.conversation_id
                response.request_id = event.started.request_id
                response.model = event.started.model
            elif kind == "tool_calls":
                response.tool_calls.extend(event.tool_calls.calls)
            elif kind == "tool_results":
                response.tool_results.extend(event.tool_results.results)
            else:
                completed = event.completed
                response.finish_reason = completed.finish_reason
                response.usage.CopyFrom(completed.usage)
                response.cost_usd = completed.cost_usd
                response.cached = completed.cached
                response.cache_match = completed.cache_match
                response.cache_similarity = completed.cache_similarity
                response.citations.extend(completed.citations)
                response.replayed = completed.replayed
                if completed.HasField("content_filter"):
                    response.content_filter.CopyFrom(completed.content_filter)
        response.text = "".join(text)
        return response

    async def GetConversation(
        self, request: chat_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetConversationResponse:
        annotate(user_id=request.user_id)
        request_id, caller = await self._start(
            context,
            check_user_id(request.user_id)
            + check_conversation_id(request.conversation_id, required=True)
            + check_page(request),
        )
        await self._refuse_other_regions(context, request.conversation_id)
        try:
            return await self._dialogue.GetConversation(
                dialogue_pb2.TenantGetConversationRequest(tenant=caller.tenant, request=request),
                timeout=downstream_timeout(context, self._settings.default_deadline_seconds),
            )
        except grpc.aio.AioRpcError as error:
            await _relay_failure(context, error, request_id)
            raise

    async def DeleteConversation(
        self, request: chat_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteConversationResponse:
        annotate(user_id=request.user_id)
        request_id, caller = await self._start(
            context,
            check_user_id(request.user_id) + check_conversation_id(request.conversation_id, required=True),
        )
        await self._refuse_other_regions(context, request.conversation_id)
        try:
            return await self._dialogue.DeleteConversation(
                dialogue_pb2.TenantDeleteConversationRequest(tenant=caller.tenant, request=request),
                timeout=downstream_timeout(context, self._settings.default_deadline_seconds),
            )
        except grpc.aio.AioRpcError as error:
            await _relay_failure(context, error, request_id)
            raise

    async def EraseUser(
        self, request: chat_pb2.EraseUserRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.EraseUserResponse:
        annotate(user_id=request.user_id)
        request_id, caller = await self._start(context, check_user_id(request.user_id))
        try:
            return await self._dialogue.EraseUser(
                dialogue_pb2.TenantEraseUserRequest(tenant=caller.tenant, request=request),
                timeout=downstream_timeout(context, self._settings.default_deadline_seconds),
            )
        except grpc.aio.AioRpcError as error:
            await _relay_failure(context, error, request_id)
            raise

    async def GetUsage(
        self, request: chat_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetUsageResponse:
        request_id, caller = await self._start(context, [])
        try:
            return await self._usage.read(caller.tenant, caller.limits, context)
        except UsageUnavailable:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "usage cannot be read right now; retry with backoff")
            raise
        except grpc.aio.AioRpcError as error:
            await _relay_failure(context, error, request_id)
            raise

    async def _start(self, context: grpc.aio.ServicerContext, violations: Violations) -> tuple[str, Caller]:
        """Names the call, authenticates it, sends the response headers, and rejects bad input."""
        request_id = _name_call(context)
        caller = await self._authenticate(context, request_id)
        await _reply_headers(context, request_id)
        if violations:
            await abort_with(context, invalid_argument(violations))
        return request_id, caller

    async def _refuse_other_regions(self, context: grpc.aio.ServicerContext, conversation_id: str) -> None:
        """Ends a call about a conversation that lives in another region (see chatmesh.runtime.regions)."""
        home = regions.foreign_home(conversation_id, self._settings.region)
        if home is not None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"conversation {conversation_id} lives in region {home}, and this is region "
                f"{self._settings.region}: send calls about it to {home}'s chatmesh endpoint",
            )

    async def _authenticate(self, context: grpc.aio.ServicerContext, request_id: str) -> Caller:
        """The caller; ends the call with UNAUTHENTICATED or UNAVAILABLE when it cannot be identified.
        The log line's tenant is the authenticated one, never what the caller's metadata claimed."""
        try:
            caller = await self._authenticator.authenticate(context.invocation_metadata())
        except AuthError as error:
            annotate(tenant="")
            record_failure(error)
            await _reply_headers(context, request_id)
            await abort(context, error.code, str(error))
        annotate(tenant=caller.tenant)
        return caller


def _name_call(context: grpc.aio.ServicerContext) -> str:
    """The call's request id: the caller's own `x-request-id` when it sent a well-formed one, so that its
    logs and ours line up. It is the access-log line's id, and goes on to dialogue (and from there to
    safety and cache) as metadata."""
    request_id = _caller_request_id(context) or uuid.uuid4().hex
    annotate(request_id=request_id)
    return request_id


async def _reply_headers(context: grpc.aio.ServicerContext, request_id: str) -> None:
    """The request id in the response headers, which a caller gets with errors too."""
    await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))


def _caller_request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and is_well_formed_id(value):
            return value
    return None


async def _relay_failure(context: grpc.aio.ServicerContext, error: grpc.aio.AioRpcError, request_id: str) -> None:
    """Ends the call with dialogue's failure, in terms a caller can act on: dialogue's own answers pass
    through with their message and details; transport failures get a message of ours."""
    code = error.code()
    log.warning("dialogue_failed", extra={"request_id": request_id, "grpc_code": code.name})
    if is_deliberate(error) and code in _PASSED_THROUGH:
        details = tuple((key, value) for key, value in error.trailing_metadata() if key == _DETAILS_KEY)
        await abort(context, code, error.details(), details)
    if code is grpc.StatusCode.UNAVAILABLE:
        annotate(error=ErrorKind.DIALOGUE_UNAVAILABLE)
        await abort(context, code, "the dialogue service is unavailable; retry with backoff")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        await abort(context, code, "the request did not complete within its deadline")
    await abort(context, grpc.StatusCode.INTERNAL, f"the request failed inside chatmesh (request id {request_id})")
