"""Safety's side of the human-review queue: opening a case for a verdict the review policy sends to a person
(with a redacted excerpt of the text), and following the terms that reviewers' decisions add to the keyword
lists."""

import asyncio
import re

from chatmesh.review.store import NewCase, ReviewStore
from chatmesh.runtime.logs import get_logger
from chatmesh.safety import metrics
from chatmesh.safety.keywords import KeywordScreen
from chatmesh.safety.pii import NAME_BY_KIND, find_pii
from chatmesh.v1 import chat_pb2, review_pb2, safety_pb2

log = get_logger(__name__)

# The most characters of the screened text a case keeps.
EXCERPT_CHARS = 500
# How much text beyond the excerpt on each side is redacted with it, so that personal information at its edges
# is recognized whole before the excerpt is cut (longer than any e-mail address or number).
_REDACTED_MARGIN = 500
# What the PII screen may miss: any e-mail-like address, and any run of six or more digits, separated or not.
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_DIGITS = re.compile(r"\d(?:[ ./()-]?\d){5,}")

STAGE_LABELS = {
    chat_pb2.ContentFilter.STAGE_INPUT: "input",
    chat_pb2.ContentFilter.STAGE_OUTPUT: "output",
    chat_pb2.ContentFilter.STAGE_TOOL: "tool",
}
ACTION_LABELS = {
    review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW: "block_and_review",
    review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW: "allow_and_review",
}


def _sensitive_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, placeholder) of what an excerpt must not show, in order, not overlapping: what the PII
    screen finds (of every kind), then e-mail addresses and digit runs it did not take."""
    spans = [(match.start, match.end, f"[{NAME_BY_KIND[match.kind].upper()}]") for match in find_pii(text)]
    spans += [(found.start(), found.end(), "[EMAIL]") for found in _EMAIL.finditer(text)]
    spans += [(found.start(), found.end(), "[NUMBER]") for found in _DIGITS.finditer(text)]
    kept: list[tuple[int, int, str]] = []
    # By start; of spans that start together, the PII screen's (listed first) names the placeholder.
    for start, end, placeholder in sorted(spans, key=lambda span: span[0]):
        if kept and start < kept[-1][1]:
            previous = kept[-1]
            kept[-1] = (previous[0], max(previous[1], end), previous[2])
        else:
            kept.append((start, end, placeholder))
    return kept


def excerpt(text: str, start: int, end: int) -> str:
    """At most EXCERPT_CHARS characters of `text` around [start, end) (what matched; its beginning when longer,
    the text's beginning when both are 0), with personal information, e-mail addresses and runs of six or more
    digits replaced by placeholders ([EMAIL], [PHONE], [CN_ID], [PAYMENT_CARD], [IP_ADDRESS], [NUMBER])."""
    low = max(0, start - EXCERPT_CHARS - _REDACTED_MARGIN)
    high = min(len(text), end + EXCERPT_CHARS + _REDACTED_MARGIN)
    piece, start, end = text[low:high], start - low, end - low
    parts: list[str] = []
    at = 0
    # Where the match is in the redacted text: a placeholder that overlaps it is part of it.
    shift = 0
    new_start, new_end = start, end
    for span_start, span_end, placeholder in _sensitive_spans(piece):
        parts += (piece[at:span_start], placeholder)
        at = span_end
        if span_end <= start:
            new_start = start + shift + len(placeholder) - (span_end - span_start)
        elif span_start < start:
            new_start = span_start + shift
        if span_end <= end:
            new_end = end + shift + len(placeholder) - (span_end - span_start)
        elif span_start < end:
            new_end = span_start + shift + len(placeholder)
        shift += len(placeholder) - (span_end - span_start)
    parts.append(piece[at:])
    redacted = "".join(parts)
    if new_end - new_start >= EXCERPT_CHARS:
        return redacted[new_start : new_start + EXCERPT_CHARS]
    first = max(0, new_start - (EXCERPT_CHARS - (new_end - new_start)) // 2)
    last = min(len(redacted), first + EXCERPT_CHARS)
    return redacted[max(0, last - EXCERPT_CHARS) : last]


class ReviewCases:
    """Opens cases in the review store. A store that fails or does not answer in time never changes a
    verdict: the case is not opened, `review_case_failed` is logged and counted, and the verdict stands
    without a case id (a text the policy lets out still goes out)."""

    def __init__(self, store: ReviewStore) -> None:
        self._store = store

    async def open(
        self,
        turn: safety_pb2.TurnRef,
        stage: chat_pb2.ContentFilter.Stage,
        categories: tuple[str, ...],
        source: safety_pb2.ScreenSource,
        action: review_pb2.ReviewAction,
        text: str,
        span: tuple[int, int],
        seconds_left: float,
    ) -> str:
        """The case's id, or "" when it could not be opened (or not within `seconds_left`). `span` is where the
        match is in `text`."""
        case = NewCase(turn, stage, categories, source, action, excerpt(text, *span))
        fields = {"request_id": turn.request_id, "stage": STAGE_LABELS[stage], "action": ACTION_LABELS[action]}
        try:
            async with asyncio.timeout(seconds_left):
                case_id = await self._store.open_case(case)
        except Exception as error:  # whatever the store raises: the verdict stands without a case
            log.warning("review_case_failed", extra={**fields, "error": type(error).__name__})
            metrics.review_case_failed(STAGE_LABELS[stage])
            return ""
        metrics.review_case_opened(STAGE_LABELS[stage], ACTION_LABELS[action])
        log.info("review_case_opened", extra={**fields, "case_id": case_id})
        return case_id


class AddedTerms:
    """The terms that decisions added, merged into a keyword list: `refresh` reads them once, `follow` every
    few seconds. While the store cannot be read the last terms stay in force (logged once per outage)."""

    # The longest a read of the terms may take.
    READ_SECONDS = 5.0

    def __init__(self, store: ReviewStore, keywords: KeywordScreen) -> None:
        self._store = store
        self._keywords = keywords
        self._version: str | None = None
        self._failing = False

    async def refresh(self) -> None:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for loses a cancellation that arrives as the read
            # completes, and `follow` then never ends (a safety process that hung at shutdown).
            async with asyncio.timeout(self.READ_SECONDS):
                version, terms = await self._store.terms()
            if version != self._version:
                await self._keywords.set_added_terms((term.category, term.term) for term in terms)
                self._version = version
        except Exception as error:  # whatever the store raises: keep the terms in force, try again later
            if not self._failing:
                log.warning("review_terms_unreadable", extra={"error": type(error).__name__})
                self._failing = True
            return
        if self._failing:
            log.info("review_terms_readable")
            self._failing = False

    async def follow(self, interval_seconds: float) -> None:
        """Refreshes every `interval_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            await self.refresh()
