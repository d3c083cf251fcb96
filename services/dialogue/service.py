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

import grpc
from google.protobuf import timestamp_pb2

from chatmesh.dialogue.coalesce import coalesce
from chatmesh.dialogue.context_window import (
    Budget,
    MessageTooLong,
    Window,
    build_window,
    counted,
    image_proto,
    stored_image,
)
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
    TurnHistory,
    TurnInProgress,
)
from chatmesh.dialogue.summary import Summarizer
from chatmesh.dialogue.tokens import OFF_LOOP_TEXT_CHARS, TokenCounter, context_tokens
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
        tokens: TokenCounter,
        summaries: Summarizer,
        background: BackgroundTasks,
    ) -> None:
        self._settings = settings
        self._spend = spend
        self._store = store
        self._model = model
        self._safety = safety
        self._cache = cache
        self._tokens = tokens
        self._summaries = summaries
        # Cache stores and summaries run after the caller has its reply.
        self._background = background

    async def Turn(
        self, request: dialogue_pb2.TurnRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Runs the turn as named steps: `_open` (the conversation's history, under its turn lock, and the
        window the model will see), `_gate` (the input screened while the cache is asked and the tenant's
        worst case reserved; with an idempotency key, its claim), then one of `_refuse_input`,
        `_answer_from_cache` and `_answer_from_model`, each of which commits the turn; after the caller has
        its reply, `_after_reply` stores the answer in the cache and summarizes what no longer fits.

        With an idempotency key, a committed turn is replayed, a running one is ABORTED; a claimed one that
        does not commit is released, for a retry to run it anew. A turn that does not commit releases the
        conversation's turn lock."""
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
            if scope.lock is not None and not scope.committed:
                self._background.spawn(
                    self._store.abandon_turn(scope.tenant, scope.conversation_id, scope.lock), "abandon_turn"
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
        turn = await self._open(request, context, scope, seconds_left)
        gate = await self._gate(context, turn, claim)
        if gate.replay is not None:
            for event in _replay(gate.replay, turn.request_id):
                yield event
            return
        if gate.calls_model:
            # Started comes with the model's first answer: it names the model that answered (a fallback's, maybe).
            async for event in self._answer_from_model(context, turn, screened=gate.verdict is not None):
                yield event
            return
        yield _started(turn, turn.model)
        if gate.verdict is not None and gate.verdict.blocked:
            yield await self._refuse_input(context, turn, gate.verdict)
            return
        assert gate.cached is not None
        async for event in self._answer_from_cache(context, turn, gate.cached):
            yield event

    async def _open(
        self,
        request: dialogue_pb2.TurnRequest,
        context: grpc.aio.ServicerContext,
        scope: _TurnScope,
        seconds_left: float,
    ) -> _Turn:
        """The step `window`: opens an existing conversation under its turn lock (ABORTED while another turn
        holds it), and builds the window the model will see (INVALID_ARGUMENT when the message cannot fit)."""
        chat = request.request
        model = chat.options.model or self._settings.default_model
        annotate(model=model)
        history = None
        if not scope.new:
            async with _store_errors(context, scope.conversation_id):
                history = await self._store.open_turn(
                    scope.tenant,
                    scope.conversation_id,
                    chat.user_id,
                    limit=self._settings.window_max_messages,
                    lease_seconds=seconds_left + _LEASE_MARGIN_SECONDS,
                )
            scope.lock = history.lock
        limits = Limits.from_proto(request.limits)
        max_tokens = self._spend.bounded_max_tokens(
            limits, chat.options.max_tokens if chat.options.HasField("max_tokens") else None
        )
        budget = self._budget(model, max_tokens)
        if budget.prompt_tokens <= 0:
            await abort_with(
                context,
                invalid_argument(
                    [("options.max_tokens", f"leaves no room for a prompt in {model}'s {budget.context_tokens} tokens")]
                ),
            )
        new_message = StoredMessage(
            role="user",
            content=chat.message,
            created_at=time.time(),
            images=tuple(stored_image(image) for image in chat.images),
        )
        try:
            new_message, window = await self._window(model, budget, chat, history, new_message)
        except MessageTooLong as too_long:
            await abort_with(
                context,
                invalid_argument(
                    [
                        (
                            "message",
                            f"is {too_long.tokens} tokens, and {model}'s context has room for {too_long.available} "
                            f"beside the system prompt and a reply of {budget.reply_tokens}",
                        )
                    ]
                ),
            )
            raise
        spend = SpendScope(tenant=scope.tenant, limits=limits, request_id=request.request_id)
        return _Turn(
            scope=scope,
            chat=chat,
            request_id=request.request_id,
            model=model,
            deadline=asyncio.get_running_loop().time() + seconds_left,
            timeout=seconds_left,
            history=history,
            new_message=new_message,
            window=window,
            model_request=self._model_request(chat, model, window, max_tokens, scope.tenant),
            spend=spend,
            answer_context=self._answer_context(scope.tenant, chat, model, window),
        )

    def _budget(self, model: str, max_tokens: int | None) -> Budget:
        settings = self._settings
        size = context_tokens(settings.model_context_tokens, settings.default_context_tokens, model)
        reply_tokens = max_tokens or min(settings.window_reply_tokens, size // 2)
        return Budget(size, reply_tokens, settings.window_margin_tokens)

    async def _window(
        self,
        model: str,
        budget: Budget,
        chat: chat_pb2.ChatRequest,
        history: TurnHistory | None,
        new_message: StoredMessage,
    ) -> tuple[StoredMessage, Window]:
        """The new message with its tokens, and the window; counted in a worker thread when the text to count
        is long, or the model's encoding is still to be loaded. Raises MessageTooLong."""

        def build() -> tuple[StoredMessage, Window]:
            counted_message = counted(self._tokens, model, new_message)
            window = build_window(
                self._tokens,
                model,
                budget,
                system_prompt=chat.options.system_prompt,
                summary=history.summary if history is not None else None,
                history=history.messages if history is not None else [],
                new_messages=[counted_message],
            )
            return counted_message, window

        if not self._tokens.loaded(model) or len(chat.message) + len(chat.options.system_prompt) > OFF_LOOP_TEXT_CHARS:
            return await asyncio.to_thread(build)
        return build()

    async def _gate(
        self, context: grpc.aio.ServicerContext, turn: _Turn, claim: asyncio.Future[TurnClaim] | None
    ) -> _Gate:
        """The steps `screen` and `cache`: screens the input while the cache is asked and, once it misses, the
        tenant's worst case is reserved; then waits for the idempotency claim."""
        lookup = (
            asyncio.ensure_future(self._lookup(turn.answer_context, turn.deadline)) if turn.answer_context else None
        )
        reservation = self._spend.start_reservation(turn.spend, turn.model_request, turn.timeout, lookup)
        reservation_used = False
        try:
            try:
                verdict = await self._screen_input(turn.chat.message, turn.request_id, turn.deadline, turn.chat.images)
            except SafetyUnavailable:
                if lookup is not None:
                    lookup.cancel()
                annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
                await abort(
                    context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff"
                )
                raise
            cached = await lookup if lookup is not None else None
            calls_model = not (verdict is not None and verdict.blocked) and cached is None
            replay = None if claim is None else await self._replay_of(context, turn.scope, claim)
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
                self._spend.release_unused(turn.spend, turn.model_request, reservation)
        return _Gate(verdict=verdict, cached=cached, replay=replay, calls_model=calls_model and replay is None)

    async def _refuse_input(
        self, context: grpc.aio.ServicerContext, turn: _Turn, verdict: safety_pb2.Verdict
    ) -> chat_pb2.ChatEvent:
        """A refused input is committed as refused (its text not kept), and the model is not called."""
        refused = StoredMessage(role="user", content="", created_at=turn.new_message.created_at, refused=True)
        completed = _content_filtered(chat_pb2.ContentFilter.STAGE_INPUT, verdict.categories, chat_pb2.Usage())
        await self._commit(context, turn, refused, _refused_reply(), completed)
        annotate(input_tokens=0, output_tokens=0)
        return completed

    async def _answer_from_cache(
        self, context: grpc.aio.ServicerContext, turn: _Turn, cached: cache_pb2.CachedReply
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=cached.text))
        reply = counted(self._tokens, turn.model, StoredMessage("assistant", cached.text, time.time()))
        completed = chat_pb2.ChatEvent(
            completed=chat_pb2.Completed(
                finish_reason=cached.finish_reason, usage=chat_pb2.Usage(), cost_usd=0.0, cached=True
            )
        )
        await self._commit(context, turn, turn.new_message, reply, completed)
        annotate(input_tokens=0, output_tokens=0)
        yield completed
        self._after_reply(turn, cached_reply=None)

    async def _answer_from_model(
        self, context: grpc.aio.ServicerContext, turn: _Turn, *, screened: bool
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The step `model`: streams the reply through the output screen (unless the turn goes unscreened),
        then commits it. However the stream ends (finished, blocked, failed, cancelled by the caller), its
        tokens are counted: the provider's usage when it came, else counted over what was sent and received."""
        progress = StreamProgress()
        model_stream = self._model.stream_chat(turn.model_request, turn.deadline, progress)
        relayed = (
            screen_output(model_stream, self._safety, turn.request_id, turn.deadline)
            if screened
            else coalesce(model_stream)
        )
        reply_parts: list[str] = []
        outcome: ModelOutcome | None = None
        blocked: OutputBlocked | None = None
        started = False
        try:
            async for item in relayed:
                if not started:
                    started = True
                    yield _started(turn, progress.model or turn.model)
                if isinstance(item, str):
                    reply_parts.append(item)
                    yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=item))
                elif isinstance(item, OutputBlocked):
                    blocked = item
                else:
                    outcome = item
        except ModelError as error:
            log.warning("model_failed", extra={"request_id": turn.request_id, "kind": error.kind.value})
            annotate(error=_MODEL_ERROR_KINDS[error.kind])
            if error.kind is ModelErrorKind.RATE_LIMITED:
                await abort_with(context, retry_later(str(error), error.retry_after))
            if error.kind is ModelErrorKind.REJECTED:
                await abort(context, *_rejection(error.http_status, turn.model))
            await abort(context, _MODEL_ERROR_CODES[error.kind], str(error))
        except SafetyUnavailable:
            log.warning("output_screen_failed", extra={"request_id": turn.request_id})
            annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff")
        finally:
            # The model that answered (a fallback's, maybe) and its deployment's price.
            answered = progress.model or turn.model
            input_tokens, output_tokens = self._spent(turn, progress)
            cost = self._model.cost_usd(answered, input_tokens, output_tokens, progress.deployment)
            self._spend.settle_later(turn.spend, answered, input_tokens, output_tokens, cost)
            if progress.outcome is None and (input_tokens or output_tokens):
                # No Completed commits these: they count for the model's metrics and the conversation here.
                self._model.record_unfinished(answered, input_tokens, output_tokens, progress.deployment)
                if turn.history is not None and blocked is None:
                    self._background.spawn(
                        self._store.add_usage(
                            turn.scope.tenant, turn.scope.conversation_id, input_tokens, output_tokens
                        ),
                        "add_usage",
                    )
        usage = chat_pb2.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        usage.total_tokens = input_tokens + output_tokens
        if blocked is not None:
            completed = _content_filtered(chat_pb2.ContentFilter.STAGE_OUTPUT, blocked.categories, usage, cost)
            await self._commit(context, turn, turn.new_message, _refused_reply(), completed, answered)
            annotate(input_tokens=input_tokens, output_tokens=output_tokens)
            yield completed
            return
        assert outcome is not None
        reply_text = "".join(reply_parts)
        reply = counted(self._tokens, turn.model, StoredMessage("assistant", reply_text, time.time()))
        finish_reason = _FINISH_REASONS.get(outcome.finish_reason, chat_pb2.FINISH_REASON_UNSPECIFIED)
        completed = chat_pb2.ChatEvent(
            completed=chat_pb2.Completed(finish_reason=finish_reason, usage=usage, cost_usd=cost)
        )
        await self._commit(context, turn, turn.new_message, reply, completed, answered)
        annotate(input_tokens=input_tokens, output_tokens=output_tokens)
        yield completed
        # A reply that went out unscreened (safety down, fail-open) is not kept for callers that safety would
        # screen, nor one of a fallback model for callers of the model they asked for.
        cacheable = screened and finish_reason == chat_pb2.FINISH_REASON_STOP and answered == turn.model
        self._after_reply(
            turn,
            cached_reply=cache_pb2.CachedReply(
                text=reply_text, finish_reason=finish_reason, output_tokens=output_tokens
            )
            if cacheable
            else None,
        )

    def _spent(self, turn: _Turn, progress: StreamProgress) -> tuple[int, int]:
        """The (input, output) tokens of a model call: the provider's usage when it came; else, when text was
        streamed, the window's tokens and those of the text received; else none (the provider answered with
        an error, or never answered, and bills nothing)."""
        if progress.outcome is not None:
            return progress.outcome.input_tokens, progress.outcome.output_tokens
        if progress.chunks:
            return turn.window.prompt_tokens, self._tokens.count_text(turn.model, "".join(progress.text))
        return 0, 0

    def _after_reply(self, turn: _Turn, *, cached_reply: cache_pb2.CachedReply | None) -> None:
        """Runs once the caller has the Completed event, off the reply's path: the steps `cache` (store the
        answer) and `summary` (when what no longer fits the window has grown past the trigger)."""
        if cached_reply is not None and turn.answer_context is not None:
            self._background.spawn(self._store_answer(turn.answer_context, cached_reply), "cache_store")
        if self._summaries.due(turn.history, turn.window):
            assert turn.history is not None
            self._background.spawn(
                self._summaries.summarize(
                    turn.scope.tenant,
                    turn.scope.conversation_id,
                    turn.chat.user_id,
                    turn.history,
                    turn.window,
                    turn.model,
                ),
                "summarize",
            )

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
        self, chat: chat_pb2.ChatRequest, model: str, window: Window, max_tokens: int | None, tenant: str
    ) -> ModelRequest:
        return ModelRequest(
            model=model,
            messages=window.messages,
            max_tokens=max_tokens,
            user=provider_user(self._settings.log_user_id_salt.get_secret_value(), tenant, chat.user_id),
            prompt_tokens=window.prompt_tokens,
            **model_options(chat.options),
        )

    def _answer_context(
        self, tenant: str, chat: chat_pb2.ChatRequest, model: str, window: Window
    ) -> cache_pb2.AnswerContext | None:
        """What the cache keys an answer by; None when this request's answer may not be cached: a temperature
        above the cache's bound, images in the turn or its window (never looked up nor stored), or a summary
        in the window."""
        options = chat.options
        if (
            chat.images
            or window.with_summary
            or any(message.images for message in window.history)
            or (options.HasField("temperature") and options.temperature > self._settings.cache_max_temperature)
        ):
            metrics.dialogue_cache_lookup("skipped")
            return None
        context = cache_pb2.AnswerContext(
            tenant=tenant,
            model=model,
            system_prompt=options.system_prompt,
            stop=options.stop,
            messages=[
                *(cache_pb2.ContextMessage(role=_ROLES[m.role], content=m.content) for m in window.history),
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
        turn: _Turn,
        user_message: StoredMessage,
        reply: StoredMessage,
        completed: chat_pb2.ChatEvent,
        model: str | None = None,
    ) -> None:
        """The step `commit`: appends the turn (with the usage of its Completed) and releases the conversation;
        with an idempotency key, together with what a retry is to be answered (`model`: the one that answered,
        by default the one asked for)."""
        scope = turn.scope
        usage = completed.completed.usage
        committed = CommittedTurn(
            messages=(user_message, reply),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        idempotency = None
        if scope.key is not None:
            text = "" if reply.refused else reply.content
            replay = _replay_record(scope.conversation_id, model or turn.model, text, completed)
            idempotency = replace(scope.key, replay=replay)
        async with _store_errors(context, scope.conversation_id, "was deleted while the turn ran"):
            try:
                await self._store.commit_turn(
                    scope.tenant,
                    scope.conversation_id,
                    scope.user_id,
                    committed,
                    new=scope.new,
                    lock=scope.lock,
                    idempotency=idempotency,
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
        start = _page_start(request.page_token)
        if start is None:
            await abort_with(
                context, invalid_argument([("page_token", "is not one that GetConversation returned; omit it")])
            )
            raise AssertionError("unreachable")
        async with _store_errors(context, request.conversation_id):
            conversation = await self._store.get(
                scoped.tenant,
                request.conversation_id,
                request.user_id,
                start=start,
                limit=request.page_size or _DEFAULT_PAGE_SIZE,
            )
        next_token = "" if conversation.next_index is None else _page_token(conversation.next_index)
        return chat_pb2.GetConversationResponse(conversation=_to_proto(conversation), next_page_token=next_token)

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


@contextlib.asynccontextmanager
async def _store_errors(
    context: grpc.aio.ServicerContext, conversation_id: str, not_found: str = "not found"
) -> AsyncIterator[None]:
    """Ends the call with NOT_FOUND or UNAVAILABLE when the store says so."""
    try:
        yield
    except ConversationNotFound:
        await abort(context, grpc.StatusCode.NOT_FOUND, f"conversation {conversation_id} {not_found}")
    except TurnInProgress:
        await abort(
            context,
            grpc.StatusCode.ABORTED,
            f"another turn on conversation {conversation_id} is in progress; retry once it has ended",
        )
    except StoreUnavailable:
        log.error("store_unavailable", extra={"conversation_id": conversation_id})
        annotate(error=ErrorKind.STORE_UNAVAILABLE)
        await abort(context, grpc.StatusCode.UNAVAILABLE, "the conversation store is unavailable; retry with backoff")


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


# GetConversation's pages: 50 messages unless the caller asks for another size (at most 200, which the
# gateway checks); a page token is the number of the next page's first message.
_DEFAULT_PAGE_SIZE = 50
_PAGE_TOKEN_PREFIX = "p"


def _page_token(index: int) -> str:
    return base64.urlsafe_b64encode(f"{_PAGE_TOKEN_PREFIX}{index}".encode()).decode().rstrip("=")


def _page_start(token: str) -> int | None:
    """The first message of the page `token` names (0 for none), or None for a token this service never gave."""
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    number = text.removeprefix(_PAGE_TOKEN_PREFIX)
    return int(number) if text.startswith(_PAGE_TOKEN_PREFIX) and number.isdecimal() else None


def _to_proto(conversation: Conversation) -> chat_pb2.Conversation:
    summary = conversation.summary
    return chat_pb2.Conversation(
        conversation_id=conversation.conversation_id,
        user_id=conversation.user_id,
        messages=[
            chat_pb2.Message(
                role=_ROLES[message.role],
                content=message.content,
                create_time=_timestamp(message.created_at),
                refused=message.refused,
                images=[image_proto(image) for image in message.images],
            )
            for message in conversation.messages
        ],
        summary=None
        if summary is None
        else chat_pb2.Summary(
            text=summary.text, message_count=summary.message_count, update_time=_timestamp(summary.updated_at)
        ),
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


def _content_filtered(
    stage: chat_pb2.ContentFilter.Stage, categories: Sequence[str], usage: chat_pb2.Usage, cost: float = 0.0
) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        completed=chat_pb2.Completed(
            finish_reason=chat_pb2.FINISH_REASON_CONTENT_FILTER,
            usage=usage,
            cost_usd=cost,
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
    # The conversation's turn lock, once an existing conversation is opened.
    lock: str | None = None

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


@dataclass(frozen=True, slots=True)
class _Turn:
    """A turn once its conversation is opened and its window built: what every later step works from."""

    scope: _TurnScope
    chat: chat_pb2.ChatRequest
    request_id: str
    model: str
    deadline: float  # loop.time()
    timeout: float  # seconds
    history: TurnHistory | None  # None for a new conversation
    new_message: StoredMessage
    window: Window
    model_request: ModelRequest
    spend: SpendScope
    answer_context: cache_pb2.AnswerContext | None


def _started(turn: _Turn, model: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        started=chat_pb2.Started(conversation_id=turn.scope.conversation_id, request_id=turn.request_id, model=model)
    )


@dataclass(frozen=True, slots=True)
class _Gate:
    """What the input's screen, the cache and the idempotency claim decided: `verdict` None means the turn
    goes unscreened (safety down, fail-open); `calls_model` whether the model answers."""

    verdict: safety_pb2.Verdict | None
    cached: cache_pb2.CachedReply | None
    replay: str | None
    calls_model: bool


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
