"""DialogueService: runs a turn (screen, window, cache or model, commit) and serves history."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from chatmesh.dialogue import metrics, tools
from chatmesh.dialogue.coalesce import coalesce
from chatmesh.dialogue.context_window import (
    Budget,
    MessageTooLong,
    Window,
    build_window,
    counted,
    image_proto,
    model_message,
    pending_tool_calls,
    stored_image,
    window_tokens,
)
from chatmesh.dialogue.grounding import Sources, citations, search_result, sources_message
from chatmesh.dialogue.knowledge.retrieval import Retrieval, RetrievedChunk, Retriever
from chatmesh.dialogue.knowledge.store import KnowledgeBaseChanging, KnowledgeStoreUnavailable
from chatmesh.dialogue.model_options import model_options, provider_user, response_format_param
from chatmesh.dialogue.output_screen import OutputBlocked, OutputVerdict, SafetyUnavailable, screen_output
from chatmesh.dialogue.redaction import Placeholders, StreamRestorer, kinds_of, redact
from chatmesh.dialogue.server_tools import KnowledgeSearch, ServerTools, ToolOutcome
from chatmesh.dialogue.spend import SpendLedger, SpendScope
from chatmesh.dialogue.store import (
    ClaimState,
    CommittedTurn,
    Conversation,
    ConversationNotFound,
    ConversationStore,
    IdempotencyKey,
    StoredMessage,
    StoredToolCall,
    StoreUnavailable,
    TurnAlreadyCommitted,
    TurnClaim,
    TurnHistory,
    TurnInProgress,
)
from chatmesh.dialogue.summary import Summarizer
from chatmesh.dialogue.tokens import OFF_LOOP_TEXT_CHARS, TokenCounter, context_tokens
from chatmesh.model.client import ModelClient, ModelOutcome, ModelRequest, StreamProgress
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.model.pricing import price_family
from chatmesh.review.store import ReviewStore, ReviewStoreUnavailable
from chatmesh.runtime import regions
from chatmesh.runtime.access_log import ErrorKind, UserIdHasher
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.metrics import OTHER
from chatmesh.runtime.settings import DialogueSettings
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

_ROLES = {"user": chat_pb2.ROLE_USER, "assistant": chat_pb2.ROLE_ASSISTANT, "tool": chat_pb2.ROLE_TOOL}

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
        settings: DialogueSettings,
        store: ConversationStore,
        model: ModelClient,
        safety: safety_pb2_grpc.SafetyServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
        spend: SpendLedger,
        tokens: TokenCounter,
        summaries: Summarizer,
        server_tools: ServerTools,
        background: BackgroundTasks,
        reviews: ReviewStore,
        retriever: Retriever,
    ) -> None:
        self._settings = settings
        self._retriever = retriever
        self._server_tools = server_tools
        # The PII policy: the kinds redacted in storage (those of `storage` and `model`), and before the model.
        self._stored_pii = kinds_of(settings.pii_policy, "storage", "model")
        self._model_pii = kinds_of(settings.pii_policy, "model")
        self._spend = spend
        self._store = store
        self._model = model
        metrics.bind_cache_savings(settings.model_prices_usd_per_million)
        self._safety = safety
        self._cache = cache
        self._tokens = tokens
        self._summaries = summaries
        # Cache stores and summaries run after the caller has its reply.
        self._background = background
        # Only erased here: DeleteConversation and EraseUser reach the review cases too.
        self._reviews = reviews
        self._hash_user_id = UserIdHasher(settings.log_user_id_salt.get_secret_value())

    async def RunTurn(
        self, request: dialogue_pb2.TurnRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dialogue_pb2.TurnEvents]:
        """The turn's events, Started sent together with the event after it (see `turn_events`)."""
        async for events in turn_events(self._turn(request, context)):
            yield events

    async def _turn(
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
        turn = self._redacted(turn, gate.pii)
        cached = gate.cached
        if gate.calls_model:
            turn = await self._grounded(context, turn)
            turn, cached = await self._look_up_similar(turn, gate)
        if cached is None and gate.calls_model:
            # Started comes with the model's first answer: it names the model that answered (a fallback's, maybe).
            async for event in self._answer_from_model(context, turn, screened=gate.verdict is not None):
                yield event
            return
        yield _started(turn, turn.model)
        if gate.verdict is not None and gate.verdict.blocked:
            yield await self._refuse_input(context, turn, gate.verdict, gate.stage)
            return
        assert cached is not None
        async for event in self._answer_from_cache(context, turn, cached):
            yield event

    async def _open(
        self,
        request: dialogue_pb2.TurnRequest,
        context: grpc.aio.ServicerContext,
        scope: _TurnScope,
        seconds_left: float,
    ) -> _Turn:
        """The step `window`: opens an existing conversation under its turn lock (ABORTED while another turn
        holds it); checks that the request's tool_results answer exactly the calls the conversation's last turn
        left to the caller, and that its server_tools exist; and builds the window the model will see from the
        history, the results and the message (INVALID_ARGUMENT when they cannot fit)."""
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
        pending = pending_tool_calls(history.messages) if history is not None else ()
        problem = tools.results_problem(chat.tool_results, pending, chat.conversation_id)
        if problem is not None:
            await abort(context, *problem)
        unknown = [
            (
                f"options.server_tools[{index}]",
                f"names no server-side tool; there are: {', '.join(self._server_tools.names())}",
            )
            for index, name in enumerate(chat.options.server_tools)
            if name not in self._server_tools
        ]
        if unknown:
            await abort_with(context, invalid_argument(unknown))
        limits = Limits.from_proto(request.limits)
        max_tokens = self._spend.bounded_max_tokens(
            limits, chat.options.max_tokens if chat.options.HasField("max_tokens") else None
        )
        knowledge_bases = tuple(dict.fromkeys(chat.options.knowledge_bases))
        # Room for the sources is kept from the start: what the window holds besides is the same with them.
        sources_room = self._settings.knowledge_context_max_tokens if knowledge_bases else 0
        budget = self._budget(model, max_tokens, sources_room)
        if budget.prompt_tokens <= 0:
            await abort_with(
                context,
                invalid_argument(
                    [("options.max_tokens", f"leaves no room for a prompt in {model}'s {budget.context_tokens} tokens")]
                ),
            )
        now = time.time()
        new_messages = tools.result_messages(chat.tool_results, pending, now)
        if chat.message or chat.images:
            images = tuple(stored_image(image) for image in chat.images)
            new_messages.append(StoredMessage(role="user", content=chat.message, created_at=now, images=images))
        offered = [
            *tools.caller_tool_definitions(chat.options),
            *self._server_tools.definitions(chat.options.server_tools),
        ]
        try:
            counted_messages, window = await self._window(model, budget, chat, history, new_messages, offered)
        except MessageTooLong as too_long:
            await abort_with(
                context,
                invalid_argument(
                    [
                        (
                            "tool_results" if not chat.message else "message",
                            f"is {too_long.tokens} tokens, and {model}'s context has room for {too_long.available} "
                            f"beside the system prompt, the tools and a reply of {budget.reply_tokens}",
                        )
                    ]
                ),
            )
            raise
        spend = SpendScope(tenant=scope.tenant, limits=limits, request_id=request.request_id)
        answer_context = self._answer_context(scope.tenant, chat, model, window)
        if answer_context is not None and knowledge_bases:
            answer_context.knowledge_versions.update(
                await self._knowledge_versions(context, scope.tenant, knowledge_bases)
            )
        model_request = self._model_request(chat, model, window, max_tokens, scope.tenant, offered)
        return _Turn(
            scope=scope,
            chat=chat,
            request_id=request.request_id,
            model=model,
            deadline=asyncio.get_running_loop().time() + seconds_left,
            timeout=seconds_left,
            history=history,
            new_messages=tuple(counted_messages),
            window=window,
            budget=budget,
            caller_tools=frozenset(tool.name for tool in chat.options.tools),
            ref=safety_pb2.TurnRef(
                tenant=scope.tenant,
                user_id=scope.user_id,
                conversation_id=scope.conversation_id,
                request_id=request.request_id,
            ),
            placeholders=Placeholders.of(
                (pair for message in (history.messages if history else ()) for pair in message.placeholders),
                kept=self._model_pii,
            ),
            # Until the sources are in, the worst case (which a tenant's limits reserve) counts all their room.
            model_request=replace(model_request, prompt_tokens=window.prompt_tokens + sources_room),
            spend=spend,
            answer_context=answer_context,
            knowledge_bases=knowledge_bases,
        )

    def _budget(self, model: str, max_tokens: int | None, sources_room: int = 0) -> Budget:
        """The window's budget; `sources_room` tokens of the prompt are left for a knowledge base's sources."""
        settings = self._settings
        size = context_tokens(settings.model_context_tokens, settings.default_context_tokens, model)
        reply_tokens = max_tokens or min(settings.window_reply_tokens, size // 2)
        return Budget(size, reply_tokens, settings.window_margin_tokens + sources_room)

    async def _knowledge_versions(
        self, context: grpc.aio.ServicerContext, tenant: str, knowledge_bases: Sequence[str]
    ) -> dict[str, str]:
        """The versions the turn's answer is cached under: the knowledge bases' as its retrieval will read them."""
        async with _knowledge_errors(context):
            return await self._retriever.versions(tenant, knowledge_bases)

    async def _grounded(self, context: grpc.aio.ServicerContext, turn: _Turn) -> _Turn:
        """The step `knowledge`: the chunks of the turn's knowledge bases that best match the message, as the
        model's copy has it (redacted as the PII policy says), go into the window as numbered sources after the
        system prompt, as many as fit the room kept for them. The message is embedded (the semantic cache and the
        store of the answer reuse the vector); when the embedding endpoint fails, chunks are found by keywords
        alone. A knowledge base store that cannot be reached fails the turn with UNAVAILABLE."""
        if not turn.knowledge_bases or not turn.chat.message:
            return turn
        request = turn.model_request
        settings = self._settings
        async with _knowledge_errors(context):
            retrieval, vector = await self._retrieve(turn, _text_of(request.messages[-1]), settings.knowledge_top_k)
        sources = sources_message(retrieval.chunks, self._tokens, turn.model, settings.knowledge_context_max_tokens)
        embedding = None
        if vector is not None:
            embedding = cache_pb2.QuestionEmbedding(
                model=settings.embedding_model,
                dimensions=settings.embedding_dimensions,
                vector=vector.astype("<f4").tobytes(),
            )
        return replace(
            turn,
            model_request=_with_sources(request, turn.window, sources),
            sources=sources.chunks if sources is not None else (),
            question_embedding=embedding,
        )

    async def _retrieve(self, turn: _Turn, question: str, k: int) -> tuple[Retrieval, np.ndarray | None]:
        """The `k` chunks of the turn's knowledge bases that best match `question`, and its embedding (None when the
        embedding endpoint failed: the chunks are then found by keywords alone). Raises KnowledgeStoreUnavailable
        and KnowledgeBaseChanging."""
        settings = self._settings
        vector = None
        try:
            (vector,) = await self._model.embed(
                [question],
                model=settings.embedding_model,
                dimensions=settings.embedding_dimensions,
                deadline=min(turn.deadline, asyncio.get_running_loop().time() + settings.embedding_timeout_seconds),
            )
        except ModelError as error:
            log.warning("knowledge_embedding_failed", extra={"error": error.kind.value})
        retrieval = await self._retriever.search(
            turn.scope.tenant,
            turn.knowledge_bases,
            question,
            vector,
            k=k,
            # A floor on similarity applies only where there is one: not by keywords alone.
            min_similarity=settings.knowledge_min_similarity
            if vector is not None and settings.knowledge_min_similarity
            else None,
        )
        for name in retrieval.missing:
            log.warning("knowledge_base_missing", extra={"tenant": turn.scope.tenant, "knowledge_base": name})
        return retrieval, vector

    def _knowledge_search(self, turn: _Turn, answer: _Answer) -> KnowledgeSearch | None:
        """The turn's server-side tool `knowledge_search` (None for a turn without knowledge bases): the chunks that
        best match the model's query, numbered after the turn's sources so far, which they join (`answer.
        tool_sources`) so that the reply may cite them. A store that cannot be read is an error result, not the
        turn's failure: the model may answer without it."""
        if not turn.knowledge_bases:
            return None

        async def search(query: str, k: int) -> ToolOutcome:
            try:
                retrieval, _ = await self._retrieve(turn, query, k)
            except (KnowledgeStoreUnavailable, KnowledgeBaseChanging):
                log.warning("knowledge_search_unavailable", extra={"request_id": turn.request_id})
                return ToolOutcome("the knowledge bases cannot be read now; answer without them", is_error=True)
            result = search_result(
                retrieval.chunks,
                (*turn.sources, *answer.tool_sources),
                self._tokens,
                turn.model,
                self._settings.knowledge_context_max_tokens,
            )
            answer.tool_sources.extend(result.added)
            return ToolOutcome(result.text, is_error=False)

        return search

    async def _window(
        self,
        model: str,
        budget: Budget,
        chat: chat_pb2.ChatRequest,
        history: TurnHistory | None,
        new_messages: list[StoredMessage],
        offered: list[dict[str, Any]],
    ) -> tuple[list[StoredMessage], Window]:
        """The new messages with their tokens, and the window; counted in a worker thread when the text to
        count is long, or the model's encoding is still to be loaded. Raises MessageTooLong."""

        tools_text = json.dumps(offered, ensure_ascii=False) if offered else ""

        def build() -> tuple[list[StoredMessage], Window]:
            counted_messages = [counted(self._tokens, model, message) for message in new_messages]
            window = build_window(
                self._tokens,
                model,
                budget,
                system_prompt=chat.options.system_prompt,
                summary=history.summary if history is not None else None,
                history=history.messages if history is not None else [],
                new_messages=counted_messages,
                tools_tokens=self._tokens.count_text(model, tools_text) if tools_text else 0,
            )
            return counted_messages, window

        text_chars = sum(len(message.content) for message in new_messages) + len(chat.options.system_prompt)
        text_chars += len(tools_text)
        if not self._tokens.loaded(model) or text_chars > OFF_LOOP_TEXT_CHARS:
            return await asyncio.to_thread(build)
        return build()

    def _redacted(self, turn: _Turn, pii: Sequence[safety_pb2.PiiSpan]) -> _Turn:
        """The step `pii`: the turn with the PII policy applied to the caller's message (the last new message):
        the stored message holds placeholders for the kinds not left, and the model's copy for those of mode
        `model`. Its tokens stay those counted for the original (placeholders are about as long)."""
        spans = [span for span in pii if span.kind in self._stored_pii]
        if not spans:
            return turn
        message = turn.new_messages[-1]
        stored = redact(message.content, spans, self._stored_pii, turn.placeholders)
        for_model = redact(message.content, spans, self._model_pii, turn.placeholders)
        request = turn.model_request
        if for_model != message.content:
            request = replace(request, messages=[*request.messages[:-1], _with_text(request.messages[-1], for_model)])
        redacted = replace(message, content=stored, placeholders=turn.placeholders.take_added())
        return replace(
            turn,
            new_messages=(*turn.new_messages[:-1], redacted),
            model_request=request,
            with_pii=True,
        )

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
                verdict, stage, pii = await self._screen_what_the_caller_sent(turn)
            except SafetyUnavailable:
                if lookup is not None:
                    lookup.cancel()
                annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
                await abort(
                    context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff"
                )
                raise
            found = await lookup if lookup is not None else None
            cached = found if found is not None and found.hit else None
            # A reply screened under other lists or another policy (or with safety down) is never served.
            stale = cached is not None and (verdict is None or cached.reply.policy_version != verdict.policy_version)
            if cached is not None:
                metrics.dialogue_cache_lookup("stale" if stale else "hit")
            if stale:
                cached = None
            calls_model = not (verdict is not None and verdict.blocked) and cached is None
            replay = None if claim is None else await self._replay_of(context, turn.scope, claim)
            reserved = False
            if reservation is not None and calls_model and replay is None:
                try:
                    # The reservation is not made on a hit; a stale one is a miss found late.
                    reserved = await reservation
                    if not reserved and stale:
                        reserved = await self._spend.reserve(turn.spend, turn.model_request, turn.timeout)
                except Refused as refused:
                    await abort_with(context, refused.status)
                reservation_used = True
        finally:
            # A reservation the model call will not use (cached answer, refused input, failure, cancel) is
            # released once made.
            if reservation is not None and not reservation_used:
                self._spend.release_unused(turn.spend, turn.model_request, reservation)
        return _Gate(
            verdict=verdict,
            stage=stage,
            pii=pii,
            cached=cached,
            similar_lookup=found is not None and found.similar_lookup,
            replay=replay,
            calls_model=calls_model and replay is None,
            reserved=reserved,
        )

    async def _screen_what_the_caller_sent(
        self, turn: _Turn
    ) -> tuple[safety_pb2.Verdict | None, chat_pb2.ContentFilter.Stage, list[safety_pb2.PiiSpan]]:
        """The verdict on what the caller sent, the stage a refusal is reported at, and the personal information
        in its message: the message (with its images) by ScreenInput, the tool results by ScreenTool, both at
        once. None when safety cannot be reached and the operator chose fail-open: the whole turn then goes
        unscreened. Raises SafetyUnavailable."""
        chat = turn.chat
        screens: list[tuple[chat_pb2.ContentFilter.Stage, Awaitable[_ScreenResponse | None]]] = []
        if chat.message or chat.images:
            screens.append((chat_pb2.ContentFilter.STAGE_INPUT, self._screen_input(turn)))
        if chat.tool_results:
            texts = [result.content for result in chat.tool_results]
            screens.append((chat_pb2.ContentFilter.STAGE_TOOL, self._screen_tools(texts, turn)))
        if len(screens) == 1:  # a turn's usual case: no task to gather
            responses = [await screens[0][1]]
        else:
            responses = await asyncio.gather(*(screen for _, screen in screens))
        pii = [
            span
            for response in responses
            if isinstance(response, safety_pb2.ScreenInputResponse)
            for span in response.pii
        ]
        for (stage, _), response in zip(screens, responses, strict=True):
            if response is not None and response.verdict.blocked:
                return response.verdict, stage, pii
        if None in responses:
            return None, screens[0][0], []
        return responses[0].verdict, screens[0][0], pii

    async def _refuse_input(
        self,
        context: grpc.aio.ServicerContext,
        turn: _Turn,
        verdict: safety_pb2.Verdict,
        stage: chat_pb2.ContentFilter.Stage,
    ) -> chat_pb2.ChatEvent:
        """A refused input (the message, or a tool result) is committed as refused, every new message's text not
        kept, and the model is not called. A refused result still answers its call, so no call stays pending."""
        refused = [
            replace(message, content="", refused=True, images=(), tokens=0, encoding="")
            for message in turn.new_messages
        ]
        completed = _content_filtered(stage, verdict.categories, chat_pb2.Usage())
        await self._commit(context, turn, (*refused, _refused_reply()), completed)
        annotate(input_tokens=0, output_tokens=0)
        return completed

    async def _answer_from_cache(
        self, context: grpc.aio.ServicerContext, turn: _Turn, found: cache_pb2.LookupResponse
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """A reply from the cache (screened under the current policy when it was made, which the gate checked): sent
        whole, committed, and counted as saved, with the prompt as counted and the reply as first made."""
        cached = found.reply
        cached_delta = chat_pb2.Delta(text=cached.text)
        yield chat_pb2.ChatEvent(delta=cached_delta)
        reply = counted(self._tokens, turn.model, StoredMessage("assistant", cached.text, time.time()))
        completed = chat_pb2.ChatEvent(
            completed=chat_pb2.Completed(
                finish_reason=cached.finish_reason,
                usage=chat_pb2.Usage(),
                cost_usd=0.0,
                cached=True,
                cache_match=found.match,
                cache_similarity=found.similarity,
                citations=cached.citations,
            )
        )
        saved_input = turn.model_request.prompt_tokens or 0
        metrics.cache_hit_saved(
            price_family(self._settings.model_prices_usd_per_million, turn.model) or OTHER,
            "semantic" if found.match == chat_pb2.CACHE_MATCH_SEMANTIC else "exact",
            saved_input + cached.output_tokens,
            self._model.cost_usd(turn.model, saved_input, cached.output_tokens),
        )
        await self._commit(
            context, turn, (*turn.new_messages, reply), completed, events=[chat_pb2.ChatEvent(delta=cached_delta)]
        )
        annotate(input_tokens=0, output_tokens=0)
        yield completed
        self._after_reply(turn, cached_reply=None)

    async def _answer_from_model(
        self, context: grpc.aio.ServicerContext, turn: _Turn, *, screened: bool
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The steps `model` and `tools`. Each model call (`_model_step`) streams its text through the output
        screen (unless the turn goes unscreened). When the model calls tools, their arguments are screened and
        the calls sent (ToolCalls); the server-side ones are run, and their results screened and sent
        (ToolResults). While every call is server-side, the model is called again with the results, at most
        tool_max_steps calls in all, the last with tool_choice none so that the turn ends with an answer. The
        turn then commits everything it produced, ending with the reply or with the caller's calls to run.

        A turn that does not commit leaves the conversation as it was; the tokens of its model calls (the
        provider's usage, else counted over what was sent and received) still count for the tenant and the
        conversation's usage."""
        answer = _Answer(model=turn.model)
        request = turn.model_request
        try:
            for step in range(self._settings.tool_max_steps):
                if step:
                    request = await self._next_step(context, turn, request, answer, step)
                async for event in self._model_step(context, turn, request, step, answer, screened=screened):
                    yield event
                end = answer.step
                if end.blocked is not None:
                    stage = chat_pb2.ContentFilter.STAGE_OUTPUT
                    yield await self._refuse_answer(context, turn, answer, stage, end.blocked.categories)
                    return
                if end.outcome is None or not end.outcome.tool_calls:
                    async for event in self._reply(context, turn, answer, screened=screened):
                        yield event
                    return
                if step == self._settings.tool_max_steps - 1:
                    await abort(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"the model still called tools in the last of the {step + 1} model calls a turn may make "
                        "(CHATMESH_TOOL_MAX_STEPS); nothing was stored",
                    )
                async for event in self._tool_step(context, turn, answer, screened=screened):
                    yield event
                if answer.ended:
                    return
        finally:
            if not turn.scope.committed and turn.history is not None and (answer.input_tokens or answer.output_tokens):
                self._background.spawn(
                    self._store.add_usage(
                        turn.scope.tenant, turn.scope.conversation_id, answer.input_tokens, answer.output_tokens
                    ),
                    "add_usage",
                )

    async def _model_step(
        self,
        context: grpc.aio.ServicerContext,
        turn: _Turn,
        request: ModelRequest,
        step: int,
        answer: _Answer,
        *,
        screened: bool,
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """One model call: sends Started with the turn's first answer (naming the model that answered, a
        fallback's maybe) and the text as it is cleared; sets `answer.step` to how the call ended, and however
        it ends, adds its tokens and cost to `answer` and settles them."""
        progress = StreamProgress()
        end = _StepEnd()
        model_stream = self._model.stream_chat(request, turn.deadline, progress)
        relayed = (
            screen_output(model_stream, self._safety, turn.ref, turn.deadline, end.verdict)
            if screened
            else coalesce(model_stream)
        )
        # Placeholders the model writes are restored for the caller (the policy's `model` kinds).
        restorer = StreamRestorer(turn.placeholders) if turn.placeholders.originals else None
        text: list[str] = []
        try:
            async for item in relayed:
                if not answer.started:
                    answer.started = True
                    yield _started(turn, progress.model or turn.model)
                if isinstance(item, str):
                    text.append(item)
                    shown = item if restorer is None else restorer.feed(item)
                    if shown:
                        yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=shown))
                    continue
                if restorer is not None and (held := restorer.flush()):
                    yield chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=held))
                if isinstance(item, OutputBlocked):
                    end.blocked = item
                else:
                    end.outcome = item
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
            input_tokens, output_tokens = self._spent(turn.model, request, progress)
            cost = self._model.cost_usd(answered, input_tokens, output_tokens, progress.deployment)
            self._spend.settle_later(_step_spend(turn, step), answered, input_tokens, output_tokens, cost)
            if progress.outcome is None and (input_tokens or output_tokens):
                # No Completed reports these: they count for the model's metrics here.
                self._model.record_unfinished(answered, input_tokens, output_tokens, progress.deployment)
            answer.add(answered, input_tokens, output_tokens, cost)
        end.text = "".join(text)
        answer.step = end

    async def _tool_step(
        self, context: grpc.aio.ServicerContext, turn: _Turn, answer: _Answer, *, screened: bool
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The tool calls of the model's last answer: screened and sent; the server-side ones run, and their
        results screened and sent. When some call is the caller's, the turn ends here (`answer.ended`):
        committed with FINISH_REASON_TOOL_CALLS. A refused call or result ends it with CONTENT_FILTER at
        STAGE_TOOL, and neither the calls nor the results of this answer are kept."""
        end = answer.step
        assert end.outcome is not None
        calls = tools.stored_calls(end.outcome.tool_calls, turn.caller_tools)
        if screened and (
            refused := await self._refused_tool_texts(context, turn, answer, [call.arguments for call in calls])
        ):
            yield refused
            return
        calls_event = tools.tool_calls_event(calls)
        yield calls_event
        produced = [
            counted(self._tokens, turn.model, StoredMessage("assistant", end.text, time.time(), tool_calls=calls))
        ]
        events = [chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=end.text))] if end.text else []
        events.append(calls_event)
        server_calls = [call for call in calls if call.server_side]
        if server_calls:
            results = await self._run_server_tools(turn, answer, server_calls)
            if screened and (
                refused := await self._refused_tool_texts(context, turn, answer, [result.content for result in results])
            ):
                yield refused
                return
            results_event = tools.tool_results_event(results)
            yield results_event
            produced.extend(results)
            events.append(results_event)
        answer.messages.extend(produced)
        answer.events.extend(events)
        if len(server_calls) < len(calls):
            answer.ended = True
            completed = _completed(chat_pb2.FINISH_REASON_TOOL_CALLS, answer)
            await self._commit(
                context,
                turn,
                (*turn.new_messages, *answer.messages),
                completed,
                model=answer.model,
                events=answer.events,
            )
            annotate(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens)
            yield completed

    async def _run_server_tools(
        self, turn: _Turn, answer: _Answer, calls: Sequence[StoredToolCall]
    ) -> list[StoredMessage]:
        """Runs the calls concurrently, each as its tool's result (an error result when it failed, or names no
        server-side tool the request enabled), in the calls' order."""
        enabled = [call.name in turn.chat.options.server_tools for call in calls]
        outcomes = iter(
            await self._server_tools.run_all(
                [call for call, run in zip(calls, enabled, strict=True) if run],
                turn.deadline,
                knowledge=self._knowledge_search(turn, answer),
            )
        )
        now = time.time()
        results = []
        for call, run in zip(calls, enabled, strict=True):
            outcome = next(outcomes) if run else ToolOutcome(f"no tool is named {call.name!r}", is_error=True)
            message = StoredMessage("tool", outcome.content, now, tool_call_id=call.id, tool_error=outcome.is_error)
            results.append(counted(self._tokens, turn.model, message))
        return results

    async def _refused_tool_texts(
        self,
        context: grpc.aio.ServicerContext,
        turn: _Turn,
        answer: _Answer,
        texts: list[str],
    ) -> chat_pb2.ChatEvent | None:
        """Screens the model's tool calls' arguments, or the server-side tools' results, with the keyword lists;
        when refused, ends the turn (committed as `_refuse_answer` does, at STAGE_TOOL) and returns its Completed.
        Allowed when safety cannot be reached and the operator chose fail-open, else the call ends with
        UNAVAILABLE."""
        try:
            response = await self._screen_tools(texts, turn)
        except SafetyUnavailable:
            annotate(error=ErrorKind.SAFETY_UNAVAILABLE)
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the safety service is unavailable; retry with backoff")
            raise
        if response is None or not response.verdict.blocked:
            return None
        answer.ended = True
        stage = chat_pb2.ContentFilter.STAGE_TOOL
        return await self._refuse_answer(context, turn, answer, stage, response.verdict.categories)

    async def _next_step(
        self, context: grpc.aio.ServicerContext, turn: _Turn, request: ModelRequest, answer: _Answer, step: int
    ) -> ModelRequest:
        """The next model call's request: the last one's messages, then the tool calls and results it led to;
        with tool_choice none when it is the turn's last allowed call. Its worst case is reserved under the
        tenant's limits like the first call's (RESOURCE_EXHAUSTED past them), and it must fit the model's
        context (FAILED_PRECONDITION otherwise)."""
        added = answer.messages[answer.sent :]
        answer.sent = len(answer.messages)
        prompt_tokens = (request.prompt_tokens or 0) + sum(window_tokens(message) for message in added)
        if prompt_tokens > turn.budget.prompt_tokens:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server-side tools' results do not fit {turn.model}'s context: the next call would need "
                f"{prompt_tokens} prompt tokens, and there is room for {turn.budget.prompt_tokens}; nothing was stored",
            )
        last = step == self._settings.tool_max_steps - 1
        next_request = replace(
            request,
            messages=[*request.messages, *(model_message(message) for message in added)],
            prompt_tokens=prompt_tokens,
            tool_choice="none" if last else request.tool_choice,
        )
        if turn.spend.limits.limits_spend:
            try:
                await self._spend.reserve(
                    _step_spend(turn, step), next_request, turn.deadline - asyncio.get_running_loop().time()
                )
            except Refused as refused:
                await abort_with(context, refused.status)
        return next_request

    async def _reply(
        self, context: grpc.aio.ServicerContext, turn: _Turn, answer: _Answer, *, screened: bool
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The model's answer is the reply: committed after what the turn produced before it (the personal
        information in it redacted as the PII policy says), then stored in the cache when it may serve other
        callers: screened, complete, of the model asked for, and free of personal information. A retry with the
        same idempotency key is replayed the reply as stored."""
        end = answer.step
        assert end.outcome is not None
        pii = [span for span in end.verdict.pii if span.kind in self._stored_pii]
        stored_text = redact(end.text, pii, self._stored_pii, turn.placeholders)
        reply = counted(
            self._tokens,
            turn.model,
            StoredMessage("assistant", stored_text, time.time(), placeholders=turn.placeholders.take_added()),
        )
        finish_reason = _FINISH_REASONS.get(end.outcome.finish_reason, chat_pb2.FINISH_REASON_UNSPECIFIED)
        cited = citations(end.text, (*turn.sources, *answer.tool_sources))
        completed = _completed(finish_reason, answer, cited)
        if stored_text:
            answer.events.append(chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=stored_text)))
        await self._commit(
            context,
            turn,
            (*turn.new_messages, *answer.messages, reply),
            completed,
            model=answer.model,
            events=answer.events,
        )
        annotate(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens)
        yield completed
        # A reply that went out unscreened (safety down, fail-open) is not kept for callers that safety would
        # screen, nor one of a fallback model for callers of the model they asked for.
        cacheable = (
            screened
            and finish_reason == chat_pb2.FINISH_REASON_STOP
            and answer.model == turn.model
            and not turn.with_pii
            and not pii
        )
        self._after_reply(
            turn,
            cached_reply=cache_pb2.CachedReply(
                text=end.text,
                finish_reason=finish_reason,
                output_tokens=answer.output_tokens,
                policy_version=end.verdict.policy_version,
                citations=cited,
            )
            if cacheable
            else None,
        )

    async def _refuse_answer(
        self,
        context: grpc.aio.ServicerContext,
        turn: _Turn,
        answer: _Answer,
        stage: chat_pb2.ContentFilter.Stage,
        categories: Sequence[str],
    ) -> chat_pb2.ChatEvent:
        """The model's answer (its text, or its tool calls or their results) was refused: the turn is committed
        with a refused reply in its place, after what the turn produced before it."""
        completed = _content_filtered(stage, categories, answer.usage(), answer.cost)
        await self._commit(
            context,
            turn,
            (*turn.new_messages, *answer.messages, _refused_reply()),
            completed,
            model=answer.model,
            events=answer.events,
        )
        annotate(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens)
        return completed

    def _spent(self, model: str, request: ModelRequest, progress: StreamProgress) -> tuple[int, int]:
        """The (input, output) tokens of a model call: the provider's usage when it came; else, when text was
        streamed, the prompt's tokens and those of the text received; else none (the provider answered with
        an error, or never answered, and bills nothing)."""
        if progress.outcome is not None:
            return progress.outcome.input_tokens, progress.outcome.output_tokens
        if progress.chunks:
            return request.prompt_tokens or 0, self._tokens.count_text(model, "".join(progress.text))
        return 0, 0

    def _after_reply(self, turn: _Turn, *, cached_reply: cache_pb2.CachedReply | None) -> None:
        """Runs once the caller has the Completed event, off the reply's path: the steps `cache` (store the
        answer) and `summary` (when what no longer fits the window has grown past the trigger)."""
        if cached_reply is not None and turn.answer_context is not None:
            self._background.spawn(self._store_answer(turn, turn.answer_context, cached_reply), "cache_store")
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

    async def _screen_input(self, turn: _Turn) -> safety_pb2.ScreenInputResponse | None:
        """The verdict on the caller's message and the personal information in it (see `_screened`)."""
        chat = turn.chat
        request = safety_pb2.ScreenInputRequest(
            text=chat.message, request_id=turn.request_id, images=chat.images, turn=turn.ref
        )
        return await self._screened(turn, self._safety.ScreenInput(request, timeout=_seconds_left(turn)))

    async def _screen_tools(self, texts: list[str], turn: _Turn) -> safety_pb2.ScreenToolResponse | None:
        """The keyword lists' verdict on tool texts (see `_screened`)."""
        request = safety_pb2.ScreenToolRequest(texts=texts, request_id=turn.request_id, turn=turn.ref)
        return await self._screened(turn, self._safety.ScreenTool(request, timeout=_seconds_left(turn)))

    async def _screened(self, turn: _Turn, call: Awaitable[_ScreenT]) -> _ScreenT | None:
        """A safety call's answer; None when safety cannot be reached and the operator chose fail-open, in which
        case the turn goes unscreened. Raises SafetyUnavailable otherwise."""
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            log.error("safety_unavailable", extra={"request_id": turn.request_id, "grpc_code": error.code().name})
            if self._settings.safety_fail_open:
                return None
            raise SafetyUnavailable(error.code().name) from error

    def _model_request(
        self,
        chat: chat_pb2.ChatRequest,
        model: str,
        window: Window,
        max_tokens: int | None,
        tenant: str,
        offered: list[dict[str, Any]],
    ) -> ModelRequest:
        options = chat.options
        return ModelRequest(
            model=model,
            messages=window.messages,
            max_tokens=max_tokens,
            user=provider_user(self._settings.log_user_id_salt.get_secret_value(), tenant, chat.user_id),
            prompt_tokens=window.prompt_tokens,
            tools=offered,
            tool_choice=tools.tool_choice_param(options.tool_choice) if offered else None,
            parallel_tool_calls=options.parallel_tool_calls if options.HasField("parallel_tool_calls") else None,
            **model_options(options),
        )

    def _answer_context(
        self, tenant: str, chat: chat_pb2.ChatRequest, model: str, window: Window
    ) -> cache_pb2.AnswerContext | None:
        """What the cache keys an answer by; None when this request's answer may not be cached: the answer cache
        turned off (CHATMESH_CACHE_ANSWERS), a follow-up while follow-ups are not cached (CHATMESH_CACHE_FOLLOW_UPS), a
        temperature above the cache's bound, images in the turn or its window (never looked up nor stored), a summary
        in the window, or tools (offered, or their calls and results in the turn or its window)."""
        options = chat.options
        settings = self._settings
        if (
            not settings.cache_answers
            or (window.history and not (settings.cache_follow_ups or settings.semantic_cache_follow_ups))
            or chat.images
            or chat.tool_results
            or tools.offers_tools(options)
            or any(message.tool_calls or message.role == "tool" for message in window.history)
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

    async def _lookup(
        self, answer_context: cache_pb2.AnswerContext, deadline: float
    ) -> cache_pb2.LookupResponse | None:
        """The cache's answer, a hit or a miss; None when it fails or is slow: logged, never the caller's error."""
        timeout = min(self._settings.cache_lookup_timeout_seconds, deadline - asyncio.get_running_loop().time())
        try:
            response = await self._cache.Lookup(cache_pb2.LookupRequest(context=answer_context), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("cache_lookup_failed", extra={"grpc_code": error.code().name})
            metrics.dialogue_cache_lookup("error")
            return None
        if not response.hit:
            metrics.dialogue_cache_lookup("miss")
        return response

    async def _look_up_similar(self, turn: _Turn, gate: _Gate) -> tuple[_Turn, cache_pb2.LookupResponse | None]:
        """The step `similar`: after an exact miss that allows it, the cache is asked for the answer to a question
        close in meaning. Only once the input is screened, and never for a turn with personal information: the
        question goes to the embedding endpoint. A hit settles the reservation made for the model call at
        nothing; a miss keeps the question's embedding for the store of the answer. A cache that fails or is slow
        is a miss, logged."""
        if not gate.similar_lookup or gate.verdict is None or turn.with_pii or turn.answer_context is None:
            return turn, None
        timeout = min(self._settings.cache_lookup_timeout_seconds, _seconds_left(turn))
        request = cache_pb2.LookupSimilarRequest(context=turn.answer_context, embedding=turn.question_embedding)
        try:
            response = await self._cache.LookupSimilar(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("cache_similar_lookup_failed", extra={"grpc_code": error.code().name})
            return turn, None
        if response.hit and response.reply.policy_version == gate.verdict.policy_version:
            if gate.reserved:
                self._spend.settle_later(turn.spend, turn.model, 0, 0, 0.0)
            return turn, response
        if response.HasField("embedding"):
            turn = replace(turn, question_embedding=response.embedding)
        return turn, None

    async def _store_answer(
        self, turn: _Turn, answer_context: cache_pb2.AnswerContext, reply: cache_pb2.CachedReply
    ) -> None:
        try:
            await self._cache.Store(
                cache_pb2.StoreRequest(
                    context=answer_context,
                    reply=reply,
                    user_id=turn.scope.user_id,
                    conversation_id=turn.scope.conversation_id,
                    embedding=turn.question_embedding,
                ),
                timeout=self._settings.cache_lookup_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache_store_failed", extra={"grpc_code": error.code().name})

    async def _commit(
        self,
        context: grpc.aio.ServicerContext,
        turn: _Turn,
        messages: Sequence[StoredMessage],
        completed: chat_pb2.ChatEvent,
        *,
        model: str | None = None,
        events: Sequence[chat_pb2.ChatEvent] = (),
    ) -> None:
        """The step `commit`: appends the turn's messages (with the usage of its Completed) and releases the
        conversation; with an idempotency key, together with what a retry is to be answered: the turn's `events`
        (all but Started, and its text in one Delta per model call) then `completed`, from `model` (the one that
        answered, by default the one asked for)."""
        scope = turn.scope
        usage = completed.completed.usage
        committed = CommittedTurn(
            messages=tuple(messages), input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
        )
        idempotency = None
        if scope.key is not None:
            replay = _replay_record(scope.conversation_id, model or turn.model, [*events, completed])
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
        # The owner is checked first, and what derives from the conversation is erased before it: after a
        # failure, a retry still finds the conversation (and whose it is) and finishes.
        async with _store_errors(context, request.conversation_id):
            await self._store.get(scoped.tenant, request.conversation_id, request.user_id, limit=0)
        derived = await self._erase_derived(
            context, scoped.tenant, user_id=request.user_id, conversation_id=request.conversation_id
        )
        if derived.failed:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the {' and '.join(derived.failed)} of conversation {request.conversation_id} cannot be erased "
                "right now, so it was kept; retry to delete it",
            )
        async with _store_errors(context, request.conversation_id):
            erased = await self._store.delete(scoped.tenant, request.conversation_id, request.user_id)
        log.info(
            "conversation_deleted",
            extra={
                "tenant": scoped.tenant,
                "messages": erased.messages,
                "summaries": erased.summaries,
                "cache_entries": derived.cache_entries,
                "review_cases": derived.review_cases,
            },
        )
        return chat_pb2.DeleteConversationResponse()

    async def EraseUser(
        self, scoped: dialogue_pb2.TenantEraseUserRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.EraseUserResponse:
        """The user's conversations, then the cached replies and review cases derived from them. Every store is
        tried whatever the others do; UNAVAILABLE if one could not be reached, after erasing from the others."""
        tenant, user_id = scoped.tenant, scoped.request.user_id
        annotate(tenant=tenant, user_id=user_id)
        if not user_id:
            await abort_with(context, invalid_argument([("request.user_id", "is required")]))
        response = chat_pb2.EraseUserResponse()
        failed = []
        try:
            erased = await self._store.erase_user(tenant, user_id)
            response.conversations, response.messages = erased.conversations, erased.messages
            response.summaries = erased.summaries
        except StoreUnavailable:
            failed.append("conversations")
        derived = await self._erase_derived(context, tenant, user_id=user_id)
        response.cache_entries, response.review_cases = derived.cache_entries, derived.review_cases
        failed += derived.failed
        log.log(
            logging.WARNING if failed else logging.INFO,
            "user_erased",
            extra={
                "tenant": tenant,
                "user_id": self._hash_user_id(user_id),
                "conversations": response.conversations,
                "messages": response.messages,
                "summaries": response.summaries,
                "cache_entries": response.cache_entries,
                "review_cases": response.review_cases,
                "not_erased": failed,
            },
        )
        if failed:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the user's {' and '.join(failed)} cannot be erased right now (the rest was); retry, erasing is "
                "idempotent",
            )
        return response

    async def _erase_derived(
        self, context: grpc.aio.ServicerContext, tenant: str, *, user_id: str, conversation_id: str = ""
    ) -> _Derived:
        """Erases the cached replies and the review cases of the user's conversation, or (without one) of all
        the user's conversations. Each is tried whatever the other does."""
        derived = _Derived()
        erase = cache_pb2.EraseRequest(tenant=tenant)
        if conversation_id:
            erase.conversation_id = conversation_id
        else:
            erase.user_id = user_id
        try:
            response = await self._cache.Erase(
                erase, timeout=downstream_timeout(context, self._settings.default_deadline_seconds)
            )
            derived.cache_entries = response.entries
        except grpc.aio.AioRpcError as error:
            log.error("cache_erase_failed", extra={"grpc_code": error.code().name})
            derived.failed.append("cached replies")
        try:
            derived.review_cases = await self._reviews.erase(tenant, user_id=user_id, conversation_id=conversation_id)
        except ReviewStoreUnavailable:
            log.error("review_erase_failed")
            derived.failed.append("review cases")
        return derived

    async def GetTokenUsage(
        self, request: dialogue_pb2.GetTokenUsageRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetUsageResponse:
        annotate(tenant=request.tenant)
        try:
            return await self._spend.usage(request.tenant, Limits.from_proto(request.limits))
        except LedgerUnavailable:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "usage cannot be read right now; retry with backoff")
            raise


@dataclass(slots=True)
class _Derived:
    """What an erasure removed besides conversations, and the stores it could not reach."""

    cache_entries: int = 0
    review_cases: int = 0
    failed: list[str] = field(default_factory=list)


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
    except StoreUnavailable as error:
        # The error is the Redis exception's type name (chatmesh.runtime.redis_errors), never a message.
        log.error("store_unavailable", extra={"conversation_id": conversation_id, "error": str(error)})
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
                tool_calls=[tools.call_proto(call) for call in message.tool_calls],
                tool_call_id=message.tool_call_id,
                tool_error=message.tool_error,
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
    # What the caller sent, counted: the results of the pending tool calls, then the message (if any).
    new_messages: tuple[StoredMessage, ...]
    window: Window
    budget: Budget
    # The names of the request's own tools: calls of them are the caller's to run.
    caller_tools: frozenset[str]
    model_request: ModelRequest
    spend: SpendScope
    answer_context: cache_pb2.AnswerContext | None
    # Whose turn it is, as safety records it with a review case.
    ref: safety_pb2.TurnRef
    # The conversation's placeholders for personal information (see chatmesh.dialogue.redaction).
    placeholders: Placeholders
    # Whether the caller's message held personal information of a kind the policy does not leave.
    with_pii: bool = False
    # The question's embedding (from the knowledge step, or a semantic lookup that missed), passed on to the
    # semantic lookup and to the answer's store.
    question_embedding: cache_pb2.QuestionEmbedding | None = None
    # The knowledge bases the turn answers from, and the chunks the window numbers as its sources ([1] first).
    knowledge_bases: tuple[str, ...] = ()
    sources: tuple[RetrievedChunk, ...] = ()


async def turn_events(events: AsyncIterator[chat_pb2.ChatEvent]) -> AsyncIterator[dialogue_pb2.TurnEvents]:
    """One message per event, except Started, which waits for the event after it: the turn's first Delta, or its
    Completed. Nothing is sent between the two, so the caller's time to first token is the same, and the hop
    carries one message (a write, a read and their framing on both sides) less per turn."""
    held: chat_pb2.ChatEvent | None = None
    async for event in events:
        if event.HasField("started"):
            held = event
            continue
        yield dialogue_pb2.TurnEvents(events=[event] if held is None else [held, event])
        held = None
    if held is not None:
        yield dialogue_pb2.TurnEvents(events=[held])


def _started(turn: _Turn, model: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        started=chat_pb2.Started(conversation_id=turn.scope.conversation_id, request_id=turn.request_id, model=model)
    )


def _with_text(message: dict[str, Any], text: str) -> dict[str, Any]:
    """A chat message with its text replaced: its content, or its text part beside images."""
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": text}
    return {**message, "content": [{**part, "text": text} if part.get("type") == "text" else part for part in content]}


def _step_spend(turn: _Turn, step: int) -> SpendScope:
    """Each model call of a turn is reserved and settled on its own: the first under the request id."""
    return turn.spend if step == 0 else replace(turn.spend, request_id=f"{turn.request_id}/{step}")


_ScreenResponse = safety_pb2.ScreenInputResponse | safety_pb2.ScreenToolResponse
_ScreenT = TypeVar("_ScreenT", safety_pb2.ScreenInputResponse, safety_pb2.ScreenToolResponse)


def _seconds_left(turn: _Turn) -> float:
    return turn.deadline - asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class _Gate:
    """What the screens of what the caller sent, the cache and the idempotency claim decided: `verdict` None
    means the turn goes unscreened (safety down, fail-open), and `stage` is where a refusal is reported;
    `calls_model` whether the model answers."""

    verdict: safety_pb2.Verdict | None
    stage: chat_pb2.ContentFilter.Stage
    # The personal information in the caller's message.
    pii: list[safety_pb2.PiiSpan]
    cached: cache_pb2.LookupResponse | None
    # The exact lookup missed, and said that LookupSimilar may answer.
    similar_lookup: bool
    replay: str | None
    calls_model: bool
    # A reservation of the tenant's worst case is held for the model call.
    reserved: bool


@dataclass(slots=True)
class _StepEnd:
    """How one model call ended: its text, and its outcome (with its tool calls), or the output screen's block."""

    text: str = ""
    outcome: ModelOutcome | None = None
    blocked: OutputBlocked | None = None
    # What the output screen's last answer said (empty when the turn goes unscreened).
    verdict: OutputVerdict = field(default_factory=OutputVerdict)


@dataclass(slots=True)
class _Answer:
    """What the model calls of a turn have produced so far (see `_answer_from_model`)."""

    # The model that answered the last call (a fallback's, maybe).
    model: str
    started: bool = False
    # Set when a step committed the turn or refused it, and the turn is over.
    ended: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    # The assistant's tool-call messages and the server-side tools' results, in order; the first `sent` of
    # them are in the model's request already.
    messages: list[StoredMessage] = field(default_factory=list)
    sent: int = 0
    # What a retry with the same idempotency key is replayed before Completed.
    events: list[chat_pb2.ChatEvent] = field(default_factory=list)
    step: _StepEnd = field(default_factory=_StepEnd)
    # The chunks knowledge_search calls gave the model, numbered after the turn's sources in the window.
    tool_sources: list[RetrievedChunk] = field(default_factory=list)

    def add(self, model: str, input_tokens: int, output_tokens: int, cost: float) -> None:
        self.model = model
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cost += cost

    def usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
        )


def _completed(
    finish_reason: chat_pb2.FinishReason, answer: _Answer, cited: Sequence[chat_pb2.Citation] = ()
) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        completed=chat_pb2.Completed(
            finish_reason=finish_reason, usage=answer.usage(), cost_usd=answer.cost, citations=cited
        )
    )


def _text_of(message: dict[str, Any]) -> str:
    """A chat message's text: its content, or the text parts of a multi-part content."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def _with_sources(request: ModelRequest, window: Window, sources: Sources | None) -> ModelRequest:
    """The model request with the sources message after the system prompt (and the summary), and its exact
    prompt tokens."""
    if sources is None:
        return replace(request, prompt_tokens=window.prompt_tokens)
    fixed = sum(1 for message in window.messages if message.get("role") == "system")
    messages = [*request.messages[:fixed], sources.message, *request.messages[fixed:]]
    return replace(request, messages=messages, prompt_tokens=window.prompt_tokens + sources.tokens)


@contextlib.asynccontextmanager
async def _knowledge_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A knowledge base store that cannot be reached, or a knowledge base that keeps changing, fails the turn with
    UNAVAILABLE."""
    try:
        yield
    except (KnowledgeStoreUnavailable, KnowledgeBaseChanging):
        annotate(error=ErrorKind.KNOWLEDGE_UNAVAILABLE)
        await abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "the knowledge bases cannot be read now (their store is unavailable, or one is being changed); retry "
            "with backoff",
        )


