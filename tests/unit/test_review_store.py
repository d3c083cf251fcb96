"""The ReviewStore contract, which every implementation meets (memory and Redis alike), and what the Redis one
keeps in Redis: TTLs within retention, nothing left of an erased user, a queue that sweeping never breaks."""

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatmesh.review.store import (
    QUEUE,
    CaseConflict,
    CaseNotFound,
    InvalidPageToken,
    MemoryReviewStore,
    NewCase,
    RedisReviewStore,
    ReviewStore,
    case_id,
    create_review_store,
)
from chatmesh.runtime.settings import ServiceSettings
from chatmesh.v1 import chat_pb2, review_pb2, safety_pb2

RETENTION = 3600.0
LEASE = 60.0
INPUT = chat_pb2.ContentFilter.STAGE_INPUT
OUTPUT = chat_pb2.ContentFilter.STAGE_OUTPUT
OPEN = review_pb2.CASE_STATE_OPEN
CLAIMED = review_pb2.CASE_STATE_CLAIMED
DECIDED = review_pb2.CASE_STATE_DECIDED
ESCALATED = review_pb2.CASE_STATE_ESCALATED


def new_case(
    request_id: str,
    *,
    tenant: str = "acme",
    user_id: str = "alice",
    conversation_id: str = "conv-1",
    stage: int = INPUT,
    excerpt: str = "a flagged text",
) -> NewCase:
    return NewCase(
        turn=safety_pb2.TurnRef(tenant=tenant, user_id=user_id, conversation_id=conversation_id, request_id=request_id),
        stage=stage,
        categories=("fraud", "violence"),
        source=safety_pb2.SCREEN_SOURCE_KEYWORD,
        action=review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW,
        excerpt=excerpt,
    )


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory store; the URL of a real, empty redis-server for the Redis store."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[ReviewStore]:
    review_store = create_review_store(ServiceSettings(redis_url=store_url, review_retention_seconds=RETENTION))
    try:
        yield review_store
    finally:
        await review_store.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_case_is_opened_once_per_request_and_stage_and_reads_back_whole(store: ReviewStore) -> None:
    before = time.time()
    first = await store.open_case(new_case("req-1"))
    again = await store.open_case(new_case("req-1", excerpt="another text"))
    output = await store.open_case(new_case("req-1", stage=OUTPUT))

    assert first == again == case_id("acme", "req-1", INPUT)
    assert output != first and len(first) == 16 and int(first, 16) >= 0
    case = await store.get(first)
    assert case is not None
    assert case.id == first and case.state == OPEN and case.excerpt == "a flagged text"
    assert case.turn == safety_pb2.TurnRef(tenant="acme", user_id="alice", conversation_id="conv-1", request_id="req-1")
    assert case.stage == INPUT and list(case.categories) == ["fraud", "violence"]
    assert case.source == safety_pb2.SCREEN_SOURCE_KEYWORD
    assert case.action == review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW
    assert before - 1 <= case.create_time.ToMicroseconds() / 1e6 <= time.time() + 1
    assert not case.reviewer and not case.HasField("lease_expire_time") and not case.HasField("decide_time")
    assert (await store.list())[0] and len((await store.list())[0]) == 2
    assert await store.get("0" * 16) is None


async def test_cases_are_listed_newest_first_by_tenant_and_state_in_pages(store: ReviewStore) -> None:
    ids = [await store.open_case(new_case(f"req-{n}", tenant="acme" if n % 2 else "globex")) for n in range(7)]
    await store.claim("rita", case_id=ids[5], lease_seconds=LEASE)

    pages, token = [], ""
    for _ in range(10):
        page, token = await store.list(page_size=3, page_token=token)
        pages.append([case.id for case in page])
        if not token:
            break
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[0:1]]
    acme, _ = await store.list(tenant="acme")
    assert [case.id for case in acme] == [ids[5], ids[3], ids[1]]
    claimed, _ = await store.list(state=CLAIMED)
    assert [case.id for case in claimed] == [ids[5]]
    open_globex, token = await store.list(tenant="globex", state=OPEN, page_size=2)
    assert [case.id for case in open_globex] == [ids[6], ids[4]] and token
    rest, token = await store.list(tenant="globex", state=OPEN, page_size=2, page_token=token)
    assert [case.id for case in rest] == [ids[2], ids[0]] and not token
    with pytest.raises(InvalidPageToken):
        await store.list(page_token="not a token")


