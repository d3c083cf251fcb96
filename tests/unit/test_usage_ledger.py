"""The UsageLedger contract, which every implementation must meet (memory and Redis alike)."""

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable

import pytest
from redis.asyncio import Redis
from support.ports import free_port

from chatmesh.tenancy.ledger import (
    CONCURRENT_STREAMS_RETRY_SECONDS,
    LedgerUnavailable,
    LimitExceeded,
    MemoryUsageLedger,
    QuotaUse,
    RedisUsageLedger,
    Rejection,
    TenantUsage,
    UsageLedger,
    create_usage_ledger,
)
from chatmesh.tenancy.limits import NANO_USD_PER_USD, LimitName, Limits, Windows

ALICE = "alice"
BOB = "bob"
# 2026-03-15 12:30:10 UTC: 50 s before the minute ends, mid-day and mid-month.
NOW = dt.datetime(2026, 3, 15, 12, 30, 10, tzinfo=dt.UTC).timestamp()
WINDOWS = Windows.at(NOW)
LEASE = 30.0
TTL = 120.0


def usd(amount: float) -> int:
    """`amount` USD in nano-USD."""
    return round(amount * NANO_USD_PER_USD)


@pytest.fixture(params=["memory", "redis"])
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory ledger; the URL of a real, empty redis-server for the Redis ledger."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def ledger(ledger_url: str | None) -> AsyncIterator[UsageLedger]:
    usage_ledger = create_usage_ledger(ledger_url)
    try:
        yield usage_ledger
    finally:
        await usage_ledger.close()


async def admit(ledger: UsageLedger, limits: Limits, request_id: str, *, now: float = NOW, tenant: str = ALICE) -> None:
    await ledger.admit_request(tenant, limits, request_id, now=now, lease_seconds=LEASE)


async def reserve(
    ledger: UsageLedger,
    limits: Limits,
    request_id: str,
    *,
    tokens: int = 0,
    cost: int = 0,
    now: float = NOW,
    ttl: float = TTL,
    tenant: str = ALICE,
) -> None:
    await ledger.reserve(tenant, limits, request_id, tokens=tokens, cost_nano_usd=cost, now=now, ttl_seconds=ttl)


async def settle(
    ledger: UsageLedger,
    request_id: str,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost: int = 0,
    now: float = NOW,
    tenant: str = ALICE,
) -> bool:
    return await ledger.settle(
        tenant, request_id, input_tokens=input_tokens, output_tokens=output_tokens, cost_nano_usd=cost, now=now
    )


async def refusal(operation: Awaitable[object]) -> Rejection:
    """The rejection that `operation` raises."""
    with pytest.raises(LimitExceeded) as refused:
        await operation
    return refused.value.rejection


async def used(ledger: UsageLedger, limit: LimitName, *, now: float = NOW, tenant: str = ALICE) -> float:
    usage = await ledger.usage(tenant, Limits(), now=now)
    return next(quota.used for quota in usage.quotas if quota.limit is limit)


# --- Requests per minute --------------------------------------------------------------------------------------


async def test_requests_per_minute_admits_exactly_the_limit_and_refuses_the_next_until_the_minute_ends(
    ledger: UsageLedger,
) -> None:
    limits = Limits(requests_per_minute=3)
    for n in range(3):
        await admit(ledger, limits, f"r{n}", now=NOW + n)

    rejection = await refusal(admit(ledger, limits, "r3", now=NOW + 5))

    assert rejection == Rejection(LimitName.REQUESTS_PER_MINUTE, 3, 3, WINDOWS.minute_ends_at - (NOW + 5))
    assert rejection.retry_after_seconds == 45.0
    await admit(ledger, limits, "r4", now=WINDOWS.minute_ends_at)  # the next minute
    assert await used(ledger, LimitName.REQUESTS_PER_MINUTE, now=WINDOWS.minute_ends_at) == 1


async def test_a_refused_request_is_not_counted(ledger: UsageLedger) -> None:
    limits = Limits(requests_per_minute=2)
    await admit(ledger, limits, "r0")
    await admit(ledger, limits, "r1")

    for n in range(5):
        await refusal(admit(ledger, limits, f"refused{n}", now=NOW + n))

    usage = await ledger.usage(ALICE, limits, now=NOW + 10)
    assert usage.quotas[0].used == 2
    assert usage.month_requests == 2


