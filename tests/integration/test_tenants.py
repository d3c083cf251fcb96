"""Tenants over real processes: API keys, isolation, and limits that hold exactly across replicas.

One cluster for the module: three gateways and two dialogues on a real Redis, keys required, every
gateway spreading its calls over both dialogues. Each test makes tenants of its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis
from support.cli import chatmesh_cli
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.tenancy.limits import Windows
from chatmesh.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

ADMIN_TOKEN = "admin-token-for-tests"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
# Requests that set no max_tokens, from tenants with token or spend limits, reserve at most this many.
DEFAULT_MAX_TOKENS = 20
# The reply length conftest's `sim` sets.
REPLY_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    """This module's cluster (conftest's `sim` resets its simulator per test)."""
    with Cluster(
        redis_url=module_redis.url,
        env={
            "CHATMESH_AUTH": "required",
            "CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            "CHATMESH_LIMITS_DEFAULT_MAX_TOKENS": str(DEFAULT_MAX_TOKENS),
        },
        replicas={"gateway": 3, "dialogue": 2},
    ) as running:
        yield running


@pytest.fixture
async def gateways(cluster: Cluster) -> AsyncIterator[list[chat_pb2_grpc.ChatServiceStub]]:
    """A ChatService client of each gateway replica."""
    channels = [grpc.aio.insecure_channel(target) for target in cluster.gateway_targets]
    try:
        yield [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


@pytest.fixture
async def admin(cluster: Cluster) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
async def redis(module_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(module_redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def clear_of_a_minute_edge(margin_seconds: float = 5.0) -> None:
    """For tests that read one minute's window: starts them where the minute has that long left."""
    left = 60 - time.time() % 60
    if left < margin_seconds:
        await asyncio.sleep(left + 0.05)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def new_tenant(admin: admin_pb2_grpc.AdminServiceStub, prefix: str, **limits: float) -> tuple[str, str]:
    """A tenant of its own for the calling test, and an API key of it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await admin.CreateTenant(
        admin_pb2.CreateTenantRequest(name=name, limits=chat_pb2.TenantLimits(**limits)), metadata=ADMIN
    )
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant=name, description="tests"), metadata=ADMIN)
    return name, created.api_key


def question(**options: object) -> chat_pb2.ChatRequest:
    """A message no other call sends, so that no answer comes from the cache."""
    return chat_pb2.ChatRequest(
        user_id="user-a", message=f"question {uuid.uuid4().hex}", options=chat_pb2.ChatOptions(**options)
    )


def quota_failure(error: grpc.aio.AioRpcError) -> tuple[str, float]:
    """The limit a RESOURCE_EXHAUSTED names, and the retry delay it gives."""
    status = rpc_status.from_call(error)
    assert status is not None, "RESOURCE_EXHAUSTED without rich details"
    quota_id, retry = "", math.nan
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota_id = failure.violations[0].quota_id
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return quota_id, retry


# Keys.


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "missing"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "Bearer"),
        ((("authorization", "Bearer "),), "Bearer"),
        ((("authorization", "Bearer not-a-chatmesh-key"),), "malformed"),
        ((("authorization", "Bearer cmk_0123456789abcdef_short"),), "malformed"),
        ((("authorization", "Bearer " + "x" * 7000),), "malformed"),
        ((("authorization", "Bearer cmk_0123456789abcdef_" + "A" * 43),), "unknown"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "exactly one"),
    ],
    ids=["missing", "basic", "empty-bearer", "not-a-key", "short", "huge", "unknown", "two-headers"],
)
async def test_every_chat_call_without_a_valid_key_is_unauthenticated_and_says_why(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], metadata: tuple, says: str
):
    stub = gateways[0]
    calls = [
        stub.Chat(question(), metadata=metadata),
        stub.StreamChat(question(), metadata=metadata).read(),
        stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id="c1", user_id="u"), metadata=metadata),
        stub.DeleteConversation(
            chat_pb2.DeleteConversationRequest(conversation_id="c1", user_id="u"), metadata=metadata
        ),
        stub.GetUsage(chat_pb2.GetUsageRequest(), metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert says in failure.value.details()
    assert sim.sim_stats()["requests"] == 0


async def test_a_header_beyond_the_metadata_limit_fails_cleanly_and_the_gateway_keeps_serving(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, key = await new_tenant(admin, "huge")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateways[0].Chat(question(), metadata=(("authorization", "Bearer " + "x" * 64_000),))
    assert failure.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)

    reply = await gateways[0].Chat(question(), metadata=bearer(key))
    assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP


async def test_a_key_answers_for_its_tenant_on_every_replica(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    tenant, key = await new_tenant(admin, "every")
    for stub in gateways:
        reply = await stub.Chat(question(), metadata=bearer(key))
        assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
        usage = await stub.GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
        assert usage.tenant == tenant


async def test_a_key_revoked_during_traffic_fails_on_every_replica_within_two_seconds(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, key = await new_tenant(admin, "revoke")
    key_id = key.split("_")[1]
    revoked_at: list[float] = []

    async def traffic(stub: chat_pb2_grpc.ChatServiceStub) -> list[tuple[float, grpc.StatusCode]]:
        seen = []
        stop = time.monotonic() + 6.0
        for _ in range(2000):
            if time.monotonic() > stop:
                break
            try:
                await stub.GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            seen.append((time.monotonic(), code))
            await asyncio.sleep(0.01)
        return seen

    async def revoke() -> None:
        await asyncio.sleep(1.0)
        await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=key_id), metadata=ADMIN)
        revoked_at.append(time.monotonic())

    *results, _ = await asyncio.gather(*(traffic(stub) for stub in gateways), revoke())

    for seen in results:
        before = [code for at, code in seen if at < revoked_at[0] - 0.5]
        after = [code for at, code in seen if at > revoked_at[0] + 2.0]
        assert before and set(before) == {grpc.StatusCode.OK}
        assert after and set(after) == {grpc.StatusCode.UNAUTHENTICATED}
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateways[0].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
    assert f"API key {key_id} was revoked" in failure.value.details()


# Isolation.


async def test_another_tenants_conversation_is_not_found_for_every_call(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, owner = await new_tenant(admin, "owner")
    _, intruder = await new_tenant(admin, "intruder")
    stub = gateways[0]
    first = await stub.Chat(question(), metadata=bearer(owner))
    conversation = first.conversation_id

    for attempt in (
        stub.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=conversation, user_id="user-a"), metadata=bearer(intruder)
        ),
        stub.DeleteConversation(
            chat_pb2.DeleteConversationRequest(conversation_id=conversation, user_id="user-a"),
            metadata=bearer(intruder),
        ),
        stub.Chat(
            chat_pb2.ChatRequest(conversation_id=conversation, user_id="user-a", message="and now?"),
            metadata=bearer(intruder),
        ),
        stub.StreamChat(
            chat_pb2.ChatRequest(conversation_id=conversation, user_id="user-a", message="and now?"),
            metadata=bearer(intruder),
        ).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await attempt
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert failure.value.details() == f"conversation {conversation} not found"

    kept = await stub.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation, user_id="user-a"), metadata=bearer(owner)
    )
    assert len(kept.conversation.messages) == 2


async def test_the_same_user_id_in_two_tenants_is_two_users(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, first_key = await new_tenant(admin, "first")
    _, second_key = await new_tenant(admin, "second")
    mine = await gateways[0].Chat(question(), metadata=bearer(first_key))
    theirs = await gateways[1].Chat(question(), metadata=bearer(second_key))
    for key, conversation, other in ((first_key, mine, theirs), (second_key, theirs, mine)):
        seen = await gateways[2].GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=conversation.conversation_id, user_id="user-a"),
            metadata=bearer(key),
        )
        assert seen.conversation.messages[0].content != ""
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gateways[2].GetConversation(
                chat_pb2.GetConversationRequest(conversation_id=other.conversation_id, user_id="user-a"),
                metadata=bearer(key),
            )
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_answer_cache_never_answers_one_tenant_with_anothers_reply(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, first_key = await new_tenant(admin, "cache-a")
    _, second_key = await new_tenant(admin, "cache-b")
    same = chat_pb2.ChatRequest(user_id="user-a", message=f"the same question {uuid.uuid4().hex}")

    answered = await gateways[0].Chat(same, metadata=bearer(first_key))
    await asyncio.sleep(0.3)  # the reply is stored in the cache after the caller has it
    other_tenant = await gateways[0].Chat(same, metadata=bearer(second_key))
    again = await gateways[0].Chat(same, metadata=bearer(first_key))

    assert not answered.cached and not other_tenant.cached
    assert again.cached and again.text == answered.text
    assert sim.sim_stats()["requests"] == 2


# Limits.


async def test_limits_hold_exactly_across_three_gateways_and_two_dialogues(
    sim: Cluster,
    gateways: list[chat_pb2_grpc.ChatServiceStub],
    admin: admin_pb2_grpc.AdminServiceStub,
    redis: Redis,
):
    """Ten callers per tenant hammer the three gateways round robin; each tenant has one low limit."""
    requests_tenant = await new_tenant(admin, "rpm", requests_per_minute=25)
    tokens_tenant = await new_tenant(admin, "tpm", tokens_per_minute=300)
    budget_tenant = await new_tenant(admin, "budget", daily_budget_usd=0.0001)
    first_minute = Windows.at(time.time()).minute

    async def hammer(key: str) -> tuple[list[chat_pb2.ChatResponse], list[str]]:
        replies: list[chat_pb2.ChatResponse] = []
        refused: list[str] = []

        async def caller(worker: int) -> None:
            for turn in range(8):
                stub = gateways[(worker + turn) % len(gateways)]
                try:
                    replies.append(await stub.Chat(question(), metadata=bearer(key), timeout=20))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                    refused.append(quota_failure(error)[0])

        await asyncio.gather(*(caller(worker) for worker in range(10)))
        return replies, refused

    (rpm_replies, rpm_refused), (tpm_replies, tpm_refused), (budget_replies, budget_refused) = await asyncio.wait_for(
        asyncio.gather(hammer(requests_tenant[1]), hammer(tokens_tenant[1]), hammer(budget_tenant[1])), 90
    )
    minutes = int(Windows.at(time.time()).minute) - int(first_minute) + 1

    async def windows(tenant: str, kind: str) -> list[int]:
        keys = [key async for key in redis.scan_iter(f"chatmesh:usage:{{{tenant}}}:{kind}:*")]
        return [int(await redis.get(key)) for key in keys]

    # Requests per minute: every admitted call is counted in its window, and no window passes the limit.
    rpm_counts = await windows(requests_tenant[0], "rpm")
    assert sum(rpm_counts) == len(rpm_replies) <= 25 * minutes
    assert max(rpm_counts) <= 25 and set(rpm_refused) == {"requests_per_minute"}

    # Settlements run after the reply: wait until each tenant's usage reaches what its callers were told.
    async def settled_usage(key: str, replies: list[chat_pb2.ChatResponse]) -> chat_pb2.GetUsageResponse:
        expected = sum(reply.usage.total_tokens for reply in replies)
        for _ in range(50):
            usage = await gateways[1].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
            if usage.month_input_tokens + usage.month_output_tokens >= expected:
                return usage
            await asyncio.sleep(0.1)
        return usage

    for (_, key), replies, refused in (
        (requests_tenant, rpm_replies, rpm_refused),
        (tokens_tenant, tpm_replies, tpm_refused),
        (budget_tenant, budget_replies, budget_refused),
    ):
        usage = await settled_usage(key, replies)
        assert usage.month_input_tokens == sum(reply.usage.input_tokens for reply in replies)
        assert usage.month_output_tokens == sum(reply.usage.output_tokens for reply in replies)
        # Calls refused by a token or spend limit were admitted as requests first.
        assert usage.month_requests == len(replies) + sum(1 for limit in refused if limit != "requests_per_minute")
        assert usage.month_cost_usd == pytest.approx(sum(reply.cost_usd for reply in replies), abs=1e-9 * 100)

    # Tokens per minute: no window passes the limit, and once settled each holds exactly what was used.
    tpm_counts = await windows(tokens_tenant[0], "tpm")
    assert max(tpm_counts) <= 300 and set(tpm_refused) == {"tokens_per_minute"}
    assert sum(tpm_counts) == sum(reply.usage.total_tokens for reply in tpm_replies)

    # The budget: spend never passes it, and it is exactly what callers were told they spent.
    spent = sum(reply.cost_usd for reply in budget_replies)
    assert 0 < spent <= 0.0001 and set(budget_refused) == {"daily_budget_usd"}
    budget_usage = await gateways[2].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(budget_tenant[1]))
    daily = next(quota for quota in budget_usage.quotas if quota.name == "daily_budget_usd")
    assert daily.limit == pytest.approx(0.0001) and daily.used == pytest.approx(spent, abs=1e-9 * 100)
    assert daily.remaining == pytest.approx(0.0001 - spent, abs=1e-9 * 100)


async def test_concurrent_streams_are_limited_across_replicas_and_a_finished_one_frees_its_slot(
    cluster: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    cluster.sim_reset()
    cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0.15, reply_tokens=10)
    try:
        _, key = await new_tenant(admin, "streams", concurrent_streams=3)
        streams = [gateways[index].StreamChat(question(), metadata=bearer(key)) for index in range(3)]
        for stream in streams:
            assert (await stream.read()).WhichOneof("event") == "started"

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gateways[0].Chat(question(), metadata=bearer(key))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_failure(failure.value) == ("concurrent_streams", 1.0)
        assert "concurrent_streams exceeded" in failure.value.details()

        while await streams[1].read() is not grpc.aio.EOF:
            pass
        for _ in range(20):  # the slot is released just after the stream ends
            try:
                reply = await gateways[2].Chat(question(), metadata=bearer(key))
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
        assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
        for stream in (streams[0], streams[2]):
            stream.cancel()
    finally:
        cluster.sim_reset()


async def test_a_refused_call_says_which_limit_and_when_to_retry_and_costs_nothing(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    await clear_of_a_minute_edge()
    _, key = await new_tenant(admin, "refused", requests_per_minute=1)
    await gateways[0].Chat(question(), metadata=bearer(key))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateways[1].Chat(question(), metadata=bearer(key))

    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    limit, retry = quota_failure(failure.value)
    assert limit == "requests_per_minute"
    assert 0 < retry <= 60
    assert failure.value.details().startswith("requests_per_minute exceeded: 1 of 1 used")
    assert sim.sim_stats()["requests"] == 1


async def test_a_reply_from_the_cache_costs_no_tokens_and_no_budget(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    await clear_of_a_minute_edge()
    _, key = await new_tenant(admin, "cached", tokens_per_minute=1000, monthly_budget_usd=1)
    same = chat_pb2.ChatRequest(user_id="user-a", message=f"cached question {uuid.uuid4().hex}")
    first = await gateways[0].Chat(same, metadata=bearer(key))
    await asyncio.sleep(0.3)
    before = await gateways[0].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
    again = await gateways[1].Chat(same, metadata=bearer(key))
    after = await gateways[0].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))

    assert again.cached and not first.cached
    assert after.month_input_tokens == before.month_input_tokens == first.usage.input_tokens
    assert after.month_cost_usd == before.month_cost_usd
    assert after.month_requests == before.month_requests + 1
    # The reservation made while the cache was asked is released once the cached answer is known (what is
    # left is the first reply's tokens, or nothing if a new minute began meanwhile).
    settled = {first.usage.total_tokens, 0}
    for _ in range(20):
        after = await gateways[0].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
        tokens = next(quota for quota in after.quotas if quota.name == "tokens_per_minute")
        if tokens.used in settled:
            break
        await asyncio.sleep(0.05)
    assert tokens.used in settled


async def test_get_usage_reports_every_limit_with_its_use_and_reset(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    await clear_of_a_minute_edge()
    tenant, key = await new_tenant(admin, "usage", requests_per_minute=100, monthly_budget_usd=5)
    reply = await gateways[0].Chat(question(), metadata=bearer(key))
    await asyncio.sleep(0.3)
    usage = await gateways[1].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))

    assert usage.tenant == tenant and usage.limits.requests_per_minute == 100
    quotas = {quota.name: quota for quota in usage.quotas}
    assert list(quotas) == [
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_streams",
        "daily_budget_usd",
        "monthly_budget_usd",
    ]
    assert quotas["requests_per_minute"].used == 1 and quotas["requests_per_minute"].remaining == 99
    assert quotas["tokens_per_minute"].used == reply.usage.total_tokens
    assert not quotas["tokens_per_minute"].HasField("limit")
    assert quotas["monthly_budget_usd"].remaining == pytest.approx(5 - reply.cost_usd)
    assert quotas["requests_per_minute"].reset_time.seconds % 60 == 0
    assert not quotas["concurrent_streams"].HasField("reset_time")
    admin_view = await admin.GetTenantUsage(admin_pb2.GetTenantUsageRequest(tenant=tenant), metadata=ADMIN)
    assert admin_view.month_requests == usage.month_requests == 1


# Administration.


async def test_the_admin_api_needs_the_admin_token_and_no_tenant_key_stands_in(
    sim: Cluster, admin: admin_pb2_grpc.AdminServiceStub
):
    _, key = await new_tenant(admin, "notadmin")
    for metadata in ((), bearer(key), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=metadata)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "admin token" in failure.value.details()


async def test_tenants_are_created_once_validated_and_updated_by_field(admin: admin_pb2_grpc.AdminServiceStub):
    name = f"acme-{uuid.uuid4().hex[:6]}"
    created = await admin.CreateTenant(
        admin_pb2.CreateTenantRequest(name=name, limits=chat_pb2.TenantLimits(requests_per_minute=5)),
        metadata=ADMIN,
    )
    assert created.tenant.limits.requests_per_minute == 5
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=ADMIN)
    assert failure.value.code() == grpc.StatusCode.ALREADY_EXISTS

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name="Bad Name", limits=chat_pb2.TenantLimits(daily_budget_usd=-1)),
            metadata=ADMIN,
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name:" in failure.value.details() and "limits.daily_budget_usd:" in failure.value.details()

    updated = await admin.UpdateTenant(
        admin_pb2.UpdateTenantRequest(
            name=name,
            limits=chat_pb2.TenantLimits(tokens_per_minute=1000),
            update_mask={"paths": ["limits.tokens_per_minute"]},
        ),
        metadata=ADMIN,
    )
    assert updated.tenant.limits.requests_per_minute == 5 and updated.tenant.limits.tokens_per_minute == 1000
    cleared = await admin.UpdateTenant(
        admin_pb2.UpdateTenantRequest(name=name, update_mask={"paths": ["limits.requests_per_minute"]}),
        metadata=ADMIN,
    )
    assert not cleared.tenant.limits.HasField("requests_per_minute")
    assert cleared.tenant.limits.tokens_per_minute == 1000

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant="no-such-tenant"), metadata=ADMIN)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_keys_are_shown_once_listed_without_secrets_and_revoked_for_good(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    tenant, key = await new_tenant(admin, "keys")
    listed = await admin.ListKeys(admin_pb2.ListKeysRequest(tenant=tenant), metadata=ADMIN)
    (entry,) = listed.keys
    assert key.startswith(f"cmk_{entry.key_id}_") and entry.tenant == tenant and entry.description == "tests"
    assert key.split("_", 2)[2] not in str(listed)
    assert not entry.HasField("revoke_time")

    revoked = await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=entry.key_id), metadata=ADMIN)
    assert revoked.key.HasField("revoke_time")
    again = await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=entry.key_id), metadata=ADMIN)
    assert again.key.revoke_time == revoked.key.revoke_time
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id="0" * 16), metadata=ADMIN)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_cancelled_stream_is_settled_and_its_reservation_released(
    cluster: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    await clear_of_a_minute_edge()
    cluster.sim_reset()
    cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0.1, reply_tokens=30)
    try:
        _, key = await new_tenant(admin, "cancel", tokens_per_minute=10_000)
        stream = gateways[0].StreamChat(question(), metadata=bearer(key))
        deltas = 0
        while deltas < 3:
            event = await stream.read()
            deltas += event.WhichOneof("event") == "delta"
        stream.cancel()

        for _ in range(50):
            usage = await gateways[1].GetUsage(chat_pb2.GetUsageRequest(), metadata=bearer(key))
            if usage.month_output_tokens:
                break
            await asyncio.sleep(0.1)
        tokens = next(quota for quota in usage.quotas if quota.name == "tokens_per_minute")
        # Input is settled at the prompt's upper bound; output at one token per chunk the model streamed.
        assert 3 <= usage.month_output_tokens < 30 and usage.month_input_tokens > 0
        assert tokens.used == usage.month_input_tokens + usage.month_output_tokens
    finally:
        cluster.sim_reset()


async def test_log_lines_name_the_tenant_and_never_the_key(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    tenant, key = await new_tenant(admin, "logged")
    reply = await gateways[0].Chat(question(), metadata=bearer(key))
    await asyncio.sleep(0.5)  # lines are written when calls end
    logs = {name: process.log() for name, process in sim.processes.items()}

    assert all(key not in text and key.split("_", 2)[2] not in text for text in logs.values())
    lines = [
        json.loads(line)
        for name in ("gateway", "dialogue", "dialogue-2", "safety", "cache")
        for line in logs[name].splitlines()
        if reply.request_id in line
    ]
    requests = [line for line in lines if line.get("event") == "request"]
    assert {line["method"].split("/")[0] for line in requests} >= {
        "chatmesh.v1.ChatService",
        "chatmesh.v1.DialogueService",
        "chatmesh.v1.SafetyService",
    }
    assert {line.get("tenant") for line in lines} == {tenant}


async def test_tenant_and_limit_metrics_are_exported(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    await clear_of_a_minute_edge()
    tenant, key = await new_tenant(admin, "metered", requests_per_minute=1)
    await gateways[0].Chat(question(), metadata=bearer(key))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateways[0].Chat(question(), metadata=bearer(key))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateways[0].Chat(question(), metadata=bearer("cmk_0123456789abcdef_" + "B" * 43))
    await asyncio.sleep(0.5)

    def scrape(process: str) -> str:
        port = sim.processes[process].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    gateway = scrape("gateway")
    assert f'chatmesh_tenant_requests_total{{tenant="{tenant}"}} 1.0' in gateway
    assert 'chatmesh_limit_rejections_total{limit="requests_per_minute"}' in gateway
    assert 'chatmesh_auth_failures_total{reason="unknown"}' in gateway
    dialogues = scrape("dialogue") + scrape("dialogue-2")
    assert f'chatmesh_tenant_tokens_total{{kind="output",tenant="{tenant}"}} {REPLY_TOKENS}.0' in dialogues


def test_the_cli_creates_a_tenant_and_a_key_that_chats_and_revokes_it(sim: Cluster):
    target = ("--target", sim.gateway_target)
    admin_env = {"CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    name = f"cli-{uuid.uuid4().hex[:8]}"

    created = chatmesh_cli("tenants", "create", name, "--requests-per-minute", "5", *target, env=admin_env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["tenant"]["limits"] == {"requests_per_minute": "5"}
    updated = chatmesh_cli(
        "tenants", "update", name, "--daily-budget-usd", "2.5", "--clear", "requests_per_minute", *target, env=admin_env
    )
    assert json.loads(updated.stdout)["tenant"]["limits"] == {"daily_budget_usd": 2.5}
    issued = json.loads(chatmesh_cli("keys", "create", "--tenant", name, *target, env=admin_env).stdout)
    api_key, key_id = issued["api_key"], issued["key"]["key_id"]

    chat = chatmesh_cli("chat", "--once", "hello", *target, env={"CHATMESH_API_KEY": api_key})
    assert chat.returncode == 0, chat.stderr
    usage = json.loads(chatmesh_cli("usage", *target, "--api-key", api_key).stdout)
    assert usage["tenant"] == name and usage["month_requests"] == "1"

    listed = json.loads(chatmesh_cli("keys", "list", "--tenant", name, *target, env=admin_env).stdout)
    assert [key["key_id"] for key in listed["keys"]] == [key_id]
    assert chatmesh_cli("keys", "revoke", key_id, *target, env=admin_env).returncode == 0
    time.sleep(1.5)  # the gateways' key cache
    refused = chatmesh_cli("chat", "--once", "hello", *target, "--api-key", api_key)
    assert refused.returncode == 1 and f"UNAUTHENTICATED: API key {key_id} was revoked" in refused.stderr

    denied = chatmesh_cli("tenants", "list", *target, env={"CHATMESH_ADMIN_TOKEN": "wrong"})
    assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED")


async def test_a_call_whose_worst_case_alone_passes_a_limit_says_what_to_change_and_not_to_wait(
    sim: Cluster, gateways: list[chat_pb2_grpc.ChatServiceStub], admin: admin_pb2_grpc.AdminServiceStub
):
    _, key = await new_tenant(admin, "oversized", tokens_per_minute=100)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateways[0].Chat(question(max_tokens=500), metadata=bearer(key))

    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is more than the whole limit (100 tokens); lower options.max_tokens" in failure.value.details()
    limit, retry = quota_failure(failure.value)
    assert limit == "tokens_per_minute" and math.isnan(retry)  # no RetryInfo: waiting cannot help
    assert sim.sim_stats()["requests"] == 0
    assert (await gateways[0].Chat(question(max_tokens=20), metadata=bearer(key))).text
