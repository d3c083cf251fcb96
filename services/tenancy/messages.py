"""The tenancy's records as the API's messages and statuses."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from chatmesh.runtime.status import quota_exceeded
from chatmesh.tenancy.ledger import QuotaUse, Rejection, TenantUsage
from chatmesh.tenancy.limits import LimitName, Limits
from chatmesh.v1 import chat_pb2

_BUDGETS = frozenset({LimitName.DAILY_BUDGET_USD, LimitName.MONTHLY_BUDGET_USD})
# The quotas each process counts: the gateway admits calls; dialogue reserves and settles the model's use.
REQUEST_QUOTAS = frozenset({LimitName.REQUESTS_PER_MINUTE, LimitName.CONCURRENT_STREAMS})
TOKEN_QUOTAS = frozenset({LimitName.TOKENS_PER_MINUTE, LimitName.DAILY_BUDGET_USD, LimitName.MONTHLY_BUDGET_USD})


def rejection_status(tenant: str, rejection: Rejection) -> grpc.Status:
    """RESOURCE_EXHAUSTED naming the limit, with QuotaFailure and RetryInfo details."""
    if rejection.limit in _BUDGETS:
        description = f"{rejection.used:.6f} of {rejection.allowed:.6f} USD used or reserved"
    else:
        description = f"{rejection.used:.0f} of {rejection.allowed:.0f} used"
    return quota_exceeded(f"tenant:{tenant}", rejection.limit.value, description, rejection.retry_after_seconds)


def beyond_limit_status(tenant: str, limit: LimitName, needed: float, allowed: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED for a call whose worst case alone is more than the whole limit: waiting cannot
    help, so there is no RetryInfo, and the message says what to change."""
    if limit in _BUDGETS:
        needed_text, allowed_text = f"{needed:.6f} USD", f"{allowed:.6f} USD"
    else:
        needed_text, allowed_text = f"{needed:.0f} tokens", f"{allowed:.0f} tokens"
    description = (
        f"this call's worst case ({needed_text}: its prompt plus options.max_tokens) is more than the whole "
        f"limit ({allowed_text}); lower options.max_tokens, shorten the conversation, or raise the limit"
    )
    return quota_exceeded(f"tenant:{tenant}", limit.value, description, None)


def timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp


def quota_message(quota: QuotaUse) -> chat_pb2.Quota:
    message = chat_pb2.Quota(name=quota.limit.value, used=quota.used)
    if quota.allowed is not None:
        message.limit = quota.allowed
        message.remaining = max(0.0, quota.allowed - quota.used)
    if quota.resets_at is not None:
        message.reset_time.CopyFrom(timestamp(quota.resets_at))
    return message


def usage_response(
    tenant: str, limits: Limits, usage: TenantUsage, quotas: frozenset[LimitName]
) -> chat_pb2.GetUsageResponse:
    """The quotas named in `quotas`, and the month's figures this process counts: its requests (gateway) or
    its tokens and cost (dialogue)."""
    response = chat_pb2.GetUsageResponse(
        tenant=tenant,
        limits=limits.to_proto(),
        quotas=[quota_message(quota) for quota in usage.quotas if quota.limit in quotas],
    )
    if quotas is REQUEST_QUOTAS:
        response.month_requests = usage.month_requests
    else:
        response.month_input_tokens = usage.month_input_tokens
        response.month_output_tokens = usage.month_output_tokens
        response.month_cost_usd = usage.month_cost_usd
    return response