async def test_a_request_refused_for_its_stream_slot_is_not_counted_in_the_minute(ledger: UsageLedger) -> None:
    limits = Limits(requests_per_minute=5, concurrent_streams=1)
    await admit(ledger, limits, "r0")

    rejection = await refusal(admit(ledger, limits, "r1"))

    assert rejection.limit is LimitName.CONCURRENT_STREAMS
    assert await used(ledger, LimitName.REQUESTS_PER_MINUTE) == 1


# --- Concurrent streams ---------------------------------------------------------------------------------------


async def test_concurrent_streams_hold_n_slots_freed_by_release_or_by_an_expired_lease(ledger: UsageLedger) -> None:
    limits = Limits(concurrent_streams=2)
    await admit(ledger, limits, "a")
    await admit(ledger, limits, "b")

    assert await refusal(admit(ledger, limits, "c")) == Rejection(
        LimitName.CONCURRENT_STREAMS, 2, 2, CONCURRENT_STREAMS_RETRY_SECONDS
    )

    await ledger.release_requests(ALICE, ["a"])
    await ledger.release_requests(ALICE, ["a"])  # idempotent: frees no second slot
    await admit(ledger, limits, "c", now=NOW + 1)
    assert (await refusal(admit(ledger, limits, "d", now=NOW + 1))).used == 2

    # b's lease ended at NOW + 30; c's lasts until NOW + 31.
    later = NOW + LEASE + 0.5
    assert await used(ledger, LimitName.CONCURRENT_STREAMS, now=later) == 1
    await admit(ledger, limits, "d", now=later)
    assert (await refusal(admit(ledger, limits, "e", now=later))).used == 2


async def test_an_admission_first_frees_the_slots_released_with_it(ledger: UsageLedger) -> None:
    limits = Limits(concurrent_streams=2)
    await admit(ledger, limits, "a")
    await admit(ledger, limits, "b")

    await ledger.admit_request(ALICE, limits, "c", now=NOW, lease_seconds=LEASE, releasing=["a", "b"])
    await admit(ledger, limits, "d")
    assert await used(ledger, LimitName.CONCURRENT_STREAMS) == 2
    assert (await refusal(admit(ledger, limits, "e"))).used == 2


async def test_a_refused_admission_still_frees_the_slots_released_with_it(ledger: UsageLedger) -> None:
    limits = Limits(requests_per_minute=1, concurrent_streams=5)
    await admit(ledger, limits, "a")
    with pytest.raises(LimitExceeded):
        await ledger.admit_request(ALICE, limits, "b", now=NOW, lease_seconds=LEASE, releasing=["a"])
    assert await used(ledger, LimitName.CONCURRENT_STREAMS) == 0


async def test_releasing_nothing_is_harmless(ledger: UsageLedger) -> None:
    await ledger.release_requests(ALICE, [])
    assert await used(ledger, LimitName.CONCURRENT_STREAMS) == 0


async def test_releasing_a_call_that_holds_no_slot_is_harmless(ledger: UsageLedger) -> None:
    await ledger.release_requests(ALICE, ["never-admitted"])
    await admit(ledger, Limits(), "unlimited")  # holds no slot: the tenant has no streams limit
    await ledger.release_requests(ALICE, ["unlimited"])

    assert await used(ledger, LimitName.CONCURRENT_STREAMS) == 0


# --- Tokens per minute ----------------------------------------------------------------------------------------


async def test_a_reservation_that_would_pass_the_tokens_per_minute_limit_is_refused_and_reserves_nothing(
    ledger: UsageLedger,
) -> None:
    limits = Limits(tokens_per_minute=1000)
    await reserve(ledger, limits, "t1", tokens=600)

    rejection = await refusal(reserve(ledger, limits, "t2", tokens=500, now=NOW + 10))

    assert rejection == Rejection(LimitName.TOKENS_PER_MINUTE, 1000, 600, 40.0)
    assert await used(ledger, LimitName.TOKENS_PER_MINUTE) == 600
    await reserve(ledger, limits, "t3", tokens=400)  # exactly up to the limit
    assert await used(ledger, LimitName.TOKENS_PER_MINUTE) == 1000


