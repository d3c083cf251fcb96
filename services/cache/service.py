"""CacheService: exact and semantic lookup and store of replies, and the policy of what may be kept."""

import asyncio
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from chatmesh.cache import metrics
from chatmesh.cache.keys import answer_key, conversation_index, user_index
from chatmesh.cache.tiers import AnswerCache, CacheHit, EraseFailed, IndexErased, TierKind
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.status import abort, abort_with, invalid_argument
from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2

if TYPE_CHECKING:
    # Imported by main only when the semantic cache is on: numpy, the embedding client and the guards' word lists
    # stay out of a cache process that does not use them.
    from chatmesh.cache.semantic import SemanticCache

log = get_logger(__name__)

# Tenant and model are in every key's readable prefix, user and conversation ids in the indexes' names; keep
# keys small.
MAX_NAME_CHARS = 256

_TIERS = {TierKind.MEMORY: cache_pb2.CACHE_TIER_MEMORY, TierKind.REDIS: cache_pb2.CACHE_TIER_REDIS}
_TIER_NAMES = {
    cache_pb2.CACHE_TIER_UNSPECIFIED: "miss",
    cache_pb2.CACHE_TIER_MEMORY: "memory",
    cache_pb2.CACHE_TIER_REDIS: "redis",
}


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: AnswerCache, semantic: "SemanticCache | None" = None) -> None:
        self._cache = cache
        self._semantic = semantic

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        await _validate(context, request.context)
        response = _found(await self._cache.lookup(answer_key(request.context)), chat_pb2.CACHE_MATCH_EXACT, 1.0)
        metrics.cache_lookup(_TIER_NAMES[response.tier])
        if not response.hit and self._semantic is not None and self._semantic.applies_to(request.context):
            response.similar_lookup = True
        return response

    async def LookupSimilar(
        self, request: cache_pb2.LookupSimilarRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        await _validate(context, request.context)
        if self._semantic is None or not self._semantic.applies_to(request.context):
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this context is not looked up by meaning: call LookupSimilar only after a Lookup that said "
                "similar_lookup",
            )
        embedding = request.embedding if request.HasField("embedding") else None
        semantic = await self._semantic.lookup(request.context, embedding, _deadline(context))
        if semantic.hit is not None:
            return _found(semantic.hit.hit, chat_pb2.CACHE_MATCH_SEMANTIC, semantic.hit.similarity)
        response = cache_pb2.LookupResponse(hit=False)
        if semantic.embedding is not None:
            response.embedding.CopyFrom(semantic.embedding)
        return response

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        # A reply whose origin is unknown could never be erased: it is not kept.
        await _validate(
            context,
            request.context,
            _name_violations(("user_id", request.user_id), ("conversation_id", request.conversation_id)),
        )
        if not may_be_cached(request.reply):
            log.debug(
                "cache_store_refused",
                extra={
                    "reason": "finish_reason",
                    "finish_reason": chat_pb2.FinishReason.Name(request.reply.finish_reason),
                },
            )
            return cache_pb2.StoreResponse(stored=False)
        tenant = request.context.tenant
        key = answer_key(request.context)
        indexes = [conversation_index(tenant, request.conversation_id), user_index(tenant, request.user_id)]
        try:
            kept = await self._cache.store(key, request.reply.SerializeToString(), indexes)
            if kept and self._semantic is not None and self._semantic.applies_to(request.context):
                embedding = request.embedding if request.HasField("embedding") else None
                await self._semantic.store(request.context, key, indexes, embedding, _deadline(context))
        except IndexErased:
            # The conversation or the user was erased after this reply was made (dialogue stores it after its caller
            # has it): nothing is written, or what the answer's store wrote before the erasure was erased with it.
            log.info("cache_store_refused", extra={"reason": "erased", "tenant": tenant})
            return cache_pb2.StoreResponse(stored=False)
        return cache_pb2.StoreResponse(stored=bool(kept), tiers=[_TIERS[tier] for tier in kept])

    async def Erase(
        self, request: cache_pb2.EraseRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.EraseResponse:
        """Every reply stored from the conversation, or from any conversation of the user. A reply is shared by
        every user of the tenant who asks the same thing after the same window: erasing it makes them miss
        once, and the next answer is stored again from their own conversation."""
        annotate(tenant=request.tenant[:MAX_NAME_CHARS])
        violations = _name_violations(("tenant", request.tenant))
        if bool(request.user_id) == bool(request.conversation_id):
            violations.append(("user_id", "exactly one of user_id and conversation_id is required"))
        elif request.user_id:
            violations += _name_violations(("user_id", request.user_id))
        else:
            violations += _name_violations(("conversation_id", request.conversation_id))
        if violations:
            await abort_with(context, invalid_argument(violations))
        if request.user_id:
            index = user_index(request.tenant, request.user_id)
        else:
            index = conversation_index(request.tenant, request.conversation_id)
        try:
            entries = await self._cache.erase(index)
        except EraseFailed:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the cache's Redis is unavailable, so nothing was erased from it; retry (erasure is idempotent)",
            )
        log.info(
            "cache_erased",
            extra={"tenant": request.tenant, "by": "user" if request.user_id else "conversation", "entries": entries},
        )
        return cache_pb2.EraseResponse(entries=entries)