async def test_a_claim_takes_the_oldest_waiting_case_and_two_reviewers_never_hold_the_same(store: ReviewStore) -> None:
    ids = [await store.open_case(new_case(f"req-{n}")) for n in range(3)]
    before_ms = time.time() * 1000

    first = await store.claim("rita", lease_seconds=LEASE)
    second = await store.claim("sam", lease_seconds=LEASE)
    assert (first.id, second.id) == (ids[0], ids[1])
    assert first.state == CLAIMED and first.reviewer == "rita"
    assert before_ms + LEASE * 1000 - 2000 <= first.lease_expire_time.ToMilliseconds() <= time.time() * 1000 + 61_000

    with pytest.raises(CaseConflict, match="held by rita"):
        await store.claim("sam", case_id=ids[0], lease_seconds=LEASE)
    third = await store.claim("tom", lease_seconds=LEASE)
    assert third.id == ids[2]
    with pytest.raises(CaseNotFound):
        await store.claim("uma", lease_seconds=LEASE)
    with pytest.raises(CaseNotFound):
        await store.claim("uma", case_id="0" * 16, lease_seconds=LEASE)


async def test_concurrent_claims_hand_out_each_case_once(store: ReviewStore) -> None:
    ids = {await store.open_case(new_case(f"req-{n}")) for n in range(5)}

    async def claim(reviewer: str) -> str | None:
        try:
            return (await store.claim(reviewer, lease_seconds=LEASE)).id
        except CaseNotFound:
            return None

    claimed = await asyncio.gather(*(claim(f"reviewer-{n}") for n in range(8)))
    assert sorted(filter(None, claimed)) == sorted(ids)


async def test_a_given_case_is_claimed_and_its_holder_extends_the_lease(store: ReviewStore) -> None:
    ids = [await store.open_case(new_case(f"req-{n}")) for n in range(2)]

    claimed = await store.claim("rita", case_id=ids[1], lease_seconds=5)
    extended = await store.claim("rita", case_id=ids[1], lease_seconds=LEASE)
    assert claimed.id == ids[1] and extended.reviewer == "rita"
    assert extended.lease_expire_time.ToMilliseconds() > claimed.lease_expire_time.ToMilliseconds()
    # The queue hands the others out, never the held one.
    assert (await store.claim("sam", lease_seconds=LEASE)).id == ids[0]
    with pytest.raises(CaseNotFound):
        await store.claim("tom", lease_seconds=LEASE)


async def test_a_lapsed_lease_makes_the_case_claimable_again(store: ReviewStore) -> None:
    ids = [await store.open_case(new_case(f"req-{n}")) for n in range(2)]
    await store.claim("rita", lease_seconds=0.3)
    await store.claim("rita", case_id=ids[1], lease_seconds=0.3)

    await asyncio.sleep(0.5)
    lapsed = await store.get(ids[0])
    assert lapsed is not None and lapsed.state == OPEN and not lapsed.reviewer
    with pytest.raises(CaseConflict, match="lapsed; claim it again"):
        await store.decide(ids[0], "rita", review_pb2.DECISION_BLOCK, "", None)
    taken = [(await store.claim("sam", lease_seconds=LEASE)).id for _ in range(2)]
    assert taken == ids
    with pytest.raises(CaseConflict, match="held by sam"):
        await store.decide(ids[0], "rita", review_pb2.DECISION_BLOCK, "", None)


async def test_only_the_holder_decides_and_a_decided_case_stays_decided(store: ReviewStore) -> None:
    opened = await store.open_case(new_case("req-1"))
    with pytest.raises(CaseConflict, match="claim it first"):
        await store.decide(opened, "rita", review_pb2.DECISION_BLOCK, "", None)
    await store.claim("rita", lease_seconds=LEASE)
    with pytest.raises(CaseConflict, match="held by rita, not sam"):
        await store.decide(opened, "sam", review_pb2.DECISION_BLOCK, "", None)

    decided = await store.decide(opened, "rita", review_pb2.DECISION_BLOCK, "fraud, clearly", None)
    assert decided.state == DECIDED and decided.decision == review_pb2.DECISION_BLOCK
    assert decided.reviewer == "rita" and decided.note == "fraud, clearly" and decided.HasField("decide_time")
    assert not decided.HasField("lease_expire_time") and not decided.HasField("added_term")
    assert await store.get(opened) == decided
    with pytest.raises(CaseConflict, match="already decided"):
        await store.decide(opened, "rita", review_pb2.DECISION_APPROVE, "", None)
    with pytest.raises(CaseConflict, match="decided"):
        await store.claim("sam", case_id=opened, lease_seconds=LEASE)
    with pytest.raises(CaseNotFound):
        await store.claim("sam", lease_seconds=LEASE)
    with pytest.raises(CaseNotFound):
        await store.decide("0" * 16, "rita", review_pb2.DECISION_BLOCK, "", None)