async def test_settlement_replaces_a_reservation_by_actual_usage_so_capacity_returns(ledger: UsageLedger) -> None:
    limits = Limits(tokens_per_minute=1000)
    await reserve(ledger, limits, "t1", tokens=900, cost=usd(0.09))
    await refusal(reserve(ledger, limits, "t2", tokens=200))

    assert await settle(ledger, "t1", input_tokens=100, output_tokens=50, cost=usd(0.015), now=NOW + 5)

    usage = await ledger.usage(ALICE, limits, now=NOW + 5)
    assert usage.quotas[1].used == 150
    assert usage.quotas[3].used == pytest.approx(0.015)
    assert (usage.month_input_tokens, usage.month_output_tokens) == (100, 50)
    assert usage.month_cost_usd == pytest.approx(0.015)
    await reserve(ledger, limits, "t2", tokens=850, now=NOW + 5)


async def test_settlement_is_idempotent_per_request_id(ledger: UsageLedger) -> None:
    await reserve(ledger, Limits(tokens_per_minute=1000), "t1", tokens=500, cost=usd(0.5))
    assert await settle(ledger, "t1", input_tokens=10, output_tokens=20, cost=usd(0.03))
    before = await ledger.usage(ALICE, Limits(), now=NOW + 1)

    assert not await settle(ledger, "t1", input_tokens=10, output_tokens=20, cost=usd(0.03), now=NOW + 1)
    assert not await settle(ledger, "t1", input_tokens=999, output_tokens=999, cost=usd(9), now=NOW + 2)

    assert await ledger.usage(ALICE, Limits(), now=NOW + 1) == before


async def test_a_settlement_without_a_reservation_counts_in_the_current_windows(ledger: UsageLedger) -> None:
    assert await settle(ledger, "unreserved", input_tokens=10, output_tokens=5, cost=7)

    usage = await ledger.usage(ALICE, Limits(), now=NOW)
    assert [quota.used for quota in usage.quotas] == [0, 15, 0, 7 / NANO_USD_PER_USD, 7 / NANO_USD_PER_USD]
    assert (usage.month_input_tokens, usage.month_output_tokens, usage.month_cost_usd) == (10, 5, 7e-9)


async def test_a_settlement_counts_in_the_windows_its_reservation_was_made_in(ledger: UsageLedger) -> None:
    limits = Limits(tokens_per_minute=1000)
    await reserve(ledger, limits, "t1", tokens=900)
    next_minute = WINDOWS.minute_ends_at + 5

    assert await settle(ledger, "t1", input_tokens=80, output_tokens=20, now=next_minute)

    assert await used(ledger, LimitName.TOKENS_PER_MINUTE, now=NOW) == 100
    assert await used(ledger, LimitName.TOKENS_PER_MINUTE, now=next_minute) == 0


async def test_an_expired_reservation_releases_its_amounts(ledger: UsageLedger) -> None:
    limits = Limits(tokens_per_minute=1000, daily_budget_usd=1.0)
    await reserve(ledger, limits, "t1", tokens=900, cost=usd(0.9), ttl=10)
    await refusal(reserve(ledger, limits, "t2", tokens=200, now=NOW + 5))

    await reserve(ledger, limits, "t2", tokens=200, cost=usd(0.2), now=NOW + 10)  # t1 expired at NOW + 10

    usage = await ledger.usage(ALICE, limits, now=NOW + 11)
    assert (usage.quotas[1].used, usage.quotas[3].used) == (200, pytest.approx(0.2))
    # Settling the expired reservation's request counts in the current windows only.
    assert await settle(ledger, "t1", input_tokens=50, cost=usd(0.05), now=NOW + 12)
    assert await used(ledger, LimitName.TOKENS_PER_MINUTE, now=NOW + 12) == 250


async def test_many_expired_reservations_are_all_released_within_two_calls(ledger: UsageLedger) -> None:
    # The Redis ledger releases at most 100 expired reservations per call.
    for n in range(150):
        await reserve(ledger, Limits(), f"t{n}", tokens=1, cost=1, ttl=1)

    await ledger.usage(ALICE, Limits(), now=NOW + 2)

    usage = await ledger.usage(ALICE, Limits(), now=NOW + 2)
    assert [quota.used for quota in usage.quotas] == [0, 0, 0, 0, 0]


