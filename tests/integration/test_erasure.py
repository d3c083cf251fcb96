"""Erasure over real processes: EraseUser and DeleteConversation reach the conversations with their summaries,
the answer cache (exact and by meaning, in Redis and in the memory of each of two cache processes) and the review
cases, and nothing of anyone else.

One cluster for the module, on a real Redis, with keys required and two cache processes that dialogue spreads its
calls over; the model's context is small, so that two long turns are enough for a summary. Each test makes tenants
of its own, and its users write a canary (a text no one else writes) that the replies echo, so that a scan of every
Redis key can tell where the text is kept.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.cli import chatmesh_cli
from support.cluster import Cluster, logged_events
from support.metrics import metric
from support.redis_scan import keys_holding
from support.redis_server import RedisServer

from chatmesh.cache.keys import QUESTION_PREFIX
from chatmesh.review.store import NewCase, RedisReviewStore
from chatmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    review_pb2,
    safety_pb2,
)

ADMIN_TOKEN = "admin-token-for-erasure"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CALL_TIMEOUT = 10.0
MODEL = "gpt-4o-mini"  # the cluster's default
# With no max_tokens, a reply may take half of the context, and the prompt the rest less a margin of 128: 287
# tokens. A long message (110 to 250 tokens, see `long_message`) fits, but not with its reply and another one: at
# the second long turn of a conversation, the first message is left out of the window, and summarized at once.
# The summary's request (its instructions, the messages left out, and SUMMARY_TOKENS for the summary) fits the
# context too, as the model checks.
CONTEXT_TOKENS = 830
SUMMARY_TOKENS = 64

Caches = list[cache_pb2_grpc.CacheServiceStub]


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    with Cluster(
        redis_url=module_redis.url,
        env={
            "CHATMESH_AUTH": "required",
            "CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            # Follow-ups cached too (off by default), questions cached by meaning too, and a summary as soon as a
            # message no longer fits the window, so that the user's text is in every store erasure must reach.
            "CHATMESH_CACHE_FOLLOW_UPS": "true",
            "CHATMESH_SEMANTIC_CACHE": "true",
            "CHATMESH_MODEL_CONTEXT_TOKENS": json.dumps({MODEL: CONTEXT_TOKENS}),
            "CHATMESH_SUMMARY_TRIGGER_TOKENS": "1",
            "CHATMESH_SUMMARY_MAX_TOKENS": str(SUMMARY_TOKENS),
        },
        replicas={"cache": 2},
    ) as running:
        yield running


@pytest.fixture
async def gateway(cluster: Cluster) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield channel


@pytest.fixture
async def caches(cluster: Cluster) -> AsyncIterator[Caches]:
    """A client of each cache process, to ask what it would answer."""
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
        for process in cluster.processes.values()
        if process.command == "cache"
    ]
    assert len(channels) == 2
    try:
        yield [cache_pb2_grpc.CacheServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


@pytest.fixture
async def reviews(module_redis: RedisServer) -> AsyncIterator[RedisReviewStore]:
    store = RedisReviewStore.from_url(module_redis.url, retention_seconds=3600)
    try:
        yield store
    finally:
        await store.close()


class Caller:
    """One API key of a tenant, chatting as any of its users."""

    def __init__(self, channel: grpc.aio.Channel, tenant: str, api_key: str) -> None:
        self.tenant = tenant
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    async def chat(
        self,
        user_id: str,
        message: str,
        conversation_id: str = "",
        idempotency_key: str = "",
        options: chat_pb2.ChatOptions | None = None,
    ) -> chat_pb2.ChatResponse:
        return await self.stub.Chat(
            chat_pb2.ChatRequest(
                user_id=user_id,
                message=message,
                conversation_id=conversation_id,
                idempotency_key=idempotency_key,
                options=options,
            ),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT,
        )

    async def conversation(self, user_id: str, conversation_id: str) -> chat_pb2.Conversation:
        response = await self.stub.GetConversation(
            chat_pb2.GetConversationRequest(user_id=user_id, conversation_id=conversation_id),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT,
        )
        return response.conversation

    async def is_gone(self, user_id: str, conversation_id: str) -> bool:
        try:
            await self.conversation(user_id, conversation_id)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return True
        return False

    async def erase_user(self, user_id: str) -> chat_pb2.EraseUserResponse:
        return await self.stub.EraseUser(
            chat_pb2.EraseUserRequest(user_id=user_id), metadata=self.metadata, timeout=CALL_TIMEOUT
        )

    async def delete(self, user_id: str, conversation_id: str) -> None:
        await self.stub.DeleteConversation(
            chat_pb2.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT,
        )


async def new_caller(gateway: grpc.aio.Channel, prefix: str) -> Caller:
    """A tenant of its own for the calling test, and a caller with a key of it."""
    admin = admin_pb2_grpc.AdminServiceStub(gateway)
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=ADMIN)
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant=name), metadata=ADMIN)
    return Caller(gateway, name, created.api_key)


def echoed(text: str) -> str:
    """A message whose reply repeats `text` (the simulator's [echo])."""
    return f"[echo] {text}"


def long_message(text: str) -> str:
    """`text` eight times, in a message whose reply repeats it: 110 to 250 tokens for the tests' texts (a word and
    32 hexadecimal digits, which the tokenizer splits unevenly)."""
    return echoed(" ".join([text] * 8))


async def summarized(caller: Caller, user_id: str, text: str) -> chat_pb2.ChatResponse:
    """A conversation whose summary holds `text`: a first turn of `long_message(text)` (cached, exactly and by
    meaning), then a second one after which the first message no longer fits the window (above the cache's
    temperature bound: not cached), so that it is summarized. Returns the first turn's response, once the summary
    is written (after the reply: within 100 polls 50 ms apart)."""
    first = await caller.chat(user_id, long_message(text))
    uncached = chat_pb2.ChatOptions(temperature=0.9)
    await caller.chat(user_id, long_message(text), first.conversation_id, options=uncached)
    for _ in range(100):
        summary = (await caller.conversation(user_id, first.conversation_id)).summary
        if summary.message_count:
            assert text in summary.text
            return first
        await asyncio.sleep(0.05)
    raise AssertionError("the conversation was not summarized")


def in_a_summary_and_a_question(keys: list[str]) -> bool:
    """Whether these Redis keys include a conversation's summary and a question of the semantic cache."""
    return any(key.startswith("chatmesh:conv:") and key.endswith(":summary") for key in keys) and any(
        key.startswith(QUESTION_PREFIX) for key in keys
    )


def first_turn(caller: Caller, answered: chat_pb2.ChatResponse, message: str) -> cache_pb2.AnswerContext:
    """What the cache keys the answer to a conversation's first message by (no options set)."""
    return cache_pb2.AnswerContext(
        tenant=caller.tenant,
        model=answered.model,
        messages=[cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=message)],
    )


