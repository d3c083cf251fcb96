"""The KnowledgeStore contract, which every implementation meets (memory and Redis alike), and what the Redis one
keeps in Redis: keys under the tenant, no TTL, nothing left of a deleted knowledge base."""

from collections.abc import AsyncIterator

import numpy as np
import pytest
from redis.asyncio import Redis

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.store import (
    EmbeddingMismatch,
    KnowledgeStore,
    MemoryKnowledgeStore,
    RedisKnowledgeStore,
    UpsertOutcome,
    create_knowledge_store,
    validate_name,
)

MODEL = "text-embedding-3-small"


def chunks(path: str, *texts: str) -> list[Chunk]:
    return [Chunk(path, f"{path} > part {index}", index, text, len(text.split())) for index, text in enumerate(texts)]


def vectors(count: int, dimensions: int = 4, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32))


async def upsert(
    store: KnowledgeStore, path: str, digest: str, *texts: str, tenant: str = "acme", kb: str = "help", seed: int = 0
) -> tuple[UpsertOutcome, str]:
    return await store.upsert_document(
        tenant, kb, path, digest, chunks(path, *texts), vectors(len(texts), seed=seed), embedding_model=MODEL
    )


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory store; the URL of a real, empty redis-server for the Redis store."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[KnowledgeStore]:
    knowledge_store = create_knowledge_store(store_url)
    try:
        yield knowledge_store
    finally:
        await knowledge_store.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_document_is_added_then_replaced_whole_or_skipped_when_its_digest_is_unchanged(
    store: KnowledgeStore,
) -> None:
    outcome, first = await upsert(store, "faq.md", "d1", "one", "two", "three")
    assert outcome is UpsertOutcome.ADDED
    assert (await store.document("acme", "help", "faq.md")).chunk_ids == ("faq.md#0", "faq.md#1", "faq.md#2")

    assert await upsert(store, "faq.md", "d1", "other", "texts") == (UpsertOutcome.UNCHANGED, first)

    outcome, second = await upsert(store, "faq.md", "d2", "new one", seed=1)
    assert outcome is UpsertOutcome.REPLACED
    assert second != first
    snapshot = await store.load("acme", "help")
    assert snapshot is not None
    assert snapshot.version == second
    assert [chunk.text for chunk in snapshot.chunks] == ["new one"]  # the old chunks are gone
    np.testing.assert_array_equal(snapshot.vectors, np.stack(vectors(1, seed=1)))


async def test_a_snapshot_holds_every_chunk_in_source_order_with_its_vector_as_stored(store: KnowledgeStore) -> None:
    await upsert(store, "b.md", "d", "b0", "b1", seed=2)
    await upsert(store, "a.md", "d", "a0", seed=3)
    snapshot = await store.load("acme", "help")
    assert snapshot is not None
    assert [chunk.id for chunk in snapshot.chunks] == ["a.md#0", "b.md#0", "b.md#1"]
    assert snapshot.chunks[1] == Chunk("b.md", "b.md > part 0", 0, "b0", 1)
    assert snapshot.embedding_model == MODEL
    assert snapshot.vectors.dtype == np.float32
    np.testing.assert_array_equal(snapshot.vectors, np.stack(vectors(1, seed=3) + vectors(2, seed=2)))


async def test_every_change_gives_a_new_version_and_reading_changes_nothing(store: KnowledgeStore) -> None:
    assert await store.versions("acme", ["help"]) == {"help": None}
    seen = {(await upsert(store, "a.md", "d1", "a"))[1]}
    seen.add((await upsert(store, "b.md", "d1", "b"))[1])
    seen.add((await upsert(store, "a.md", "d2", "a2"))[1])
    assert await store.delete_document("acme", "help", "b.md")
    current = (await store.versions("acme", ["help", "other"]))["help"]
    seen.add(current)
    assert len(seen) == 4
    await store.load("acme", "help")
    await store.documents("acme", "help")
    assert await store.versions("acme", ["help", "other"]) == {"help": current, "other": None}


async def test_a_large_knowledge_base_loads_whole(store: KnowledgeStore) -> None:
    texts = [f"chunk {index}" for index in range(1_200)]  # more than one HSCAN batch
    await upsert(store, "big.md", "d", *texts)
    snapshot = await store.load("acme", "help")
    assert snapshot is not None
    assert [chunk.text for chunk in snapshot.chunks] == texts
    np.testing.assert_array_equal(snapshot.vectors, np.stack(vectors(1_200)))


async def test_a_deleted_document_leaves_no_chunk(store: KnowledgeStore) -> None:
    await upsert(store, "a.md", "d", "a0", "a1")
    await upsert(store, "b.md", "d", "b0")
    assert await store.delete_document("acme", "help", "a.md")
    assert not await store.delete_document("acme", "help", "a.md")
    assert not await store.delete_document("acme", "nothing", "a.md")
    snapshot = await store.load("acme", "help")
    assert snapshot is not None
    assert [chunk.id for chunk in snapshot.chunks] == ["b.md#0"]
    assert list(await store.documents("acme", "help")) == ["b.md"]