async def test_a_second_reservation_under_the_same_request_id_replaces_the_first(ledger: UsageLedger) -> None:
    limits = Limits(tokens_per_minute=1000)
    await reserve(ledger, limits, "t1", tokens=600)

    await reserve(ledger, limits, "t1", tokens=300)

    assert await used(ledger, LimitName.TOKENS_PER_MINUTE) == 300
    assert await settle(ledger, "t1", input_tokens=10)
    assert await used(ledger, LimitName.TOKENS_PER_MINUTE) == 10


async def test_negative_amounts_are_refused(ledger: UsageLedger) -> None:
    with pytest.raises(ValueError, match="negative"):
        await reserve(ledger, Limits(), "t1", tokens=-1)
    with pytest.raises(ValueError, match="negative"):
        await settle(ledger, "t1", input_tokens=1, cost=-5)


# --- Budgets ----------------------------------------------------------------------------------------------------


async def test_budgets_are_checked_daily_then_monthly_and_reported_in_usd(ledger: UsageLedger) -> None:
    limits = Limits(daily_budget_usd=1.0, monthly_budget_usd=1.5)
    await reserve(ledger, limits, "d1", cost=usd(0.8))

    assert await refusal(reserve(ledger, limits, "d2", cost=usd(0.3))) == Rejection(
        LimitName.DAILY_BUDGET_USD, 1.0, 0.8, WINDOWS.day_ends_at - NOW
    )

    assert await settle(ledger, "d1", cost=usd(0.8), now=NOW + 1)  # spent for good, beyond its reservation's TTL
    tomorrow = NOW + 86400
    await reserve(ledger, limits, "d2", cost=usd(0.6), now=tomorrow)
    assert await refusal(reserve(ledger, limits, "d3", cost=usd(0.2), now=tomorrow)) == Rejection(
        LimitName.MONTHLY_BUDGET_USD, 1.5, pytest.approx(1.4), WINDOWS.month_ends_at - tomorrow
    )


async def test_a_reservation_is_refused_for_the_first_limit_it_would_pass(ledger: UsageLedger) -> None:
    limits = Limits(tokens_per_minute=10, daily_budget_usd=1.0, monthly_budget_usd=1.0)

    everything = await refusal(reserve(ledger, limits, "x", tokens=20, cost=usd(2)))
    both_budgets = await refusal(reserve(ledger, limits, "x", tokens=5, cost=usd(2)))
    monthly_only = await refusal(
        reserve(ledger, Limits(daily_budget_usd=5.0, monthly_budget_usd=1.0), "x", tokens=5, cost=usd(2))
    )

    assert everything.limit is LimitName.TOKENS_PER_MINUTE
    assert both_budgets.limit is LimitName.DAILY_BUDGET_USD
    assert monthly_only.limit is LimitName.MONTHLY_BUDGET_USD
    assert [quota.used for quota in (await ledger.usage(ALICE, limits, now=NOW)).quotas] == [0, 0, 0, 0, 0]


async def test_reserved_spend_never_exceeds_the_daily_budget(ledger: UsageLedger) -> None:
    limits = Limits(daily_budget_usd=1.0)
    admitted = 0
    for n in range(10):
        try:
            await reserve(ledger, limits, f"s{n}", cost=usd(0.3), now=NOW + n)
        except LimitExceeded as refused:
            assert refused.rejection.limit is LimitName.DAILY_BUDGET_USD
        else:
            admitted += 1

    assert admitted == 3
    assert await used(ledger, LimitName.DAILY_BUDGET_USD, now=NOW + 10) == pytest.approx(0.9)


async def test_a_budget_of_a_fraction_of_a_dollar_admits_exactly_up_to_it(ledger: UsageLedger) -> None:
    limits = Limits(daily_budget_usd=0.1)
    await reserve(ledger, limits, "a", cost=usd(0.05))
    await reserve(ledger, limits, "b", cost=usd(0.05))

    assert (await refusal(reserve(ledger, limits, "c", cost=1))).limit is LimitName.DAILY_BUDGET_USD


# --- usage() ------------------------------------------------------------------------------------------------------


