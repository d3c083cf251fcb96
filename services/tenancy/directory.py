"""The tenant directory: tenants, their limits and default knowledge bases, and their API keys (as hashes), in memory
or in Redis.

With Redis, every gateway replica shares it; the memory directory serves one process (`make run`).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from redis.asyncio import Redis

from chatmesh.runtime.redis_errors import unavailable_on_redis_error
from chatmesh.tenancy.limits import Limits


class TenantExists(Exception):
    pass


class TenantNotFound(Exception):
    pass


class KeyNotFound(Exception):
    pass


class DirectoryUnavailable(Exception):
    """The directory's store could not be reached or did not answer."""


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    limits: Limits
    created_at: float  # Unix seconds
    # What a turn of the tenant searches when its request names no knowledge bases.
    knowledge_bases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    key_hash: str
    description: str
    created_at: float
    revoked_at: float | None = None


class TenantDirectory(abc.ABC):
    @abc.abstractmethod
    async def create_tenant(
        self, name: str, limits: Limits, *, now: float, knowledge_bases: Sequence[str] = ()
    ) -> TenantRecord:
        """Raises TenantExists."""

    @abc.abstractmethod
    async def get_tenant(self, name: str) -> TenantRecord | None: ...

    @abc.abstractmethod
    async def list_tenants(self) -> list[TenantRecord]:
        """Sorted by name."""

    @abc.abstractmethod
    async def update_tenant(self, name: str, limits: Limits, knowledge_bases: Sequence[str]) -> TenantRecord:
        """Replaces the tenant's limits and default knowledge bases. Raises TenantNotFound."""

    @abc.abstractmethod
    async def add_key(self, key: KeyRecord) -> None:
        """Raises TenantNotFound when the key's tenant does not exist."""

    @abc.abstractmethod
    async def list_keys(self, tenant: str | None) -> list[KeyRecord]:
        """One tenant's keys, or every key; sorted by tenant, then creation time."""

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, *, now: float) -> KeyRecord:
        """Marks the key revoked (a key revoked before keeps its first revocation time). Raises KeyNotFound."""

    @abc.abstractmethod
    async def resolve(self, key_id: str) -> tuple[KeyRecord, TenantRecord] | None:
        """The key and its tenant, in one read; None when either does not exist."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory directory has nothing to release
        """Releases connections."""


class MemoryTenantDirectory(TenantDirectory):
    """For one process. Never awaits, so every method is atomic on the event loop."""

    def __init__(self) -> None:
        self._tenants: dict[str, TenantRecord] = {}
        self._keys: dict[str, KeyRecord] = {}

    async def create_tenant(
        self, name: str, limits: Limits, *, now: float, knowledge_bases: Sequence[str] = ()
    ) -> TenantRecord:
        if name in self._tenants:
            raise TenantExists(name)
        record = self._tenants[name] = TenantRecord(name, limits, now, tuple(knowledge_bases))
        return record

    async def get_tenant(self, name: str) -> TenantRecord | None:
        return self._tenants.get(name)

    async def list_tenants(self) -> list[TenantRecord]:
        return sorted(self._tenants.values(), key=lambda tenant: tenant.name)

    async def update_tenant(self, name: str, limits: Limits, knowledge_bases: Sequence[str]) -> TenantRecord:
        if name not in self._tenants:
            raise TenantNotFound(name)
        record = self._tenants[name] = replace(
            self._tenants[name], limits=limits, knowledge_bases=tuple(knowledge_bases)
        )
        return record

    async def add_key(self, key: KeyRecord) -> None:
        if key.tenant not in self._tenants:
            raise TenantNotFound(key.tenant)
        self._keys[key.key_id] = key

    async def list_keys(self, tenant: str | None) -> list[KeyRecord]:
        keys = [key for key in self._keys.values() if tenant is None or key.tenant == tenant]
        return sorted(keys, key=lambda key: (key.tenant, key.created_at))

    async def revoke_key(self, key_id: str, *, now: float) -> KeyRecord:
        key = self._keys.get(key_id)
        if key is None:
            raise KeyNotFound(key_id)
        if key.revoked_at is None:
            key = self._keys[key_id] = replace(key, revoked_at=now)
        return key

    async def resolve(self, key_id: str) -> tuple[KeyRecord, TenantRecord] | None:
        key = self._keys.get(key_id)
        tenant = None if key is None else self._tenants.get(key.tenant)
        return None if key is None or tenant is None else (key, tenant)


# Every directory key shares one hash tag, so that the scripts below may touch a key and its tenant
# together in Redis Cluster; the directory is small and read through a per-gateway cache.
_PREFIX = "chatmesh:{directory}:"
_TENANTS = f"{_PREFIX}tenants"

# KEYS: tenant hash, tenant set. ARGV: name, limits JSON, created_at, knowledge bases JSON. Returns 0 if the tenant
# exists.
_CREATE_TENANT_LUA = """
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
redis.call("HSET", KEYS[1], "name", ARGV[1], "limits", ARGV[2], "created_at", ARGV[3], "knowledge_bases", ARGV[4])
redis.call("SADD", KEYS[2], ARGV[1])
return 1
"""

# KEYS: tenant hash. ARGV: limits JSON, knowledge bases JSON. Returns the tenant's fields, or an empty list if it
# does not exist.
_UPDATE_TENANT_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {} end
redis.call("HSET", KEYS[1], "limits", ARGV[1], "knowledge_bases", ARGV[2])
return redis.call("HGETALL", KEYS[1])
"""

