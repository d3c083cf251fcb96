"""Who is calling: the API key in `authorization: Bearer <key>` metadata, verified against the directory.

A verified key (and its tenant's limits) is trusted for `auth_cache_seconds` before the directory is read
again, so a revoked key or a changed limit takes effect on every gateway within that time. The cache holds
only what the directory said; the presented key is hashed and compared on every call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.tenancy import metrics
from chatmesh.tenancy.directory import DirectoryUnavailable, KeyRecord, TenantDirectory, TenantRecord
from chatmesh.tenancy.keys import KeyHasher, parse_key_id
from chatmesh.tenancy.limits import Limits

log = get_logger(__name__)

AUTHORIZATION = "authorization"
# The tenant of calls without a key when authentication is off.
DEFAULT_TENANT = "default"
# Past this many cached keys, the cache starts over (a flood of made-up key ids cannot grow it).
_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    limits: Limits
    key_id: str | None  # None for a call without a key (authentication off)
    # The tenant's default knowledge bases, for a request that names none.
    knowledge_bases: tuple[str, ...] = ()


class AuthError(Exception):
    """The call is refused: `code` and a message the caller can act on; `reason` labels the metric."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Entry:
    expires_at: float
    resolved: tuple[KeyRecord, TenantRecord] | None


class Authenticator:
    def __init__(self, settings: GatewaySettings, directory: TenantDirectory) -> None:
        self._required = settings.auth == "required"
        self._directory = directory
        self._hasher = KeyHasher(settings.api_key_pepper.get_secret_value())
        self._ttl = settings.auth_cache_seconds
        self._keys: dict[str, _Entry] = {}
        self._default_tenant: tuple[float, Caller] | None = None

    async def authenticate(self, metadata: grpc.aio.Metadata | tuple | None) -> Caller:
        """The caller, or AuthError (UNAUTHENTICATED, or UNAVAILABLE when the directory cannot be read)."""
        header = None
        for key, value in metadata or ():
            if key == AUTHORIZATION:
                if header is not None:
                    raise _refused("malformed", "send exactly one `authorization` header")
                header = value
        if header is None:
            if self._required:
                raise _refused("missing", "missing `authorization: Bearer <API key>` metadata")
            return await self._default_caller()
        return await self._verify(header)

    async def _verify(self, header: str | bytes) -> Caller:
        if not isinstance(header, str):
            raise _refused("malformed", "the `authorization` header must be text: `Bearer <API key>`")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _refused("malformed", "the `authorization` header must be `Bearer <API key>`")
        key = key.strip()
        key_id = parse_key_id(key)
        if key_id is None:
            raise _refused("malformed", "the API key is malformed: chatmesh keys look like cmk_<16 hex>_<43 chars>")
        resolved = await self._resolve(key_id)
        if resolved is None or not self._hasher.matches(key, resolved[0].key_hash):
            raise _refused("unknown", "unknown API key")
        record, tenant = resolved
        if record.revoked_at is not None:
            raise _refused("revoked", f"API key {key_id} was revoked")
        return Caller(tenant.name, tenant.limits, key_id, tenant.knowledge_bases)

    async def _resolve(self, key_id: str) -> tuple[KeyRecord, TenantRecord] | None:
        now = time.monotonic()
        entry = self._keys.get(key_id)
        if entry is not None and now < entry.expires_at:
            return entry.resolved
        try:
            resolved = await self._directory.resolve(key_id)
        except DirectoryUnavailable as error:
            log.error("directory_unavailable", extra={"error": str(error)})
            raise AuthError(
                grpc.StatusCode.UNAVAILABLE, "API keys cannot be verified right now; retry with backoff", "unavailable"
            ) from error
        if len(self._keys) >= _MAX_CACHED:
            self._keys.clear()
        self._keys[key_id] = _Entry(now + self._ttl, resolved)
        return resolved

    async def _default_caller(self) -> Caller:
        """The tenant `default`, with its limits and default knowledge bases if an operator created it; none
        otherwise."""
        now = time.monotonic()
        if self._default_tenant is not None and now < self._default_tenant[0]:
            return self._default_tenant[1]
        try:
            tenant = await self._directory.get_tenant(DEFAULT_TENANT)
        except DirectoryUnavailable as error:
            raise AuthError(
                grpc.StatusCode.UNAVAILABLE, "tenant limits cannot be read right now; retry with backoff", "unavailable"
            ) from error
        caller = (
            Caller(DEFAULT_TENANT, Limits(), None)
            if tenant is None
            else Caller(DEFAULT_TENANT, tenant.limits, None, tenant.knowledge_bases)
        )
        self._default_tenant = (now + self._ttl, caller)
        return caller


def _refused(reason: str, message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


def record_failure(error: AuthError) -> None:
    metrics.auth_failed(error.reason)
