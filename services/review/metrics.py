"""The human-review queue's metrics, in the gateway (chatmesh.gateway.review). Every gateway reports the whole
queue, so take the max over instances; the gauges exist only in a process that sweeps the queue:

    chatmesh_review_open_cases                                     cases not decided, as of the last sweep
    chatmesh_review_oldest_open_age_seconds                        the oldest of them's age, now (0: none)
    chatmesh_review_decisions_total{decision}                      approve, block, escalate

The cases safety opens are counted by chatmesh.safety.metrics.
"""

from __future__ import annotations

import functools
import time

from prometheus_client import Counter, Gauge

_REVIEW_DECISIONS = Counter(
    "chatmesh_review_decisions_total", "Review decisions, by decision: approve, block, escalate.", ("decision",)
)
REVIEW_DECISIONS = ("approve", "block", "escalate")
_REVIEW_DECISION_CHILDREN = {decision: _REVIEW_DECISIONS.labels(decision) for decision in REVIEW_DECISIONS}


def review_decided(decision: str) -> None:
    """`decision`: one of REVIEW_DECISIONS."""
    _REVIEW_DECISION_CHILDREN[decision].inc()


@functools.cache
def _review_queue_gauges() -> tuple[Gauge, Gauge]:
    return (
        Gauge(
            "chatmesh_review_open_cases",
            "Review cases not decided (open, claimed or escalated), as of this gateway's last sweep of the queue.",
        ),
        Gauge(
            "chatmesh_review_oldest_open_age_seconds",
            "Age of the oldest review case not decided, 0 when there is none (the case as of the last sweep).",
        ),
    )


def review_queue_observed(open_cases: int, oldest_age_seconds: float | None) -> None:
    """The queue as a sweep found it. The oldest case's age goes on growing at every scrape until the next."""
    open_gauge, age_gauge = _review_queue_gauges()
    open_gauge.set(open_cases)
    opened_at = None if oldest_age_seconds is None else time.time() - oldest_age_seconds
    age_gauge.set_function(lambda: 0.0 if opened_at is None else time.time() - opened_at)
