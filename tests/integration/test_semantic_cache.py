"""The semantic cache over real cache processes, Redis, and modelsim's /v1/embeddings through the openai SDK:
a paraphrase is answered, a different question never is, scopes never mix, the index outlives a process, erasure
reaches the vectors, and a failing embedding endpoint is a miss."""

import asyncio
import json
import os
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from support.cache_calls import answer_context, cache_process, erase, lookup, lookup_similar, reply, store
from support.cluster import Cluster, ServiceProcess, logged_events
from support.metrics import metric
from support.ports import free_port

from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2, chat_pb2_grpc

# Low enough that modelsim's word-hashing embeddings make the near-misses below candidates, so that the guards,
# not the threshold, must refuse them.
GUARD_THRESHOLD = "0.5"
PARAPHRASE_THRESHOLD = "0.8"
QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"  # 0.86 with modelsim's embeddings
ANSWER = "Open Settings, then Security, then Reset password."
ATTEMPTS = 100  # bounded polls, 50 ms apart


@pytest.fixture(scope="module")
def modelsim() -> Iterator[ServiceProcess]:
    port = free_port()
    env = {**os.environ, "CHATMESH_BIND_HOST": "127.0.0.1", "CHATMESH_MODELSIM_PORT": str(port)}
    process = ServiceProcess("modelsim", port, env, Path(tempfile.mkdtemp(prefix="chatmesh-modelsim-")))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def sim_config(modelsim: ServiceProcess) -> Iterator[Callable[..., None]]:
    """Sets modelsim's config for one test, and puts it back after."""

    def configure(**fields: object) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{modelsim.port}/sim/config",
            data=json.dumps(fields).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    yield configure
    configure(embedding_error_status=0, embedding_latency_seconds=0)


@pytest.fixture
async def semantic_caches(
    modelsim: ServiceProcess,
) -> AsyncIterator[Callable[..., tuple[ServiceProcess, cache_pb2_grpc.CacheServiceStub]]]:
    """Starts semantic cache processes (Redis-backed when given a URL) and returns a stub of each; all are stopped
    at the end."""
    started: list[tuple[ServiceProcess, grpc.aio.Channel]] = []

    def start(redis_url: str | None, **settings: str) -> tuple[ServiceProcess, cache_pb2_grpc.CacheServiceStub]:
        process = cache_process(
            redis_url,
            **{
                "CHATMESH_SEMANTIC_CACHE": "true",
                "CHATMESH_SEMANTIC_CACHE_THRESHOLD": PARAPHRASE_THRESHOLD,
                "OPENAI_API_KEY": "test-key",
                "OPENAI_BASE_URL": f"http://127.0.0.1:{modelsim.port}/v1",
                **settings,
            },
        )
        process.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
        started.append((process, channel))
        return process, cache_pb2_grpc.CacheServiceStub(channel)

    try:
        yield start
    finally:
        for process, channel in started:
            await channel.close()
            process.stop()


async def find(stub: cache_pb2_grpc.CacheServiceStub, context: cache_pb2.AnswerContext) -> cache_pb2.LookupResponse:
    """What dialogue finds: the exact answer, else (when the exact lookup allows it) one close in meaning."""
    exact = await lookup(stub, context)
    if exact.hit or not exact.similar_lookup:
        return exact
    return await lookup_similar(stub, context)


async def until_hit(
    stub: cache_pb2_grpc.CacheServiceStub, context: cache_pb2.AnswerContext
) -> cache_pb2.LookupResponse:
    """The first hit within ATTEMPTS lookups (a process loads a scope from Redis in the background: the lookup
    that starts the load misses); the last miss if none."""
    for _ in range(ATTEMPTS):
        found = await find(stub, context)
        if found.hit:
            return found
        await asyncio.sleep(0.05)
    return found


async def question_keys(redis_url: str) -> list[bytes]:
    client = Redis.from_url(redis_url)
    try:
        return [key async for key in client.scan_iter(match="chatmesh:cache-question:*")]
    finally:
        await client.aclose()


@pytest.mark.parametrize("backed_by", ["memory", "redis"])
async def test_a_paraphrase_is_answered_from_the_cache_marked_semantic_with_its_similarity(
    semantic_caches, redis_url: str, backed_by: str
) -> None:
    _, cache = semantic_caches(redis_url if backed_by == "redis" else None)
    await find(cache, answer_context(QUESTION))  # the miss before the model answers
    assert (await store(cache, answer_context(QUESTION), reply(ANSWER))).stored

    found = await until_hit(cache, answer_context(PARAPHRASE))
    exact = await lookup(cache, answer_context(QUESTION))

    assert found.hit and found.reply.text == ANSWER
    assert found.match == chat_pb2.CACHE_MATCH_SEMANTIC
    assert 0.8 <= found.similarity < 1.0
    assert exact.match == chat_pb2.CACHE_MATCH_EXACT and exact.similarity == 1.0