# KEYS: tenant hash, key hash, tenant's key set. ARGV: key id, then the key's field/value pairs.
_ADD_KEY_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("HSET", KEYS[2], unpack(ARGV, 2))
redis.call("SADD", KEYS[3], ARGV[1])
return 1
"""

# KEYS: key hash. ARGV: revoked_at. Returns the key's fields, or an empty list if it does not exist.
_REVOKE_KEY_LUA = """
if redis.call("EXISTS", KEYS[1]) == 0 then return {} end
redis.call("HSETNX", KEYS[1], "revoked_at", ARGV[1])
return redis.call("HGETALL", KEYS[1])
"""

# KEYS: key hash. ARGV: the tenant hash's key prefix. Returns {key fields, tenant fields}.
_RESOLVE_LUA = """
local key = redis.call("HGETALL", KEYS[1])
if #key == 0 then return {{}, {}} end
local tenant = redis.call("HGET", KEYS[1], "tenant")
return {key, redis.call("HGETALL", ARGV[1] .. tenant)}
"""

_unavailable_on_redis_error = unavailable_on_redis_error(DirectoryUnavailable)


class RedisTenantDirectory(TenantDirectory):
    """Tenants in hashes `chatmesh:{directory}:tenant:<name>` (and the set `…:tenants`); keys in hashes
    `chatmesh:{directory}:apikey:<key id>` (and per tenant the set `…:tenant-keys:<name>`)."""

    def __init__(self, client: Redis) -> None:
        """Takes ownership of `client`, which must decode responses; see `from_url`."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisTenantDirectory needs a client created with decode_responses=True")
        self._client = client
        self._create_tenant = client.register_script(_CREATE_TENANT_LUA)
        self._update_tenant = client.register_script(_UPDATE_TENANT_LUA)
        self._add_key = client.register_script(_ADD_KEY_LUA)
        self._revoke_key = client.register_script(_REVOKE_KEY_LUA)
        self._resolve = client.register_script(_RESOLVE_LUA)

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> RedisTenantDirectory:
        return cls(
            Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2, **(options or {}))
        )

    @staticmethod
    def _tenant_key(name: str) -> str:
        return f"{_PREFIX}tenant:{name}"

    @staticmethod
    def _api_key(key_id: str) -> str:
        return f"{_PREFIX}apikey:{key_id}"

    @staticmethod
    def _tenant_keys(name: str) -> str:
        return f"{_PREFIX}tenant-keys:{name}"

    @_unavailable_on_redis_error
    async def create_tenant(
        self, name: str, limits: Limits, *, now: float, knowledge_bases: Sequence[str] = ()
    ) -> TenantRecord:
        created = await self._create_tenant(
            keys=(self._tenant_key(name), _TENANTS),
            args=(name, _encode_limits(limits), repr(now), json.dumps(list(knowledge_bases))),
        )
        if not created:
            raise TenantExists(name)
        return TenantRecord(name, limits, now, tuple(knowledge_bases))

    @_unavailable_on_redis_error
    async def get_tenant(self, name: str) -> TenantRecord | None:
        fields = await self._client.hgetall(self._tenant_key(name))
        return _decode_tenant(fields) if fields else None

    @_unavailable_on_redis_error
    async def list_tenants(self) -> list[TenantRecord]:
        names = sorted(await self._client.smembers(_TENANTS))
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._tenant_key(name))
            results = await pipe.execute()
        return [_decode_tenant(fields) for fields in results if fields]

    @_unavailable_on_redis_error
    async def update_tenant(self, name: str, limits: Limits, knowledge_bases: Sequence[str]) -> TenantRecord:
        fields = await self._update_tenant(
            keys=(self._tenant_key(name),), args=(_encode_limits(limits), json.dumps(list(knowledge_bases)))
        )
        if not fields:
            raise TenantNotFound(name)
        return _decode_tenant(_pairs(fields))

    @_unavailable_on_redis_error
    async def add_key(self, key: KeyRecord) -> None:
        fields = [
            ("tenant", key.tenant),
            ("key_hash", key.key_hash),
            ("description", key.description),
            ("created_at", repr(key.created_at)),
        ]
        added = await self._add_key(
            keys=(self._tenant_key(key.tenant), self._api_key(key.key_id), self._tenant_keys(key.tenant)),
            args=(key.key_id, *(item for pair in fields for item in pair)),
        )
        if not added:
            raise TenantNotFound(key.tenant)

    @_unavailable_on_redis_error
    async def list_keys(self, tenant: str | None) -> list[KeyRecord]:
        tenants = [tenant] if tenant is not None else sorted(await self._client.smembers(_TENANTS))
        async with self._client.pipeline(transaction=False) as pipe:
            for name in tenants:
                pipe.smembers(self._tenant_keys(name))
            key_ids = [key_id for ids in await pipe.execute() for key_id in sorted(ids)]
        async with self._client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(self._api_key(key_id))
            results = await pipe.execute()
        keys = [_decode_key(key_id, fields) for key_id, fields in zip(key_ids, results, strict=True) if fields]
        return sorted(keys, key=lambda key: (key.tenant, key.created_at))

    @_unavailable_on_redis_error
    async def revoke_key(self, key_id: str, *, now: float) -> KeyRecord:
        fields = await self._revoke_key(keys=(self._api_key(key_id),), args=(repr(now),))
        if not fields:
            raise KeyNotFound(key_id)
        return _decode_key(key_id, _pairs(fields))

    @_unavailable_on_redis_error
    async def resolve(self, key_id: str) -> tuple[KeyRecord, TenantRecord] | None:
        key_fields, tenant_fields = await self._resolve(keys=(self._api_key(key_id),), args=(f"{_PREFIX}tenant:",))
        if not key_fields or not tenant_fields:
            return None
        return _decode_key(key_id, _pairs(key_fields)), _decode_tenant(_pairs(tenant_fields))

    async def close(self) -> None:
        await self._client.aclose()


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL returns it inside a script: a flat list of field, value, field, value…"""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _encode_limits(limits: Limits) -> str:
    return json.dumps({name: value for name, value in asdict(limits).items() if value is not None})


def _decode_tenant(fields: dict[str, str]) -> TenantRecord:
    return TenantRecord(
        name=fields["name"],
        limits=Limits(**json.loads(fields["limits"])),
        created_at=float(fields["created_at"]),
        # Absent from tenants created before default knowledge bases existed.
        knowledge_bases=tuple(json.loads(fields.get("knowledge_bases", "[]"))),
    )


def _decode_key(key_id: str, fields: dict[str, str]) -> KeyRecord:
    revoked_at = fields.get("revoked_at")
    return KeyRecord(
        key_id=key_id,
        tenant=fields["tenant"],
        key_hash=fields["key_hash"],
        description=fields.get("description", ""),
        created_at=float(fields["created_at"]),
        revoked_at=None if revoked_at is None else float(revoked_at),
    )


def create_tenant_directory(redis_url: str | None, options: Mapping[str, Any] | None = None) -> TenantDirectory:
    """Redis when a URL is given (CHATMESH_REDIS_URL), memory otherwise."""
    if redis_url:
        return RedisTenantDirectory.from_url(redis_url, options)
    return MemoryTenantDirectory()
