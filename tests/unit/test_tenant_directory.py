"""The TenantDirectory contract (memory and Redis alike), API keys, and the gateway's key check."""

from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis

from chatmesh.gateway.auth import DEFAULT_TENANT, Authenticator, AuthError
from chatmesh.gateway.main import check_auth_settings
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.tenancy.directory import (
    DirectoryUnavailable,
    KeyNotFound,
    KeyRecord,
    RedisTenantDirectory,
    TenantDirectory,
    TenantExists,
    TenantNotFound,
    create_tenant_directory,
)
from chatmesh.tenancy.keys import KeyHasher, generate_key, parse_key_id
from chatmesh.tenancy.limits import Limits

LIMITS = Limits(requests_per_minute=60, monthly_budget_usd=12.5)


@pytest.fixture(params=["memory", "redis"])
def directory_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory directory; the URL of a real, empty redis-server for the Redis one."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
async def directory(directory_url: str | None) -> AsyncIterator[TenantDirectory]:
    tenant_directory = create_tenant_directory(directory_url)
    try:
        yield tenant_directory
    finally:
        await tenant_directory.close()


def key_record(tenant: str, key_id: str = "0123456789abcdef", created_at: float = 10.0) -> KeyRecord:
    return KeyRecord(key_id=key_id, tenant=tenant, key_hash="h" * 64, description="billing", created_at=created_at)


async def test_a_tenant_is_created_once_with_its_limits(directory: TenantDirectory) -> None:
    created = await directory.create_tenant("acme", LIMITS, now=5.0)
    assert created.limits == LIMITS
    assert await directory.get_tenant("acme") == created
    with pytest.raises(TenantExists):
        await directory.create_tenant("acme", Limits(), now=6.0)
    assert (await directory.get_tenant("acme")).limits == LIMITS
    assert await directory.get_tenant("globex") is None


async def test_tenants_are_listed_by_name_and_their_limits_and_knowledge_bases_replaced(
    directory: TenantDirectory,
) -> None:
    await directory.create_tenant("zeta", Limits(), now=1.0)
    await directory.create_tenant("acme", LIMITS, now=2.0, knowledge_bases=["help", "billing"])
    assert [tenant.name for tenant in await directory.list_tenants()] == ["acme", "zeta"]
    assert (await directory.get_tenant("acme")).knowledge_bases == ("help", "billing")
    assert (await directory.get_tenant("zeta")).knowledge_bases == ()

    updated = await directory.update_tenant("zeta", Limits(concurrent_streams=2), ["faq"])
    assert updated.limits == Limits(concurrent_streams=2) and updated.created_at == 1.0
    assert updated.knowledge_bases == ("faq",) and await directory.get_tenant("zeta") == updated
    assert (await directory.update_tenant("zeta", Limits(), [])).knowledge_bases == ()
    with pytest.raises(TenantNotFound):
        await directory.update_tenant("nobody", Limits(), [])