def next_turn(before: cache_pb2.AnswerContext, reply: str, message: str) -> cache_pb2.AnswerContext:
    following = cache_pb2.AnswerContext()
    following.CopyFrom(before)
    following.messages.add(role=chat_pb2.ROLE_ASSISTANT, content=reply)
    following.messages.add(role=chat_pb2.ROLE_USER, content=message)
    return following


async def lookups(caches: Caches, context: cache_pb2.AnswerContext) -> list[cache_pb2.LookupResponse]:
    """What each cache process answers for `context`."""
    return [await cache.Lookup(cache_pb2.LookupRequest(context=context), timeout=CALL_TIMEOUT) for cache in caches]


async def similar_lookups(caches: Caches, context: cache_pb2.AnswerContext) -> list[cache_pb2.LookupResponse]:
    """What each cache process answers by meaning (its semantic cache) for the first turn `context`."""
    return [
        await cache.LookupSimilar(cache_pb2.LookupSimilarRequest(context=context), timeout=CALL_TIMEOUT)
        for cache in caches
    ]


Look = Callable[[Caches, cache_pb2.AnswerContext], Awaitable[list[cache_pb2.LookupResponse]]]


async def in_every_memory(caches: Caches, context: cache_pb2.AnswerContext, look: Look = lookups) -> bool:
    """Whether every cache process answers `context` from its memory, within 100 tries 20 ms apart (dialogue stores
    it after its caller has the reply; a process's first lookup fills its memory from Redis, and its first lookup by
    meaning in a scope loads the scope's questions from Redis)."""
    for _ in range(100):
        await look(caches, context)
        if all(found.tier == cache_pb2.CACHE_TIER_MEMORY for found in await look(caches, context)):
            return True
        await asyncio.sleep(0.02)
    return False


async def missed_everywhere(caches: Caches, context: cache_pb2.AnswerContext, look: Look = lookups) -> bool:
    """Whether every cache process misses `context`, within 100 tries 20 ms apart (the other process hears of an
    erasure through Redis, a moment after it returned)."""
    for _ in range(100):
        if not any(found.hit for found in await look(caches, context)):
            return True
        await asyncio.sleep(0.02)
    return False


