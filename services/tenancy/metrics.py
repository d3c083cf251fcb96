"""Tenants' metrics, in the gateway (requests, API keys, limits) and in dialogue (tokens and cost). `tenant` is the
name of a tenant the gateway verified, at most `metrics_max_tenants` distinct ones per process, then "other":

    chatmesh_tenant_requests_total{tenant}                         calls admitted (gateway)
    chatmesh_tenant_tokens_total{tenant, kind}                     tokens settled, input or output (dialogue)
    chatmesh_tenant_cost_usd_total{tenant}                         cost settled (dialogue)
    chatmesh_limit_rejections_total{limit}                         RESOURCE_EXHAUSTED by a tenant limit
    chatmesh_auth_failures_total{reason}                           missing, malformed, unknown, revoked, unavailable
    chatmesh_ledger_errors_total{operation}                        admit, release, reserve, settle (Redis down)
"""

from __future__ import annotations

from prometheus_client import Counter

from chatmesh.runtime.metrics import CappedLabel

_TENANT_REQUESTS = Counter(
    "chatmesh_tenant_requests_total", "Chat and StreamChat calls admitted, by tenant.", ("tenant",)
)
_TENANT_TOKENS = Counter(
    "chatmesh_tenant_tokens_total",
    "Model tokens settled against a tenant, by kind: input, output (estimated for interrupted streams).",
    ("tenant", "kind"),
)
_TENANT_COST = Counter("chatmesh_tenant_cost_usd_total", "Model cost settled against a tenant, in USD.", ("tenant",))
_LIMIT_REJECTIONS = Counter(
    "chatmesh_limit_rejections_total", "Calls refused with RESOURCE_EXHAUSTED by a tenant limit, by limit.", ("limit",)
)
_AUTH_FAILURES = Counter(
    "chatmesh_auth_failures_total",
    "ChatService calls refused before they started: missing, malformed, unknown or revoked API keys, and "
    "keys that could not be verified (unavailable).",
    ("reason",),
)
_LEDGER_ERRORS = Counter(
    "chatmesh_ledger_errors_total",
    "Usage-ledger operations that failed (Redis unreachable), by operation: admit, release, reserve, settle.",
    ("operation",),
)
LIMIT_NAMES = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "daily_budget_usd",
    "monthly_budget_usd",
)
AUTH_FAILURE_REASONS = ("missing", "malformed", "unknown", "revoked", "unavailable")
LEDGER_OPERATIONS = ("admit", "release", "reserve", "settle")
_LIMIT_REJECTION_CHILDREN = {limit: _LIMIT_REJECTIONS.labels(limit) for limit in LIMIT_NAMES}
_AUTH_FAILURE_CHILDREN = {reason: _AUTH_FAILURES.labels(reason) for reason in AUTH_FAILURE_REASONS}
_LEDGER_ERROR_CHILDREN = {operation: _LEDGER_ERRORS.labels(operation) for operation in LEDGER_OPERATIONS}


class TenantMetrics:
    """The per-tenant counters of one process, with the tenant label capped at `max_tenants`."""

    def __init__(self, max_tenants: int) -> None:
        self._label = CappedLabel(max_tenants)

    def request_admitted(self, tenant: str) -> None:
        _TENANT_REQUESTS.labels(self._label(tenant)).inc()

    def usage_settled(self, tenant: str, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        label = self._label(tenant)
        _TENANT_TOKENS.labels(label, "input").inc(input_tokens)
        _TENANT_TOKENS.labels(label, "output").inc(output_tokens)
        _TENANT_COST.labels(label).inc(cost_usd)


def limit_rejected(limit: str) -> None:
    """`limit`: one of LIMIT_NAMES."""
    _LIMIT_REJECTION_CHILDREN[limit].inc()


def auth_failed(reason: str) -> None:
    """`reason`: one of AUTH_FAILURE_REASONS."""
    _AUTH_FAILURE_CHILDREN[reason].inc()


def ledger_error(operation: str) -> None:
    """`operation`: one of LEDGER_OPERATIONS."""
    _LEDGER_ERROR_CHILDREN[operation].inc()
