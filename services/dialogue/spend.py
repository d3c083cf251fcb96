"""A model call's tokens and spend, under its tenant's limits: reserved before the call, settled after.

The reservation is the call's worst case: its prompt's tokens as the window counted them (else an upper
bound: byte-level BPE never makes more tokens than the text has UTF-8 bytes, plus a few per message for the
chat format) plus its max_tokens, priced at the model's price. Settlement replaces it with what the provider
reported; for a stream that did not finish (cancelled, blocked, broken off), with the prompt's count and the
tokens of the text received, since the provider bills what it produced before the connection closed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc

from chatmesh.dialogue.tokens import TokenCounter
from chatmesh.model.client import ModelRequest
from chatmesh.model.pricing import cost_usd, price_family
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.runtime.status import Refused, failure
from chatmesh.runtime.tasks import BackgroundTasks
from chatmesh.tenancy import metrics
from chatmesh.tenancy.ledger import LedgerUnavailable, LimitExceeded, UsageLedger
from chatmesh.tenancy.limits import NANO_USD_PER_USD, LimitName, Limits, cost_to_nano
from chatmesh.tenancy.messages import TOKEN_QUOTAS, beyond_limit_status, rejection_status, usage_response
from chatmesh.v1 import cache_pb2, chat_pb2

log = get_logger(__name__)

# Chat-format tokens around each message, and priming the reply; generous against every OpenAI encoding.
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 3
# A reservation outlives its turn's deadline by this much before the ledger releases it on its own.
_RESERVATION_MARGIN_SECONDS = 60.0
# Settlement is idempotent, so a failed one is tried again a few times before it is given up (and logged).
_SETTLE_ATTEMPTS = 3
_SETTLE_RETRY_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class SpendScope:
    """Whose turn it is and under what limits."""

    tenant: str
    limits: Limits
    request_id: str


def _beyond_limit(limits: Limits, tokens: int, cost_nano_usd: int) -> tuple[LimitName, float, float] | None:
    """The first limit that this call's worst case alone passes, with what it needs and what it allows."""
    checks = (
        (LimitName.TOKENS_PER_MINUTE, tokens, limits.tokens_per_minute, 1),
        (LimitName.DAILY_BUDGET_USD, cost_nano_usd, limits.daily_budget_nano_usd, NANO_USD_PER_USD),
        (LimitName.MONTHLY_BUDGET_USD, cost_nano_usd, limits.monthly_budget_nano_usd, NANO_USD_PER_USD),
    )
    for limit, needed, allowed, scale in checks:
        if allowed is not None and needed > allowed:
            return limit, needed / scale, allowed / scale
    return None


def prompt_token_bound(messages: list[dict[str, Any]], model: str) -> int:
    """At least as many tokens as any OpenAI encoding makes of these messages. A message's content is a string
    or content parts; an image part counts the most an image of its detail costs `model` (OpenAI's image rule,
    its size unknown)."""
    total = _TOKENS_PER_MESSAGE * len(messages) + _TOKENS_PER_REPLY
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            total += len(content.encode())
            continue
        for part in content:
            if part.get("type") == "image_url":
                total += _IMAGE_RATES.image_part_tokens(model, part["image_url"])
            else:
                total += len(str(part.get("text") or "").encode())
    return total


# Only its image rates are used: no encoding is loaded.
_IMAGE_RATES = TokenCounter()