async def test_a_tenant_stored_before_default_knowledge_bases_existed_has_none(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.hset(
            "chatmesh:{directory}:tenant:acme", mapping={"name": "acme", "limits": "{}", "created_at": "1.0"}
        )
    finally:
        await client.aclose()
    directory = RedisTenantDirectory.from_url(redis_url)
    try:
        assert (await directory.get_tenant("acme")).knowledge_bases == ()
    finally:
        await directory.close()


async def test_a_key_resolves_to_itself_and_its_tenant_in_one_read(directory: TenantDirectory) -> None:
    await directory.create_tenant("acme", LIMITS, now=1.0)
    await directory.add_key(key_record("acme"))
    key, tenant = await directory.resolve("0123456789abcdef")
    assert key == key_record("acme") and tenant.limits == LIMITS
    assert await directory.resolve("fedcba9876543210") is None


async def test_a_key_needs_an_existing_tenant(directory: TenantDirectory) -> None:
    with pytest.raises(TenantNotFound):
        await directory.add_key(key_record("nobody"))
    assert await directory.resolve("0123456789abcdef") is None


async def test_keys_are_listed_by_tenant_then_age(directory: TenantDirectory) -> None:
    for name in ("globex", "acme"):
        await directory.create_tenant(name, Limits(), now=1.0)
    await directory.add_key(key_record("globex", "1" * 16, created_at=1.0))
    await directory.add_key(key_record("acme", "2" * 16, created_at=3.0))
    await directory.add_key(key_record("acme", "3" * 16, created_at=2.0))
    assert [key.key_id for key in await directory.list_keys(None)] == ["3" * 16, "2" * 16, "1" * 16]
    assert [key.key_id for key in await directory.list_keys("globex")] == ["1" * 16]
    assert await directory.list_keys("nobody") == []


async def test_a_revoked_key_keeps_its_first_revocation_time(directory: TenantDirectory) -> None:
    await directory.create_tenant("acme", Limits(), now=1.0)
    await directory.add_key(key_record("acme"))
    assert (await directory.revoke_key("0123456789abcdef", now=20.0)).revoked_at == 20.0
    assert (await directory.revoke_key("0123456789abcdef", now=30.0)).revoked_at == 20.0
    key, _ = await directory.resolve("0123456789abcdef")
    assert key.revoked_at == 20.0
    with pytest.raises(KeyNotFound):
        await directory.revoke_key("fedcba9876543210", now=1.0)


async def test_an_unreachable_redis_is_directory_unavailable() -> None:
    directory = RedisTenantDirectory.from_url("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(DirectoryUnavailable):
            await directory.resolve("0123456789abcdef")
    finally:
        await directory.close()


# Keys.


def test_keys_are_random_and_carry_their_id() -> None:
    first_id, first = generate_key()
    second_id, second = generate_key()
    assert first != second and first_id != second_id
    assert parse_key_id(first) == first_id and len(first) == 4 + 16 + 1 + 43


@pytest.mark.parametrize(
    "key", ["", "cmk_", "cmk_0123456789ABCDEF_" + "a" * 43, "cmk_0123456789abcdef_" + "a" * 42, "x" * 10_000]
)
def test_malformed_keys_have_no_id(key: str) -> None:
    assert parse_key_id(key) is None


def test_the_stored_hash_depends_on_the_pepper() -> None:
    _, key = generate_key()
    assert KeyHasher("one")(key) != KeyHasher("two")(key)
    assert KeyHasher("one").matches(key, KeyHasher("one")(key))


# The gateway's check.


async def test_a_verified_key_is_trusted_until_the_cache_time_passes(directory: TenantDirectory) -> None:
    settings = GatewaySettings(auth="required", auth_cache_seconds=0.0)
    authenticator = Authenticator(settings, directory)
    hasher = KeyHasher(settings.api_key_pepper.get_secret_value())
    key_id, key = generate_key()
    await directory.create_tenant("acme", LIMITS, now=1.0, knowledge_bases=["help", "billing"])
    await directory.add_key(KeyRecord(key_id, "acme", hasher(key), "", 1.0))

    caller = await authenticator.authenticate((("authorization", f"Bearer {key}"),))
    assert (caller.tenant, caller.limits, caller.key_id) == ("acme", LIMITS, key_id)
    assert caller.knowledge_bases == ("help", "billing")
    await directory.revoke_key(key_id, now=2.0)
    with pytest.raises(AuthError) as refused:
        await authenticator.authenticate((("authorization", f"bearer {key}"),))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and refused.value.reason == "revoked"


async def test_a_key_with_the_right_id_and_a_wrong_secret_is_unknown(directory: TenantDirectory) -> None:
    settings = GatewaySettings(auth="required")
    hasher = KeyHasher(settings.api_key_pepper.get_secret_value())
    key_id, key = generate_key()
    await directory.create_tenant("acme", Limits(), now=1.0)
    await directory.add_key(KeyRecord(key_id, "acme", hasher(key), "", 1.0))
    forged = f"cmk_{key_id}_{'A' * 43}"
    with pytest.raises(AuthError) as refused:
        await Authenticator(settings, directory).authenticate((("authorization", f"Bearer {forged}"),))
    assert refused.value.reason == "unknown"


async def test_without_authentication_a_call_without_a_key_is_the_default_tenant(directory: TenantDirectory) -> None:
    authenticator = Authenticator(GatewaySettings(auth="off", auth_cache_seconds=0.0), directory)
    assert (await authenticator.authenticate(())).limits == Limits()
    await directory.create_tenant(DEFAULT_TENANT, LIMITS, now=1.0, knowledge_bases=["help"])
    caller = await authenticator.authenticate(())
    assert (caller.tenant, caller.limits, caller.key_id, caller.knowledge_bases) == (
        DEFAULT_TENANT,
        LIMITS,
        None,
        ("help",),
    )


@pytest.mark.parametrize(
    ("host", "allowed"), [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False)]
)
def test_authentication_may_be_off_only_on_loopback(host: str, allowed: bool) -> None:
    settings = GatewaySettings(auth="off", bind_host=host)
    if allowed:
        check_auth_settings(settings)
    else:
        with pytest.raises(SystemExit, match="CHATMESH_AUTH=required"):
            check_auth_settings(settings)
    check_auth_settings(GatewaySettings(auth="required", bind_host=host))