def embedding_requests(modelsim: ServiceProcess) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{modelsim.port}/sim/stats", timeout=5) as response:
        return json.loads(response.read())["embedding_requests"]


async def test_the_store_after_a_miss_reuses_the_lookups_embedding_whichever_process_it_reaches(
    semantic_caches, modelsim: ServiceProcess, redis_url: str
) -> None:
    _, first = semantic_caches(redis_url)
    _, second = semantic_caches(redis_url)
    before = embedding_requests(modelsim)

    missed = await lookup_similar(first, answer_context(QUESTION))
    await store(second, answer_context(QUESTION), reply(ANSWER), embedding=missed.embedding)

    assert not missed.hit
    assert (missed.embedding.model, missed.embedding.dimensions) == ("text-embedding-3-small", 256)
    assert len(missed.embedding.vector) == 256 * 4
    assert embedding_requests(modelsim) == before + 1
    assert (await until_hit(second, answer_context(PARAPHRASE))).hit


async def test_an_embedding_of_another_model_is_not_reused(
    semantic_caches, modelsim: ServiceProcess, redis_url: str
) -> None:
    _, cache = semantic_caches(redis_url)
    missed = await lookup_similar(cache, answer_context(QUESTION))
    other = cache_pb2.QuestionEmbedding(model="text-embedding-3-large", dimensions=256, vector=missed.embedding.vector)
    before = embedding_requests(modelsim)

    await store(cache, answer_context(QUESTION), reply(ANSWER), embedding=other)

    assert embedding_requests(modelsim) == before + 1


NEAR_MISSES = [
    ("Can I return an item after 30 days?", "Can I return an item after 60 days?"),
    ("Can I get a refund within three days?", "Can I get a refund within five days?"),
    ("How deep is the Atlantic Ocean?", "How deep is the Pacific Ocean?"),
    ("大西洋有多深？", "太平洋有多深？"),  # noqa: RUF001
    ("Does the iPhone 14 support wireless charging?", "Does the iPhone 15 support wireless charging?"),
    ("Can I cancel my order?", "Can't I cancel my order?"),
    ("我能退款吗？", "我不能退款吗？"),  # noqa: RUF001
    ('What does "premium" include?', 'What does "basic" include?'),
]


async def test_a_different_question_is_never_answered_however_close_its_words(semantic_caches, redis_url: str) -> None:
    _, cache = semantic_caches(redis_url, CHATMESH_SEMANTIC_CACHE_THRESHOLD=GUARD_THRESHOLD)
    for stored, _ in NEAR_MISSES:
        await find(cache, answer_context(stored))
        assert (await store(cache, answer_context(stored), reply(f"About: {stored}"))).stored
    await until_hit(cache, answer_context(NEAR_MISSES[0][0] + " "))  # the scope is loaded

    for stored, asked in NEAR_MISSES:
        found = await find(cache, answer_context(asked))
        assert not found.hit, f"{asked!r} was answered with the answer to {stored!r}"


async def test_only_first_turns_are_looked_up_by_default(semantic_caches, redis_url: str) -> None:
    _, cache = semantic_caches(redis_url)
    await store(cache, answer_context(QUESTION), reply(ANSWER))
    await until_hit(cache, answer_context(PARAPHRASE))
    follow_up = answer_context(PARAPHRASE)
    follow_up.messages.insert(0, cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content="Hello"))
    follow_up.messages.insert(1, cache_pb2.ContextMessage(role=chat_pb2.ROLE_ASSISTANT, content="Hi!"))

    missed = await lookup(cache, follow_up)
    assert not missed.hit and not missed.similar_lookup
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup_similar(cache, follow_up)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_with_follow_ups_on_a_follow_up_matches_only_after_the_same_history(
    semantic_caches, redis_url: str
) -> None:
    _, cache = semantic_caches(redis_url, CHATMESH_SEMANTIC_CACHE_FOLLOW_UPS="true")

    def after(history: str, question: str) -> cache_pb2.AnswerContext:
        context = answer_context(question)
        context.messages.insert(0, cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=history))
        context.messages.insert(1, cache_pb2.ContextMessage(role=chat_pb2.ROLE_ASSISTANT, content="Sure."))
        return context

    await store(cache, after("I use the mobile app.", QUESTION), reply(ANSWER))

    assert (await until_hit(cache, after("I use the mobile app.", PARAPHRASE))).hit
    assert not (await find(cache, after("I use the website.", PARAPHRASE))).hit


