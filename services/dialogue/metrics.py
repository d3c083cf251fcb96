"""Dialogue's metrics: its view of the cache, what the cache saved, and its server-side tools (label values from
closed sets only, never an id or text):

    chatmesh_dialogue_cache_lookups_total{outcome}                 hit, miss, error, stale, skipped
    chatmesh_dialogue_cache_hits_total{match}                      turns answered from the cache: exact, semantic
    chatmesh_cache_saved_tokens_total{model, match}                model tokens the cache saved
    chatmesh_cache_saved_usd_total{model, match}                   what they would have cost, by the price table
    chatmesh_server_tool_calls_total{tool, outcome}                server-side tool calls; tool: a built-in's or
                                                                   the tools file's name; outcome: ok, error,
                                                                   invalid_arguments, timeout
    chatmesh_server_tool_duration_seconds{tool}                    (histogram) a server-side tool call

`model` is a model name of the price table (a dated snapshot counts as its family), anything else is "other".
Its model calls are counted by chatmesh.model.metrics, its tenants' tokens and cost by chatmesh.tenancy.metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from chatmesh.runtime.metrics import LATENCY_BUCKETS, OTHER

_DIALOGUE_LOOKUPS = Counter(
    "chatmesh_dialogue_cache_lookups_total",
    "Dialogue's cache lookups, by outcome: hit, miss, error (failed or too slow: answered by the model), "
    "stale (a reply screened under another safety policy version: answered by the model), skipped (the request "
    "may not be cached).",
    ("outcome",),
)
DIALOGUE_LOOKUP_OUTCOMES = ("hit", "miss", "error", "stale", "skipped")
_DIALOGUE_LOOKUP_OUTCOMES = {outcome: _DIALOGUE_LOOKUPS.labels(outcome) for outcome in DIALOGUE_LOOKUP_OUTCOMES}


def dialogue_cache_lookup(outcome: str) -> None:
    """`outcome`: one of DIALOGUE_LOOKUP_OUTCOMES."""
    _DIALOGUE_LOOKUP_OUTCOMES[outcome].inc()


_CACHE_HITS = Counter(
    "chatmesh_dialogue_cache_hits_total",
    "Turns answered from the cache, by how the question matched: exact, or semantic.",
    ("match",),
)
_CACHE_SAVED_TOKENS = Counter(
    "chatmesh_cache_saved_tokens_total",
    "Model tokens the cache saved (the prompt as counted, and the reply as first made), by model (a price "
    "table's name, or other) and match.",
    ("model", "match"),
)
_CACHE_SAVED_USD = Counter(
    "chatmesh_cache_saved_usd_total",
    "What the saved tokens would have cost at the price table's prices, in USD, by model and match.",
    ("model", "match"),
)
CACHE_MATCHES = ("exact", "semantic")
for _match in CACHE_MATCHES:
    _CACHE_HITS.labels(_match)


def bind_cache_savings(models: Iterable[str]) -> None:
    """Creates the savings series of every model of the price table (and "other") at 0, so that a rate sees the
    first hit."""
    for model in (*models, OTHER):
        for match in CACHE_MATCHES:
            _CACHE_SAVED_TOKENS.labels(model, match)
            _CACHE_SAVED_USD.labels(model, match)


def cache_hit_saved(model: str, match: str, tokens: int, cost_usd: float) -> None:
    """A turn answered from the cache: `model` a price table name or "other", `match` one of CACHE_MATCHES."""
    _CACHE_HITS.labels(match).inc()
    _CACHE_SAVED_TOKENS.labels(model, match).inc(tokens)
    _CACHE_SAVED_USD.labels(model, match).inc(cost_usd)


# Server-side tools (dialogue: chatmesh.dialogue.server_tools). `tool` is a built-in's name or one of the operator's
# tools file, so the label is bounded by that file.

_SERVER_TOOL_CALLS = Counter(
    "chatmesh_server_tool_calls_total",
    "Server-side tool calls, by tool and outcome: ok, error (the tool failed or answered an error), "
    "invalid_arguments (refused before the tool ran), timeout.",
    ("tool", "outcome"),
)
_SERVER_TOOL_DURATION = Histogram(
    "chatmesh_server_tool_duration_seconds",
    "Seconds a server-side tool call took, from its arguments' check to its result.",
    ("tool",),
    buckets=LATENCY_BUCKETS,
)
SERVER_TOOL_OUTCOMES = ("ok", "error", "invalid_arguments", "timeout")


def server_tools_declared(tools: Iterable[str]) -> None:
    """Creates the series of these tools at 0, so that a tool's first call and first failure show in rates."""
    for tool in tools:
        _SERVER_TOOL_DURATION.labels(tool)
        for outcome in SERVER_TOOL_OUTCOMES:
            _SERVER_TOOL_CALLS.labels(tool, outcome)


def server_tool_call(tool: str, outcome: str, seconds: float) -> None:
    """One server-side tool call of `tool` that ended with `outcome` (one of SERVER_TOOL_OUTCOMES)."""
    _SERVER_TOOL_CALLS.labels(tool, outcome).inc()
    _SERVER_TOOL_DURATION.labels(tool).observe(seconds)
