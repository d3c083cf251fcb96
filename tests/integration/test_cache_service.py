"""CacheService over a real cache process: alone, backed by Redis, across a restart, with Redis gone, and
erasure reaching every process."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from redis.asyncio import Redis
from support.cache_calls import (
    CALL_TIMEOUT,
    REPLY_TEXT,
    answer_context,
    cache_process,
    connect,
    erase,
    lookup,
    reply,
    store,
)
from support.cluster import ServiceProcess, log_lines, logged_events
from support.redis_server import RedisServer

from chatmesh.cache.keys import conversation_index, tombstone, user_index
from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2


@pytest.fixture(scope="module")
def memory_cache() -> Iterator[ServiceProcess]:
    """One cache process without Redis, shared by the tests of this module that need no restart."""
    process = cache_process(None)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def cache(memory_cache: ServiceProcess) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{memory_cache.port}") as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


# Two cache processes on one Redis, a stub of each, and a client of that Redis.
TwoOnRedis = tuple[list[ServiceProcess], list[cache_pb2_grpc.CacheServiceStub], Redis]


@pytest.fixture
async def two_on_redis(redis_url: str) -> AsyncIterator[TwoOnRedis]:
    processes = [cache_process(redis_url), cache_process(redis_url)]
    client = Redis.from_url(redis_url)
    channels: tuple[grpc.aio.Channel, ...] = ()
    try:
        for process in processes:
            process.start()
        channels, stubs = zip(*[await connect(process) for process in processes], strict=True)
        yield processes, list(stubs), client
    finally:
        for channel in channels:
            await channel.close()
        await client.aclose()
        for process in processes:
            process.stop()


async def test_a_miss_then_a_store_then_a_memory_hit(cache: cache_pb2_grpc.CacheServiceStub) -> None:
    context = answer_context("miss, store, hit")

    missed = await lookup(cache, context)
    stored = await store(cache, context, reply())
    hit = await lookup(cache, context)

    assert missed == cache_pb2.LookupResponse(hit=False)
    assert stored.stored and list(stored.tiers) == [cache_pb2.CACHE_TIER_MEMORY]
    assert hit.hit and hit.tier == cache_pb2.CACHE_TIER_MEMORY
    assert hit.reply == reply()


async def test_the_same_question_after_another_history_misses(cache: cache_pb2_grpc.CacheServiceStub) -> None:
    first_turn = answer_context("And its population?")
    await store(cache, first_turn, reply("About two million."))
    follow_up = cache_pb2.AnswerContext()
    follow_up.CopyFrom(first_turn)
    del follow_up.messages[:]
    follow_up.messages.add(role=chat_pb2.ROLE_USER, content="What is the capital of Spain?")
    follow_up.messages.add(role=chat_pb2.ROLE_ASSISTANT, content="Madrid.")
    follow_up.messages.add(role=chat_pb2.ROLE_USER, content="And its population?")

    assert not (await lookup(cache, follow_up)).hit
    assert (await lookup(cache, first_turn)).hit


async def test_whitespace_and_width_variants_of_a_question_hit(cache: cache_pb2_grpc.CacheServiceStub) -> None:
    await store(cache, answer_context("What is AI?"), reply("Artificial intelligence."))

    hit = await lookup(cache, answer_context("  Ｗｈａｔ　is \n AI？ "))  # noqa: RUF001

    assert hit.hit and hit.reply.text == "Artificial intelligence."


async def test_answers_are_not_shared_across_tenants_or_models(cache: cache_pb2_grpc.CacheServiceStub) -> None:
    await store(cache, answer_context("scoped", tenant="acme", model="gpt-4o"), reply())

    assert (await lookup(cache, answer_context("scoped", tenant="acme", model="gpt-4o"))).hit
    assert not (await lookup(cache, answer_context("scoped", tenant="globex", model="gpt-4o"))).hit
    assert not (await lookup(cache, answer_context("scoped", tenant="acme", model="gpt-4o-mini"))).hit


@pytest.mark.parametrize(
    "finish_reason",
    [
        chat_pb2.FINISH_REASON_LENGTH,
        chat_pb2.FINISH_REASON_CONTENT_FILTER,
        chat_pb2.FINISH_REASON_TOOL_CALLS,
        chat_pb2.FINISH_REASON_UNSPECIFIED,
    ],
)
async def test_a_reply_that_did_not_finish_with_stop_is_not_stored(
    cache: cache_pb2_grpc.CacheServiceStub, finish_reason: int
) -> None:
    context = answer_context(f"cut short {finish_reason}")

    stored = await store(cache, context, reply(finish_reason=finish_reason))

    assert stored == cache_pb2.StoreResponse(stored=False)
    assert not (await lookup(cache, context)).hit


async def test_an_empty_reply_is_not_stored(cache: cache_pb2_grpc.CacheServiceStub) -> None:
    context = answer_context("empty reply")

    assert not (await store(cache, context, reply(text=""))).stored
    assert not (await lookup(cache, context)).hit


@pytest.mark.parametrize(
    ("field", "context"),
    [
        ("context.tenant", answer_context(tenant="")),
        ("context.tenant", answer_context(tenant="t" * 257)),
        ("context.model", answer_context(model="")),
        ("context.messages", cache_pb2.AnswerContext(tenant="default", model="gpt-4o-mini")),
        (
            "context.messages",
            cache_pb2.AnswerContext(
                tenant="default",
                model="gpt-4o-mini",
                messages=[cache_pb2.ContextMessage(role=chat_pb2.ROLE_ASSISTANT, content="not the user's")],
            ),
        ),
        (
            "context.messages[0].role",
            cache_pb2.AnswerContext(
                tenant="default",
                model="gpt-4o-mini",
                messages=[
                    cache_pb2.ContextMessage(content="no role"),
                    cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content="question"),
                ],
            ),
        ),
    ],
)
async def test_an_unusable_context_is_invalid_argument_naming_the_field(
    cache: cache_pb2_grpc.CacheServiceStub, field: str, context: cache_pb2.AnswerContext
) -> None:
    for call in (lookup(cache, context), store(cache, context, reply())):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert field in bad_fields(raised.value)


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    """The fields an INVALID_ARGUMENT names in its BadRequest."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad_request)
    return {violation.field for violation in bad_request.field_violations}