def question_vectors(cluster: Cluster) -> list[float]:
    """The questions' vectors that each cache process holds in its memory (its semantic cache)."""
    return [
        metric(cluster, name, "chatmesh_cache_semantic_vectors", {})
        for name, process in cluster.processes.items()
        if process.command == "cache"
    ]


async def fewer_vectors_everywhere(cluster: Cluster, before: list[float], erased: int) -> bool:
    """Whether every cache process holds `erased` question vectors fewer than `before`, within 100 tries 20 ms
    apart."""
    for _ in range(100):
        if question_vectors(cluster) == [count - erased for count in before]:
            return True
        await asyncio.sleep(0.02)
    return False


async def answered_from_the_cache(caller: Caller, user_id: str, message: str) -> list[str]:
    """Asks `message` in new conversations until the cache answers (at most 20 times); returns the conversations."""
    conversations = []
    for _ in range(20):
        answered = await caller.chat(user_id, message)
        conversations.append(answered.conversation_id)
        if answered.cached:
            return conversations
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer came from the cache in {len(conversations)} conversations")


def review_case(caller: Caller, user_id: str, answered: chat_pb2.ChatResponse, excerpt: str) -> NewCase:
    return NewCase(
        turn=safety_pb2.TurnRef(
            tenant=caller.tenant,
            user_id=user_id,
            conversation_id=answered.conversation_id,
            request_id=answered.request_id,
        ),
        stage=chat_pb2.ContentFilter.STAGE_INPUT,
        categories=("fraud",),
        source=safety_pb2.SCREEN_SOURCE_KEYWORD,
        action=review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW,
        excerpt=excerpt,
    )


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad_request)
    return {violation.field for violation in bad_request.field_violations}


async def test_erasing_a_user_leaves_nothing_of_theirs_in_any_store_and_touches_no_one_else(
    sim: Cluster,
    gateway: grpc.aio.Channel,
    caches: Caches,
    reviews: RedisReviewStore,
    module_redis: RedisServer,
) -> None:
    caller, elsewhere = await new_caller(gateway, "erasure"), await new_caller(gateway, "control")
    canary, kept_beside, kept_elsewhere = (f"{name}-{uuid.uuid4().hex}" for name in ("canary", "beside", "elsewhere"))
    # The user: a conversation of two turns (the second idempotent, so that its reply is also kept for replays),
    # both stored in the cache, then the first question again until the cache answers it; and a conversation long
    # enough to be summarized.
    opening, follow_up = echoed(f"{canary} one"), echoed(f"{canary} two")
    first = await caller.chat("leaving", opening)
    await caller.chat("leaving", follow_up, first.conversation_id, idempotency_key="turn-2")
    from_the_cache = await answered_from_the_cache(caller, "leaving", opening)
    summarized_turn = await summarized(caller, "leaving", canary)
    assert await reviews.open_case(review_case(caller, "leaving", first, f"... {canary} one ..."))
    # Controls, each with a summarized conversation: another user of the same tenant, and the same user id in
    # another tenant.
    beside = await summarized(caller, "staying", kept_beside)
    same_id_elsewhere = await summarized(elsewhere, "leaving", kept_elsewhere)
    assert await reviews.open_case(review_case(elsewhere, "leaving", same_id_elsewhere, f"... {kept_elsewhere} ..."))
    # The answers cached from the user's turns, of which the first turns' questions are also cached by meaning.
    questions = [
        first_turn(caller, first, opening),
        first_turn(caller, summarized_turn, long_message(canary)),
    ]
    answers = [*questions, next_turn(questions[0], first.text, follow_up)]
    controls = [
        first_turn(caller, beside, long_message(kept_beside)),
        first_turn(elsewhere, same_id_elsewhere, long_message(kept_elsewhere)),
    ]
    for context in (*answers, *controls):
        assert await in_every_memory(caches, context)
    for context in (*questions, *controls):
        assert await in_every_memory(caches, context, look=similar_lookups)
    vectors = question_vectors(sim)
    before = await keys_holding(module_redis.url, canary, kept_beside, kept_elsewhere)
    assert all(in_a_summary_and_a_question(keys) for keys in before.values()), before

    erased = await caller.erase_user("leaving")

    conversations = [first.conversation_id, summarized_turn.conversation_id, *from_the_cache]
    # Answers are counted, not the questions kept with them (see CacheService.Erase).
    assert erased == chat_pb2.EraseUserResponse(
        conversations=len(conversations),
        messages=4 + 4 + 2 * len(from_the_cache),
        summaries=1,
        cache_entries=len(answers),
        review_cases=1,
    )
    for conversation_id in conversations:
        assert await caller.is_gone("leaving", conversation_id)
    for context in answers:
        assert await missed_everywhere(caches, context)
    # Before any lookup by meaning, which would drop a vector whose question it cannot read.
    assert await fewer_vectors_everywhere(sim, vectors, len(questions))
    for context in questions:
        assert await missed_everywhere(caches, context, look=similar_lookups)
    after = await keys_holding(module_redis.url, canary, kept_beside, kept_elsewhere)
    assert after[canary] == []
    assert after[kept_beside] == before[kept_beside] and after[kept_elsewhere] == before[kept_elsewhere]
    for context in controls:
        assert all(found.hit for found in await lookups(caches, context))
        assert all(found.hit for found in await similar_lookups(caches, context))
    for control, user_id, response, text in (
        (caller, "staying", beside, kept_beside),
        (elsewhere, "leaving", same_id_elsewhere, kept_elsewhere),
    ):
        kept = await control.conversation(user_id, response.conversation_id)
        assert len(kept.messages) == 4 and text in kept.summary.text
    # Again: nothing left to erase, and no error.
    assert await caller.erase_user("leaving") == chat_pb2.EraseUserResponse()
    log = "".join(process.log() for process in sim.processes.values() if process.command != "modelsim")
    assert "user_erased" in logged_events(log)
    assert canary not in log and '"leaving"' not in log