def _replay_record(conversation_id: str, model: str, events: Sequence[chat_pb2.ChatEvent]) -> str:
    """What a retry with the same idempotency key is answered, as the store keeps it: the turn's events after
    Started, the last of them its Completed."""
    return json.dumps(
        {
            "conversation_id": conversation_id,
            "model": model,
            "events": [base64.b64encode(event.SerializeToString()).decode() for event in events],
        },
        separators=(",", ":"),
    )


def _replay(record: str, request_id: str) -> list[chat_pb2.ChatEvent]:
    """The events of a committed turn, replayed to a retry under this call's request id."""
    data = json.loads(record)
    started = chat_pb2.ChatEvent(
        started=chat_pb2.Started(conversation_id=data["conversation_id"], request_id=request_id, model=data["model"])
    )
    if "events" in data:
        events = [chat_pb2.ChatEvent.FromString(base64.b64decode(event)) for event in data["events"]]
    else:
        # A record of a turn committed before tool calls were stored: its text and Completed (kept for
        # CHATMESH_IDEMPOTENCY_TTL_SECONDS after an upgrade).
        completed = chat_pb2.ChatEvent(completed=chat_pb2.Completed.FromString(base64.b64decode(data["completed"])))
        events = [chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=data["text"]))] if data["text"] else []
        events.append(completed)
    events[-1].completed.replayed = True
    return [started, *events]
