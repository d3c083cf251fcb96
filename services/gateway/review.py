"""ReviewService: the human-review queue for reviewers, behind the admin token, and its periodic sweep.

The gateway serves it beside AdminService, with the same credential (an operator's, never a tenant's API key), on
the queue in chatmesh.review.store that safety opens cases in. Every gateway sweeps the queue every
`review_sweep_seconds`; the sweep is safe to run from several at once, and refreshes the queue's gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import grpc

from chatmesh.gateway.admin import TENANT_NAME, AdminToken
from chatmesh.review import metrics
from chatmesh.review.store import CaseConflict, CaseNotFound, InvalidPageToken, ReviewStore, ReviewStoreUnavailable
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.runtime.status import abort, abort_with, invalid_argument
from chatmesh.safety.keywords import normalize
from chatmesh.v1 import review_pb2, review_pb2_grpc

log = get_logger(__name__)

MAX_REVIEWER_CHARS = 64
MAX_NOTE_CHARS = 2_000
MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50
MAX_LEASE_SECONDS = 86_400
MAX_TERM_CHARS = 200
_CASE_ID = re.compile(r"[0-9a-f]{16}")
# A keyword category, as the keyword files write them.
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DECISION_LABELS = {
    review_pb2.DECISION_APPROVE: "approve",
    review_pb2.DECISION_BLOCK: "block",
    review_pb2.DECISION_ESCALATE: "escalate",
}

Violations = list[tuple[str, str]]


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    def __init__(self, settings: GatewaySettings, store: ReviewStore) -> None:
        self._admin_token = AdminToken(settings)
        self._store = store
        self._lease_seconds = settings.review_lease_seconds

    async def ListCases(
        self, request: review_pb2.ListCasesRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.ListCasesResponse:
        await self._admin_token.authorize(context)
        violations: Violations = []
        if request.tenant and not TENANT_NAME.fullmatch(request.tenant):
            violations.append(("tenant", "must be empty (every tenant) or a tenant name"))
        if request.state not in review_pb2.CaseState.values():
            violations.append(("state", "must be open, claimed, decided, escalated, or unset (every state)"))
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(("page_size", f"must be 0 to {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})"))
        await _check(context, violations)
        async with _store_errors(context):
            try:
                cases, token = await self._store.list(
                    tenant=request.tenant,
                    state=request.state,
                    page_size=request.page_size or DEFAULT_PAGE_SIZE,
                    page_token=request.page_token,
                )
            except InvalidPageToken as error:
                await _check(context, [("page_token", f"{error}; start again without one")])
        return review_pb2.ListCasesResponse(cases=cases, next_page_token=token)

    async def GetCase(
        self, request: review_pb2.GetCaseRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.ReviewCase:
        await self._admin_token.authorize(context)
        await _check(context, _check_case_id(request.id, required=True))
        async with _store_errors(context):
            case = await self._store.get(request.id)
        if case is None:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"case {request.id} not found (never opened, or expired, or erased)"
            )
        assert case is not None
        return case

    async def ClaimCase(
        self, request: review_pb2.ClaimCaseRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.ReviewCase:
        await self._admin_token.authorize(context)
        violations = _check_reviewer(request.reviewer) + _check_case_id(request.id, required=False)
        if not 0 <= request.lease_seconds <= MAX_LEASE_SECONDS:
            violations.append(("lease_seconds", f"must be 0 to {MAX_LEASE_SECONDS} (0: {self._lease_seconds:g})"))
        await _check(context, violations)
        async with _store_errors(context):
            case = await self._store.claim(
                request.reviewer, case_id=request.id, lease_seconds=request.lease_seconds or self._lease_seconds
            )
        log.info("review_case_claimed", extra={"case_id": case.id, "tenant": case.turn.tenant})
        return case

    async def DecideCase(
        self, request: review_pb2.DecideCaseRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.ReviewCase:
        await self._admin_token.authorize(context)
        violations = _check_case_id(request.id, required=True) + _check_reviewer(request.reviewer)
        if request.decision not in DECISION_LABELS:
            violations.append(("decision", "must be approve, block or escalate"))
        if len(request.note) > MAX_NOTE_CHARS:
            violations.append(("note", f"must be at most {MAX_NOTE_CHARS} characters"))
        if request.HasField("add_term"):
            violations += _check_term("add_term", request.add_term)
        await _check(context, violations)
        term = request.add_term if request.HasField("add_term") else None
        async with _store_errors(context):
            case = await self._store.decide(request.id, request.reviewer, request.decision, request.note, term)
        decision = DECISION_LABELS[request.decision]
        metrics.review_decided(decision)
        log.info(
            "review_case_decided",
            extra={
                "case_id": case.id,
                "tenant": case.turn.tenant,
                "decision": decision,
                "term_added": term is not None,
            },
        )
        return case

    async def ListTerms(
        self, request: review_pb2.ListTermsRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.ListTermsResponse:
        await self._admin_token.authorize(context)
        async with _store_errors(context):
            _, terms = await self._store.terms()
        return review_pb2.ListTermsResponse(terms=terms)

    async def RemoveTerm(
        self, request: review_pb2.RemoveTermRequest, context: grpc.aio.ServicerContext
    ) -> review_pb2.RemoveTermResponse:
        await self._admin_token.authorize(context)
        await _check(context, _check_term("term", request.term))
        async with _store_errors(context):
            removed = await self._store.remove_term(request.term)
        if not removed:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no added term {request.term.category}:{request.term.term}; ListTerms shows them "
                "(the chart's keyword lists are changed in the chart)",
            )
        log.info("review_term_removed", extra={"category": request.term.category})
        return review_pb2.RemoveTermResponse()


async def sweep_periodically(store: ReviewStore, every_seconds: float) -> None:
    """Sweeps the queue and refreshes its gauges now and every `every_seconds` after, until cancelled. A failed
    sweep is logged, and the next one tried on time."""
    while True:
        try:
            await store.sweep()
            metrics.review_queue_observed(*await store.open_summary())
        except ReviewStoreUnavailable as error:
            log.warning("review_sweep_failed", extra={"error": str(error)})
        await asyncio.sleep(every_seconds)


async def _check(context: grpc.aio.ServicerContext, violations: Violations) -> None:
    if violations:
        await abort_with(context, invalid_argument(violations))


def _check_case_id(case_id: str, *, required: bool) -> Violations:
    if not case_id and not required:
        return []
    if not _CASE_ID.fullmatch(case_id):
        return [("id", "must be a case id: 16 hex digits")]
    return []


def _check_reviewer(reviewer: str) -> Violations:
    if not reviewer.strip() or len(reviewer) > MAX_REVIEWER_CHARS or _CONTROL.search(reviewer):
        return [("reviewer", f"must be 1 to {MAX_REVIEWER_CHARS} characters, not blank, without control characters")]
    return []


def _check_term(field: str, term: review_pb2.KeywordTerm) -> Violations:
    violations: Violations = []
    if not _CATEGORY.fullmatch(term.category):
        violations.append(
            (f"{field}.category", "must be 1 to 64 of A-Z a-z 0-9 _ . / -, starting with a letter or digit")
        )
    if len(term.term) > MAX_TERM_CHARS or _CONTROL.search(term.term) or not normalize(term.term):
        violations.append(
            (f"{field}.term", f"must be 1 to {MAX_TERM_CHARS} characters with a letter or digit, on one line")
        )
    return violations


@contextlib.asynccontextmanager
async def _store_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except CaseNotFound as error:
        await abort(context, grpc.StatusCode.NOT_FOUND, str(error))
    except CaseConflict as error:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
    except ReviewStoreUnavailable:
        log.error("review_store_unavailable")
        await abort(context, grpc.StatusCode.UNAVAILABLE, "the review queue is unavailable; retry with backoff")