async def test_deleting_a_conversation_erases_its_summary_the_replies_and_questions_cached_from_it_and_its_review_cases(
    sim: Cluster,
    gateway: grpc.aio.Channel,
    caches: Caches,
    reviews: RedisReviewStore,
    module_redis: RedisServer,
) -> None:
    caller = await new_caller(gateway, "deleting")
    canary, kept = f"canary-{uuid.uuid4().hex}", f"kept-{uuid.uuid4().hex}"
    doomed = await summarized(caller, "ana", canary)
    other = await caller.chat("ana", echoed(kept))
    case_id = await reviews.open_case(review_case(caller, "ana", doomed, f"... {canary} ..."))
    doomed_context = first_turn(caller, doomed, long_message(canary))
    other_context = first_turn(caller, other, echoed(kept))
    for context in (doomed_context, other_context):
        assert await in_every_memory(caches, context)
        assert await in_every_memory(caches, context, look=similar_lookups)
    vectors = question_vectors(sim)
    assert in_a_summary_and_a_question((await keys_holding(module_redis.url, canary))[canary])

    # Only its owner may: another user's attempt erases nothing.
    with pytest.raises(grpc.aio.AioRpcError) as not_theirs:
        await caller.delete("mallory", doomed.conversation_id)
    assert not_theirs.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(found.hit for found in await lookups(caches, doomed_context))
    assert await reviews.get(case_id) is not None

    await caller.delete("ana", doomed.conversation_id)

    assert await caller.is_gone("ana", doomed.conversation_id)
    assert await missed_everywhere(caches, doomed_context)
    assert await fewer_vectors_everywhere(sim, vectors, 1)
    assert await missed_everywhere(caches, doomed_context, look=similar_lookups)
    assert await reviews.get(case_id) is None
    assert (await keys_holding(module_redis.url, canary))[canary] == []
    assert all(found.hit for found in await lookups(caches, other_context))
    assert all(found.hit for found in await similar_lookups(caches, other_context))
    assert len((await caller.conversation("ana", other.conversation_id)).messages) == 2


