"""DialogueService: runs a turn (screen, window, cache or model, commit) and serves history."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from chatmesh.dialogue.coalesce import coalesce
from chatmesh.dialogue.content import user_content
from chatmesh.dialogue.context_window import build_messages
from chatmesh.dialogue.model_options import model_options, provider_user, response_format_param
from chatmesh.dialogue.output_screen import OutputBlocked, SafetyUnavailable, screen_output
from chatmesh.dialogue.spend import SpendLedger, SpendScope
from chatmesh.dialogue.store import (
    ClaimState,
    CommittedTurn,
    Conversation,
    ConversationNotFound,
    ConversationStore,
    IdempotencyKey,
    StoredMessage,
    StoreUnavailable,
    TurnAlreadyCommitted,
    TurnClaim,
)
from chatmesh.runtime import metrics, regions
from chatmesh.runtime.access_log import ErrorKind
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.model_client import (
    ModelClient,
    ModelError,
    ModelErrorKind,
    ModelOutcome,
    ModelRequest,
    StreamProgress,
    cost_usd,
)
from chatmesh.runtime.settings import Settings
from chatmesh.runtime.status import Refused, abort, abort_with, invalid_argument, retry_later
from chatmesh.runtime.tasks import BackgroundTasks
from chatmesh.tenancy.ledger import LedgerUnavailable
from chatmesh.tenancy.limits import Limits
from chatmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    chat_pb2,
    dialogue_pb2,
    dialogue_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)

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
}

_MODEL_ERROR_KINDS = {
    ModelErrorKind.RATE_LIMITED: ErrorKind.MODEL_RATE_LIMITED,
    ModelErrorKind.UNAVAILABLE: ErrorKind.MODEL_UNAVAILABLE,
    ModelErrorKind.TIMEOUT: ErrorKind.MODEL_TIMEOUT,
    ModelErrorKind.REJECTED: ErrorKind.MODEL_REJECTED,
}


class DialogueServicer(dialogue_pb2_grpc.DialogueServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        model: ModelClient,
        safety: safety_pb2_grpc.SafetyServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
        spend: SpendLedger,
        background: BackgroundTasks,
    ) -> None:
        self._settings = settings
        self._spend = spend
        self._store = store
        self._model = model
        self._safety = safety
        self._cache = cache
        # Cache stores run after the caller has its reply.
        self._background = background

    async def Turn(
        self, request: dialogue_pb2.TurnRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Runs the turn. With an idempotency key, it is claimed while the input is screened and the cache
        asked, and before anything is sent: a committed turn is replayed, a running one is ABORTED; a claimed
        one that does not commit is released, for a retry to run it anew."""
        scope = _TurnScope.of(request, self._settings.region)
        annotate(request_id=request.request_id, tenant=scope.tenant, user_id=scope.user_id)
        timeout = downstream_timeout(context, self._settings.default_deadline_seconds)
        claim = asyncio.ensure_future(self._claim(scope, timeout)) if scope.key is not None else None
        try:
            async for event in self._run_turn(request, context, scope, timeout, claim):
                yield event
        finally:
            if claim is not None and not claim.done():
                claim.cancel()  # a claim that was made all the same lapses with its lease
            if scope.key is not None and scope.claimed and not scope.committed:
                self._background.spawn(
                    self._store.release_turn(scope.tenant, scope.conversation_id, scope.key), "release_turn"
                )

    async def _claim(self, scope: _TurnScope, seconds_left: float) -> TurnClaim:
        assert scope.key is not None
        claim = await self._store.claim_turn(
            scope.tenant, scope.conversation_id, scope.key, lease_seconds=seconds_left + _LEASE_MARGIN_SECONDS
        )
        scope.claimed = claim.state is ClaimState.CLAIMED
        return claim

    async def _replay_of(
        self, context: grpc.aio.ServicerContext, scope: _TurnScope, pending: asyncio.Future[TurnClaim]
    ) -> str | None:
        """The committed turn's replay, or None when this attempt holds the claim; ends the call when another
        attempt holds it, or the key was used for another request."""
        async with _store_errors(context, scope.conversation_id):
            claim = await pending
        if claim.state is ClaimState.RUNNING:
            await abort(
                context,
                grpc.StatusCode.ABORTED,
                "a turn with this idempotency_key is still running; retry once it has ended",
            )
        if claim.state is ClaimState.MISMATCH:
            await abort_with(
                context, invalid_argument([("idempotency_key", "was already used for a different request")])
            )
        return claim.replay if claim.state is ClaimState.COMMITTED else None

    async def _run_turn(
        self,
        request: dialogue_pb2.TurnRequest,
        context: grpc.aio.ServicerContext,
        scope: _TurnScope,
        seconds_left: float,
        claim: asyncio.Future[TurnClaim] | None,
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Screen the input while looking in the cache; answer from the cache, or reserve the model call's
        worst case under the tenant's limits and stream from the model through the output screen; commit
        the turn; settle the model's usage and store a cacheable reply once the caller has it."""
        timeout = seconds_left
        deadline = asyncio.get_running_loop().time() + timeout
        chat = request.request
        request_id = request.request_id
        tenant = scope.tenant
        model = chat.options.model or self._settings.default_model
        annotate(model=model)
        new = scope.new
        conversation_id = scope.conversation_id
        history: list[StoredMessage] = []
        if not new:
            async with _store_errors(context, conversation_id):
                history = await self._store.recent_messages(
                    tenant, conversation_id, chat.user_id, self._settings.context_window_messages
                )
        window = [message for message in history if not message.refused]
        answer_context = self._answer_context(tenant, chat, model, window)
        started_at = time.time()

        spend = SpendScope(tenant=tenant, limits=Limits.from_proto(request.limits), request_id=request_id)
        model_request = self._model_request(chat, model, window, spend.limits, tenant)
        # Screening runs with the cache lookup and, once it misses, the reservation under the tenant's limits.
        lookup = asyncio.ensure_future(self._lookup(answer_context, deadline)) if answer_context else None
        reservation = self._spend.start_reservation(spend, model_request, timeout, lookup)
        reservation_used = False
        try:
            try:
                verdict = await self._screen_input(chat.message, request_id, deadline, chat.images)
            except SafetyUnavailable:
                if lookup is not None:
                    lookup.cancel()
                annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
                await abort(
                    context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff"
                )
            cached = await lookup if lookup is not None else None
            blocked_input = verdict is not None and verdict.blocked
            calls_model = not blocked_input and cached is None
            replay = None if claim is None else await self._replay_of(context, scope, claim)
            if reservation is not None and calls_model and replay is None:
                try:
                    await reservation
                except Refused as refused:
                    await abort_with(context, refused.status)
                reservation_used = True
        finally:
            # A reservation the model call will not use (cached answer, refused input, failure, cancel) is
            # released once made.
            if reservation is not None and not reservation_used:
                self._spend.release_unused(spend, model_request, reservation)
        if replay is not None:
            for event in _replay(replay, request_id):
                yield event
            return
        try:
            yield chat_pb2.ChatEvent(
                started=chat_pb2.Started(conversation_id=conversation_id, request_id=request_id, model=model)
            )
        except BaseException:
            # The caller went away before the model was called: release the reservation now, not at its expiry.
            if calls_model:
                self._spend.settle_later(spend, model_request, StreamProgress())
            raise

        user_message = StoredMessage(role="user", content=chat.message, created_at=started_at)
        if blocked_input:
            assert verdict is not None
            refused = StoredMessage(role="user", content="", created_at=started_at, refused=True)
            completed = _content_filtered(chat_pb2.ContentFilter.STAGE_INPUT, verdict.categories)
            await self._commit(context, scope, model, refused, _refused_reply(), completed)
            annotate(input_tokens=0, output_tokens=0)
            yield completed
            return
        if cached is not None:
            yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=cached.text))
            reply = StoredMessage(role="assistant", content=cached.text, created_at=time.time())
            completed = chat_pb2.ChatEvent(
                completed=chat_pb2.Completed(
                    finish_reason=cached.finish_reason, usage=chat_pb2.Usage(), cost_usd=0.0, cached=True
                )
            )
            await self._commit(context, scope, model, user_message, reply, completed)
            annotate(input_tokens=0, output_tokens=0)
            yield completed
            return

        progress = StreamProgress()
        model_stream = self._model.stream_chat(model_request, deadline, progress)
        relayed = (
            coalesce(model_stream)
            if verdict is None
            else screen_output(model_stream, self._safety, request_id, deadline)
        )
        reply_parts: list[str] = []
        outcome = ModelOutcome()
        blocked: OutputBlocked | None = None
        try:
            async for item in relayed:
                if isinstance(item, str):
                    reply_parts.append(item)
                    yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=item))
                elif isinstance(item, OutputBlocked):
                    blocked = item
                else:
                    outcome = item
        except ModelError as error:
            log.warning("model_failed", extra={"request_id": request_id, "kind": error.kind.value})
            annotate(error=_MODEL_ERROR_KINDS[error.kind])
            if error.kind is ModelErrorKind.RATE_LIMITED:
                await abort_with(context, retry_later(str(error), error.retry_after))
            if error.kind is ModelErrorKind.REJECTED:
                await abort(context, *_rejection(error.http_status, model))
            await abort(context, _MODEL_ERROR_CODES[error.kind], str(error))
        except SafetyUnavailable:
            log.warning("output_screen_failed", extra={"request_id": request_id})
            annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff")
        finally:
            # However the stream ended (finished, blocked, failed, or cancelled by the caller), the tokens
            # the model produced are settled against the tenant.
            self._spend.settle_later(spend, model_request, progress)

        if blocked is not None:
            completed = _content_filtered(chat_pb2.ContentFilter.STAGE_OUTPUT, blocked.categories)
            await self._commit(context, scope, model, user_message, _refused_reply(), completed)
            annotate(input_tokens=0, output_tokens=0)
            yield completed
            return
        reply_text = "".join(reply_parts)
        reply = StoredMessage(role="assistant", content=reply_text, created_at=time.time())
        finish_reason = _FINISH_REASONS.get(outcome.finish_reason, chat_pb2.FINISH_REASON_UNSPECIFIED)
        completed = chat_pb2.ChatEvent(
            completed=chat_pb2.Completed(
                finish_reason=finish_reason,
                usage=chat_pb2.Usage(
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                    total_tokens=outcome.input_tokens + outcome.output_tokens,
                ),
                cost_usd=self._cost_usd(model, outcome),
            )
        )
        await self._commit(
            context, scope, model, user_message, reply, completed, outcome.input_tokens, outcome.output_tokens
        )
        annotate(input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens)
        yield completed
        # Runs once the caller has the Completed event: off the reply's path. A reply that went out
        # unscreened (safety down, fail-open) is not kept for callers that safety would screen.
        if answer_context is not None and verdict is not None and finish_reason == chat_pb2.FINISH_REASON_STOP:
            cached_reply = cache_pb2.CachedReply(
                text=reply_text, finish_reason=finish_reason, output_tokens=outcome.output_tokens
            )
            self._background.spawn(self._store_answer(answer_context, cached_reply), "cache_store")

    async def _screen_input(
        self, text: str, request_id: str, deadline: float, images: Sequence[chat_pb2.Image] = ()
    ) -> safety_pb2.Verdict | None:
        """The input's verdict; None when safety cannot be reached and the operator chose fail-open, in
        which case the whole turn goes unscreened. Raises SafetyUnavailable otherwise."""
        try:
            response = await self._safety.ScreenInput(
                safety_pb2.ScreenInputRequest(text=text, request_id=request_id, images=images),
                timeout=deadline - asyncio.get_running_loop().time(),
            )
        except grpc.aio.AioRpcError as error:
            log.error("safety_unavailable", extra={"request_id": request_id, "grpc_code": error.code().name})
            if self._settings.safety_fail_open:
                return None
            raise SafetyUnavailable(error.code().name) from error
        return response.verdict

    def _model_request(
        self, chat: chat_pb2.ChatRequest, model: str, window: list[StoredMessage], limits: Limits, tenant: str
    ) -> ModelRequest:
        options = chat.options
        messages: list[dict[str, Any]] = list(build_messages(options.system_prompt, window, chat.message))
        if chat.images:
            # The new message, last, goes as content parts: its text, then its images.
            messages[-1] = {"role": "user", "content": user_content(chat.message, chat.images)}
        return ModelRequest(
            model=model,
            messages=messages,
            max_tokens=self._spend.bounded_max_tokens(
                limits, options.max_tokens if options.HasField("max_tokens") else None
            ),
            user=provider_user(self._settings.log_user_id_salt.get_secret_value(), tenant, chat.user_id),
            **model_options(options),
        )

    def _answer_context(
        self, tenant: str, chat: chat_pb2.ChatRequest, model: str, window: list[StoredMessage]
    ) -> cache_pb2.AnswerContext | None:
        """What the cache keys an answer by; None when this request's answer may not be cached: a temperature
        above the cache's bound, or images (a turn with images is never looked up nor stored)."""
        options = chat.options
        if chat.images or (
            options.HasField("temperature") and options.temperature > self._settings.cache_max_temperature
        ):
            metrics.dialogue_cache_lookup("skipped")
            return None
        context = cache_pb2.AnswerContext(
            tenant=tenant,
            model=model,
            system_prompt=options.system_prompt,
            stop=options.stop,
            messages=[
                *(cache_pb2.ContextMessage(role=_ROLES[m.role], content=m.content) for m in window),
                cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=chat.message),
            ],
        )
        for name in ("temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty"):
            if options.HasField(name):
                setattr(context, name, getattr(options, name))
        context.logit_bias.update(options.logit_bias)
        # Plain text, however it is said (unset, TYPE_UNSPECIFIED, TYPE_TEXT), is one context.
        if response_format_param(options.response_format) is not None:
            context.response_format.CopyFrom(options.response_format)
        return context

    async def _lookup(self, answer_context: cache_pb2.AnswerContext, deadline: float) -> cache_pb2.CachedReply | None:
        """The cached reply, or None: a cache that fails or is slow is a miss, logged, never the caller's error."""
        timeout = min(self._settings.cache_lookup_timeout_seconds, deadline - asyncio.get_running_loop().time())
        try:
            response = await self._cache.Lookup(cache_pb2.LookupRequest(context=answer_context), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("cache_lookup_failed", extra={"grpc_code": error.code().name})
            metrics.dialogue_cache_lookup("error")
            return None
        metrics.dialogue_cache_lookup("hit" if response.hit else "miss")
        return response.reply if response.hit else None

    async def _store_answer(self, answer_context: cache_pb2.AnswerContext, reply: cache_pb2.CachedReply) -> None:
        try:
            await self._cache.Store(
                cache_pb2.StoreRequest(context=answer_context, reply=reply),
                timeout=self._settings.cache_lookup_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache_store_failed", extra={"grpc_code": error.code().name})

    async def _commit(
        self,
        context: grpc.aio.ServicerContext,
        scope: _TurnScope,
        model: str,
        user_message: StoredMessage,
        reply: StoredMessage,
        completed: chat_pb2.ChatEvent,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Commits the turn; with an idempotency key, together with what a retry is to be answered."""
        turn = CommittedTurn(
            user_message=user_message, reply=reply, input_tokens=input_tokens, output_tokens=output_tokens
        )
        idempotency = None
        if scope.key is not None:
            replay = _replay_record(scope.conversation_id, model, "" if reply.refused else reply.content, completed)
            idempotency = replace(scope.key, replay=replay)
        async with _store_errors(context, scope.conversation_id, "was deleted while the turn ran"):
            try:
                await self._store.commit_turn(
                    scope.tenant, scope.conversation_id, scope.user_id, turn, new=scope.new, idempotency=idempotency
                )
            except TurnAlreadyCommitted:
                await abort(
                    context,
                    grpc.StatusCode.ABORTED,
                    "another attempt with this idempotency_key committed the turn first; retry to get its reply",
                )
        scope.committed = True

    async def GetConversation(
        self, scoped: dialogue_pb2.TenantGetConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetConversationResponse:
        request = scoped.request
        annotate(tenant=scoped.tenant, user_id=request.user_id)
        async with _store_errors(context, request.conversation_id):
            conversation = await self._store.get(scoped.tenant, request.conversation_id, request.user_id)
        return chat_pb2.GetConversationResponse(conversation=_to_proto(conversation))

    async def DeleteConversation(
        self, scoped: dialogue_pb2.TenantDeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteConversationResponse:
        request = scoped.request
        annotate(tenant=scoped.tenant, user_id=request.user_id)
        async with _store_errors(context, request.conversation_id):
            await self._store.delete(scoped.tenant, request.conversation_id, request.user_id)
        return chat_pb2.DeleteConversationResponse()

    async def GetTokenUsage(
        self, request: dialogue_pb2.GetTokenUsageRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetUsageResponse:
        annotate(tenant=request.tenant)
        try:
            return await self._spend.usage(request.tenant, Limits.from_proto(request.limits))
        except LedgerUnavailable:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "usage cannot be read right now; retry with backoff")
            raise

    def _cost_usd(self, model: str, outcome: ModelOutcome) -> float:
        """Priced by the longest entry of the price table that the model name starts with, so that
        dated snapshots ("gpt-4o-mini-2024-07-18") take their family's price; unknown models cost 0.
        The same function prices `chatmesh_model_cost_usd_total` (chatmesh.runtime.model_client)."""
        return cost_usd(self._settings.model_prices_usd_per_million, model, outcome.input_tokens, outcome.output_tokens)


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
        annotate(error=ErrorKind.STORE_UNAVAILABLE)
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
                role=_ROLES[message.role],
                content=message.content,
                create_time=_timestamp(message.created_at),
                refused=message.refused,
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


def _rejection(http_status: int | None, model: str) -> tuple[grpc.StatusCode, str]:
    """What a caller is told when the model provider refused the request itself."""
    if http_status == 404:
        return grpc.StatusCode.INVALID_ARGUMENT, f"options.model: the model provider has no model {model!r}"
    if http_status in (400, 422):
        return grpc.StatusCode.INVALID_ARGUMENT, f"the model provider found the request invalid (HTTP {http_status})"
    if http_status in (401, 403):
        return (
            grpc.StatusCode.FAILED_PRECONDITION,
            "the model provider refused chatmesh's credentials; its operator must check OPENAI_API_KEY",
        )
    return grpc.StatusCode.FAILED_PRECONDITION, f"the model provider rejected the request (HTTP {http_status})"


def _refused_reply() -> StoredMessage:
    return StoredMessage(role="assistant", content="", created_at=time.time(), refused=True)


def _content_filtered(stage: chat_pb2.ContentFilter.Stage, categories: list[str]) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        completed=chat_pb2.Completed(
            finish_reason=chat_pb2.FINISH_REASON_CONTENT_FILTER,
            usage=chat_pb2.Usage(),
            content_filter=chat_pb2.ContentFilter(stage=stage, categories=categories),
        )
    )


# A claim outlives its attempt's deadline by this much (an attempt is cancelled at its deadline, and a
# commit already sent lands within moments): an attempt whose process died is then taken over.
_LEASE_MARGIN_SECONDS = 5.0


@dataclass(slots=True)
class _TurnScope:
    """Whose turn it is, in which conversation, under which idempotency key; whether this attempt holds the
    key's claim, and whether the turn is committed."""

    tenant: str
    user_id: str
    conversation_id: str
    new: bool
    key: IdempotencyKey | None
    claimed: bool = False
    committed: bool = False

    @classmethod
    def of(cls, request: dialogue_pb2.TurnRequest, region: str) -> _TurnScope:
        chat = request.request
        key = None
        conversation_id = chat.conversation_id
        if chat.idempotency_key:
            fingerprint = hashlib.sha256(chat.SerializeToString(deterministic=True)).hexdigest()[:32]
            key = IdempotencyKey(chat.idempotency_key, fingerprint)
            # A retried first turn must find the conversation its first attempt created: its id comes from
            # the key (which the tenant's caller keeps unique), not from chance.
            if not conversation_id:
                seed = f"{request.tenant}\x00{chat.idempotency_key}".encode()
                conversation_id = regions.conversation_id(region, hashlib.sha256(seed).hexdigest()[:32])
        return cls(
            tenant=request.tenant,
            user_id=chat.user_id,
            conversation_id=conversation_id or regions.conversation_id(region, uuid.uuid4().hex),
            new=not chat.conversation_id,
            key=key,
        )


def _replay_record(conversation_id: str, model: str, text: str, completed: chat_pb2.ChatEvent) -> str:
    """What a retry with the same idempotency key is answered, as the store keeps it."""
    return json.dumps(
        {
            "conversation_id": conversation_id,
            "model": model,
            "text": text,
            "completed": base64.b64encode(completed.completed.SerializeToString()).decode(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _replay(record: str, request_id: str) -> list[chat_pb2.ChatEvent]:
    """The events of a committed turn, replayed to a retry under this call's request id."""
    data = json.loads(record)
    completed = chat_pb2.Completed.FromString(base64.b64decode(data["completed"]))
    completed.replayed = True
    events = [
        chat_pb2.ChatEvent(
            started=chat_pb2.Started(
                conversation_id=data["conversation_id"], request_id=request_id, model=data["model"]
            )
        )
    ]
    if data["text"]:
        events.append(chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=data["text"])))
    events.append(chat_pb2.ChatEvent(completed=completed))
    return events
