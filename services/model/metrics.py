"""The model's metrics: its calls (chatmesh.model.client), deployments and router (chatmesh.model.router), in the
processes that call a model (dialogue: chat; safety: moderation; cache: embeddings). Label values come from closed
sets only, never an id or text:

    chatmesh_model_requests_total{operation, model, outcome}       one per call, retries included; outcome:
                                                                   ok, cancelled, rate_limited, unavailable,
                                                                   timeout, rejected, error
    chatmesh_model_request_duration_seconds{operation, model}      (histogram) a call, retries included
    chatmesh_model_time_to_first_token_seconds{model}              (histogram) to the first text delta
    chatmesh_model_tokens_total{model, kind}                       kind: input, output
    chatmesh_model_cost_usd_total{model}                           from `model_prices_usd_per_million`
    chatmesh_model_retries_total{operation, kind}                  attempts retried, by why
    chatmesh_model_upstream_errors_total{operation, kind}          failed attempts, by kind
    chatmesh_model_deployment_attempts_total{deployment, outcome}  chat attempts by deployment (model.deployments);
                                                                   outcome: ok, rate_limited, unauthorized,
                                                                   server_error, connection_error, timeout,
                                                                   first_token_timeout, rejected
    chatmesh_model_breaker_state{deployment}                       0 closed, 1 half-open (a probe is due), 2 open
    chatmesh_model_key_state{deployment, key}                      key: its index; 0 usable, 1 cooling, 2 retired
    chatmesh_model_healthy_deployments{model}                      deployments of a model entry whose breaker is
                                                                   not open and that have a key not retired

`model` is a model name of the price table (a dated snapshot counts as its family, as it is priced), anything else
is "other"; `deployment` is a name of the deployments file (bounded by it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from chatmesh.runtime.metrics import LATENCY_BUCKETS, OTHER

if TYPE_CHECKING:
    from chatmesh.model.router import Router

_MODEL_REQUESTS = Counter(
    "chatmesh_model_requests_total",
    "Calls to the model provider, retries included, by how they ended: ok, cancelled, or the failure kind.",
    ("operation", "model", "outcome"),
)
_MODEL_DURATION = Histogram(
    "chatmesh_model_request_duration_seconds",
    "Seconds from the start of a model call (its first attempt) to its end, retries included; cancelled "
    "calls are left out.",
    ("operation", "model"),
    buckets=LATENCY_BUCKETS,
)
_MODEL_TTFT = Histogram(
    "chatmesh_model_time_to_first_token_seconds",
    "Seconds from the start of a streamed chat call (its first attempt) to its first text delta.",
    ("model",),
    buckets=LATENCY_BUCKETS,
)
_MODEL_TOKENS = Counter(
    "chatmesh_model_tokens_total", "Tokens the model provider reported, by kind: input, output.", ("model", "kind")
)
_MODEL_COST = Counter(
    "chatmesh_model_cost_usd_total",
    "Cost of the model's tokens in USD, by the price table (model_prices_usd_per_million).",
    ("model",),
)
_MODEL_RETRIES = Counter(
    "chatmesh_model_retries_total",
    "Model call attempts that failed and were retried, by failure kind.",
    ("operation", "kind"),
)
_MODEL_ERRORS = Counter(
    "chatmesh_model_upstream_errors_total",
    "Model call attempts that failed (retried or not), by failure kind.",
    ("operation", "kind"),
)
MODEL_OUTCOMES = ("ok", "cancelled", "rate_limited", "unavailable", "timeout", "rejected", "error")
_MODEL_FAILURE_KINDS = ("rate_limited", "unavailable", "timeout", "rejected")


def model_attempt_failed(operation: str, kind: str, retried: bool) -> None:
    """An attempt at the model provider failed with `kind` (a ModelErrorKind value); `retried` when
    another attempt follows."""
    _MODEL_ERRORS.labels(operation, kind).inc()
    if retried:
        _MODEL_RETRIES.labels(operation, kind).inc()


class _ModelChildren:
    __slots__ = ("cost", "duration", "input_tokens", "outcomes", "output_tokens", "ttft")

    def __init__(self, operation: str, model: str) -> None:
        self.outcomes = {outcome: _MODEL_REQUESTS.labels(operation, model, outcome) for outcome in MODEL_OUTCOMES}
        self.duration = _MODEL_DURATION.labels(operation, model)
        self.ttft = _MODEL_TTFT.labels(model)
        self.input_tokens = _MODEL_TOKENS.labels(model, "input")
        self.output_tokens = _MODEL_TOKENS.labels(model, "output")
        self.cost = _MODEL_COST.labels(model)


class ModelCall:
    """One model call's metrics, its children bound when it starts (see ModelMetrics.call)."""

    __slots__ = ("_children", "_started_at")

    def __init__(self, children: _ModelChildren) -> None:
        self._children = children
        self._started_at = time.perf_counter()

    def first_token(self) -> None:
        self._children.ttft.observe(time.perf_counter() - self._started_at)

    def completed(self, input_tokens: int = 0, output_tokens: int = 0, cost_usd: float = 0.0) -> None:
        """The call ended with the provider's answer (and, for a chat, its usage and what it cost)."""
        self.tokens(input_tokens, output_tokens, cost_usd)
        children = self._children
        children.outcomes["ok"].inc()
        children.duration.observe(time.perf_counter() - self._started_at)

    def tokens(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        """Tokens the call spent and what they cost; for a call that ended without the provider's usage, as
        chatmesh counted them (ModelClient.record_unfinished)."""
        children = self._children
        if input_tokens:
            children.input_tokens.inc(input_tokens)
        if output_tokens:
            children.output_tokens.inc(output_tokens)
        if cost_usd:
            children.cost.inc(cost_usd)

    def failed(self, outcome: str) -> None:
        """The call ended without an answer: "cancelled" (its caller went away), a ModelErrorKind value, or
        anything else, counted as "error"."""
        children = self._children
        counter = children.outcomes.get(outcome) or children.outcomes["error"]
        counter.inc()
        if outcome != "cancelled":
            children.duration.observe(time.perf_counter() - self._started_at)


class ModelMetrics:
    """The model calls of a process, labelled by the price table's model names (`models`) and "other".
    Every chat model's series exist from the start, at 0; `call` binds a call's children by one lookup."""

    def __init__(self, models: Iterable[str]) -> None:
        self._models = frozenset(models)
        self._children: dict[tuple[str, str], _ModelChildren] = {}
        for model in (*self._models, OTHER):
            self._bind("chat", model)
        for operation in ("chat", "moderation"):
            for kind in _MODEL_FAILURE_KINDS:
                _MODEL_ERRORS.labels(operation, kind)
                _MODEL_RETRIES.labels(operation, kind)

    def call(self, operation: str, model: str | None) -> ModelCall:
        """`model`: a name of the price table (a call's price family), or None for any other."""
        label = model if model in self._models else OTHER
        children = self._children.get((operation, label)) or self._bind(operation, label)
        return ModelCall(children)

    def _bind(self, operation: str, model: str) -> _ModelChildren:
        children = self._children[operation, model] = _ModelChildren(operation, model)
        return children


# The model router (chatmesh.model.router): deployments, their key pools and breakers. Labels are the names
# of the deployments file (bounded by it); the gauges are read from the router when scraped.

_DEPLOYMENT_ATTEMPTS = Counter(
    "chatmesh_model_deployment_attempts_total",
    "Chat attempts at a model deployment, by outcome.",
    ("deployment", "outcome"),
)
_BREAKER_STATE = Gauge(
    "chatmesh_model_breaker_state",
    "A deployment's circuit breaker: 0 closed, 1 half-open (a probe is due), 2 open.",
    ("deployment",),
)
_KEY_STATE = Gauge(
    "chatmesh_model_key_state",
    "A deployment's API key, by its index in the deployments file: 0 usable, 1 cooling down (429), 2 retired "
    "(401 or 403).",
    ("deployment", "key"),
)
_HEALTHY_DEPLOYMENTS = Gauge(
    "chatmesh_model_healthy_deployments",
    "Deployments of a model entry whose breaker is not open and that have a key not retired.",
    ("model",),
)
DEPLOYMENT_ATTEMPT_OUTCOMES = (
    "ok",
    "rate_limited",
    "unauthorized",
    "server_error",
    "connection_error",
    "timeout",
    "first_token_timeout",
    "rejected",
)


class DeploymentAttempts:
    """The attempt counters of one deployment, bound once."""

    __slots__ = ("_children",)

    def __init__(self, deployment: str) -> None:
        self._children = {
            outcome: _DEPLOYMENT_ATTEMPTS.labels(deployment, outcome) for outcome in DEPLOYMENT_ATTEMPT_OUTCOMES
        }

    def attempt(self, outcome: str) -> None:
        self._children[outcome].inc()


def watch_model_router(router: Router) -> None:
    """Serves the breaker, key and health gauges of `router` from its state
    at each scrape; the latest router of a process wins."""
    for route in router.deployments.models.values():
        _HEALTHY_DEPLOYMENTS.labels(route.name).set_function(functools.partial(router.healthy_count, route))
    for name, breaker in router.breakers.items():
        _BREAKER_STATE.labels(name).set_function(lambda breaker=breaker: int(breaker.state))
        pool = router.pools[name]
        for index in range(len(pool)):
            _KEY_STATE.labels(name, str(index)).set_function(functools.partial(_key_state, pool, index))


def _key_state(pool: Any, index: int) -> int:
    return int(pool.state(index))
