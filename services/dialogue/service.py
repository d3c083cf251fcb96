"""DialogueService: runs a turn (load the window, stream from the model, commit) and serves history."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from chatmesh.dialogue.coalesce import coalesce
from chatmesh.dialogue.context_window import build_messages
from chatmesh.dialogue.store import (
    CommittedTurn,
    Conversation,
    ConversationNotFound,
    ConversationStore,
    StoredMessage,
    StoreUnavailable,
)
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.model_client import ModelClient, ModelError, ModelErrorKind, ModelOutcome, ModelRequest
from chatmesh.runtime.settings import Settings
from chatmesh.runtime.status import abort, abort_with, retry_later
from chatmesh.v1 import chat_pb2, dialogue_pb2, dialogue_pb2_grpc

log = get_logger(__name__)

_FINISH_REASONS = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "content_filter": chat_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": chat_pb2.FINISH_REASON_TOOL_CALLS,
}

_ROLES = {"user": chat_pb2.ROLE_USER, "assistant": chat_pb2.ROLE_ASSISTANT}

_MODEL_ERROR_CODES = {
    ModelErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ModelErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelErrorKind.REJECTED: grpc.StatusCode.FAILED_PRECONDITION,
}


class DialogueServicer(dialogue_pb2_grpc.DialogueServiceServicer):
    def __init__(self, settings: Settings, store: ConversationStore, model: ModelClient) -> None:
        self._settings = settings
        self._store = store
        self._model = model

    async def Turn(
        self, request: dialogue_pb2.TurnRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + downstream_timeout(context, self._settings.default_deadline_seconds)
        chat = request.request
        options = chat.options
        new = not chat.conversation_id
        conversation_id = chat.conversation_id or uuid.uuid4().hex
        history: list[StoredMessage] = []
        if not new:
            async with _store_errors(context, conversation_id):
                history = await self._store.recent_messages(
                    conversation_id, chat.user_id, self._settings.context_window_messages
                )
        model = options.model or self._settings.default_model
        yield chat_pb2.ChatEvent(
            started=chat_pb2.Started(conversation_id=conversation_id, request_id=request.request_id, model=model)
        )

        model_request = ModelRequest(
            model=model,
            messages=build_messages(options.system_prompt, history, chat.message),
            temperature=options.temperature if options.HasField("temperature") else None,
            top_p=options.top_p if options.HasField("top_p") else None,
            max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
            stop=list(options.stop),
            seed=options.seed if options.HasField("seed") else None,
        )
        started_at = time.time()
        reply: list[str] = []
        outcome = ModelOutcome()
        try:
            async for item in coalesce(self._model.stream_chat(model_request, deadline)):
                if isinstance(item, str):
                    reply.append(item)
                    yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=item))
                else:
                    outcome = item
        except ModelError as error:
            log.warning("model_failed", extra={"request_id": request.request_id, "kind": error.kind.value})
            if error.kind is ModelErrorKind.RATE_LIMITED:
                await abort_with(context, retry_later(str(error), error.retry_after))
            await abort(context, _MODEL_ERROR_CODES[error.kind], str(error))

        turn = CommittedTurn(
            user_message=StoredMessage(role="user", content=chat.message, created_at=started_at),
            reply=StoredMessage(role="assistant", content="".join(reply), created_at=time.time()),
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
        )
        async with _store_errors(context, conversation_id, "was deleted while the turn ran"):
            await self._store.commit_turn(conversation_id, chat.user_id, turn, new=new)
        yield chat_pb2.ChatEvent(
            completed=chat_pb2.Completed(
                finish_reason=_FINISH_REASONS.get(outcome.finish_reason, chat_pb2.FINISH_REASON_UNSPECIFIED),
                usage=chat_pb2.Usage(
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                    total_tokens=outcome.input_tokens + outcome.output_tokens,
                ),
                cost_usd=self._cost_usd(model, outcome),
            )
        )

    async def GetConversation(
        self, request: chat_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetConversationResponse:
        async with _store_errors(context, request.conversation_id):
            conversation = await self._store.get(request.conversation_id, request.user_id)
        return chat_pb2.GetConversationResponse(conversation=_to_proto(conversation))

    async def DeleteConversation(
        self, request: chat_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteConversationResponse:
        async with _store_errors(context, request.conversation_id):
            await self._store.delete(request.conversation_id, request.user_id)
        return chat_pb2.DeleteConversationResponse()

    def _cost_usd(self, model: str, outcome: ModelOutcome) -> float:
        """Priced by the longest entry of the price table that the model name starts with, so that
        dated snapshots ("gpt-4o-mini-2024-07-18") take their family's price; unknown models cost 0."""
        prices = self._settings.model_prices_usd_per_million
        matches = [name for name in prices if model.startswith(name)]
        if not matches:
            return 0.0
        input_price, output_price = prices[max(matches, key=len)]
        return (outcome.input_tokens * input_price + outcome.output_tokens * output_price) / 1_000_000


@contextlib.asynccontextmanager
async def _store_errors(
    context: grpc.aio.ServicerContext, conversation_id: str, not_found: str = "not found"
) -> AsyncIterator[None]:
    """Ends the call with NOT_FOUND or UNAVAILABLE when the store says so."""
    try:
        yield
    except ConversationNotFound:
        await abort(context, grpc.StatusCode.NOT_FOUND, f"conversation {conversation_id} {not_found}")
    except StoreUnavailable:
        log.error("store_unavailable", extra={"conversation_id": conversation_id})
        await abort(context, grpc.StatusCode.UNAVAILABLE, "the conversation store is unavailable; retry with backoff")


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _to_proto(conversation: Conversation) -> chat_pb2.Conversation:
    return chat_pb2.Conversation(
        conversation_id=conversation.conversation_id,
        user_id=conversation.user_id,
        messages=[
            chat_pb2.Message(
                role=_ROLES[message.role], content=message.content, create_time=_timestamp(message.created_at)
            )
            for message in conversation.messages
        ],
        create_time=_timestamp(conversation.created_at),
        update_time=_timestamp(conversation.updated_at),
        usage=chat_pb2.Usage(
            input_tokens=conversation.input_tokens,
            output_tokens=conversation.output_tokens,
            total_tokens=conversation.input_tokens + conversation.output_tokens,
        ),
    )