def _found(hit: CacheHit | None, match: int, similarity: float) -> cache_pb2.LookupResponse:
    """The response for what a tier returned: a miss for nothing, or for something unreadable (written by something
    else under our prefix; the next Store replaces it)."""
    if hit is None:
        return cache_pb2.LookupResponse(hit=False)
    try:
        reply = cache_pb2.CachedReply.FromString(hit.value)
    except DecodeError:
        log.warning("cache_value_unreadable", extra={"tier": hit.tier.value})
        return cache_pb2.LookupResponse(hit=False)
    return cache_pb2.LookupResponse(hit=True, reply=reply, tier=_TIERS[hit.tier], match=match, similarity=similarity)


def _deadline(context: grpc.aio.ServicerContext) -> float:
    """The call's deadline in loop.time() terms; a minute from now when it has none."""
    remaining = context.time_remaining()
    return asyncio.get_running_loop().time() + (60.0 if remaining is None else remaining)


def may_be_cached(reply: cache_pb2.CachedReply) -> bool:
    """Only a whole reply the model ended on its own: never one cut by LENGTH, refused (CONTENT_FILTER),
    or asking for tool calls, and never an empty one."""
    return reply.finish_reason == chat_pb2.FINISH_REASON_STOP and bool(reply.text)


def _name_violations(*fields: tuple[str, str]) -> list[tuple[str, str]]:
    """Each (field, value) that is empty or longer than MAX_NAME_CHARS."""
    violations = []
    for field, value in fields:
        if not value:
            violations.append((field, "required"))
        elif len(value) > MAX_NAME_CHARS:
            violations.append((field, f"at most {MAX_NAME_CHARS} characters"))
    return violations


def context_violations(answer_context: cache_pb2.AnswerContext) -> list[tuple[str, str]]:
    """The (field, description) pairs that make an AnswerContext unusable as a key."""
    violations = _name_violations(("context.tenant", answer_context.tenant), ("context.model", answer_context.model))
    if not answer_context.messages:
        violations.append(("context.messages", "required: the window, ending with the new user message"))
    elif answer_context.messages[-1].role != chat_pb2.ROLE_USER:
        violations.append(("context.messages", "the last message must be the user's"))
    for index, message in enumerate(answer_context.messages):
        if message.role == chat_pb2.ROLE_UNSPECIFIED:
            violations.append((f"context.messages[{index}].role", "required"))
    return violations


async def _validate(
    context: grpc.aio.ServicerContext,
    answer_context: cache_pb2.AnswerContext,
    more: list[tuple[str, str]] | None = None,
) -> None:
    annotate(model=answer_context.model[:MAX_NAME_CHARS])
    violations = context_violations(answer_context) + (more or [])
    if violations:
        await abort_with(context, invalid_argument(violations))