async def test_escalating_reopens_the_case_behind_the_others(store: ReviewStore) -> None:
    first = await store.open_case(new_case("req-1"))
    await store.claim("rita", lease_seconds=LEASE)
    second = await store.open_case(new_case("req-2"))

    escalated = await store.decide(first, "rita", review_pb2.DECISION_ESCALATE, "needs a senior", None)
    assert escalated.state == ESCALATED and escalated.note == "needs a senior"
    assert [case.id for case in (await store.list(state=ESCALATED))[0]] == [first]
    assert (await store.claim("sam", lease_seconds=LEASE)).id == second
    senior = await store.claim("vera", lease_seconds=LEASE)
    assert senior.id == first and senior.reviewer == "vera"
    approved = await store.decide(first, "vera", review_pb2.DECISION_APPROVE, "fine", None)
    assert approved.state == DECIDED and approved.decision == review_pb2.DECISION_APPROVE


async def test_open_summary_counts_undecided_cases_and_the_oldest_ones_age(store: ReviewStore) -> None:
    assert await store.open_summary() == (0, None)
    first = await store.open_case(new_case("req-1"))
    await asyncio.sleep(0.2)
    await store.open_case(new_case("req-2"))
    await store.claim("rita", lease_seconds=LEASE)

    count, age = await store.open_summary()
    assert count == 2 and age is not None and 0.2 <= age < 30
    await store.decide(first, "rita", review_pb2.DECISION_ESCALATE, "", None)
    assert (await store.open_summary())[0] == 2
    await store.claim("rita", lease_seconds=LEASE)
    await store.claim("rita", lease_seconds=LEASE)
    await store.decide(first, "rita", review_pb2.DECISION_BLOCK, "", None)
    count, age = await store.open_summary()
    assert count == 1 and age is not None and age < 0.2 + 30


async def test_erasure_removes_a_users_or_a_conversations_cases(store: ReviewStore) -> None:
    alice = [
        await store.open_case(new_case("req-1", conversation_id="conv-a")),
        await store.open_case(new_case("req-2", conversation_id="conv-b")),
    ]
    await store.claim("rita", case_id=alice[0], lease_seconds=LEASE)
    bob = await store.open_case(new_case("req-3", user_id="bob", conversation_id="conv-c"))
    other_tenant = await store.open_case(new_case("req-4", tenant="globex"))

    assert await store.erase("acme", conversation_id="conv-b") == 1
    assert await store.get(alice[1]) is None and await store.get(alice[0]) is not None
    assert await store.erase("acme", user_id="alice") == 1
    assert await store.erase("acme", user_id="alice") == 0
    assert await store.get(alice[0]) is None
    assert [case.id for case in (await store.list())[0]] == [other_tenant, bob]
    assert (await store.open_summary())[0] == 2
    assert {(await store.claim("sam", lease_seconds=LEASE)).id for _ in range(2)} == {bob, other_tenant}
    with pytest.raises(CaseNotFound):
        await store.claim("sam", lease_seconds=LEASE)


async def test_terms_are_added_by_decisions_and_removed_with_a_new_version(store: ReviewStore) -> None:
    version, terms = await store.terms()
    assert terms == []
    opened = await store.open_case(new_case("req-1"))
    await store.claim("rita", lease_seconds=LEASE)
    term = review_pb2.KeywordTerm(category="fraud", term="wire me bitcoin")

    decided = await store.decide(opened, "rita", review_pb2.DECISION_BLOCK, "", term)
    assert decided.added_term == term
    added_version, terms = await store.terms()
    assert terms == [term] and added_version != version
    await store.add_term(term)
    assert await store.terms() == (added_version, [term])
    other = review_pb2.KeywordTerm(category="abuse", term="x\u00e9")
    await store.add_term(other)
    both_version, terms = await store.terms()
    assert terms == [other, term] and both_version not in (version, added_version)

    assert await store.remove_term(term) is True
    assert await store.remove_term(term) is False
    removed_version, terms = await store.terms()
    assert terms == [other] and removed_version not in (version, added_version, both_version)


def test_the_settings_choose_redis_or_memory_and_keep_cases_no_longer_than_conversations(redis_server) -> None:
    assert isinstance(create_review_store(ServiceSettings(redis_url=None)), MemoryReviewStore)
    assert isinstance(create_review_store(ServiceSettings(redis_url=redis_server.url)), RedisReviewStore)
    with pytest.raises(ValueError, match="REVIEW_RETENTION_SECONDS must be at most"):
        ServiceSettings(review_retention_seconds=3600, conversation_retention_seconds=600)
    assert ServiceSettings(review_retention_seconds=10**9, conversation_retention_seconds=0)


# The Redis store's keys.


