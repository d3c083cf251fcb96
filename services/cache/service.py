"""CacheService: exact lookup and store of replies, and the policy of what may be kept."""

import grpc
from google.protobuf.message import DecodeError

from chatmesh.cache.keys import answer_key
from chatmesh.cache.tiers import AnswerCache, TierKind
from chatmesh.runtime import metrics
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.status import abort_with, invalid_argument
from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2

log = get_logger(__name__)

# Tenant and model are in every key's readable prefix; keep keys small.
MAX_NAME_CHARS = 256

_TIERS = {TierKind.MEMORY: cache_pb2.CACHE_TIER_MEMORY, TierKind.REDIS: cache_pb2.CACHE_TIER_REDIS}


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: AnswerCache) -> None:
        self._cache = cache

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        await _validate(context, request.context)
        hit = await self._cache.lookup(answer_key(request.context))
        if hit is None:
            metrics.cache_lookup("miss")
            return cache_pb2.LookupResponse(hit=False)
        try:
            reply = cache_pb2.CachedReply.FromString(hit.value)
        except DecodeError:
            # Written by something else under our prefix; a miss, and the next Store replaces it.
            log.warning("cache_value_unreadable", extra={"tier": hit.tier.value})
            metrics.cache_lookup("miss")
            return cache_pb2.LookupResponse(hit=False)
        metrics.cache_lookup(hit.tier.value)
        return cache_pb2.LookupResponse(hit=True, reply=reply, tier=_TIERS[hit.tier])

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        await _validate(context, request.context)
        if not may_be_cached(request.reply):
            log.debug(
                "cache_store_refused",
                extra={"finish_reason": chat_pb2.FinishReason.Name(request.reply.finish_reason)},
            )
            return cache_pb2.StoreResponse(stored=False)
        kept = await self._cache.store(answer_key(request.context), request.reply.SerializeToString())
        return cache_pb2.StoreResponse(stored=bool(kept), tiers=[_TIERS[tier] for tier in kept])


def may_be_cached(reply: cache_pb2.CachedReply) -> bool:
    """Only a whole reply the model ended on its own: never one cut by LENGTH, refused (CONTENT_FILTER),
    or asking for tool calls, and never an empty one."""
    return reply.finish_reason == chat_pb2.FINISH_REASON_STOP and bool(reply.text)


def context_violations(answer_context: cache_pb2.AnswerContext) -> list[tuple[str, str]]:
    """The (field, description) pairs that make an AnswerContext unusable as a key."""
    violations = []
    for name, value in (("tenant", answer_context.tenant), ("model", answer_context.model)):
        if not value:
            violations.append((f"context.{name}", "required"))
        elif len(value) > MAX_NAME_CHARS:
            violations.append((f"context.{name}", f"at most {MAX_NAME_CHARS} characters"))
    if not answer_context.messages:
        violations.append(("context.messages", "required: the window, ending with the new user message"))
    elif answer_context.messages[-1].role != chat_pb2.ROLE_USER:
        violations.append(("context.messages", "the last message must be the user's"))
    for index, message in enumerate(answer_context.messages):
        if message.role == chat_pb2.ROLE_UNSPECIFIED:
            violations.append((f"context.messages[{index}].role", "required"))
    return violations


async def _validate(context: grpc.aio.ServicerContext, answer_context: cache_pb2.AnswerContext) -> None:
    annotate(model=answer_context.model[:MAX_NAME_CHARS])
    violations = context_violations(answer_context)
    if violations:
        await abort_with(context, invalid_argument(violations))
