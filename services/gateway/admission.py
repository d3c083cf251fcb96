"""Admitting a call under its tenant's request limits (requests per minute, concurrent streams)."""

from __future__ import annotations

import asyncio
import time

import grpc

from chatmesh.gateway.auth import Caller
from chatmesh.runtime import metrics
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings
from chatmesh.runtime.status import failure
from chatmesh.tenancy.ledger import LedgerUnavailable, LimitExceeded, UsageLedger
from chatmesh.tenancy.messages import rejection_status

log = get_logger(__name__)

# A stream slot outlives its call's deadline by this much before the ledger frees it on its own (a gateway
# that died mid-call cannot hold it forever).
_LEASE_MARGIN_SECONDS = 30.0


class AdmissionRefused(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class Admission:
    def __init__(self, settings: Settings, ledger: UsageLedger, tenant_metrics: metrics.TenantMetrics) -> None:
        self._ledger = ledger
        self._fail_open = settings.request_limits_fail_open
        self._metrics = tenant_metrics
        # Releases run after the caller has its reply; kept so that shutdown can wait for them.
        self._releases: set[asyncio.Task[None]] = set()

    async def admit(self, caller: Caller, request_id: str, timeout_seconds: float) -> bool:
        """Counts the call and takes a stream slot when the tenant has a limit on them. Returns whether a
        slot must be released when the call ends; raises AdmissionRefused."""
        limits = caller.limits
        try:
            await self._ledger.admit_request(
                caller.tenant,
                limits,
                request_id,
                now=time.time(),
                lease_seconds=timeout_seconds + _LEASE_MARGIN_SECONDS,
            )
        except LimitExceeded as refused:
            metrics.limit_rejected(refused.rejection.limit.value)
            raise AdmissionRefused(rejection_status(caller.tenant, refused.rejection)) from refused
        except LedgerUnavailable as error:
            metrics.ledger_error("admit")
            log.error("ledger_unavailable", extra={"operation": "admit", "fail_open": self._fail_open})
            if not self._fail_open:
                raise AdmissionRefused(
                    failure(
                        grpc.StatusCode.UNAVAILABLE,
                        "the tenant's request limits cannot be checked right now; retry with backoff",
                    )
                ) from error
            return False
        self._metrics.request_admitted(caller.tenant)
        return limits.concurrent_streams is not None

    def release_later(self, tenant: str, request_id: str) -> None:
        """Frees the call's stream slot off the reply's path."""
        task = asyncio.create_task(self._release(tenant, request_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, tenant: str, request_id: str) -> None:
        try:
            await self._ledger.release_request(tenant, request_id)
        except LedgerUnavailable:
            # The slot's lease frees it later.
            metrics.ledger_error("release")
            log.warning("ledger_unavailable", extra={"operation": "release"})

    async def wait_for_releases(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