SCOPES = {
    "tenant": {"tenant": "another-tenant"},
    "model": {"model": "gpt-4o"},
    "system prompt": {"system_prompt": "Answer in French."},
    "temperature": {"temperature": 0.2},
    "max tokens": {"max_tokens": 50},
}


async def test_a_paraphrase_is_matched_only_within_its_scope(semantic_caches, redis_url: str) -> None:
    _, cache = semantic_caches(redis_url)
    await store(cache, answer_context(QUESTION), reply(ANSWER))
    assert (await until_hit(cache, answer_context(PARAPHRASE))).hit

    for name, fields in SCOPES.items():
        scoped = answer_context(PARAPHRASE, **fields)
        await find(cache, scoped)
        await asyncio.sleep(0.2)  # let a Redis load of the scope finish, if one started
        assert not (await find(cache, scoped)).hit, name


@pytest.mark.parametrize(
    "embedding",
    [{"CHATMESH_EMBEDDING_MODEL": "text-embedding-3-large"}, {"CHATMESH_EMBEDDING_DIMENSIONS": "128"}],
    ids=["model", "dimensions"],
)
async def test_vectors_of_another_embedding_model_or_size_are_never_compared(
    semantic_caches, redis_url: str, embedding: dict[str, str]
) -> None:
    _, first = semantic_caches(redis_url)
    _, other = semantic_caches(redis_url, **embedding)
    await store(first, answer_context(QUESTION), reply(ANSWER))
    assert (await until_hit(first, answer_context(PARAPHRASE))).hit

    await find(other, answer_context(PARAPHRASE))
    await asyncio.sleep(0.2)

    assert not (await find(other, answer_context(PARAPHRASE))).hit


async def test_the_index_outlives_the_process_that_built_it(semantic_caches, redis_url: str) -> None:
    first_process, first = semantic_caches(redis_url)
    await store(first, answer_context(QUESTION), reply(ANSWER))
    first_process.stop()

    _, restarted = semantic_caches(redis_url)

    found = await until_hit(restarted, answer_context(PARAPHRASE))
    assert found.hit and found.match == chat_pb2.CACHE_MATCH_SEMANTIC


async def test_a_question_stored_by_one_replica_is_found_by_another_that_had_loaded_the_scope(
    semantic_caches, redis_url: str
) -> None:
    _, first = semantic_caches(redis_url)
    _, second = semantic_caches(redis_url)
    await store(first, answer_context("What are your opening hours?"), reply("Nine to five."))
    assert (await until_hit(second, answer_context("What are your opening hours, please?"))).hit

    await store(first, answer_context(QUESTION), reply(ANSWER))  # announced to the second

    assert (await until_hit(second, answer_context(PARAPHRASE))).hit


@pytest.mark.parametrize("backed_by", ["memory", "redis"])
async def test_erasing_a_conversation_removes_its_questions_and_their_vectors_everywhere(
    semantic_caches, redis_url: str, backed_by: str
) -> None:
    url = redis_url if backed_by == "redis" else None
    _, first = semantic_caches(url)
    second = semantic_caches(url)[1] if url else first
    await store(first, answer_context(QUESTION), reply(ANSWER), conversation_id="conv-erased")
    await store(first, answer_context("What are your opening hours?"), reply("Nine to five."), conversation_id="kept")
    assert (await until_hit(second, answer_context(PARAPHRASE))).hit

    assert await erase(first, conversation_id="conv-erased") == 1

    for replica in (first, second):
        assert not (await find(replica, answer_context(PARAPHRASE))).hit
        assert not (await find(replica, answer_context(QUESTION))).hit
        assert (await find(replica, answer_context("What are your opening hours, please?"))).hit
    if url:
        remaining = await question_keys(url)
        assert len(remaining) == 1 and b"conv" not in remaining[0]
    # Dialogue's store of the conversation's last answer, landing after the erasure: neither it nor its question
    # is kept.
    late = await store(second, answer_context(QUESTION), reply(ANSWER), conversation_id="conv-erased")
    assert not late.stored
    for replica in (first, second):
        assert not (await find(replica, answer_context(PARAPHRASE))).hit
    if url:
        assert len(await question_keys(url)) == 1


