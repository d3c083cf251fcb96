"""AdminService: tenants, their limits and default knowledge bases, their API keys, and erasing a tenant's user,
behind the admin token.

It is served by the gateway process, beside ChatService, rather than by a process of its own: the
gateway already holds the tenant directory and the ledger, admin calls are rare, and one process less
is one thing less to deploy and secure. It has its own credential (CHATMESH_ADMIN_TOKEN), which no
tenant's API key can stand in for.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import time
from collections.abc import AsyncIterator

import grpc

from chatmesh.gateway.auth import AUTHORIZATION
from chatmesh.gateway.usage import UsageReader, UsageUnavailable
from chatmesh.gateway.validation import check_knowledge_bases, check_user_id
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.runtime.status import abort, abort_with, invalid_argument, is_deliberate
from chatmesh.tenancy.directory import (
    DirectoryUnavailable,
    KeyNotFound,
    KeyRecord,
    TenantDirectory,
    TenantExists,
    TenantNotFound,
    TenantRecord,
)
from chatmesh.tenancy.keys import KeyHasher, generate_key
from chatmesh.tenancy.limits import LimitName, Limits
from chatmesh.tenancy.messages import timestamp
from chatmesh.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, dialogue_pb2, dialogue_pb2_grpc

log = get_logger(__name__)

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
MAX_DESCRIPTION_CHARS = 200
# Upper bounds that keep every count exact in the ledger (Lua numbers are doubles: nano-USD sums of
# budgets up to a million USD stay below 2^53).
_MAX_COUNT = 10**12
_MAX_BUDGET_USD = 1_000_000.0
_LIMIT_PATHS = {f"limits.{name.value}": name.value for name in LimitName}
_KNOWLEDGE_BASES_PATH = "knowledge_bases"


class AdminToken:
    """The check of the admin token, for every admin service the gateway serves (AdminService, ReviewService)."""

    def __init__(self, settings: GatewaySettings) -> None:
        token = settings.admin_token
        self._token = None if token is None else token.get_secret_value()
        self._open = token is None and settings.auth == "off"

    async def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Ends the call with UNAUTHENTICATED unless it presents the admin token (or the admin API is open)."""
        annotate(tenant="")
        if self._open:
            return
        if self._token is None:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the admin API is off: its operator must set CHATMESH_ADMIN_TOKEN",
            )
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION and isinstance(value, str):
                presented = value
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token.encode()):
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need `authorization: Bearer <admin token>` metadata with the admin token",
            )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        directory: TenantDirectory,
        usage: UsageReader,
        hasher: KeyHasher,
        dialogue: dialogue_pb2_grpc.DialogueServiceStub,
    ) -> None:
        self._settings = settings
        self._dialogue = dialogue
        self._admin_token = AdminToken(settings)
        self._directory = directory
        self._usage = usage
        self._hasher = hasher

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateTenantResponse:
        await self._authorize(context)
        await _check(
            context,
            _check_name("name", request.name)
            + _check_limits(request.limits)
            + check_knowledge_bases("knowledge_bases", request.knowledge_bases),
        )
        async with _directory_errors(context):
            try:
                tenant = await self._directory.create_tenant(
                    request.name,
                    Limits.from_proto(request.limits),
                    now=time.time(),
                    knowledge_bases=request.knowledge_bases,
                )
            except TenantExists:
                await abort(context, grpc.StatusCode.ALREADY_EXISTS, f"tenant {request.name} already exists")
        log.info("tenant_created", extra={"tenant": tenant.name})
        return admin_pb2.CreateTenantResponse(tenant=_tenant_message(tenant))

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetTenantResponse:
        await self._authorize(context)
        tenant = await self._existing_tenant(context, request.name)
        return admin_pb2.GetTenantResponse(tenant=_tenant_message(tenant))

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        await self._authorize(context)
        async with _directory_errors(context):
            tenants = await self._directory.list_tenants()
        return admin_pb2.ListTenantsResponse(tenants=[_tenant_message(tenant) for tenant in tenants])

    async def UpdateTenant(
        self, request: admin_pb2.UpdateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UpdateTenantResponse:
        await self._authorize(context)
        unknown = [
            path
            for path in request.update_mask.paths
            if path not in ("limits", _KNOWLEDGE_BASES_PATH) and path not in _LIMIT_PATHS
        ]
        violations = (
            _check_name("name", request.name)
            + _check_limits(request.limits)
            + check_knowledge_bases("knowledge_bases", request.knowledge_bases)
        )
        if unknown:
            violations.append(
                ("update_mask", f"unknown paths {unknown}; use limits, limits.<field> or {_KNOWLEDGE_BASES_PATH}")
            )
        await _check(context, violations)
        current = await self._existing_tenant(context, request.name)
        paths = set(request.update_mask.paths)
        if not paths or "limits" in paths:
            limits = Limits.from_proto(request.limits)
        else:
            merged = current.limits.to_proto()
            for path in paths & set(_LIMIT_PATHS):
                field = _LIMIT_PATHS[path]
                if request.limits.HasField(field):
                    setattr(merged, field, getattr(request.limits, field))
                else:
                    merged.ClearField(field)
            limits = Limits.from_proto(merged)
        knowledge_bases = request.knowledge_bases if _KNOWLEDGE_BASES_PATH in paths else current.knowledge_bases
        async with _directory_errors(context):
            tenant = await self._directory.update_tenant(request.name, limits, knowledge_bases)
        log.info("tenant_updated", extra={"tenant": tenant.name})
        return admin_pb2.UpdateTenantResponse(tenant=_tenant_message(tenant))

    async def CreateKey(
        self, request: admin_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateKeyResponse:
        await self._authorize(context)
        violations = _check_name("tenant", request.tenant)
        if len(request.description) > MAX_DESCRIPTION_CHARS:
            violations.append(("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"))
        await _check(context, violations)
        key_id, api_key = generate_key()
        record = KeyRecord(
            key_id=key_id,
            tenant=request.tenant,
            key_hash=self._hasher(api_key),
            description=request.description,
            created_at=time.time(),
        )
        async with _directory_errors(context):
            await self._directory.add_key(record)
        log.info("key_created", extra={"tenant": record.tenant, "key_id": key_id})
        return admin_pb2.CreateKeyResponse(key=_key_message(record), api_key=api_key)

    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListKeysResponse:
        await self._authorize(context)
        if request.tenant:
            await _check(context, _check_name("tenant", request.tenant))
        async with _directory_errors(context):
            keys = await self._directory.list_keys(request.tenant or None)
        return admin_pb2.ListKeysResponse(keys=[_key_message(key) for key in keys])

    async def RevokeKey(
        self, request: admin_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeKeyResponse:
        await self._authorize(context)
        if not _KEY_ID.fullmatch(request.key_id):
            await _check(context, [("key_id", "must be the 16 hex digits after cmk_ in the key")])
        async with _directory_errors(context):
            try:
                record = await self._directory.revoke_key(request.key_id, now=time.time())
            except KeyNotFound:
                await abort(context, grpc.StatusCode.NOT_FOUND, f"key {request.key_id} not found")
        log.info("key_revoked", extra={"tenant": record.tenant, "key_id": record.key_id})
        return admin_pb2.RevokeKeyResponse(key=_key_message(record))

    async def GetTenantUsage(
        self, request: admin_pb2.GetTenantUsageRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetUsageResponse:
        await self._authorize(context)
        tenant = await self._existing_tenant(context, request.tenant, field="tenant")
        try:
            return await self._usage.read(tenant.name, tenant.limits, context)
        except (UsageUnavailable, grpc.aio.AioRpcError):
            await abort(context, grpc.StatusCode.UNAVAILABLE, "usage cannot be read right now; retry with backoff")
            raise

    async def EraseUser(
        self, request: admin_pb2.EraseTenantUserRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.EraseUserResponse:
        """Dialogue erases; the tenant need not be in the directory (`default` without keys is not), so an
        unknown one erases nothing and says so with zero counts."""
        await self._authorize(context)
        annotate(user_id=request.user_id)
        await _check(context, _check_name("tenant", request.tenant) + check_user_id(request.user_id))
        try:
            return await self._dialogue.EraseUser(
                dialogue_pb2.TenantEraseUserRequest(
                    tenant=request.tenant, request=chat_pb2.EraseUserRequest(user_id=request.user_id)
                ),
                timeout=downstream_timeout(context, self._settings.default_deadline_seconds),
            )
        except grpc.aio.AioRpcError as error:
            # Dialogue's own answers (what could not be erased) are meant for the caller; erasing is idempotent.
            log.warning("dialogue_failed", extra={"grpc_code": error.code().name})
            if is_deliberate(error):
                await abort(context, error.code(), error.details())
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the dialogue service is unavailable; retry with backoff")
            raise

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        await self._admin_token.authorize(context)

    async def _existing_tenant(self, context: grpc.aio.ServicerContext, name: str, field: str = "name") -> TenantRecord:
        await _check(context, _check_name(field, name))
        async with _directory_errors(context):
            tenant = await self._directory.get_tenant(name)
        if tenant is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tenant {name} not found")
        assert tenant is not None
        return tenant


async def _check(context: grpc.aio.ServicerContext, violations: list[tuple[str, str]]) -> None:
    if violations:
        await abort_with(context, invalid_argument(violations))


def _check_name(field: str, name: str) -> list[tuple[str, str]]:
    if not TENANT_NAME.fullmatch(name):
        return [(field, "must be 1 to 63 of a-z 0-9 and -, starting with a letter or digit")]
    return []


def _check_limits(limits: chat_pb2.TenantLimits) -> list[tuple[str, str]]:
    violations = []
    for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
        if limits.HasField(name) and not 0 <= getattr(limits, name) <= _MAX_COUNT:
            violations.append((f"limits.{name}", f"must be between 0 and {_MAX_COUNT}"))
    for name in ("daily_budget_usd", "monthly_budget_usd"):
        if limits.HasField(name) and not 0 <= getattr(limits, name) <= _MAX_BUDGET_USD:
            violations.append((f"limits.{name}", f"must be between 0 and {_MAX_BUDGET_USD:.0f}"))
    return violations


@contextlib.asynccontextmanager
async def _directory_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except TenantNotFound as error:
        await abort(context, grpc.StatusCode.NOT_FOUND, f"tenant {error} not found")
    except DirectoryUnavailable:
        log.error("directory_unavailable")
        await abort(context, grpc.StatusCode.UNAVAILABLE, "the tenant directory is unavailable; retry with backoff")


def _tenant_message(tenant: TenantRecord) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        name=tenant.name,
        limits=tenant.limits.to_proto(),
        create_time=timestamp(tenant.created_at),
        knowledge_bases=tenant.knowledge_bases,
    )


def _key_message(key: KeyRecord) -> admin_pb2.ApiKey:
    message = admin_pb2.ApiKey(
        key_id=key.key_id, tenant=key.tenant, description=key.description, create_time=timestamp(key.created_at)
    )
    if key.revoked_at is not None:
        message.revoke_time.CopyFrom(timestamp(key.revoked_at))
    return message