@pytest.mark.parametrize(
    ("user_id", "conversation_id", "field"), [("", "conv-1", "user_id"), ("user-1", "", "conversation_id")]
)
async def test_a_reply_whose_origin_is_not_named_is_not_stored(
    cache: cache_pb2_grpc.CacheServiceStub, user_id: str, conversation_id: str, field: str
) -> None:
    context = answer_context(f"no origin {field}")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await store(cache, context, reply(), user_id=user_id, conversation_id=conversation_id)

    assert field in bad_fields(raised.value)
    assert not (await lookup(cache, context)).hit


async def test_without_redis_erasure_removes_what_this_process_stored_from_the_conversation_or_user(
    cache: cache_pb2_grpc.CacheServiceStub,
) -> None:
    first, second, kept = (answer_context(f"erase me {n}", tenant="erasing") for n in range(3))
    await store(cache, first, reply(), user_id="leaving", conversation_id="c-1")
    await store(cache, second, reply(), user_id="leaving", conversation_id="c-2")
    await store(cache, kept, reply(), user_id="staying", conversation_id="c-3")

    assert await erase(cache, "erasing", conversation_id="c-1") == 1
    assert [(await lookup(cache, context)).hit for context in (first, second, kept)] == [False, True, True]
    assert await erase(cache, "erasing", user_id="leaving") == 1
    assert await erase(cache, "erasing", user_id="leaving") == 0
    assert [(await lookup(cache, context)).hit for context in (first, second, kept)] == [False, False, True]
    # The same ids in another tenant name nothing stored here.
    assert await erase(cache, "other", user_id="staying") == 0
    assert (await lookup(cache, kept)).hit