@pytest.mark.parametrize(
    "fault", [{"embedding_error_status": 500}, {"embedding_latency_seconds": 2}], ids=["failing", "slow"]
)
async def test_an_embedding_endpoint_that_fails_or_is_slow_makes_a_logged_miss_never_an_error(
    semantic_caches, sim_config, redis_url: str, fault: dict[str, object]
) -> None:
    process, cache = semantic_caches(redis_url, CHATMESH_EMBEDDING_TIMEOUT_SECONDS="0.2")
    await store(cache, answer_context(QUESTION), reply(ANSWER))
    assert (await until_hit(cache, answer_context(PARAPHRASE))).hit

    sim_config(**fault)
    missed = await find(cache, answer_context("How could I reset my password?"))
    exact = await lookup(cache, answer_context(QUESTION))

    assert missed == cache_pb2.LookupResponse(hit=False)
    assert exact.hit and exact.match == chat_pb2.CACHE_MATCH_EXACT
    assert "semantic_embedding_failed" in logged_events(process.log())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The whole path with the semantic cache on, memory-backed."""
    with Cluster(
        env={"CHATMESH_SEMANTIC_CACHE": "true", "CHATMESH_SEMANTIC_CACHE_THRESHOLD": PARAPHRASE_THRESHOLD}
    ) as running:
        yield running


async def ask(chat: chat_pb2_grpc.ChatServiceStub, message: str) -> chat_pb2.ChatResponse:
    return await chat.Chat(chat_pb2.ChatRequest(user_id="semantic", message=message), timeout=20)


async def until_cached(chat: chat_pb2_grpc.ChatServiceStub, message: str) -> chat_pb2.ChatResponse:
    """Asks `message` until the reply comes from the cache (stored after the caller had the first one), at most
    ATTEMPTS times."""
    for _ in range(ATTEMPTS):
        response = await ask(chat, message)
        if response.cached:
            return response
        await asyncio.sleep(0.05)
    return response


async def test_through_the_gateway_a_paraphrase_is_answered_from_the_cache_and_the_saving_counted(
    cluster: Cluster,
) -> None:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        first = await ask(chat, QUESTION)
        assert not first.cached and first.usage.output_tokens > 0
        exact = await until_cached(chat, QUESTION)  # the answer and its question are stored
        assert exact.cache_match == chat_pb2.CACHE_MATCH_EXACT and exact.cache_similarity == 1.0

        semantic = await ask(chat, PARAPHRASE)

    assert semantic.cached and semantic.text == first.text
    assert semantic.cache_match == chat_pb2.CACHE_MATCH_SEMANTIC and 0.8 <= semantic.cache_similarity < 1
    assert semantic.usage == chat_pb2.Usage() and semantic.cost_usd == 0
    assert metric(cluster, "dialogue", "chatmesh_dialogue_cache_hits_total", {"match": "semantic"}) == 1
    saved = metric(
        cluster, "dialogue", "chatmesh_cache_saved_tokens_total", {"model": "gpt-4o-mini", "match": "semantic"}
    )
    assert saved >= first.usage.output_tokens
    assert (
        metric(cluster, "dialogue", "chatmesh_cache_saved_usd_total", {"model": "gpt-4o-mini", "match": "semantic"}) > 0
    )
    assert metric(cluster, "cache", "chatmesh_cache_semantic_lookups_total", {"outcome": "hit"}) == 1


async def test_through_the_gateway_a_near_miss_goes_to_the_model(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        await ask(chat, "Can I return an item after 30 days?")
        await until_cached(chat, "Can I return an item after 30 days?")

        near_miss = await ask(chat, "Can I return an item after 60 days?")

    assert not near_miss.cached and near_miss.usage.output_tokens > 0


async def test_through_the_gateway_a_question_with_personal_information_is_never_embedded(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        await ask(chat, "How do I change my email address?")
        await until_cached(chat, "How do I change my email address?")
        embedded_before = cluster.sim_stats()["embedding_requests"]

        with_email = await ask(chat, "How do I change my email address jane.doe@example.com?")

    assert not with_email.cached
    assert cluster.sim_stats()["embedding_requests"] == embedded_before


async def test_with_the_answer_cache_off_every_turn_goes_to_the_model() -> None:
    with Cluster(env={"CHATMESH_CACHE_ANSWERS": "false", "CHATMESH_SEMANTIC_CACHE": "true"}) as cluster:
        async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            first = await ask(chat, QUESTION)
            await asyncio.sleep(0.3)  # past the background store it would have made
            again = await ask(chat, QUESTION)

        assert not first.cached and not again.cached and again.usage.output_tokens > 0
        assert metric(cluster, "cache", "chatmesh_cache_lookups_total", {}) == 0
        assert metric(cluster, "dialogue", "chatmesh_dialogue_cache_lookups_total", {"outcome": "skipped"}) == 2
        assert cluster.sim_stats()["embedding_requests"] == 0