async def test_usage_reports_each_limit_in_its_window_and_the_month_so_far(ledger: UsageLedger) -> None:
    limits = Limits(
        requests_per_minute=10,
        tokens_per_minute=5000,
        concurrent_streams=4,
        daily_budget_usd=2.0,
        monthly_budget_usd=20.0,
    )
    await admit(ledger, limits, "r1")
    await admit(ledger, limits, "r2")
    await reserve(ledger, limits, "r1", tokens=1000, cost=usd(0.5))
    await reserve(ledger, limits, "r2", tokens=2000, cost=usd(0.25))
    await settle(ledger, "r1", input_tokens=300, output_tokens=200, cost=usd(0.125))
    await ledger.release_requests(ALICE, ["r1"])

    usage = await ledger.usage(ALICE, limits, now=NOW + 1)

    assert usage == TenantUsage(
        quotas=[
            QuotaUse(LimitName.REQUESTS_PER_MINUTE, 10, 2, WINDOWS.minute_ends_at),
            QuotaUse(LimitName.TOKENS_PER_MINUTE, 5000, 2500, WINDOWS.minute_ends_at),
            QuotaUse(LimitName.CONCURRENT_STREAMS, 4, 1, None),
            QuotaUse(LimitName.DAILY_BUDGET_USD, 2.0, 0.375, WINDOWS.day_ends_at),
            QuotaUse(LimitName.MONTHLY_BUDGET_USD, 20.0, 0.375, WINDOWS.month_ends_at),
        ],
        month_requests=2,
        month_input_tokens=300,
        month_output_tokens=200,
        month_cost_usd=0.125,
    )
    assert [quota.limit for quota in usage.quotas] == list(LimitName)


async def test_a_tenant_without_limits_reports_no_allowance_but_still_counts(ledger: UsageLedger) -> None:
    for n in range(3):
        await admit(ledger, Limits(), f"r{n}")
    await settle(ledger, "r0", input_tokens=40, output_tokens=2, cost=usd(0.001))
    await settle(ledger, "r1", input_tokens=60, output_tokens=8, cost=usd(0.002))

    usage = await ledger.usage(ALICE, Limits(), now=NOW)

    assert [quota.allowed for quota in usage.quotas] == [None] * 5
    assert [quota.used for quota in usage.quotas] == [3, 110, 0, pytest.approx(0.003), pytest.approx(0.003)]
    assert (usage.month_requests, usage.month_input_tokens, usage.month_output_tokens) == (3, 100, 10)
    assert usage.month_cost_usd == pytest.approx(0.003)


async def test_the_months_usage_starts_over_with_the_next_month(ledger: UsageLedger) -> None:
    await admit(ledger, Limits(), "r0")
    await settle(ledger, "r0", input_tokens=1, output_tokens=1, cost=1)
    next_month = WINDOWS.month_ends_at + 1

    usage = await ledger.usage(ALICE, Limits(), now=next_month)

    assert (usage.month_requests, usage.month_input_tokens, usage.month_cost_usd) == (0, 0, 0.0)
    assert (await ledger.usage(ALICE, Limits(), now=NOW)).month_requests == 1


# --- Tenants ------------------------------------------------------------------------------------------------------


async def test_tenants_are_isolated(ledger: UsageLedger) -> None:
    limits = Limits(requests_per_minute=1, tokens_per_minute=100, concurrent_streams=1, daily_budget_usd=1.0)
    await admit(ledger, limits, "r1", tenant=ALICE)
    await reserve(ledger, limits, "r1", tokens=100, cost=usd(1), tenant=ALICE)
    assert await settle(ledger, "r1", input_tokens=100, cost=usd(1), tenant=ALICE)

    await admit(ledger, limits, "r1", tenant=BOB)
    await reserve(ledger, limits, "r1", tokens=100, cost=usd(1), tenant=BOB)
    assert await settle(ledger, "r1", input_tokens=50, cost=usd(0.5), tenant=BOB)  # same request id, other tenant

    assert (await refusal(admit(ledger, limits, "r2", tenant=ALICE))).limit is LimitName.REQUESTS_PER_MINUTE
    bob = await ledger.usage(BOB, limits, now=NOW)
    assert [quota.used for quota in bob.quotas] == [1, 50, 1, 0.5, 0.5]
    assert (bob.month_requests, bob.month_input_tokens) == (1, 50)


# --- Exactness under concurrency ------------------------------------------------------------------------------


@pytest.fixture
async def replicas(ledger_url: str | None) -> AsyncIterator[list[UsageLedger]]:
    """Three ledgers over one store, as three replicas have: separate Redis clients, or one memory ledger."""
    if ledger_url is None:
        memory = MemoryUsageLedger()
        yield [memory, memory, memory]
        return
    ledgers: list[UsageLedger] = [RedisUsageLedger.from_url(ledger_url) for _ in range(3)]
    try:
        yield ledgers
    finally:
        for replica in ledgers:
            await replica.close()