class SpendLedger:
    """Dialogue's side of the usage ledger: reservations, settlements, and the token quotas' usage."""

    def __init__(
        self,
        settings: DialogueSettings,
        ledger: UsageLedger,
        tenant_metrics: metrics.TenantMetrics,
        background: BackgroundTasks,
    ) -> None:
        self._ledger = ledger
        self._prices = settings.model_prices_usd_per_million
        self._fail_open = settings.spend_limits_fail_open
        self._default_max_tokens = settings.limits_default_max_tokens
        self._metrics = tenant_metrics
        # Settlements run after the caller has its reply.
        self._background = background

    def bounded_max_tokens(self, limits: Limits, requested: int | None) -> int | None:
        """The max_tokens to ask the model for: the caller's, or with token or spend limits and none asked
        for, the default bound (so that the reservation covers the worst case)."""
        if requested is None and limits.limits_spend:
            return self._default_max_tokens
        return requested

    def start_reservation(
        self,
        scope: SpendScope,
        request: ModelRequest,
        timeout_seconds: float,
        cache_lookup: asyncio.Future[cache_pb2.LookupResponse | None] | None,
    ) -> asyncio.Task[bool] | None:
        """Starts reserving the call's worst case when the tenant has token or spend limits (None otherwise):
        as soon as `cache_lookup` (if any) misses, while the input is still being screened. A cached answer
        costs no Redis round trip. Await the task before calling the model (it raises Refused), or hand
        it to `release_unused` when the model is not called."""
        if not scope.limits.limits_spend:
            return None
        return asyncio.ensure_future(self._reserve_on_miss(scope, request, timeout_seconds, cache_lookup))

    async def _reserve_on_miss(
        self,
        scope: SpendScope,
        request: ModelRequest,
        timeout_seconds: float,
        cache_lookup: asyncio.Future[cache_pb2.LookupResponse | None] | None,
    ) -> bool:
        found = None if cache_lookup is None else await cache_lookup
        if found is not None and found.hit:
            return False
        return await self.reserve(scope, request, timeout_seconds)

    def release_unused(self, scope: SpendScope, request: ModelRequest, reservation: asyncio.Task[bool]) -> None:
        """The model will not be called (a cached answer, a refused input, a failure): once the reservation
        is made, it is settled at nothing, off the reply's path."""

        async def release() -> None:
            try:
                reserved = await reservation
            except (Refused, asyncio.CancelledError):
                return
            if reserved:
                await self._settle(scope, 0, 0, 0.0)

        self._background.spawn(release(), "release_reservation")

    async def reserve(self, scope: SpendScope, request: ModelRequest, timeout_seconds: float) -> bool:
        """Reserves the call's worst case; raises Refused. Returns whether a reservation is held (not
        when Redis is down and the operator chose to fail open)."""
        limits = scope.limits
        has_budget = limits.daily_budget_usd is not None or limits.monthly_budget_usd is not None
        if has_budget and price_family(self._prices, request.model) is None:
            raise Refused(
                failure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"options.model: {request.model!r} has no price in chatmesh's price table, so the tenant's "
                    "budget cannot be applied to it; its operator must add it to "
                    "CHATMESH_MODEL_PRICES_USD_PER_MILLION",
                )
            )
        input_tokens = (
            request.prompt_tokens
            if request.prompt_tokens is not None
            else prompt_token_bound(request.messages, request.model)
        )
        output_tokens = request.max_tokens or 0
        cost = cost_to_nano(cost_usd(self._prices, request.model, input_tokens, output_tokens))
        beyond = _beyond_limit(limits, input_tokens + output_tokens, cost)
        if beyond is not None:
            metrics.limit_rejected(beyond[0].value)
            raise Refused(beyond_limit_status(scope.tenant, *beyond))
        try:
            await self._ledger.reserve(
                scope.tenant,
                limits,
                scope.request_id,
                tokens=input_tokens + output_tokens,
                cost_nano_usd=cost,
                now=time.time(),
                ttl_seconds=timeout_seconds + _RESERVATION_MARGIN_SECONDS,
            )
        except LimitExceeded as refused:
            metrics.limit_rejected(refused.rejection.limit.value)
            raise Refused(rejection_status(scope.tenant, refused.rejection)) from refused
        except LedgerUnavailable as error:
            metrics.ledger_error("reserve")
            log.error("ledger_unavailable", extra={"operation": "reserve", "fail_open": self._fail_open})
            if not self._fail_open:
                raise Refused(
                    failure(
                        grpc.StatusCode.UNAVAILABLE,
                        "the tenant's token and spend limits cannot be checked right now; retry with backoff",
                    )
                ) from error
            return False
        return True

    def settle_later(
        self, scope: SpendScope, model: str, input_tokens: int, output_tokens: int, cost: float | None = None
    ) -> None:
        """Settles the call off the reply's path with its tokens: the provider's usage, or for a stream that
        did not finish, its caller's count of what was sent and received; and their `cost` in USD (by default
        priced by the price table: a deployment may have its own price)."""
        if cost is None:
            cost = cost_usd(self._prices, model, input_tokens, output_tokens)
        self._background.spawn(self._settle(scope, input_tokens, output_tokens, cost), "settlement")

    async def _settle(self, scope: SpendScope, input_tokens: int, output_tokens: int, cost: float) -> None:
        for attempt in range(1, _SETTLE_ATTEMPTS + 1):
            try:
                settled = await self._ledger.settle(
                    scope.tenant,
                    scope.request_id,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    cost_nano_usd=cost_to_nano(cost),
                    now=time.time(),
                )
            except LedgerUnavailable:
                metrics.ledger_error("settle")
                if attempt == _SETTLE_ATTEMPTS:
                    log.error("settlement_failed", extra={"request_id": scope.request_id})
                    return
                await asyncio.sleep(_SETTLE_RETRY_SECONDS * attempt)
                continue
            if settled:
                self._metrics.usage_settled(scope.tenant, input_tokens, output_tokens, cost)
            return

    async def usage(self, tenant: str, limits: Limits) -> chat_pb2.GetUsageResponse:
        """The token and spend quotas, and the month's settled tokens and cost. Raises LedgerUnavailable."""
        usage = await self._ledger.usage(tenant, limits, now=time.time())
        return usage_response(tenant, limits, usage, TOKEN_QUOTAS)
