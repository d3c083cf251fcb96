"""The cache tiers: one contract for memory and Redis, the memory tier's byte bound, and the two-tier AnswerCache."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from support.ports import free_port
from support.redis_server import RedisServer

from chatmesh.cache import tiers
from chatmesh.cache.keys import conversation_index, tombstone, user_index
from chatmesh.cache.tiers import (
    ERASURES_CHANNEL,
    TOMBSTONE_SECONDS,
    AnswerCache,
    CachedValue,
    EraseFailed,
    Erasure,
    IndexErased,
    MemoryTier,
    RedisTier,
    Tier,
    TierKind,
)
from chatmesh.runtime.settings import CacheSettings, DialogueSettings

KEY = "chatmesh:cache:default:gpt-4o-mini:" + "ab" * 32
VALUE = b"\x0a\x05Paris\x10\x01\x18\x02"
CONVERSATION = conversation_index("default", "conv-1")
USER = user_index("default", "user-1")
INDEXES = [CONVERSATION, USER]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class TierUnderTest:
    tier: Tier
    # Lets `seconds` pass for the tier: a fake clock for memory, real time for Redis.
    elapse: Callable[[float], Awaitable[None]]
    # A TTL the test can wait out.
    short_ttl: float
    # How long the tier's tombstones live.
    tombstone_seconds: float


@pytest.fixture(params=["memory", "redis"])
def tier_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory tier; the URL of a real, empty redis-server for the Redis tier."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def subject(tier_url: str | None) -> AsyncIterator[TierUnderTest]:
    if tier_url is None:
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        tier: Tier = MemoryTier(1 << 20, clock=clock)
        under_test = TierUnderTest(tier, advance, short_ttl=30.0, tombstone_seconds=TOMBSTONE_SECONDS)
    else:
        # Tombstones short enough to wait out, long enough that a store right after the erasure meets them.
        tier = RedisTier.from_url(tier_url, timeout_seconds=5, tombstone_seconds=0.5)
        under_test = TierUnderTest(tier, asyncio.sleep, short_ttl=0.05, tombstone_seconds=0.5)
    try:
        yield under_test
    finally:
        await tier.close()


async def until_missing(tier: Tier, key: str, step: Callable[[], Awaitable[None]], attempts: int = 100) -> bool:
    """Whether `key` is gone within `attempts` checks, calling `step` between them."""
    for _ in range(attempts):
        if await tier.get(key) is None:
            return True
        await step()
    return False


# The contract, for both tiers.


async def test_an_unknown_key_is_a_miss(subject: TierUnderTest) -> None:
    assert await subject.tier.get(KEY) is None


async def test_a_stored_value_is_found_with_its_remaining_ttl(subject: TierUnderTest) -> None:
    assert await subject.tier.put(KEY, VALUE, ttl_seconds=60)

    found = await subject.tier.get(KEY)

    assert found is not None
    assert found.value == VALUE
    assert 0 < found.ttl_seconds <= 60


async def test_a_value_expires_after_its_ttl(subject: TierUnderTest) -> None:
    await subject.tier.put(KEY, VALUE, ttl_seconds=subject.short_ttl)

    await subject.elapse(subject.short_ttl)

    assert await until_missing(subject.tier, KEY, lambda: subject.elapse(subject.short_ttl / 5))


async def test_storing_again_replaces_the_value_and_its_ttl(subject: TierUnderTest) -> None:
    await subject.tier.put(KEY, b"first", ttl_seconds=subject.short_ttl)
    await subject.tier.put(KEY, b"second", ttl_seconds=3600)

    found = await subject.tier.get(KEY)

    assert found is not None and found.value == b"second"
    assert found.ttl_seconds > subject.short_ttl


async def test_keys_are_independent_and_values_round_trip_as_bytes(subject: TierUnderTest) -> None:
    values = {f"{KEY}:{n}": bytes(range(n, 256)) + "你好 👍🏽".encode() for n in range(3)}
    for key, value in values.items():
        await subject.tier.put(key, value, ttl_seconds=60)

    for key, value in values.items():
        found = await subject.tier.get(key)
        assert found is not None and found.value == value


@pytest.mark.parametrize("ttl_seconds", [0, -1])
async def test_a_ttl_that_is_not_positive_stores_nothing(subject: TierUnderTest, ttl_seconds: float) -> None:
    assert not await subject.tier.put(KEY, VALUE, ttl_seconds=ttl_seconds)

    assert await subject.tier.get(KEY) is None


async def test_erasing_an_index_removes_the_entries_it_lists_and_no_other(subject: TierUnderTest) -> None:
    other_conversation = conversation_index("default", "conv-2")
    await subject.tier.put(f"{KEY}:1", b"one", ttl_seconds=60, indexes=[CONVERSATION, USER])
    await subject.tier.put(f"{KEY}:2", b"two", ttl_seconds=60, indexes=[other_conversation, USER])
    await subject.tier.put(f"{KEY}:3", b"three", ttl_seconds=60, indexes=[user_index("default", "user-2")])

    assert await subject.tier.erase(CONVERSATION) == 1
    assert await subject.tier.get(f"{KEY}:1") is None
    assert await subject.tier.get(f"{KEY}:2") is not None

    assert await subject.tier.erase(USER) == 1  # the first was already gone
    assert await subject.tier.get(f"{KEY}:2") is None
    assert await subject.tier.get(f"{KEY}:3") is not None
    assert await subject.tier.erase(USER) == 0
    assert await subject.tier.erase(other_conversation) == 0


async def test_an_entry_stored_again_from_another_conversation_is_erased_with_either(subject: TierUnderTest) -> None:
    other_conversation = conversation_index("default", "conv-2")
    await subject.tier.put(KEY, b"first", ttl_seconds=60, indexes=[CONVERSATION])
    await subject.tier.put(KEY, b"again", ttl_seconds=60, indexes=[other_conversation])

    assert await subject.tier.erase(CONVERSATION) == 1
    assert await subject.tier.get(KEY) is None


async def test_erasing_does_not_count_entries_that_expired(subject: TierUnderTest) -> None:
    await subject.tier.put(f"{KEY}:short", b"short", ttl_seconds=subject.short_ttl, indexes=[USER])
    await subject.tier.put(f"{KEY}:long", b"long", ttl_seconds=3600, indexes=[USER])
    await subject.elapse(subject.short_ttl)
    assert await until_missing(subject.tier, f"{KEY}:short", lambda: subject.elapse(subject.short_ttl / 5))

    assert await subject.tier.erase(USER) == 1


async def test_a_store_listing_an_index_erased_moments_ago_is_refused_and_one_after_its_tombstone_is_written(
    subject: TierUnderTest,
) -> None:
    await subject.tier.put(KEY, b"before", ttl_seconds=60, indexes=INDEXES)
    assert await subject.tier.erase(USER) == 1

    # A store racing the erasure (made before it, landing after it) writes nothing, nor does any other store of
    # the user's, from this conversation or another.
    with pytest.raises(IndexErased):
        await subject.tier.put(KEY, b"racing", ttl_seconds=60, indexes=INDEXES)
    with pytest.raises(IndexErased):
        await subject.tier.put(
            f"{KEY}:2", b"elsewhere", ttl_seconds=60, indexes=[conversation_index("default", "c-2"), USER]
        )
    assert await subject.tier.get(KEY) is None and await subject.tier.get(f"{KEY}:2") is None
    # Another user of the tenant, and the same user id in another tenant, store as before.
    assert await subject.tier.put(f"{KEY}:3", b"three", ttl_seconds=60, indexes=[user_index("default", "user-2")])
    assert await subject.tier.put(f"{KEY}:4", b"four", ttl_seconds=60, indexes=[user_index("other", "user-1")])

    await subject.elapse(subject.tombstone_seconds)

    assert await subject.tier.put(KEY, b"after", ttl_seconds=60, indexes=INDEXES)
    found = await subject.tier.get(KEY)
    assert found is not None and found.value == b"after"
    assert await subject.tier.erase(CONVERSATION) == 1  # listed again


async def test_a_refused_store_lists_its_key_in_no_index(subject: TierUnderTest) -> None:
    await subject.tier.erase(USER)

    with pytest.raises(IndexErased):
        await subject.tier.put(KEY, VALUE, ttl_seconds=60, indexes=INDEXES)

    # Erasing the conversation (never erased itself) finds nothing: the refused store did not list its key there.
    assert await subject.tier.erase(CONVERSATION) == 0


# The memory tier: exact TTLs on a fake clock, and its bound in bytes.


async def test_memory_entries_live_exactly_their_ttl() -> None:
    clock = FakeClock()
    memory = MemoryTier(1 << 20, clock=clock)
    await memory.put(KEY, VALUE, ttl_seconds=60)

    clock.advance(15)
    found = await memory.get(KEY)
    assert found is not None and found.ttl_seconds == 45

    clock.advance(44.5)
    assert await memory.get(KEY) is not None
    clock.advance(0.5)
    assert await memory.get(KEY) is None
    assert len(memory) == 0 and memory.bytes_used == 0


def entry(n: int, value_bytes: int = 100) -> tuple[str, bytes]:
    return f"{KEY}-{n}", bytes([n]) * value_bytes


async def test_memory_evicts_the_least_recently_used_entries_to_stay_within_its_bytes() -> None:
    entries = [entry(n) for n in range(4)]
    size = MemoryTier.entry_size(*entries[0])
    memory = MemoryTier(3 * size)
    for key, value in entries[:3]:
        assert await memory.put(key, value, ttl_seconds=60)
    assert memory.bytes_used == 3 * size

    await memory.get(entries[0][0])  # now the most recently used
    await memory.put(*entries[3], ttl_seconds=60)

    assert await memory.get(entries[1][0]) is None
    for key, value in (entries[0], entries[2], entries[3]):
        found = await memory.get(key)
        assert found is not None and found.value == value
    assert memory.bytes_used == 3 * size and len(memory) == 3


async def test_memory_evicts_as_many_entries_as_a_large_one_needs() -> None:
    small = [entry(n, value_bytes=10) for n in range(5)]
    small_size = MemoryTier.entry_size(*small[0])
    memory = MemoryTier(5 * small_size)
    for key, value in small:
        await memory.put(key, value, ttl_seconds=60)

    large_key, large_value = "large", b"x" * (3 * small_size - len("large"))
    assert await memory.put(large_key, large_value, ttl_seconds=60)

    assert [await memory.get(key) is not None for key, _ in small] == [False, False, False, True, True]
    assert memory.bytes_used == 5 * small_size


async def test_memory_does_not_store_an_entry_larger_than_its_bound() -> None:
    kept_key, kept_value = entry(1)
    memory = MemoryTier(MemoryTier.entry_size(kept_key, kept_value) + 50)
    await memory.put(kept_key, kept_value, ttl_seconds=60)

    oversized = "big", b"x" * (memory.bytes_used + 50)
    assert not await memory.put(*oversized, ttl_seconds=60)

    assert await memory.get("big") is None
    assert await memory.get(kept_key) is not None
    assert memory.bytes_used == MemoryTier.entry_size(kept_key, kept_value)


async def test_memory_counts_a_replaced_entry_once() -> None:
    memory = MemoryTier(1 << 20)
    await memory.put(KEY, b"x" * 100, ttl_seconds=60)
    await memory.put(KEY, b"y" * 10, ttl_seconds=60)

    assert memory.bytes_used == MemoryTier.entry_size(KEY, b"y" * 10)
    assert len(memory) == 1


async def test_memory_indexes_forget_evicted_entries() -> None:
    entries = [entry(n) for n in range(3)]
    memory = MemoryTier(2 * MemoryTier.entry_size(*entries[0]))
    for key, value in entries:
        await memory.put(key, value, ttl_seconds=60, indexes=[USER])

    assert await memory.erase(USER) == 2
    assert len(memory) == 0 and memory.bytes_used == 0
    assert await memory.erase(USER) == 0


async def test_memory_keeps_a_bounded_number_of_tombstones_dropping_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tiers, "MAX_TOMBSTONES", 2)
    memory = MemoryTier(1 << 20)
    first, second, third = (user_index("default", f"user-{number}") for number in range(3))
    for index in (first, second, third):
        await memory.erase(index)

    assert await memory.put(KEY, VALUE, ttl_seconds=60, indexes=[first])
    for index in (second, third):
        with pytest.raises(IndexErased):
            await memory.put(KEY, VALUE, ttl_seconds=60, indexes=[index])


async def test_memory_counts_key_bytes_in_utf8() -> None:
    assert MemoryTier.entry_size("ключ", b"12") == len("ключ".encode()) + 2


# The two-tier AnswerCache.


@pytest.fixture
async def redis_tier(redis_url: str) -> AsyncIterator[RedisTier]:
    tier = RedisTier.from_url(redis_url, timeout_seconds=5)
    try:
        yield tier
    finally:
        await tier.close()


async def test_without_redis_the_cache_is_memory_alone() -> None:
    cache = AnswerCache(MemoryTier(1 << 20), None, ttl_seconds=60)

    assert await cache.lookup(KEY) is None
    assert await cache.store(KEY, VALUE, INDEXES) == [TierKind.MEMORY]
    hit = await cache.lookup(KEY)
    assert hit is not None and (hit.value, hit.tier) == (VALUE, TierKind.MEMORY)


async def test_a_store_writes_both_tiers_with_the_ttl(redis_url: str, redis_tier: RedisTier) -> None:
    memory = MemoryTier(1 << 20)
    cache = AnswerCache(memory, redis_tier, ttl_seconds=60)

    assert await cache.store(KEY, VALUE, INDEXES) == [TierKind.MEMORY, TierKind.REDIS]

    in_memory, in_redis = await memory.get(KEY), await redis_tier.get(KEY)
    assert in_memory is not None and in_memory.value == VALUE
    assert in_redis is not None and in_redis.value == VALUE
    client = Redis.from_url(redis_url)
    try:
        assert 0 < await client.pttl(KEY) <= 60_000
    finally:
        await client.aclose()


async def test_a_redis_hit_fills_memory_for_what_is_left_of_its_ttl(redis_tier: RedisTier) -> None:
    # Another cache process stored it: it is in Redis, not in this process's memory.
    await redis_tier.put(KEY, VALUE, ttl_seconds=30)
    memory = MemoryTier(1 << 20)
    cache = AnswerCache(memory, redis_tier, ttl_seconds=3600)

    first = await cache.lookup(KEY)
    second = await cache.lookup(KEY)

    assert first is not None and (first.value, first.tier) == (VALUE, TierKind.REDIS)
    assert second is not None and (second.value, second.tier) == (VALUE, TierKind.MEMORY)
    filled = await memory.get(KEY)
    assert filled is not None and filled.ttl_seconds <= 30


async def test_a_value_too_large_for_memory_is_still_kept_in_redis(redis_tier: RedisTier) -> None:
    cache = AnswerCache(MemoryTier(10), redis_tier, ttl_seconds=60)

    assert await cache.store(KEY, VALUE, INDEXES) == [TierKind.REDIS]
    hit = await cache.lookup(KEY)
    assert hit is not None and hit.tier is TierKind.REDIS


async def test_a_redis_failure_is_a_logged_miss_and_a_memory_only_store(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = RedisTier.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=1)
    cache = AnswerCache(MemoryTier(1 << 20), unreachable, ttl_seconds=60)
    secret_value = b"the reply text"
    try:
        with caplog.at_level(logging.WARNING, logger="chatmesh.cache.tiers"):
            assert await cache.lookup(KEY) is None
            assert await cache.store(KEY, secret_value, INDEXES) == [TierKind.MEMORY]
            hit = await cache.lookup(KEY)
    finally:
        await cache.close()

    assert hit is not None and hit.tier is TierKind.MEMORY
    failures = [record for record in caplog.records if record.msg == "cache_redis_failed"]
    assert [record.operation for record in failures] == ["lookup", "store"]
    assert all(record.error == "ConnectionError" for record in failures)
    for record in failures:
        logged = repr(record.__dict__)
        assert KEY not in logged and "the reply text" not in logged


async def test_the_cache_uses_redis_only_when_a_url_is_set(redis_url: str) -> None:
    for url in (None, ""):
        cache = AnswerCache.from_settings(CacheSettings(redis_url=url))
        assert await cache.store(KEY, VALUE, INDEXES) == [TierKind.MEMORY]
        await cache.close()
    cache = AnswerCache.from_settings(CacheSettings(redis_url=redis_url))
    try:
        assert await cache.store(KEY, VALUE, INDEXES) == [TierKind.MEMORY, TierKind.REDIS]
    finally:
        await cache.close()


async def test_the_redis_tier_refuses_a_client_that_decodes_responses(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisTier(client)
    finally:
        await client.aclose()


# Erasure across tiers and processes.


async def test_without_redis_an_erasure_counts_what_memory_held() -> None:
    cache = AnswerCache(MemoryTier(1 << 20), None, ttl_seconds=60)
    await cache.store(KEY, VALUE, INDEXES)

    assert await cache.erase(USER) == 1
    assert await cache.lookup(KEY) is None
    assert await cache.erase(CONVERSATION) == 0


async def test_an_erasure_removes_the_entries_and_their_indexes_from_redis(
    redis_url: str, redis_tier: RedisTier
) -> None:
    cache = AnswerCache(MemoryTier(1 << 20), redis_tier, ttl_seconds=60)
    await cache.store(KEY, VALUE, INDEXES)
    client = Redis.from_url(redis_url)
    try:
        # The user's index lists the entry and the conversation's index, which erasing the user removes too.
        assert await client.smembers(CONVERSATION) == {KEY.encode()}
        assert await client.smembers(USER) == {KEY.encode(), CONVERSATION.encode()}
        assert 0 < await client.pttl(USER) <= 60_000 and 0 < await client.pttl(CONVERSATION) <= 60_000

        assert await cache.erase(USER) == 1

        # What is left is the user's tombstone, for TOMBSTONE_SECONDS.
        assert await client.keys() == [tombstone(USER).encode()]
        assert TOMBSTONE_SECONDS * 1000 - 5_000 < await client.pttl(tombstone(USER)) <= TOMBSTONE_SECONDS * 1000
        assert await cache.lookup(KEY) is None
        assert await cache.erase(USER) == 0
    finally:
        await client.aclose()


async def test_an_erasure_is_announced_with_its_keys(redis_url: str, redis_tier: RedisTier) -> None:
    listener = RedisTier.from_url(redis_url, timeout_seconds=5)
    announcements = listener.announcements()
    try:
        assert await asyncio.wait_for(anext(announcements), 5) is None  # subscribed
        await redis_tier.put(KEY, VALUE, ttl_seconds=60, indexes=[USER])

        assert await redis_tier.erase(USER) == 1

        assert await asyncio.wait_for(anext(announcements), 5) == Erasure(USER, (KEY,))  # stored without a conversation
        await redis_tier.erase(USER)
        assert await asyncio.wait_for(anext(announcements), 5) == Erasure(USER, ())
    finally:
        await announcements.aclose()
        await listener.close()


async def until_in_memory(cache: AnswerCache, key: str, attempts: int = 100) -> bool:
    """Whether `cache` answers `key` from memory within `attempts` lookups 20 ms apart."""
    for _ in range(attempts):
        hit = await cache.lookup(key)
        if hit is not None and hit.tier is TierKind.MEMORY:
            return True
        await asyncio.sleep(0.02)
    return False


async def until_memory_misses(cache: AnswerCache, key: str, attempts: int = 100) -> bool:
    """Whether `cache` stops answering `key` from memory within `attempts` checks 20 ms apart."""
    for _ in range(attempts):
        hit = await cache.lookup(key)
        if hit is None or hit.tier is not TierKind.MEMORY:
            return hit is None
        await asyncio.sleep(0.02)
    return False


async def test_an_erasure_reaches_the_memory_of_every_cache_process(redis_url: str) -> None:
    processes = [
        AnswerCache(MemoryTier(1 << 20), RedisTier.from_url(redis_url, timeout_seconds=5), ttl_seconds=60)
        for _ in range(2)
    ]
    for cache in processes:
        cache.follow_announcements()
    first, second = processes
    try:
        await first.store(KEY, VALUE, INDEXES)
        # Filled from Redis by a lookup, then answered from memory (a fill is skipped while the process subscribes).
        assert await until_in_memory(second, KEY)

        assert await first.erase(CONVERSATION) == 1

        assert await first.lookup(KEY) is None
        assert await until_memory_misses(second, KEY)
    finally:
        for cache in processes:
            await cache.close()


class ReadThenWait(RedisTier):
    """A Redis tier whose reads return only once `release` is set, as a slow reply would."""

    release: asyncio.Event

    async def get(self, key: str) -> CachedValue | None:
        found = await super().get(key)
        await self.release.wait()
        return found


async def test_an_answer_read_from_redis_before_an_erasure_is_not_put_back_in_memory_after_it(redis_url: str) -> None:
    slow = ReadThenWait.from_url(redis_url, timeout_seconds=5)
    slow.release = asyncio.Event()
    memory = MemoryTier(1 << 20)
    cache = AnswerCache(memory, slow, ttl_seconds=60)
    try:
        await slow.put(KEY, VALUE, 60, INDEXES)
        reading = asyncio.ensure_future(cache.lookup(KEY))
        await asyncio.sleep(0.05)  # the read is done, its answer not yet handled

        assert await cache.erase(CONVERSATION) == 1
        slow.release.set()
        await reading

        assert await memory.get(KEY) is None
        assert await cache.lookup(KEY) is None
    finally:
        await cache.close()


async def test_without_redis_a_store_after_an_erasure_is_refused() -> None:
    cache = AnswerCache(MemoryTier(1 << 20), None, ttl_seconds=60)
    await cache.erase(CONVERSATION)

    with pytest.raises(IndexErased):
        await cache.store(KEY, VALUE, INDEXES)
    assert await cache.lookup(KEY) is None


async def test_a_store_after_an_erasure_in_another_process_is_refused_by_redis_and_kept_in_no_tier(
    redis_url: str,
) -> None:
    erasing, storing = (
        AnswerCache(MemoryTier(1 << 20), RedisTier.from_url(redis_url, timeout_seconds=5), ttl_seconds=60)
        for _ in range(2)
    )
    try:
        await erasing.erase(USER)

        # The storing process has not heard of the erasure (it follows no announcements): Redis's tombstone refuses.
        with pytest.raises(IndexErased):
            await storing.store(KEY, VALUE, INDEXES)
        assert await storing.lookup(KEY) is None
        assert await erasing.lookup(KEY) is None
    finally:
        await erasing.close()
        await storing.close()


def test_a_tombstone_outlives_the_longest_a_store_may_run() -> None:
    # Dialogue gives a Store its lookup timeout as its deadline.
    assert DialogueSettings().cache_lookup_timeout_seconds * 100 <= TOMBSTONE_SECONDS


async def test_with_redis_memory_keeps_an_entry_at_most_the_memory_ttl(redis_tier: RedisTier) -> None:
    clock = FakeClock()
    memory = MemoryTier(1 << 20, clock=clock)
    cache = AnswerCache(memory, redis_tier, ttl_seconds=3600, memory_ttl_seconds=60)
    await cache.store(KEY, VALUE, INDEXES)

    clock.advance(60)

    assert await memory.get(KEY) is None
    hit = await cache.lookup(KEY)
    assert hit is not None and hit.tier is TierKind.REDIS
    refilled = await memory.get(KEY)
    assert refilled is not None and refilled.ttl_seconds == 60


async def test_without_redis_the_memory_ttl_does_not_apply() -> None:
    clock = FakeClock()
    memory = MemoryTier(1 << 20, clock=clock)
    cache = AnswerCache(memory, None, ttl_seconds=3600, memory_ttl_seconds=60)
    await cache.store(KEY, VALUE, INDEXES)

    clock.advance(61)

    assert await memory.get(KEY) is not None


async def test_a_process_that_lost_its_subscription_forgets_its_memory_once_subscribed_again() -> None:
    # A Redis of its own, restarted empty: whatever was erased meanwhile, this process cannot know.
    server = RedisServer.start()
    memory = MemoryTier(1 << 20)
    cache = AnswerCache(memory, RedisTier.from_url(server.url, timeout_seconds=1), ttl_seconds=60)
    cache.follow_announcements()
    try:
        assert await until_subscribed(server.url)
        await cache.store(KEY, VALUE, INDEXES)
        server.kill()
        server.restart()

        assert await until_memory_misses(cache, KEY, attempts=250)
    finally:
        await cache.close()
        server.stop()


async def until_subscribed(url: str, attempts: int = 100) -> bool:
    """Whether some process listens to the erasures channel within `attempts` checks 20 ms apart."""
    client = Redis.from_url(url)
    try:
        for _ in range(attempts):
            if (await client.pubsub_numsub(ERASURES_CHANNEL))[0][1]:
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        await client.aclose()


async def test_an_erasure_fails_when_redis_cannot_be_reached_after_erasing_memory() -> None:
    unreachable = RedisTier.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=1)
    memory = MemoryTier(1 << 20)
    cache = AnswerCache(memory, unreachable, ttl_seconds=60)
    try:
        await cache.store(KEY, VALUE, INDEXES)
        with pytest.raises(EraseFailed):
            await cache.erase(USER)
        assert await memory.get(KEY) is None
    finally:
        await cache.close()


def test_answers_are_kept_no_longer_than_conversations() -> None:
    with pytest.raises(ValueError, match="CACHE_TTL_SECONDS must be at most"):
        CacheSettings(cache_ttl_seconds=3600, conversation_retention_seconds=600, review_retention_seconds=600)
    assert CacheSettings(cache_ttl_seconds=10**9, conversation_retention_seconds=0)
