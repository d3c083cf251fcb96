"""Admitting a call under its tenant's request limits (requests per minute, concurrent streams).

A call that held a stream slot frees it when it ends, but not with a Redis round trip of its own: the
release rides with the tenant's next admission on this gateway (which frees it before counting), or, if
none comes first, goes out within RELEASE_DELAY_SECONDS. A slot is never freed late enough to matter to
this replica's callers, and at most that delay late for other replicas'; it is never freed early, so the
limit is never passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from chatmesh.gateway.auth import Caller
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.runtime.status import Refused, failure
from chatmesh.runtime.tasks import BackgroundTasks
from chatmesh.tenancy import metrics
from chatmesh.tenancy.ledger import LedgerUnavailable, LimitExceeded, UsageLedger
from chatmesh.tenancy.messages import rejection_status

log = get_logger(__name__)

# A stream slot outlives its call's deadline by this much before the ledger frees it on its own (a gateway
# that died mid-call cannot hold it forever).
_LEASE_MARGIN_SECONDS = 30.0
RELEASE_DELAY_SECONDS = 0.02


class Admission:
    def __init__(self, settings: GatewaySettings, ledger: UsageLedger, tenant_metrics: metrics.TenantMetrics) -> None:
        self._ledger = ledger
        self._fail_open = settings.request_limits_fail_open
        self._metrics = tenant_metrics
        # Ended calls' slots not yet freed, by tenant.
        self._ended: dict[str, list[str]] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._releases = BackgroundTasks()

    async def admit(self, caller: Caller, request_id: str, timeout_seconds: float) -> bool:
        """Counts the call and takes a stream slot when the tenant has a limit on them. Returns whether the
        slot must be released (`release`) when the call ends; raises Refused."""
        limits = caller.limits
        releasing = self._ended.pop(caller.tenant, ())
        try:
            await self._ledger.admit_request(
                caller.tenant,
                limits,
                request_id,
                now=time.time(),
                lease_seconds=timeout_seconds + _LEASE_MARGIN_SECONDS,
                releasing=releasing,
            )
        except LimitExceeded as refused:
            metrics.limit_rejected(refused.rejection.limit.value)
            raise Refused(rejection_status(caller.tenant, refused.rejection)) from refused
        except LedgerUnavailable as error:
            self._defer_release(caller.tenant, releasing)
            metrics.ledger_error("admit")
            log.error("ledger_unavailable", extra={"operation": "admit", "fail_open": self._fail_open})
            if not self._fail_open:
                raise Refused(
                    failure(
                        grpc.StatusCode.UNAVAILABLE,
                        "the tenant's request limits cannot be checked right now; retry with backoff",
                    )
                ) from error
            return False
        self._metrics.request_admitted(caller.tenant)
        return limits.concurrent_streams is not None

    def release(self, tenant: str, request_id: str) -> None:
        """Frees the ended call's stream slot: with the tenant's next admission, or shortly."""
        self._defer_release(tenant, (request_id,))

    def _defer_release(self, tenant: str, request_ids: Sequence[str]) -> None:
        if not request_ids:
            return
        self._ended.setdefault(tenant, []).extend(request_ids)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(RELEASE_DELAY_SECONDS, self._release_ended)

    def _release_ended(self) -> None:
        self._flush = None
        ended, self._ended = self._ended, {}
        for tenant, request_ids in ended.items():
            self._releases.spawn(self._release(tenant, request_ids), "release_stream_slots")

    async def _release(self, tenant: str, request_ids: list[str]) -> None:
        try:
            await self._ledger.release_requests(tenant, request_ids)
        except LedgerUnavailable:
            # The slots' leases free them later.
            metrics.ledger_error("release")
            log.warning("ledger_unavailable", extra={"operation": "release"})

    async def close(self) -> None:
        """Frees every ended call's slot (at shutdown)."""
        if self._flush is not None:
            self._flush.cancel()
        self._release_ended()
        await self._releases.wait()
