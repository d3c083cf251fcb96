"""The safety process's metrics: its verdicts, the personal information it finds, and the review cases it opens
(label values from closed sets only, never an id or text):

    chatmesh_safety_screens_total{stage, verdict}                  stage: input, output, tool; allowed, blocked
    chatmesh_safety_blocked_total{stage, source, category}         one per category of a blocked verdict; source:
                                                                   keyword, moderation
    chatmesh_safety_pii_found_total{stage, kind}                   personal information found; stage: input,
                                                                   output; kind: a PII policy kind it does not
                                                                   leave (email, phone, cn_id, …)
    chatmesh_review_cases_opened_total{stage, action}              review cases opened; action: block_and_review,
                                                                   allow_and_review
    chatmesh_review_case_failures_total{stage}                     cases not opened: the store failed

`category` is capped at MAX_CATEGORIES distinct values per process, then "other". Its moderation calls are counted
by chatmesh.model.metrics; the review queue's decisions by chatmesh.review.metrics (in the gateway).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

from chatmesh.runtime.metrics import CappedLabel

# At most this many distinct `category` values per process; later new ones count as "other".
MAX_CATEGORIES = 64

_SAFETY_SCREENS = Counter(
    "chatmesh_safety_screens_total",
    "Texts screened, by stage (input, output, tool) and verdict (allowed, blocked).",
    ("stage", "verdict"),
)
_SAFETY_BLOCKED = Counter(
    "chatmesh_safety_blocked_total",
    "Blocked verdicts, one per category named, by stage and source (keyword, moderation).",
    ("stage", "source", "category"),
)
SAFETY_STAGES = ("input", "output", "tool")
_SAFETY_SCREEN_CHILDREN = {
    (stage, verdict): _SAFETY_SCREENS.labels(stage, verdict)
    for stage in SAFETY_STAGES
    for verdict in ("allowed", "blocked")
}
_category = CappedLabel(MAX_CATEGORIES)


def safety_categories(stage_sources: Iterable[tuple[str, str]], categories: Iterable[str]) -> None:
    """Creates the blocked series of these categories at 0 (e.g. the loaded keyword lists' categories)."""
    pairs = list(stage_sources)
    for category in categories:
        label = _category(category)
        for stage, source in pairs:
            _SAFETY_BLOCKED.labels(stage, source, label)


def safety_verdict(stage: str, categories: Iterable[str] = (), source: str = "keyword") -> None:
    """One screened text of `stage` (input, output, tool): allowed when `categories` is empty, else blocked by
    `source` (keyword, moderation) for each of them."""
    blocked = False
    for category in categories:
        blocked = True
        _SAFETY_BLOCKED.labels(stage, source, _category(category)).inc()
    _SAFETY_SCREEN_CHILDREN[stage, "blocked" if blocked else "allowed"].inc()


_SAFETY_PII_FOUND = Counter(
    "chatmesh_safety_pii_found_total",
    "Personal information found by safety's PII screen, by stage (input, output) and kind (email, phone, cn_id, "
    "payment_card, ip_address; only the kinds the PII policy does not leave are looked for).",
    ("stage", "kind"),
)


def safety_pii_kinds(kinds: Iterable[str]) -> None:
    """Creates the series of these kinds (those the PII policy does not leave) at 0, for both stages."""
    for kind in kinds:
        for stage in ("input", "output"):
            _SAFETY_PII_FOUND.labels(stage, kind)


def safety_pii_found(stage: str, kind: str, count: int = 1) -> None:
    """`count` items of `kind` found in one text of `stage` (input, output)."""
    _SAFETY_PII_FOUND.labels(stage, kind).inc(count)


_REVIEW_CASES_OPENED = Counter(
    "chatmesh_review_cases_opened_total",
    "Review cases safety opened, by stage (input, output, tool) and action (block_and_review, allow_and_review).",
    ("stage", "action"),
)
_REVIEW_CASE_FAILURES = Counter(
    "chatmesh_review_case_failures_total",
    "Review cases safety could not open (the store failed or was too slow; the verdict stood), by stage.",
    ("stage",),
)
for _stage in SAFETY_STAGES:
    _REVIEW_CASE_FAILURES.labels(_stage)
    for _action in ("block_and_review", "allow_and_review"):
        _REVIEW_CASES_OPENED.labels(_stage, _action)


def review_case_opened(stage: str, action: str) -> None:
    """`stage`: input, output, tool; `action`: block_and_review, allow_and_review."""
    _REVIEW_CASES_OPENED.labels(stage, action).inc()


def review_case_failed(stage: str) -> None:
    _REVIEW_CASE_FAILURES.labels(stage).inc()