async def test_without_redis_a_store_that_lands_after_its_conversations_erasure_is_refused(
    cache: cache_pb2_grpc.CacheServiceStub, memory_cache: ServiceProcess
) -> None:
    racing = answer_context("made before the erasure, stored after it", tenant="racing")
    assert await erase(cache, "racing", conversation_id="c-1") == 0

    refused = await store(cache, racing, reply(), user_id="u-1", conversation_id="c-1")

    assert refused == cache_pb2.StoreResponse(stored=False)
    assert not (await lookup(cache, racing)).hit
    # The user's other conversations are not erased.
    assert (await store(cache, racing, reply(), user_id="u-1", conversation_id="c-2")).stored
    assert refused_as_erased(memory_cache) == 1


def refused_as_erased(process: ServiceProcess) -> int:
    """The stores `process` logged as refused for an erasure."""
    return sum(
        line.get("event") == "cache_store_refused" and line.get("reason") == "erased"
        for line in log_lines(process.log())
    )


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"user_id": "u"}, "tenant"),
        ({"tenant": "t"}, "user_id"),
        ({"tenant": "t", "user_id": "u", "conversation_id": "c"}, "user_id"),
        ({"tenant": "t", "conversation_id": "c" * 257}, "conversation_id"),
    ],
    ids=["no-tenant", "neither-id", "both-ids", "long-id"],
)
async def test_an_erasure_names_a_tenant_and_exactly_one_of_user_or_conversation(
    cache: cache_pb2_grpc.CacheServiceStub, request_fields: dict[str, str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cache.Erase(cache_pb2.EraseRequest(**request_fields), timeout=CALL_TIMEOUT)

    assert field in bad_fields(raised.value)


async def until_missed(stub: cache_pb2_grpc.CacheServiceStub, context: cache_pb2.AnswerContext) -> bool:
    """Whether lookups of `context` miss within 100 tries 20 ms apart (another process's erasure reaches this
    one's memory through Redis, a moment after it returned)."""
    for _ in range(100):
        if not (await lookup(stub, context)).hit:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_with_redis_an_erasure_reaches_redis_and_the_memory_of_every_cache_process(
    two_on_redis: TwoOnRedis,
) -> None:
    _, stubs, client = two_on_redis
    asked, other = answer_context("asked in the erased conversation"), answer_context("asked elsewhere")
    await store(stubs[0], asked, reply(), user_id="u-1", conversation_id="c-1")
    await store(stubs[1], other, reply(), user_id="u-1", conversation_id="c-2")
    for stub in stubs:  # in both processes' memory
        for context in (asked, other):
            await lookup(stub, context)
            assert (await lookup(stub, context)).tier == cache_pb2.CACHE_TIER_MEMORY

    assert await erase(stubs[1], conversation_id="c-1") == 1
    for stub in stubs:
        assert await until_missed(stub, asked)
        assert (await lookup(stub, other)).hit

    assert await erase(stubs[0], user_id="u-1") == 1
    for stub in stubs:
        assert await until_missed(stub, other)
    assert await erase(stubs[0], user_id="u-1") == 0
    # Nothing is left but the tombstones of what was erased.
    tombstones = {tombstone(conversation_index("default", "c-1")), tombstone(user_index("default", "u-1"))}
    assert {key.decode() async for key in client.scan_iter("chatmesh:cache*")} == tombstones


async def test_with_redis_a_store_that_lands_after_an_erasure_is_refused_by_every_cache_process(
    two_on_redis: TwoOnRedis,
) -> None:
    processes, stubs, client = two_on_redis
    racing = answer_context("made before the erasure, stored after it")
    await store(stubs[0], racing, reply(), user_id="u-1", conversation_id="c-1")

    assert await erase(stubs[0], user_id="u-1") == 1
    # Dialogue's store of the user's last reply, late: on the process that erased, and on one that may not have
    # heard of the erasure yet, whose memory nothing may keep either.
    for stub in stubs:
        refused = await store(stub, racing, reply(), user_id="u-1", conversation_id="c-1")
        assert refused == cache_pb2.StoreResponse(stored=False)
    for stub in stubs:
        assert not (await lookup(stub, racing)).hit
    assert [key async for key in client.scan_iter("chatmesh:cache*")] == [
        tombstone(user_index("default", "u-1")).encode()
    ]
    # Another user's store of the same answer is kept.
    assert (await store(stubs[1], racing, reply(), user_id="u-2", conversation_id="c-2")).stored
    assert (await lookup(stubs[0], racing)).hit
    assert [refused_as_erased(process) for process in processes] == [1, 1]


def assert_serving_and_reflected(process: ServiceProcess) -> None:
    """Health SERVING, overall and for CacheService, and CacheService listed by reflection."""
    with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chatmesh.v1.CacheService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT
        )
        listed = {service.name for response in responses for service in response.list_services_response.service}
    assert "chatmesh.v1.CacheService" in listed


def test_health_is_serving_and_reflection_lists_the_cache_service(memory_cache: ServiceProcess) -> None:
    assert_serving_and_reflected(memory_cache)


async def test_a_redis_backed_answer_survives_a_restart_of_the_cache_process(redis_url: str) -> None:
    process = cache_process(redis_url)
    context, cut_short = answer_context("survives a restart"), answer_context("cut short")
    try:
        process.start()
        channel, stub = await connect(process)
        async with channel:
            stored = await store(stub, context, reply())
            refused = await store(stub, cut_short, reply(finish_reason=chat_pb2.FINISH_REASON_LENGTH))
        assert list(stored.tiers) == [cache_pb2.CACHE_TIER_MEMORY, cache_pb2.CACHE_TIER_REDIS]
        assert refused == cache_pb2.StoreResponse(stored=False)
        assert process.stop() == 0

        process.start()
        channel, stub = await connect(process)
        async with channel:
            from_redis = await lookup(stub, context)
            from_memory = await lookup(stub, context)
            cut_short_lookup = await lookup(stub, cut_short)
    finally:
        process.stop()

    assert from_redis.hit and from_redis.tier == cache_pb2.CACHE_TIER_REDIS
    assert from_redis.reply == reply()
    assert from_memory.hit and from_memory.tier == cache_pb2.CACHE_TIER_MEMORY
    assert cut_short_lookup == cache_pb2.LookupResponse(hit=False)


async def test_with_redis_down_the_cache_keeps_answering_from_memory_and_misses() -> None:
    redis_server = RedisServer.start()
    process = cache_process(redis_server.url)
    kept, unknown, later = answer_context("kept"), answer_context("never stored"), answer_context("stored later")
    try:
        process.start()
        channel, stub = await connect(process)
        async with channel:
            await store(stub, kept, reply())
            redis_server.stop()

            kept_hit = await lookup(stub, kept)
            unknown_miss = await lookup(stub, unknown)
            later_stored = await store(stub, later, reply("stored while Redis is down"))
            later_hit = await lookup(stub, later)
        assert process.running
        assert_serving_and_reflected(process)
    finally:
        process.stop()
        redis_server.stop()

    assert kept_hit.hit and kept_hit.tier == cache_pb2.CACHE_TIER_MEMORY
    assert unknown_miss == cache_pb2.LookupResponse(hit=False)
    assert later_stored.stored and list(later_stored.tiers) == [cache_pb2.CACHE_TIER_MEMORY]
    assert later_hit.hit and later_hit.tier == cache_pb2.CACHE_TIER_MEMORY
    log = process.log()
    assert "cache_redis_failed" in logged_events(log)
    assert "stored while Redis is down" not in log and REPLY_TEXT not in log and "never stored" not in log