async def test_a_cache_store_that_lands_after_the_erasure_keeps_nothing(
    sim: Cluster,
    gateway: grpc.aio.Channel,
    caches: Caches,
    module_redis: RedisServer,
) -> None:
    caller = await new_caller(gateway, "racing")
    canary = f"canary-{uuid.uuid4().hex}"
    leaving = await caller.chat("fay", echoed(f"{canary} erased"))
    deleted = await caller.chat("gus", echoed(f"{canary} deleted"))
    kept = await caller.chat("gus", echoed("kept"))
    await caller.erase_user("fay")
    await caller.delete("gus", deleted.conversation_id)

    # Dialogue stores a reply after its caller has it: made before the erasure, its store may land after it, on
    # either cache process (the same call as dialogue's, for each conversation).
    late = [
        (first_turn(caller, leaving, echoed(f"{canary} late")), "fay", leaving.conversation_id),
        (first_turn(caller, deleted, echoed(f"{canary} late too")), "gus", deleted.conversation_id),
    ]
    for cache in caches:
        for context, user_id, conversation_id in late:
            request = cache_pb2.StoreRequest(
                context=context,
                reply=cache_pb2.CachedReply(text=f"{canary} reply", finish_reason=chat_pb2.FINISH_REASON_STOP),
                user_id=user_id,
                conversation_id=conversation_id,
            )
            assert not (await cache.Store(request, timeout=CALL_TIMEOUT)).stored

    for context, _, _ in late:
        assert not any(found.hit for found in await lookups(caches, context))
        assert not any(found.hit for found in await similar_lookups(caches, context))
    assert (await keys_holding(module_redis.url, canary))[canary] == []
    # The user's other conversation is not erased: its answer is cached as before.
    assert await in_every_memory(caches, first_turn(caller, kept, echoed("kept")))


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"tenant": "Not A Tenant", "user_id": "u"}, {"tenant"}),
        ({"tenant": "acme"}, {"user_id"}),
        ({"tenant": "acme", "user_id": "u" * 129}, {"user_id"}),
    ],
    ids=["bad-tenant", "no-user", "long-user"],
)
async def test_an_admin_erasure_names_a_tenant_and_a_user(
    gateway: grpc.aio.Channel, request_fields: dict[str, str], fields: set[str]
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin.EraseUser(admin_pb2.EraseTenantUserRequest(**request_fields), metadata=ADMIN, timeout=CALL_TIMEOUT)

    assert bad_fields(raised.value) == fields


async def test_a_tenant_erases_only_its_own_users_and_names_one(sim: Cluster, gateway: grpc.aio.Channel) -> None:
    caller, elsewhere = await new_caller(gateway, "own"), await new_caller(gateway, "theirs")
    kept = await elsewhere.chat("bo", "hello")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await caller.erase_user("")
    assert bad_fields(raised.value) == {"user_id"}
    assert await caller.erase_user("bo") == chat_pb2.EraseUserResponse()
    assert len((await elsewhere.conversation("bo", kept.conversation_id)).messages) == 2


async def test_the_cli_erases_a_user_of_a_tenant_with_the_admin_token(sim: Cluster, gateway: grpc.aio.Channel) -> None:
    caller = await new_caller(gateway, "cli")
    conversation = await caller.chat("cy", echoed("remember me"))
    target = ("--target", sim.gateway_target)

    denied = await asyncio.to_thread(
        chatmesh_cli, "users", "erase", "cy", "--tenant", caller.tenant, *target, env={"CHATMESH_ADMIN_TOKEN": "wrong"}
    )
    assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED")
    erased = await asyncio.to_thread(
        chatmesh_cli,
        "users",
        "erase",
        "cy",
        "--tenant",
        caller.tenant,
        *target,
        env={"CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN},
    )

    assert erased.returncode == 0, erased.stderr
    counts = json.loads(erased.stdout)
    assert (counts["conversations"], counts["messages"]) == ("1", "2")
    assert counts["review_cases"] == "0"
    assert await caller.is_gone("cy", conversation.conversation_id)


async def test_with_the_cache_down_erasure_says_to_retry_and_a_retry_finishes_it(
    sim: Cluster,
    gateway: grpc.aio.Channel,
    caches: Caches,
    module_redis: RedisServer,
) -> None:
    caller = await new_caller(gateway, "retry")
    canary = f"canary-{uuid.uuid4().hex}"
    kept = await caller.chat("di", echoed(f"{canary} kept"))
    erased = await caller.chat("eve", echoed(f"{canary} erased"))
    assert await in_every_memory(caches, first_turn(caller, kept, echoed(f"{canary} kept")))
    assert await in_every_memory(caches, first_turn(caller, erased, echoed(f"{canary} erased")))
    cache_processes = [process for process in sim.processes.values() if process.command == "cache"]
    for process in cache_processes:
        process.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as deleting:
            await caller.delete("di", kept.conversation_id)
        with pytest.raises(grpc.aio.AioRpcError) as erasing:
            await caller.erase_user("eve")
    finally:
        for process in cache_processes:
            process.start()

    # A conversation is kept until what derives from it is erased; a user's conversations go at once.
    assert deleting.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in deleting.value.details()
    assert len((await caller.conversation("di", kept.conversation_id)).messages) == 2
    assert erasing.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cached replies" in erasing.value.details() and "retry" in erasing.value.details()
    assert await caller.is_gone("eve", erased.conversation_id)
    await caller.delete("di", kept.conversation_id)
    finished = await caller.erase_user("eve")
    assert (finished.conversations, finished.cache_entries) == (0, 1)
    assert (await keys_holding(module_redis.url, canary))[canary] == []