async def test_every_key_that_holds_user_text_expires_within_retention_and_erasure_leaves_none(
    redis_url: str, redis: Redis
) -> None:
    store = RedisReviewStore.from_url(redis_url, retention_seconds=RETENTION)
    canary = "canary-7f3a"
    try:
        ids = [
            await store.open_case(new_case(f"req-{n}", user_id="user-canary", excerpt=f"text {canary}"))
            for n in range(3)
        ]
        await store.claim("rita", case_id=ids[0], lease_seconds=LEASE)
        await store.claim("rita", lease_seconds=LEASE)
        await store.decide(ids[0], "rita", review_pb2.DECISION_ESCALATE, f"note on {canary}", None)
        await store.decide(ids[1], "rita", review_pb2.DECISION_BLOCK, f"note on {canary}", None)

        for key in await redis.keys("*"):
            ttl = await redis.pttl(key)
            if key in (QUEUE, "chatmesh:review:terms", "chatmesh:review:terms:version"):
                assert ttl == -1  # the queue holds references only; the terms are operator data
            else:
                assert 0 < ttl <= RETENTION * 1000, key
        assert await redis.xlen(QUEUE) == 2  # the escalated case's new entry and the open one

        assert await store.erase("acme", user_id="user-canary") == 3
        left = [await _dump(redis, key) for key in await redis.keys("*")]
        assert not [value for value in left if canary in value or "user-canary" in value]
        assert await redis.xlen(QUEUE) == 0
        assert await redis.keys("chatmesh:review:{acme}:*") == []
    finally:
        await store.close()


async def _dump(redis: Redis, key: str) -> str:
    """Everything a key holds, as text."""
    kind = await redis.type(key)
    if kind == "string":
        return key + str(await redis.get(key))
    if kind == "hash":
        return key + str(await redis.hgetall(key))
    if kind == "zset":
        return key + str(await redis.zrange(key, 0, -1))
    if kind == "set":
        return key + str(await redis.smembers(key))
    if kind == "stream":
        return key + str(await redis.xrange(key))
    raise AssertionError(f"{key} is a {kind}")


async def test_sweep_trims_only_below_the_oldest_pending_entry_and_keeps_consumers_that_hold_entries(
    redis_url: str, redis: Redis
) -> None:
    store = RedisReviewStore.from_url(redis_url, retention_seconds=RETENTION, consumer_idle_seconds=0)
    try:
        ids = [await store.open_case(new_case(f"req-{n}")) for n in range(5)]
        first = await store.claim("rita", lease_seconds=LEASE)
        held = await store.claim("sam", lease_seconds=LEASE)
        await store.decide(first.id, "rita", review_pb2.DECISION_APPROVE, "", None)
        # Handed out, then acknowledged without being deleted: what XTRIM is for.
        entries = await redis.xrange(QUEUE)
        assert len(entries) == 4
        await store.sweep()

        pending = await redis.xpending_range(QUEUE, "reviewers", "-", "+", 10)
        assert [entry["consumer"] for entry in pending] == ["sam"]
        remaining = [entry_id for entry_id, _ in await redis.xrange(QUEUE)]
        assert remaining == [entry_id for entry_id, _ in entries]  # the pending one and every one after it
        consumers = {
            consumer["name"]: consumer["pending"] for consumer in await redis.xinfo_consumers(QUEUE, "reviewers")
        }
        assert consumers == {"sam": 1}  # rita holds nothing and is idle: deleted; sam is kept

        await store.decide(held.id, "sam", review_pb2.DECISION_BLOCK, "", None)
        await store.sweep()
        assert await redis.xlen(QUEUE) == 3  # the three never handed out
        assert [(await store.claim("tom", lease_seconds=LEASE)).id for _ in range(3)] == ids[2:]
    finally:
        await store.close()


async def test_sweep_drops_entries_whose_case_expired_and_several_sweeps_at_once_are_safe(
    redis_url: str, redis: Redis
) -> None:
    store = RedisReviewStore.from_url(redis_url, retention_seconds=RETENTION, consumer_idle_seconds=0)
    try:
        ids = [await store.open_case(new_case(f"req-{n}")) for n in range(4)]
        await store.claim("rita", lease_seconds=LEASE)
        await store.claim("sam", lease_seconds=LEASE)
        await redis.delete(f"chatmesh:review:{{acme}}:case:{ids[0]}")  # as if it expired

        await asyncio.gather(*(store.sweep() for _ in range(4)))

        pending = await redis.xpending_range(QUEUE, "reviewers", "-", "+", 10)
        assert [entry["consumer"] for entry in pending] == ["sam"]
        assert await redis.xlen(QUEUE) == 3
        assert [(await store.claim("tom", lease_seconds=LEASE)).id for _ in range(2)] == ids[2:]
    finally:
        await store.close()