async def test_knowledge_bases_are_listed_per_tenant_and_deleted_whole(store: KnowledgeStore) -> None:
    await upsert(store, "a.md", "d", "a0", "a1")
    _, version = await upsert(store, "b.md", "d", "b0")
    await upsert(store, "a.md", "d", "x", kb="sales")
    await upsert(store, "a.md", "d", "y", tenant="globex")

    listed = await store.list_knowledge_bases("acme")
    assert [(kb.name, kb.documents, kb.chunks, kb.embedding_model, kb.dimensions) for kb in listed] == [
        ("help", 2, 3, MODEL, 4),
        ("sales", 1, 1, MODEL, 4),
    ]
    assert listed[0].version == version
    assert listed[0].updated_at > 0

    assert await store.delete_knowledge_base("acme", "help")
    assert not await store.delete_knowledge_base("acme", "help")
    assert [kb.name for kb in await store.list_knowledge_bases("acme")] == ["sales"]
    assert await store.load("acme", "help") is None
    assert await store.documents("acme", "help") == {}
    assert [kb.name for kb in await store.list_knowledge_bases("globex")] == ["help"]


async def test_a_knowledge_base_created_again_never_repeats_a_version(store: KnowledgeStore) -> None:
    _, first = await upsert(store, "a.md", "d", "a")
    await store.delete_knowledge_base("acme", "help")
    _, again = await upsert(store, "a.md", "d", "a")
    assert again != first  # a reply cached under the first version is never served for the second


async def test_tenants_never_see_each_others_knowledge_bases(store: KnowledgeStore) -> None:
    await upsert(store, "a.md", "d", "acme's secret")
    assert await store.load("globex", "help") is None
    assert await store.document("globex", "help", "a.md") is None
    assert await store.versions("globex", ["help"]) == {"help": None}
    assert await store.list_knowledge_bases("globex") == []
    assert not await store.delete_knowledge_base("globex", "help")
    assert await store.load("acme", "help") is not None


async def test_a_knowledge_base_holds_one_embedding_model_and_size(store: KnowledgeStore) -> None:
    _, version = await upsert(store, "a.md", "d", "a")
    with pytest.raises(EmbeddingMismatch, match="embedded with text-embedding-3-small at 4 dimensions"):
        await store.upsert_document(
            "acme", "help", "b.md", "d", chunks("b.md", "b"), vectors(1), embedding_model="other"
        )
    with pytest.raises(EmbeddingMismatch):
        await store.upsert_document(
            "acme", "help", "b.md", "d", chunks("b.md", "b"), vectors(1, 8), embedding_model=MODEL
        )
    assert await store.versions("acme", ["help"]) == {"help": version}


async def test_a_document_without_chunks_is_recorded_without_fixing_the_model(store: KnowledgeStore) -> None:
    outcome, _ = await store.upsert_document("acme", "help", "empty.md", "d", [], [], embedding_model="any")
    assert outcome is UpsertOutcome.ADDED
    assert await upsert(store, "a.md", "d", "a") == (
        UpsertOutcome.ADDED,
        (await store.versions("acme", ["help"]))["help"],
    )
    snapshot = await store.load("acme", "help")
    assert snapshot is not None
    assert len(snapshot.chunks) == 1


@pytest.mark.parametrize("name", ["", "-help", "a b", "a/b", "x" * 65, "帮助"])
async def test_names_are_checked(store: KnowledgeStore, name: str) -> None:
    with pytest.raises(ValueError, match="knowledge base name"):
        await store.load("acme", name)


def test_valid_names() -> None:
    for name in ("help", "Help-Center_2.0", "a", "x" * 64):
        validate_name(name)


async def test_redis_keeps_a_knowledge_base_under_its_tenant_without_ttl_and_deletes_every_key(
    redis_url: str, redis: Redis
) -> None:
    store = RedisKnowledgeStore.from_url(redis_url)
    try:
        await upsert(store, "a.md", "d", "a0", "a1", tenant="acme corp")
        await upsert(store, "a.md", "d", "other", tenant="globex")
        keys = sorted([key.decode() async for key in redis.scan_iter("chatmesh:kb:{acme%20corp}*")])
        assert keys == [
            "chatmesh:kb:{acme%20corp}:help:chunks",
            "chatmesh:kb:{acme%20corp}:help:documents",
            "chatmesh:kb:{acme%20corp}:help:meta",
            "chatmesh:kb:{acme%20corp}:help:vectors",
            "chatmesh:kb:{acme%20corp}:names",
        ]
        for key in keys:
            assert await redis.ttl(key) == -1  # operator data: kept until deleted
        assert await redis.hlen("chatmesh:kb:{acme%20corp}:help:vectors") == 2
        assert len(await redis.hget("chatmesh:kb:{acme%20corp}:help:vectors", "a.md#1")) == 4 * 4  # float32

        await store.delete_knowledge_base("acme corp", "help")
        assert [key async for key in redis.scan_iter("chatmesh:kb:{acme%20corp}*")] == []
        assert await redis.exists("chatmesh:kb:{globex}:help:vectors")
    finally:
        await store.close()


async def test_redis_refuses_a_client_that_decodes_responses(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses=False"):
            RedisKnowledgeStore(client)
    finally:
        await client.aclose()


def test_without_a_redis_url_the_store_is_in_memory() -> None:
    assert isinstance(create_knowledge_store(None), MemoryKnowledgeStore)
    assert isinstance(create_knowledge_store(""), MemoryKnowledgeStore)
