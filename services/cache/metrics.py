"""The cache process's metrics: its lookups, its Redis errors and its semantic tier (label values from closed
sets only, never a key or text):

    chatmesh_cache_lookups_total{tier}                             tier: memory, redis, miss
    chatmesh_cache_redis_errors_total{operation}                   lookup, store, erase, subscribe; the semantic
                                                                   cache's semantic_store, semantic_load
    chatmesh_cache_semantic_lookups_total{outcome}                 after an exact miss: hit, miss, guarded, error
    chatmesh_cache_semantic_guard_refusals_total{guard}            numbers, negation, entities, contrast
    chatmesh_cache_semantic_best_similarity                        (histogram) the nearest question's similarity
    chatmesh_cache_semantic_vectors                                question vectors held in this process

What the cache saved, and dialogue's lookups, are dialogue's to count: chatmesh.dialogue.metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

_CACHE_LOOKUPS = Counter(
    "chatmesh_cache_lookups_total", "Cache lookups, by the tier that answered: memory, redis, or miss.", ("tier",)
)
_CACHE_REDIS_ERRORS = Counter(
    "chatmesh_cache_redis_errors_total", "Redis commands of the cache that failed, by operation.", ("operation",)
)
CACHE_TIERS = ("memory", "redis", "miss")
_CACHE_LOOKUP_TIERS = {tier: _CACHE_LOOKUPS.labels(tier) for tier in CACHE_TIERS}
for _operation in ("lookup", "store", "erase", "subscribe"):
    _CACHE_REDIS_ERRORS.labels(_operation)


def cache_lookup(tier: str) -> None:
    """`tier`: memory, redis or miss."""
    _CACHE_LOOKUP_TIERS[tier].inc()


def cache_redis_error(operation: str) -> None:
    """`operation`: lookup, store, erase, subscribe (following other processes' announcements), or the semantic
    cache's semantic_store and semantic_load."""
    _CACHE_REDIS_ERRORS.labels(operation).inc()


_SEMANTIC_LOOKUPS = Counter(
    "chatmesh_cache_semantic_lookups_total",
    "Semantic lookups after an exact miss, by outcome: hit, miss (no question of the scope close enough), guarded "
    "(close enough, but a guard refused every candidate), error (the embedding endpoint failed or was too slow).",
    ("outcome",),
)
SEMANTIC_LOOKUP_OUTCOMES = ("hit", "miss", "guarded", "error")
_SEMANTIC_LOOKUP_OUTCOMES = {outcome: _SEMANTIC_LOOKUPS.labels(outcome) for outcome in SEMANTIC_LOOKUP_OUTCOMES}
_SEMANTIC_GUARD_REFUSALS = Counter(
    "chatmesh_cache_semantic_guard_refusals_total",
    "Candidates above the similarity threshold that a guard refused, by guard: numbers, negation, entities, contrast.",
    ("guard",),
)
for _guard in ("numbers", "negation", "entities", "contrast"):
    _SEMANTIC_GUARD_REFUSALS.labels(_guard)
_SEMANTIC_BEST_SIMILARITY = Histogram(
    "chatmesh_cache_semantic_best_similarity",
    "The cosine similarity of the nearest question of the scope, above the threshold or not, per semantic lookup "
    "in a scope that had questions: where the threshold sits among real questions.",
    buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0),
)
_SEMANTIC_VECTORS = Gauge(
    "chatmesh_cache_semantic_vectors", "Question vectors the semantic cache holds in this process's memory."
)


def semantic_lookup(outcome: str) -> None:
    """`outcome`: one of SEMANTIC_LOOKUP_OUTCOMES."""
    _SEMANTIC_LOOKUP_OUTCOMES[outcome].inc()


def semantic_guard_refusal(guard: str) -> None:
    _SEMANTIC_GUARD_REFUSALS.labels(guard).inc()


def semantic_best_similarity(similarity: float) -> None:
    _SEMANTIC_BEST_SIMILARITY.observe(similarity)


def watch_semantic_vectors(count: Callable[[], int]) -> None:
    """Serves the vector gauge from `count` at each scrape."""
    _SEMANTIC_VECTORS.set_function(count)
