"""The ConversationStore contract, which every implementation must meet (memory and Redis alike)."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from chatmesh.dialogue.store import (
    ClaimState,
    CommittedTurn,
    ConversationNotFound,
    ConversationStore,
    Erased,
    IdempotencyKey,
    MemoryConversationStore,
    RedisConversationStore,
    StoredImage,
    StoredMessage,
    StoredToolCall,
    Summary,
    TurnAlreadyCommitted,
    TurnClaim,
    TurnInProgress,
    create_conversation_store,
)

TENANT = "acme"
OTHER_TENANT = "globex"
ALICE = "alice"
MALLORY = "mallory"
CONVERSATION = "conv-1"
LEASE = 30.0


def make_turn(n: int, *, question: str | None = None, answer: str | None = None) -> CommittedTurn:
    """Turn `n`, with timestamps that grow with `n` and usage of (10 * n, n) tokens."""
    return CommittedTurn(
        messages=(
            StoredMessage("user", question or f"question {n}", 1_700_000_000.0 + 2 * n + 0.25),
            StoredMessage("assistant", answer or f"answer {n}", 1_700_000_000.0 + 2 * n + 1.5),
        ),
        input_tokens=10 * n,
        output_tokens=n,
    )


def messages_of(*turns: CommittedTurn) -> list[StoredMessage]:
    return [message for turn in turns for message in turn.messages]


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory store; the URL of a real, empty redis-server for the Redis store."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[ConversationStore]:
    conversation_store = create_conversation_store(store_url)
    try:
        yield conversation_store
    finally:
        await conversation_store.close()


async def test_a_new_conversation_is_created_by_its_first_committed_turn(store: ConversationStore) -> None:
    first = make_turn(1)
    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)

    await store.commit_turn(TENANT, CONVERSATION, ALICE, first, new=True)

    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    assert conversation.tenant == TENANT
    assert conversation.conversation_id == CONVERSATION
    assert conversation.user_id == ALICE
    assert conversation.messages == messages_of(first)
    assert conversation.created_at == first.messages[0].created_at
    assert conversation.updated_at == first.messages[-1].created_at
    assert (conversation.input_tokens, conversation.output_tokens) == (10, 1)


async def recent(store: ConversationStore, limit: int, conversation_id: str = CONVERSATION) -> list[StoredMessage]:
    """The newest `limit` messages that a turn would start from (the turn is then abandoned)."""
    history = await store.open_turn(TENANT, conversation_id, ALICE, limit=limit, lease_seconds=LEASE)
    await store.abandon_turn(TENANT, conversation_id, history.lock)
    return history.messages


async def committed(store: ConversationStore, *turns: CommittedTurn, conversation_id: str = CONVERSATION) -> None:
    """Commits `turns` one after the other, as turns that open the conversation first."""
    await store.commit_turn(TENANT, conversation_id, ALICE, turns[0], new=True)
    for turn in turns[1:]:
        await committed_next(store, turn, conversation_id=conversation_id)


async def committed_next(store: ConversationStore, turn: CommittedTurn, *, conversation_id: str = CONVERSATION) -> None:
    history = await store.open_turn(TENANT, conversation_id, ALICE, limit=0, lease_seconds=LEASE)
    await store.commit_turn(TENANT, conversation_id, ALICE, turn, new=False, lock=history.lock)


async def test_a_turn_starts_from_the_last_n_messages_oldest_first(store: ConversationStore) -> None:
    turns = [make_turn(n) for n in (1, 2, 3)]
    await committed(store, *turns)
    await store.commit_turn(TENANT, "conv-2", ALICE, make_turn(9), new=True)

    everything = messages_of(*turns)
    assert await recent(store, 3) == everything[-3:]
    assert await recent(store, 1) == [turns[-1].messages[-1]]
    assert await recent(store, 100) == everything
    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=3, lease_seconds=LEASE)
    assert history.first_index == 3 and history.summary is None
    assert (await store.get(TENANT, CONVERSATION, ALICE)).updated_at == turns[-1].messages[-1].created_at


@pytest.mark.parametrize("limit", [0, -1])
async def test_a_limit_below_one_returns_nothing_but_still_checks_the_owner(
    store: ConversationStore, limit: int
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)

    assert await recent(store, limit) == []
    with pytest.raises(ConversationNotFound):
        await store.open_turn(TENANT, CONVERSATION, MALLORY, limit=limit, lease_seconds=LEASE)
    with pytest.raises(ConversationNotFound):
        await store.open_turn(TENANT, "unknown", ALICE, limit=limit, lease_seconds=LEASE)


Operation = Callable[[ConversationStore, str, str, str], Awaitable[object]]

OPERATIONS: dict[str, Operation] = {
    "open_turn": lambda store, tenant, conversation_id, user_id: store.open_turn(
        tenant, conversation_id, user_id, limit=10, lease_seconds=LEASE
    ),
    "get": lambda store, tenant, conversation_id, user_id: store.get(tenant, conversation_id, user_id),
    "delete": lambda store, tenant, conversation_id, user_id: store.delete(tenant, conversation_id, user_id),
    "commit_turn": lambda store, tenant, conversation_id, user_id: store.commit_turn(
        tenant, conversation_id, user_id, make_turn(7), new=False
    ),
}


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_another_users_conversation_is_not_found_and_stays_untouched(
    store: ConversationStore, operation: Operation
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    before = await store.get(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await operation(store, TENANT, CONVERSATION, MALLORY)

    assert await store.get(TENANT, CONVERSATION, ALICE) == before


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_the_same_id_in_another_tenant_is_not_found_and_stays_untouched(
    store: ConversationStore, operation: Operation
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    before = await store.get(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await operation(store, OTHER_TENANT, CONVERSATION, ALICE)

    assert await store.get(TENANT, CONVERSATION, ALICE) == before
    with pytest.raises(ConversationNotFound):  # and nothing came into being in the other tenant
        await store.get(OTHER_TENANT, CONVERSATION, ALICE)


async def test_the_same_user_id_in_two_tenants_is_two_different_users(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, "conv-acme", ALICE, make_turn(1), new=True)
    await store.commit_turn(OTHER_TENANT, "conv-globex", ALICE, make_turn(2), new=True)

    assert (await store.get(TENANT, "conv-acme", ALICE)).messages == messages_of(make_turn(1))
    assert (await store.get(OTHER_TENANT, "conv-globex", ALICE)).messages == messages_of(make_turn(2))
    for tenant, conversation_id in [(OTHER_TENANT, "conv-acme"), (TENANT, "conv-globex")]:
        for operation in OPERATIONS.values():
            with pytest.raises(ConversationNotFound):
                await operation(store, tenant, conversation_id, ALICE)
    assert (await store.get(TENANT, "conv-acme", ALICE)).messages == messages_of(make_turn(1))
    assert (await store.get(OTHER_TENANT, "conv-globex", ALICE)).messages == messages_of(make_turn(2))


@pytest.mark.parametrize("other_user", [ALICE, MALLORY])
async def test_the_same_id_in_two_tenants_names_two_independent_conversations(
    store: ConversationStore, other_user: str
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    await store.commit_turn(OTHER_TENANT, CONVERSATION, other_user, make_turn(5), new=True)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False)
    await store.commit_turn(OTHER_TENANT, CONVERSATION, other_user, make_turn(6), new=False)

    ours = await store.get(TENANT, CONVERSATION, ALICE)
    theirs = await store.get(OTHER_TENANT, CONVERSATION, other_user)

    assert (ours.tenant, ours.user_id, ours.messages) == (TENANT, ALICE, messages_of(make_turn(1), make_turn(2)))
    assert (ours.input_tokens, ours.output_tokens) == (30, 3)
    assert ours.created_at == make_turn(1).messages[0].created_at
    assert (theirs.tenant, theirs.user_id) == (OTHER_TENANT, other_user)
    assert theirs.messages == messages_of(make_turn(5), make_turn(6))
    assert (theirs.input_tokens, theirs.output_tokens) == (110, 11)
    assert theirs.created_at == make_turn(5).messages[0].created_at
    assert await recent(store, 1) == [make_turn(2).messages[-1]]
    theirs_history = await store.open_turn(OTHER_TENANT, CONVERSATION, other_user, limit=1, lease_seconds=LEASE)
    assert theirs_history.messages == [make_turn(6).messages[-1]]


async def test_deleting_in_one_tenant_leaves_the_same_id_in_another_untouched(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    await store.commit_turn(OTHER_TENANT, CONVERSATION, ALICE, make_turn(2), new=True)
    before = await store.get(OTHER_TENANT, CONVERSATION, ALICE)

    await store.delete(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)
    with pytest.raises(ConversationNotFound):
        await store.delete(TENANT, CONVERSATION, ALICE)
    assert await store.get(OTHER_TENANT, CONVERSATION, ALICE) == before
    await store.commit_turn(OTHER_TENANT, CONVERSATION, ALICE, make_turn(3), new=False)
    # The id is free again in the tenant that deleted it, and only there.
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(4), new=True)
    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(4))
    assert (await store.get(OTHER_TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(2), make_turn(3))


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_an_unknown_conversation_is_not_found(store: ConversationStore, operation: Operation) -> None:
    with pytest.raises(ConversationNotFound):
        await operation(store, TENANT, "unknown", ALICE)

    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, "unknown", ALICE)


@pytest.mark.parametrize("user_id", [ALICE, MALLORY])
async def test_creating_a_conversation_under_a_taken_id_fails_and_changes_nothing(
    store: ConversationStore, user_id: str
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    before = await store.get(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await store.commit_turn(TENANT, CONVERSATION, user_id, make_turn(2), new=True)

    assert await store.get(TENANT, CONVERSATION, ALICE) == before


async def test_a_deleted_conversation_is_not_resurrected_by_a_late_commit(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    await store.delete(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False)

    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)
    with pytest.raises(ConversationNotFound):
        await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)


async def test_delete_erases_the_conversation_at_once(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    await store.commit_turn(TENANT, "conv-2", ALICE, make_turn(2), new=True)

    await store.delete(TENANT, CONVERSATION, ALICE)

    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)
    with pytest.raises(ConversationNotFound):
        await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    with pytest.raises(ConversationNotFound):
        await store.delete(TENANT, CONVERSATION, ALICE)
    assert (await store.get(TENANT, "conv-2", ALICE)).messages == messages_of(make_turn(2))


async def test_delete_says_what_it_erased(store: ConversationStore) -> None:
    await committed(store, make_turn(1), make_turn(2))
    assert await store.commit_summary(
        TENANT, CONVERSATION, Summary("turn one", 2, 1.0), replaces=0, covered_until=time.time() + 60
    )

    assert await store.delete(TENANT, CONVERSATION, ALICE) == Erased(conversations=1, messages=4, summaries=1)


async def test_erasing_a_user_erases_every_conversation_of_theirs_and_only_theirs(store: ConversationStore) -> None:
    await committed(store, make_turn(1), make_turn(2), conversation_id="alice-1")
    assert await store.commit_summary(
        TENANT, "alice-1", Summary("turn one", 2, 1.0), replaces=0, covered_until=time.time() + 60
    )
    key = replace(KEY, replay='{"text": "answer 3"}')
    await store.claim_turn(TENANT, "alice-2", key, lease_seconds=30)
    await store.commit_turn(TENANT, "alice-2", ALICE, make_turn(3), new=True, idempotency=key)
    await store.commit_turn(TENANT, "mallory-1", MALLORY, make_turn(4), new=True)
    await store.commit_turn(OTHER_TENANT, "alice-1", ALICE, make_turn(5), new=True)

    assert await store.erase_user(TENANT, ALICE) == Erased(conversations=2, messages=6, summaries=1)

    for conversation_id in ("alice-1", "alice-2"):
        with pytest.raises(ConversationNotFound):
            await store.get(TENANT, conversation_id, ALICE)
    assert (await store.claim_turn(TENANT, "alice-2", KEY, lease_seconds=30)).state is ClaimState.CLAIMED
    assert (await store.get(TENANT, "mallory-1", MALLORY)).messages == messages_of(make_turn(4))
    assert (await store.get(OTHER_TENANT, "alice-1", ALICE)).messages == messages_of(make_turn(5))


async def test_erasing_a_user_again_or_one_without_conversations_erases_nothing(store: ConversationStore) -> None:
    await committed(store, make_turn(1))
    await committed(store, make_turn(2), conversation_id="conv-2")
    await store.delete(TENANT, CONVERSATION, ALICE)

    assert await store.erase_user(TENANT, ALICE) == Erased(conversations=1, messages=2, summaries=0)
    assert await store.erase_user(TENANT, ALICE) == Erased()
    assert await store.erase_user(TENANT, "nobody") == Erased()


async def test_a_user_erased_can_start_again(store: ConversationStore) -> None:
    await committed(store, make_turn(1))
    await store.erase_user(TENANT, ALICE)

    await committed(store, make_turn(2))

    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(2))
    assert await store.erase_user(TENANT, ALICE) == Erased(conversations=1, messages=2, summaries=0)


async def test_usage_totals_add_up_over_turns(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    for n in (2, 3, 4):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(n), new=False)

    conversation = await store.get(TENANT, CONVERSATION, ALICE)

    assert (conversation.input_tokens, conversation.output_tokens) == (100, 10)


# Full-width punctuation, an emoji with a skin tone, a zero-width joiner, quotes and a backslash.
CHINESE = "你好，世界！今天天气怎么样？"  # noqa: RUF001
EMOJI_AND_ESCAPES = '晴天 ☀️ 👍🏽 — «ça va» \u200d\n"quoted" \\ end'


async def test_unicode_content_round_trips(store: ConversationStore) -> None:
    turn = make_turn(1, question=CHINESE, answer=EMOJI_AND_ESCAPES)
    conversation_id = "会话-🙂"

    await store.commit_turn(TENANT, conversation_id, "用户", turn, new=True)

    assert (
        await store.open_turn(TENANT, conversation_id, "用户", limit=2, lease_seconds=LEASE)
    ).messages == messages_of(turn)
    assert (await store.get(TENANT, conversation_id, "用户")).messages == messages_of(turn)


async def test_a_refused_turn_keeps_its_refusal_and_not_its_text(store: ConversationStore) -> None:
    refused = CommittedTurn(
        messages=(
            StoredMessage("user", "", 1_700_000_000.0, refused=True),
            StoredMessage("assistant", "", 1_700_000_001.0, refused=True),
        ),
        input_tokens=0,
        output_tokens=0,
    )

    await store.commit_turn(TENANT, CONVERSATION, ALICE, refused, new=True)

    assert await recent(store, 2) == messages_of(refused)
    assert [message.refused for message in (await store.get(TENANT, CONVERSATION, ALICE)).messages] == [True, True]


async def test_returned_objects_are_copies(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    before = await store.get(TENANT, CONVERSATION, ALICE)

    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    conversation.messages.append(StoredMessage("user", "injected", 0.0))
    conversation.input_tokens = 999
    conversation.user_id = MALLORY
    conversation.tenant = OTHER_TENANT
    newest = await recent(store, 10)
    newest.clear()

    assert await store.get(TENANT, CONVERSATION, ALICE) == before
    assert await recent(store, 10) == before.messages


async def test_the_factory_uses_redis_for_a_url_and_memory_otherwise(redis_url: str) -> None:
    assert isinstance(create_conversation_store(None), MemoryConversationStore)
    assert isinstance(create_conversation_store(""), MemoryConversationStore)
    redis_store = create_conversation_store(redis_url)
    try:
        assert isinstance(redis_store, RedisConversationStore)
    finally:
        await redis_store.close()


async def test_the_redis_store_refuses_a_client_that_returns_bytes(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisConversationStore(client)
    finally:
        await client.aclose()


async def test_a_redis_conversation_keeps_every_key_under_one_tenant_scoped_hash_tag(redis_url: str) -> None:
    store = create_conversation_store(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
        history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
        summary = Summary("they said hello", 2, 1_700_000_010.0)
        assert await store.commit_summary(TENANT, CONVERSATION, summary, replaces=0, covered_until=time.time() + 60)
        prefix = f"chatmesh:conv:{{{TENANT}/{CONVERSATION}}}:"
        keys = [prefix + name for name in ("meta", "m:0", "m:1", "lock", "summary")]

        # And the index of the user's conversations, under the user's own tag.
        assert sorted(await client.keys("*")) == sorted([*keys, f"chatmesh:user:{{{TENANT}/{ALICE}}}:conversations"])
        assert len({key_slot(key.encode()) for key in keys}) == 1
        assert await client.hmget(prefix + "meta", "tenant", "user_id") == [TENANT, ALICE]
        await store.abandon_turn(TENANT, CONVERSATION, history.lock)
    finally:
        await client.aclose()
        await store.close()


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
async def test_a_redis_conversation_whose_stored_tenant_disagrees_with_its_key_is_not_found(
    redis_url: str, operation: Operation
) -> None:
    """Defence in depth: the owner check also compares the tenant stored in the meta hash."""
    store = create_conversation_store(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
        meta_key = f"chatmesh:conv:{{{TENANT}/{CONVERSATION}}}:meta"
        await client.hset(meta_key, "tenant", OTHER_TENANT)
        keys = await client.keys("*")
        before = {key: await client.dump(key) for key in keys}

        with pytest.raises(ConversationNotFound):
            await operation(store, TENANT, CONVERSATION, ALICE)

        assert {key: await client.dump(key) for key in await client.keys("*")} == before
    finally:
        await client.aclose()
        await store.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_memory_conversation_erases_each_message_at_its_own_age_then_itself() -> None:
    clock = FakeClock()
    store = MemoryConversationStore(retention_seconds=100, clock=clock)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    clock.now += 60
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False)
    clock.now += 60  # 120 s after the first turn, 60 s after the last: the first turn is gone

    assert await recent(store, 10) == messages_of(make_turn(2))
    page = await store.get(TENANT, CONVERSATION, ALICE)
    assert (page.messages, page.first_index) == (messages_of(make_turn(2)), 2)

    clock.now += 40
    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)
    with pytest.raises(ConversationNotFound):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(3), new=False)


async def test_a_redis_conversation_erases_each_message_at_its_own_age(redis_url: str) -> None:
    store = create_conversation_store(redis_url, retention_seconds=1.0)
    try:
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
        await asyncio.sleep(0.6)
        await committed_next(store, make_turn(2))
        await asyncio.sleep(0.6)  # 1.2 s after the first turn, 0.6 s after the second

        assert await recent(store, 10) == messages_of(make_turn(2))
        page = await store.get(TENANT, CONVERSATION, ALICE)
        assert (page.messages, page.first_index) == (messages_of(make_turn(2)), 2)
    finally:
        await store.close()


async def test_a_redis_conversation_is_erased_after_its_retention_period(redis_url: str) -> None:
    store = create_conversation_store(redis_url, retention_seconds=0.3)
    client = Redis.from_url(redis_url)
    try:
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
        keys = await client.keys(f"chatmesh:conv:{{{TENANT}/{CONVERSATION}}}:*")
        assert len(keys) == 3
        assert all(0 < ttl <= 300 for ttl in [await client.pttl(key) for key in keys])
        for _ in range(100):  # Redis expires the keys itself; at most 100 polls of 20 ms
            if not await client.exists(*keys):
                break
            await asyncio.sleep(0.02)
        with pytest.raises(ConversationNotFound):
            await store.get(TENANT, CONVERSATION, ALICE)
    finally:
        await client.aclose()
        await store.close()


async def test_a_redis_users_conversations_are_indexed_by_tenant_for_the_retention_period(redis_url: str) -> None:
    store = create_conversation_store(redis_url, retention_seconds=60)
    client = Redis.from_url(redis_url, decode_responses=True)
    odd_user = "ana@example.com/}{ x"
    try:
        await store.commit_turn(TENANT, "first", odd_user, make_turn(1), new=True)
        await store.commit_turn(TENANT, "second", odd_user, make_turn(2), new=True)
        await store.commit_turn(OTHER_TENANT, "third", odd_user, make_turn(3), new=True)
        index = f"chatmesh:user:{{{TENANT}/ana%40example.com%2F%7D%7B%20x}}:conversations"

        assert await client.zrange(index, 0, -1) == ["first", "second"]
        assert 0 < await client.pttl(index) <= 60_000
        assert await store.erase_user(TENANT, odd_user) == Erased(conversations=2, messages=4, summaries=0)
        assert await client.exists(index) == 0
        assert await client.keys(f"chatmesh:*{TENANT}/*") == []
        assert await client.keys(f"chatmesh:*{OTHER_TENANT}/*") != []
    finally:
        await client.aclose()
        await store.close()


async def test_a_redis_index_entry_whose_id_another_user_now_holds_erases_nothing_of_theirs(redis_url: str) -> None:
    """An index entry outlives its conversation until the index is next written; the id may be taken again."""
    store = create_conversation_store(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.commit_turn(TENANT, "taken", MALLORY, make_turn(1), new=True)
        index = f"chatmesh:user:{{{TENANT}/{ALICE}}}:conversations"
        await client.zadd(index, {"taken": 0})

        assert await store.erase_user(TENANT, ALICE) == Erased()

        assert (await store.get(TENANT, "taken", MALLORY)).messages == messages_of(make_turn(1))
        assert await client.exists(index) == 0
    finally:
        await client.aclose()
        await store.close()


async def test_a_memory_user_whose_conversations_expired_has_nothing_to_erase() -> None:
    clock = FakeClock()
    store = MemoryConversationStore(retention_seconds=100, clock=clock)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    clock.now += 100

    assert await store.erase_user(TENANT, ALICE) == Erased()


async def test_the_memory_store_drops_the_least_recently_used_conversation_past_its_bound() -> None:
    store = MemoryConversationStore(max_conversations=2)
    await store.commit_turn(TENANT, "first", ALICE, make_turn(1), new=True)
    await store.commit_turn(TENANT, "second", ALICE, make_turn(1), new=True)
    await store.get(TENANT, "first", ALICE)  # now "second" is the least recently used

    await store.commit_turn(TENANT, "third", ALICE, make_turn(1), new=True)

    assert (await store.get(TENANT, "first", ALICE)).messages
    assert (await store.get(TENANT, "third", ALICE)).messages
    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, "second", ALICE)


async def test_the_memory_store_bound_counts_every_tenant_and_keeps_same_ids_apart() -> None:
    store = MemoryConversationStore(max_conversations=2)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    await store.commit_turn(OTHER_TENANT, CONVERSATION, ALICE, make_turn(2), new=True)
    await store.get(TENANT, CONVERSATION, ALICE)  # now the other tenant's is the least recently used

    await store.commit_turn(TENANT, "conv-2", ALICE, make_turn(3), new=True)

    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(1))
    assert (await store.get(TENANT, "conv-2", ALICE)).messages == messages_of(make_turn(3))
    with pytest.raises(ConversationNotFound):
        await store.get(OTHER_TENANT, CONVERSATION, ALICE)


# Idempotent turns.

KEY = IdempotencyKey("key-1", "f" * 32)


async def test_a_claimed_turn_is_running_for_a_retry_until_its_lease_lapses(store: ConversationStore) -> None:
    assert (await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)).state is ClaimState.CLAIMED
    assert (await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)).state is ClaimState.RUNNING

    other = IdempotencyKey("key-2", "f" * 32)
    await store.claim_turn(TENANT, CONVERSATION, other, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    # The attempt that held it is gone: a retry takes the turn over.
    assert (await store.claim_turn(TENANT, CONVERSATION, other, lease_seconds=30)).state is ClaimState.CLAIMED


async def test_a_committed_turn_is_replayed_and_cannot_be_committed_twice(store: ConversationStore) -> None:
    await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    committed = replace(KEY, replay='{"text": "answer 1"}')
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True, idempotency=committed)

    claim = await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    assert claim == TurnClaim(ClaimState.COMMITTED, '{"text": "answer 1"}')
    with pytest.raises(TurnAlreadyCommitted):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False, idempotency=committed)
    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(1))


async def test_a_key_sent_with_another_request_is_a_mismatch(store: ConversationStore) -> None:
    await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    changed = IdempotencyKey(KEY.key, "0" * 32)
    assert (await store.claim_turn(TENANT, CONVERSATION, changed, lease_seconds=30)).state is ClaimState.MISMATCH


async def test_a_released_claim_lets_a_retry_run_the_turn_anew(store: ConversationStore) -> None:
    await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    await store.release_turn(TENANT, CONVERSATION, KEY)
    assert (await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)).state is ClaimState.CLAIMED


async def test_keys_belong_to_their_conversation_and_tenant(store: ConversationStore) -> None:
    await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    assert (await store.claim_turn(OTHER_TENANT, CONVERSATION, KEY, lease_seconds=30)).state is ClaimState.CLAIMED
    assert (await store.claim_turn(TENANT, "conv-2", KEY, lease_seconds=30)).state is ClaimState.CLAIMED


async def test_deleting_a_conversation_forgets_its_keys_and_their_replies(store: ConversationStore) -> None:
    await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
    committed = replace(KEY, replay='{"text": "answer 1"}')
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True, idempotency=committed)
    await store.delete(TENANT, CONVERSATION, ALICE)

    assert (await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)).state is ClaimState.CLAIMED


async def test_keys_are_remembered_no_longer_than_conversations(redis_url: str) -> None:
    store = create_conversation_store(redis_url, retention_seconds=60, idempotency_ttl_seconds=3600)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30)
        ttl = await client.pttl(f"chatmesh:conv:{{{TENANT}/{CONVERSATION}}}:turn:{KEY.key}")
        assert 0 < ttl <= 60_000
    finally:
        await client.aclose()
        await store.close()


# One turn at a time.


async def test_a_second_turn_cannot_open_a_conversation_while_one_holds_it(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    first = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)

    with pytest.raises(TurnInProgress):
        await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    with pytest.raises(TurnInProgress):  # nor commit without holding it
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(9), new=False)

    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False, lock=first.lock)
    second = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    assert second.messages == messages_of(make_turn(1), make_turn(2))


async def test_an_abandoned_turn_frees_the_conversation_and_a_stale_lock_commits_nothing(
    store: ConversationStore,
) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    abandoned = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    await store.abandon_turn(TENANT, CONVERSATION, abandoned.lock)
    current = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)

    await store.abandon_turn(TENANT, CONVERSATION, abandoned.lock)  # not its lock any more: no effect
    with pytest.raises(TurnInProgress):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(9), new=False, lock=abandoned.lock)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False, lock=current.lock)

    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == messages_of(make_turn(1), make_turn(2))


async def test_a_lock_lapses_with_its_lease(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
    crashed = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=0.05)
    await asyncio.sleep(0.1)  # the memory store's default clock is the real one too

    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    with pytest.raises(TurnInProgress):
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(9), new=False, lock=crashed.lock)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(2), new=False, lock=history.lock)


async def test_concurrent_turns_on_one_conversation_commit_one_at_a_time_and_none_is_lost(
    store: ConversationStore,
) -> None:
    """Ten turns race, each retrying (at most 200 times) while another holds the conversation: every turn is
    committed exactly once, whole, and each saw every turn committed before it."""
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(0), new=True)
    seen: dict[int, int] = {}

    async def run(n: int) -> None:
        for _ in range(200):
            try:
                history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=100, lease_seconds=LEASE)
            except TurnInProgress:
                await asyncio.sleep(0.002)
                continue
            seen[n] = len(history.messages)
            await asyncio.sleep(0)  # let the others try while this turn runs
            await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(n), new=False, lock=history.lock)
            return
        raise AssertionError(f"turn {n} never got the conversation")

    await asyncio.gather(*(run(n) for n in range(1, 11)))

    messages = (await store.get(TENANT, CONVERSATION, ALICE)).messages
    assert len(messages) == 22
    pairs = list(zip(messages[::2], messages[1::2], strict=True))
    assert all(question.content.split()[-1] == answer.content.split()[-1] for question, answer in pairs)
    assert sorted(int(question.content.split()[-1]) for question, _ in pairs) == list(range(11))
    assert sorted(seen.values()) == list(range(2, 22, 2))


# Length, pages and summaries.


async def test_past_its_bound_a_conversation_drops_its_oldest_messages(store_url: str | None) -> None:
    store = create_conversation_store(store_url, max_messages=4)
    try:
        await committed(store, *(make_turn(n) for n in range(1, 5)))

        conversation = await store.get(TENANT, CONVERSATION, ALICE)
        assert conversation.messages == messages_of(make_turn(3), make_turn(4))
        assert conversation.first_index == 4
        assert await recent(store, 10) == messages_of(make_turn(3), make_turn(4))
        assert (conversation.input_tokens, conversation.output_tokens) == (100, 10)  # usage stays whole
    finally:
        await store.close()


async def test_messages_come_in_pages_oldest_first(store: ConversationStore) -> None:
    turns = [make_turn(n) for n in range(1, 6)]
    await committed(store, *turns)
    everything = messages_of(*turns)

    pages, start = [], 0
    for _ in range(10):
        page = await store.get(TENANT, CONVERSATION, ALICE, start=start, limit=4)
        pages.append((page.first_index, page.messages))
        if page.next_index is None:
            break
        start = page.next_index
    assert pages == [(0, everything[0:4]), (4, everything[4:8]), (8, everything[8:10])]
    assert (await store.get(TENANT, CONVERSATION, ALICE, start=10, limit=4)).messages == []
    assert (await store.get(TENANT, CONVERSATION, ALICE)).next_index is None


async def test_a_summary_stands_in_for_the_messages_it_covers(store: ConversationStore) -> None:
    await committed(store, *(make_turn(n) for n in range(1, 4)))
    summary = Summary("turns one and two", 4, 1_700_000_100.0)

    assert await store.commit_summary(TENANT, CONVERSATION, summary, replaces=0, covered_until=time.time() + 60)

    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=100, lease_seconds=LEASE)
    assert (history.summary, history.first_index, history.messages) == (summary, 4, messages_of(make_turn(3)))
    await store.abandon_turn(TENANT, CONVERSATION, history.lock)
    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    assert conversation.summary == summary and len(conversation.messages) == 6  # still listed until they expire


async def test_of_two_summaries_written_at_once_only_one_lands(store: ConversationStore) -> None:
    await committed(store, *(make_turn(n) for n in range(1, 4)))
    until = time.time() + 60
    first = Summary("first", 2, 1.0)
    assert await store.commit_summary(TENANT, CONVERSATION, first, replaces=0, covered_until=until)

    assert not await store.commit_summary(
        TENANT, CONVERSATION, Summary("stale", 2, 2.0), replaces=0, covered_until=until
    )
    assert await store.commit_summary(TENANT, CONVERSATION, Summary("next", 4, 3.0), replaces=2, covered_until=until)
    assert (await store.get(TENANT, CONVERSATION, ALICE)).summary == Summary("next", 4, 3.0)


async def test_a_summary_never_resurrects_a_deleted_conversation(store: ConversationStore) -> None:
    await committed(store, make_turn(1))
    await store.delete(TENANT, CONVERSATION, ALICE)

    assert not await store.commit_summary(
        TENANT, CONVERSATION, Summary("late", 2, 1.0), replaces=0, covered_until=time.time() + 60
    )
    with pytest.raises(ConversationNotFound):
        await store.get(TENANT, CONVERSATION, ALICE)


async def test_a_summary_expires_with_the_newest_message_it_covers(redis_url: str) -> None:
    store = create_conversation_store(redis_url, retention_seconds=60)
    try:
        await committed(store, make_turn(1), make_turn(2))
        summary = Summary("turn one", 2, 1.0)
        assert await store.commit_summary(TENANT, CONVERSATION, summary, replaces=0, covered_until=time.time() + 0.2)
        await asyncio.sleep(0.4)

        assert (await store.get(TENANT, CONVERSATION, ALICE)).summary is None
    finally:
        await store.close()


async def test_token_counts_and_images_round_trip(store: ConversationStore) -> None:
    image = StoredImage(mime_type="image/png", data=b"\x89PNG\r\n\x1a\n", detail="low")
    turn = CommittedTurn(
        messages=(
            StoredMessage("user", "what is this?", 1.0, tokens=4, encoding="o200k_base", images=(image,)),
            StoredMessage("assistant", "a picture", 2.0, tokens=2, encoding="o200k_base"),
        ),
        input_tokens=100,
        output_tokens=2,
    )
    await store.commit_turn(TENANT, CONVERSATION, ALICE, turn, new=True)

    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == list(turn.messages)


async def test_the_pii_placeholders_a_message_introduced_round_trip_with_it(store: ConversationStore) -> None:
    turn = CommittedTurn(
        messages=(
            StoredMessage(
                "user",
                "card [CARD_1], phone [PHONE_1]",
                1.0,
                placeholders=(("[CARD_1]", "4111 1111 1111 1111"), ("[PHONE_1]", "")),
            ),
            StoredMessage("assistant", "noted [CARD_1]", 2.0),
        ),
        input_tokens=10,
        output_tokens=3,
    )
    await store.commit_turn(TENANT, CONVERSATION, ALICE, turn, new=True)

    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=5)
    assert history.messages == list(turn.messages)


async def test_tokens_spent_outside_a_turn_add_to_the_conversations_usage(store: ConversationStore) -> None:
    await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)

    await store.add_usage(TENANT, CONVERSATION, 7, 3)
    await store.add_usage(OTHER_TENANT, CONVERSATION, 100, 100)  # no such conversation there: nothing

    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    assert (conversation.input_tokens, conversation.output_tokens) == (17, 4)
    with pytest.raises(ConversationNotFound):
        await store.get(OTHER_TENANT, CONVERSATION, ALICE)


# Turns with tool calls and their results.

LOOKUP = StoredToolCall("call_1", "order_status", '{"id":7,"note":"«quoted» \\"x\\""}')
SHIPPING = StoredToolCall("call_2", "shipping_quote", "{}")
CLOCK = StoredToolCall("call_3", "current_time", "{}", server_side=True)


def tool_turns() -> tuple[CommittedTurn, CommittedTurn]:
    """A turn that ends with calls the caller runs, and the next: their results, a server-side call, its
    failure, and the final reply."""
    asking = CommittedTurn(
        messages=(
            StoredMessage("user", "where is order 7?", 10.0, tokens=6, encoding="o200k_base"),
            StoredMessage("assistant", "", 11.0, tokens=30, encoding="o200k_base", tool_calls=(LOOKUP, SHIPPING)),
        ),
        input_tokens=50,
        output_tokens=30,
    )
    answering = CommittedTurn(
        messages=(
            StoredMessage("tool", '{"status":"shipped"}', 20.0, tool_call_id="call_1"),
            StoredMessage("assistant", "Checking the date.", 21.0, tool_calls=(CLOCK,)),
            StoredMessage("tool", "clock unavailable", 22.0, tool_call_id="call_3", tool_error=True),
            StoredMessage("assistant", "It shipped.", 23.0, tokens=4, encoding="o200k_base"),
        ),
        input_tokens=200,
        output_tokens=20,
    )
    return asking, answering


async def test_a_turn_of_tool_calls_and_results_round_trips_whole_and_in_order(store: ConversationStore) -> None:
    asking, answering = tool_turns()
    await store.commit_turn(TENANT, CONVERSATION, ALICE, asking, new=True)
    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=10, lease_seconds=LEASE)
    assert (history.first_index, history.messages) == (0, list(asking.messages))
    key = replace(KEY, replay='{"text": "It shipped."}')
    await store.commit_turn(TENANT, CONVERSATION, ALICE, answering, new=False, lock=history.lock, idempotency=key)

    everything = messages_of(asking, answering)
    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    assert (conversation.first_index, conversation.messages, conversation.next_index) == (0, everything, None)
    assert (conversation.created_at, conversation.updated_at) == (10.0, 23.0)
    assert (conversation.input_tokens, conversation.output_tokens) == (250, 50)
    assert conversation.messages[1].tool_calls == (LOOKUP, SHIPPING)
    assert conversation.messages[4].tool_error and conversation.messages[4].tool_call_id == "call_3"
    newest = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=5, lease_seconds=LEASE)
    assert (newest.first_index, newest.messages) == (1, everything[1:])
    await store.abandon_turn(TENANT, CONVERSATION, newest.lock)
    page = await store.get(TENANT, CONVERSATION, ALICE, start=2, limit=3)
    assert (page.first_index, page.messages, page.next_index) == (2, everything[2:5], 5)
    assert await store.claim_turn(TENANT, CONVERSATION, KEY, lease_seconds=30) == TurnClaim(
        ClaimState.COMMITTED, '{"text": "It shipped."}'
    )

    # A new conversation takes its times from the turn's first and last messages.
    await store.commit_turn(TENANT, "conv-2", ALICE, answering, new=True)
    other = await store.get(TENANT, "conv-2", ALICE)
    assert (other.messages, other.created_at, other.updated_at) == (list(answering.messages), 20.0, 23.0)


async def test_a_turn_has_at_least_one_message() -> None:
    with pytest.raises(ValueError, match="at least one message"):
        CommittedTurn(messages=(), input_tokens=0, output_tokens=0)


async def test_a_turn_of_one_message_commits(store: ConversationStore) -> None:
    alone = CommittedTurn(messages=(StoredMessage("assistant", "hello", 5.0),), input_tokens=1, output_tokens=1)

    await store.commit_turn(TENANT, CONVERSATION, ALICE, alone, new=True)

    conversation = await store.get(TENANT, CONVERSATION, ALICE)
    assert (conversation.messages, conversation.created_at, conversation.updated_at) == ([alone.messages[0]], 5.0, 5.0)


async def test_past_its_bound_a_turn_of_many_messages_drops_the_oldest(store_url: str | None) -> None:
    store = create_conversation_store(store_url, max_messages=3)
    try:
        asking, answering = tool_turns()
        await committed(store, asking, answering)

        conversation = await store.get(TENANT, CONVERSATION, ALICE)
        assert (conversation.first_index, conversation.messages) == (3, messages_of(asking, answering)[3:])
        assert await recent(store, 10) == messages_of(asking, answering)[3:]
        # A turn longer than the bound keeps its newest messages.
        await store.commit_turn(TENANT, "conv-2", ALICE, answering, new=True)
        longer = await store.get(TENANT, "conv-2", ALICE)
        assert (longer.first_index, longer.messages) == (1, list(answering.messages[1:]))
        assert (longer.created_at, longer.updated_at) == (20.0, 23.0)
    finally:
        await store.close()


async def test_refused_tool_calls_and_results_keep_their_refusal_and_not_their_text(store: ConversationStore) -> None:
    refused = CommittedTurn(
        messages=(
            StoredMessage("tool", "", 1.0, refused=True, tool_call_id="call_1"),
            StoredMessage("assistant", "", 2.0, refused=True),
            StoredMessage("tool", "", 3.0, refused=True, tool_call_id="call_2", tool_error=True),
        ),
        input_tokens=0,
        output_tokens=0,
    )

    await store.commit_turn(TENANT, CONVERSATION, ALICE, refused, new=True)

    assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == list(refused.messages)
    assert await recent(store, 3) == list(refused.messages)


async def test_redis_records_written_before_tool_calls_still_decode(redis_url: str) -> None:
    """Messages are stored without the fields that have their defaults, so records in the format from before
    tool calls read as they did, and are still written that way."""
    store = create_conversation_store(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    prefix = f"chatmesh:conv:{{{TENANT}/{CONVERSATION}}}:"
    try:
        await store.commit_turn(TENANT, CONVERSATION, ALICE, make_turn(1), new=True)
        assert await client.get(prefix + "m:0") == '{"role":"user","content":"question 1","created_at":1700000002.25}'
        await client.set(prefix + "m:0", '{"role":"user","content":"hello","created_at":1.5,"refused":true}')
        await client.set(
            prefix + "m:1", '{"role":"assistant","content":"hi","created_at":2.5,"tokens":1,"encoding":"o200k_base"}'
        )
        asking, _ = tool_turns()
        await committed_next(store, asking)

        old = [
            StoredMessage("user", "hello", 1.5, refused=True),
            StoredMessage("assistant", "hi", 2.5, tokens=1, encoding="o200k_base"),
        ]
        assert (await store.get(TENANT, CONVERSATION, ALICE)).messages == [*old, *asking.messages]
        assert await recent(store, 10) == [*old, *asking.messages]
    finally:
        await client.aclose()
        await store.close()