async def succeeded(calls: list[Awaitable[None]]) -> int:
    """How many of the concurrent `calls` succeeded; every failure must be LimitExceeded."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [result for result in results if result is not None]
    assert all(isinstance(failure, LimitExceeded) for failure in failures), failures
    return len(results) - len(failures)


async def test_concurrent_admissions_never_pass_the_limits(replicas: list[UsageLedger]) -> None:
    per_minute = Limits(requests_per_minute=50)
    streams = Limits(concurrent_streams=20)

    admitted_per_minute = await succeeded(
        [admit(replicas[n % 3], per_minute, f"r{n}", tenant="per-minute") for n in range(200)]
    )
    admitted_streams = await succeeded([admit(replicas[n % 3], streams, f"r{n}", tenant="streams") for n in range(200)])

    assert (admitted_per_minute, admitted_streams) == (50, 20)
    assert await used(replicas[0], LimitName.REQUESTS_PER_MINUTE, tenant="per-minute") == 50
    assert await used(replicas[1], LimitName.CONCURRENT_STREAMS, tenant="streams") == 20


async def test_concurrent_reservations_never_pass_the_limits_and_settlements_add_up(
    replicas: list[UsageLedger],
) -> None:
    # Tokens would admit 33 reservations, the daily budget only 25.
    limits = Limits(tokens_per_minute=10_000, daily_budget_usd=5.0)
    outcomes = await asyncio.gather(
        *[reserve(replicas[n % 3], limits, f"r{n}", tokens=300, cost=usd(0.2)) for n in range(200)],
        return_exceptions=True,
    )
    reserved = [f"r{n}" for n, outcome in enumerate(outcomes) if outcome is None]
    assert all(isinstance(outcome, LimitExceeded) for outcome in outcomes if outcome is not None)
    assert len(reserved) == 25
    assert await used(replicas[2], LimitName.DAILY_BUDGET_USD) == pytest.approx(5.0)

    actual = {request_id: (10 + n, n % 7, usd(0.001) * (n + 1)) for n, request_id in enumerate(reserved)}
    settlements = [
        settle(replicas[(n + copy) % 3], request_id, input_tokens=i, output_tokens=o, cost=c, now=NOW + 1)
        for copy in range(2)  # every settlement twice: idempotent
        for n, (request_id, (i, o, c)) in enumerate(actual.items())
    ]
    settled = await asyncio.gather(*settlements)

    assert sum(settled) == len(actual)
    usage = await replicas[0].usage(ALICE, limits, now=NOW + 2)
    input_tokens = sum(i for i, _, _ in actual.values())
    output_tokens = sum(o for _, o, _ in actual.values())
    cost = sum(c for _, _, c in actual.values())
    assert usage.quotas[1].used == input_tokens + output_tokens
    assert usage.quotas[3].used == pytest.approx(cost / NANO_USD_PER_USD)
    assert (usage.month_input_tokens, usage.month_output_tokens) == (input_tokens, output_tokens)
    assert usage.month_cost_usd == pytest.approx(cost / NANO_USD_PER_USD)


# --- The implementations' own -------------------------------------------------------------------------------------


async def test_the_factory_uses_redis_for_a_url_and_memory_otherwise(redis_url: str) -> None:
    assert isinstance(create_usage_ledger(None), MemoryUsageLedger)
    assert isinstance(create_usage_ledger(""), MemoryUsageLedger)
    redis_ledger = create_usage_ledger(redis_url)
    try:
        assert isinstance(redis_ledger, RedisUsageLedger)
    finally:
        await redis_ledger.close()


async def test_the_redis_ledger_refuses_a_client_that_returns_bytes(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisUsageLedger(client)
    finally:
        await client.aclose()


async def test_an_unreachable_redis_makes_the_ledger_unavailable() -> None:
    ledger = RedisUsageLedger.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(LedgerUnavailable):
            await admit(ledger, Limits(requests_per_minute=1), "r1")
        with pytest.raises(LedgerUnavailable):
            await ledger.release_requests(ALICE, ["r1"])
        with pytest.raises(LedgerUnavailable):
            await reserve(ledger, Limits(), "r1", tokens=1)
        with pytest.raises(LedgerUnavailable):
            await settle(ledger, "r1", input_tokens=1)
        with pytest.raises(LedgerUnavailable):
            await ledger.usage(ALICE, Limits(), now=NOW)
    finally:
        await ledger.close()


async def test_the_redis_ledger_keeps_a_tenants_keys_in_one_slot_with_bounded_lifetimes(redis_url: str) -> None:
    ledger = RedisUsageLedger.from_url(redis_url)
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await admit(ledger, Limits(concurrent_streams=5), "r1")
        await reserve(ledger, Limits(), "r1", tokens=10, cost=5)
        await reserve(ledger, Limits(), "r2", tokens=10, cost=5)
        await settle(ledger, "r1", input_tokens=3, output_tokens=4, cost=2)

        prefix = f"chatmesh:usage:{{{ALICE}}}:"
        ttls = {key.removeprefix(prefix): await client.ttl(key) for key in await client.keys("*")}
        day = 86400
        expected_ttls = {
            f"rpm:{WINDOWS.minute}": 120,
            f"tpm:{WINDOWS.minute}": 3600,
            f"spend:day:{WINDOWS.day}": 3 * day,
            f"spend:month:{WINDOWS.month}": 70 * day,
            f"month:{WINDOWS.month}": 400 * day,
            "streams": LEASE,
            "reservations": 70 * day,
            "reservation_expiry": 70 * day,
            "settled:r1": day,
        }
        assert ttls.keys() == expected_ttls.keys()
        for key, ttl in ttls.items():
            assert expected_ttls[key] - 5 <= ttl <= expected_ttls[key], key
        assert await client.hgetall(f"{prefix}month:{WINDOWS.month}") == {
            "requests": "1",
            "input_tokens": "3",
            "output_tokens": "4",
            "cost_nano_usd": "2",
        }
        assert await client.hgetall(f"{prefix}reservations") == {
            "r2": f"10:5:{WINDOWS.minute}:{WINDOWS.day}:{WINDOWS.month}"
        }
    finally:
        await client.aclose()
        await ledger.close()


async def test_the_redis_ledger_counts_budgets_of_millions_of_dollars_exactly(redis_url: str) -> None:
    ledger = RedisUsageLedger.from_url(redis_url)
    try:
        limits = Limits(monthly_budget_usd=2_000_000.0)
        await reserve(ledger, limits, "big", cost=2_000_000 * NANO_USD_PER_USD - 1)
        await reserve(ledger, limits, "last", cost=1)

        assert (await refusal(reserve(ledger, limits, "over", cost=1))).limit is LimitName.MONTHLY_BUDGET_USD
        assert await used(ledger, LimitName.MONTHLY_BUDGET_USD) == 2_000_000.0
    finally:
        await ledger.close()


async def test_the_memory_ledger_forgets_windows_streams_and_reservations_that_no_longer_matter() -> None:
    ledger = MemoryUsageLedger()
    await admit(ledger, Limits(concurrent_streams=3), "r1")
    await reserve(ledger, Limits(), "r2", tokens=10, cost=5)
    await settle(ledger, "r3", input_tokens=1)

    two_hours_later = NOW + 7200
    await ledger.usage(BOB, Limits(), now=two_hours_later)  # any call prunes, at most once a minute

    alice = ledger._tenants[ALICE]
    assert not (alice.requests or alice.tokens or alice.streams or alice.reservations)
    assert alice.day_spend and alice.month_spend  # today's and this month's spend still count
    assert BOB in ledger._tenants

    next_year = NOW + 400 * 86400 + 32 * 86400 + 7200
    await ledger.usage(BOB, Limits(), now=next_year)
    assert ledger._tenants.keys() == {BOB}
    assert not ledger._settled


async def test_the_memory_ledger_remembers_settled_requests_for_a_day_and_a_bounded_number() -> None:
    ledger = MemoryUsageLedger(max_settled_ids=2)
    for request_id in ("a", "b", "c"):
        assert await settle(ledger, request_id, input_tokens=1)

    assert not await settle(ledger, "c", input_tokens=1)
    assert await settle(ledger, "a", input_tokens=1)  # forgotten: beyond the bound
    assert not await settle(ledger, "a", input_tokens=1, now=NOW + 86399)
    assert await settle(ledger, "a", input_tokens=1, now=NOW + 86400)  # forgotten: a day later
