"""The human-review queue as reviewers work it: ReviewService and `chatmesh review` on a real gateway and Redis.

Safety opens cases in production; here each test opens its own directly through the store, on the gateway's
Redis, which is emptied before each test.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis
from support.cli import chatmesh_cli
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.review.store import NewCase, RedisReviewStore
from chatmesh.v1 import chat_pb2, review_pb2, review_pb2_grpc, safety_pb2

ADMIN_TOKEN = "review-admin-token"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
RETENTION = 3600.0
SWEEP_SECONDS = 0.2


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    """A gateway alone (ReviewService needs nothing else), keys required, sweeping often."""
    with Cluster(
        redis_url=module_redis.url,
        processes=("gateway",),
        env={
            "CHATMESH_AUTH": "required",
            "CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            "CHATMESH_REVIEW_SWEEP_SECONDS": str(SWEEP_SECONDS),
            "CHATMESH_REVIEW_LEASE_SECONDS": "120",
        },
    ) as running:
        yield running


@pytest.fixture
async def store(module_redis: RedisServer) -> AsyncIterator[RedisReviewStore]:
    """The gateway's queue, emptied, for opening cases as safety does."""
    client = Redis.from_url(module_redis.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    review_store = RedisReviewStore.from_url(module_redis.url, retention_seconds=RETENTION)
    try:
        yield review_store
    finally:
        await review_store.close()


@pytest.fixture
async def review(cluster: Cluster) -> AsyncIterator[review_pb2_grpc.ReviewServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield review_pb2_grpc.ReviewServiceStub(channel)


async def open_case(store: RedisReviewStore, request_id: str, *, tenant: str = "acme", excerpt: str = "") -> str:
    return await store.open_case(
        NewCase(
            turn=safety_pb2.TurnRef(tenant=tenant, user_id="alice", conversation_id="conv-1", request_id=request_id),
            stage=chat_pb2.ContentFilter.STAGE_INPUT,
            categories=("fraud",),
            source=safety_pb2.SCREEN_SOURCE_KEYWORD,
            action=review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW,
            excerpt=excerpt or f"flagged text of {request_id}",
        )
    )


async def failure_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    request = error_details_pb2.BadRequest()
    status.details[0].Unpack(request)
    return [violation.field for violation in request.field_violations]


async def test_a_reviewer_lists_claims_and_decides_cases_and_the_decision_adds_a_term(
    store: RedisReviewStore, review: review_pb2_grpc.ReviewServiceStub
) -> None:
    first = await open_case(store, "req-1")
    second = await open_case(store, "req-2", tenant="globex")

    listed = await review.ListCases(review_pb2.ListCasesRequest(), metadata=ADMIN)
    assert [case.id for case in listed.cases] == [second, first] and not listed.next_page_token
    acme = await review.ListCases(review_pb2.ListCasesRequest(tenant="acme"), metadata=ADMIN)
    assert [case.id for case in acme.cases] == [first]
    shown = await review.GetCase(review_pb2.GetCaseRequest(id=first), metadata=ADMIN)
    assert shown.excerpt == "flagged text of req-1" and shown.state == review_pb2.CASE_STATE_OPEN

    claimed = await review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="rita"), metadata=ADMIN)
    assert claimed.id == first and claimed.state == review_pb2.CASE_STATE_CLAIMED and claimed.reviewer == "rita"
    # The server's lease when the claim sets none (CHATMESH_REVIEW_LEASE_SECONDS=120).
    lease = claimed.lease_expire_time.ToSeconds() - time.time()
    assert 100 < lease <= 121
    term = review_pb2.KeywordTerm(category="fraud", term="wire me bitcoin")
    decided = await review.DecideCase(
        review_pb2.DecideCaseRequest(
            id=first, reviewer="rita", decision=review_pb2.DECISION_BLOCK, note="scam", add_term=term
        ),
        metadata=ADMIN,
    )
    assert decided.state == review_pb2.CASE_STATE_DECIDED and decided.added_term == term and decided.note == "scam"
    open_cases = await review.ListCases(
        review_pb2.ListCasesRequest(state=review_pb2.CASE_STATE_OPEN, page_size=1), metadata=ADMIN
    )
    assert [case.id for case in open_cases.cases] == [second]

    assert list((await review.ListTerms(review_pb2.ListTermsRequest(), metadata=ADMIN)).terms) == [term]
    assert (await store.terms())[1] == [term]  # where safety reads them
    await review.RemoveTerm(review_pb2.RemoveTermRequest(term=term), metadata=ADMIN)
    assert not (await review.ListTerms(review_pb2.ListTermsRequest(), metadata=ADMIN)).terms


async def test_every_call_needs_the_admin_token(review: review_pb2_grpc.ReviewServiceStub) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "cmk_0123456789abcdef_x"),)):
        error = await failure_of(review.ListCases(review_pb2.ListCasesRequest(), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <admin token>" in error.details()
    error = await failure_of(review.ListTerms(review_pb2.ListTermsRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_invalid_requests_name_the_field(
    store: RedisReviewStore, review: review_pb2_grpc.ReviewServiceStub
) -> None:
    case = await open_case(store, "req-1")
    calls = {
        "page_size": review.ListCases(review_pb2.ListCasesRequest(page_size=201), metadata=ADMIN),
        "tenant": review.ListCases(review_pb2.ListCasesRequest(tenant="Not A Tenant"), metadata=ADMIN),
        "page_token": review.ListCases(review_pb2.ListCasesRequest(page_token="nonsense!"), metadata=ADMIN),
        "id": review.GetCase(review_pb2.GetCaseRequest(id="../etc"), metadata=ADMIN),
        "reviewer": review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="r" * 65), metadata=ADMIN),
        "lease_seconds": review.ClaimCase(
            review_pb2.ClaimCaseRequest(reviewer="rita", lease_seconds=-1), metadata=ADMIN
        ),
        "decision": review.DecideCase(review_pb2.DecideCaseRequest(id=case, reviewer="rita"), metadata=ADMIN),
        "note": review.DecideCase(
            review_pb2.DecideCaseRequest(id=case, reviewer="rita", decision=review_pb2.DECISION_BLOCK, note="n" * 2001),
            metadata=ADMIN,
        ),
        "add_term.category": review.DecideCase(
            review_pb2.DecideCaseRequest(
                id=case,
                reviewer="rita",
                decision=review_pb2.DECISION_BLOCK,
                add_term=review_pb2.KeywordTerm(category="", term="x"),
            ),
            metadata=ADMIN,
        ),
        "term.term": review.RemoveTerm(
            review_pb2.RemoveTermRequest(term=review_pb2.KeywordTerm(category="fraud", term="a\tb")), metadata=ADMIN
        ),
    }
    for field, call in calls.items():
        error = await failure_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert bad_fields(error) == [field] and error.details().startswith(f"{field}: ")
    assert (await review.GetCase(review_pb2.GetCaseRequest(id=case), metadata=ADMIN)).state == (
        review_pb2.CASE_STATE_OPEN
    )


async def test_conflicts_say_what_to_do_and_missing_cases_are_not_found(
    store: RedisReviewStore, review: review_pb2_grpc.ReviewServiceStub
) -> None:
    case = await open_case(store, "req-1")
    await review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="rita", id=case), metadata=ADMIN)

    held = await failure_of(review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="sam", id=case), metadata=ADMIN))
    assert held.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "held by rita; claim another case, or this one once that lease lapses" in held.details()
    not_holder = await failure_of(
        review.DecideCase(
            review_pb2.DecideCaseRequest(id=case, reviewer="sam", decision=review_pb2.DECISION_APPROVE), metadata=ADMIN
        )
    )
    assert not_holder.code() == grpc.StatusCode.FAILED_PRECONDITION and "only the holder decides" in (
        not_holder.details()
    )
    nothing = await failure_of(review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="sam"), metadata=ADMIN))
    assert nothing.code() == grpc.StatusCode.NOT_FOUND and "no open or escalated case" in nothing.details()
    for call in (
        review.GetCase(review_pb2.GetCaseRequest(id="0" * 16), metadata=ADMIN),
        review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="sam", id="0" * 16), metadata=ADMIN),
        review.RemoveTerm(
            review_pb2.RemoveTermRequest(term=review_pb2.KeywordTerm(category="fraud", term="never added")),
            metadata=ADMIN,
        ),
    ):
        assert (await failure_of(call)).code() == grpc.StatusCode.NOT_FOUND


async def test_the_cli_works_the_queue(cluster: Cluster, store: RedisReviewStore) -> None:
    target = ("--target", cluster.gateway_target)
    admin = {"CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    case = await open_case(store, "req-1")

    def cli(*args: str) -> dict:
        result = chatmesh_cli("review", *args, *target, env=admin)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    listed = await asyncio.to_thread(cli, "list", "--state", "open", "--tenant", "acme")
    assert [item["id"] for item in listed["cases"]] == [case] and listed["cases"][0]["state"] == "CASE_STATE_OPEN"
    assert (await asyncio.to_thread(cli, "show", case))["excerpt"] == "flagged text of req-1"
    claimed = await asyncio.to_thread(cli, "claim", "--reviewer", "rita", "--lease-seconds", "30")
    assert claimed["id"] == case and claimed["reviewer"] == "rita"
    decided = await asyncio.to_thread(
        cli,
        "decide",
        case,
        "--reviewer",
        "rita",
        "--decision",
        "block",
        "--note",
        "scam",
        "--add-term",
        "fraud:wire me",
    )
    assert decided["decision"] == "DECISION_BLOCK" and decided["added_term"] == {"category": "fraud", "term": "wire me"}
    assert (await asyncio.to_thread(cli, "terms", "list"))["terms"] == [{"category": "fraud", "term": "wire me"}]
    assert await asyncio.to_thread(cli, "terms", "remove", "fraud:wire me") == {}

    again = await asyncio.to_thread(
        chatmesh_cli, "review", "decide", case, "--reviewer", "rita", "--decision", "approve", *target, env=admin
    )
    assert again.returncode == 1 and again.stderr.startswith("error: FAILED_PRECONDITION: ")
    assert "already decided" in again.stderr
    denied = await asyncio.to_thread(chatmesh_cli, "review", "list", *target, env={"CHATMESH_ADMIN_TOKEN": "wrong"})
    assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED")
    malformed = await asyncio.to_thread(chatmesh_cli, "review", "terms", "remove", "no-colon", *target, env=admin)
    assert malformed.returncode == 2 and "expected CATEGORY:TERM" in malformed.stderr


async def test_the_gateway_exports_the_queue_and_the_decisions(
    cluster: Cluster, store: RedisReviewStore, review: review_pb2_grpc.ReviewServiceStub
) -> None:
    await open_case(store, "req-1")
    case = await open_case(store, "req-2")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_ports['gateway']}/metrics", timeout=5) as page:
            return page.read().decode()

    def value(text: str, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert found, name
        return float(found.group(1))

    # The gauges follow the sweeps (every 0.2 s here): bounded wait for one after the cases were opened.
    for _ in range(50):
        text = await asyncio.to_thread(scrape)
        if value(text, "chatmesh_review_open_cases") == 2:
            break
        await asyncio.sleep(SWEEP_SECONDS)
    assert value(text, "chatmesh_review_open_cases") == 2
    assert 0 < value(text, "chatmesh_review_oldest_open_age_seconds") < 60
    before = value(text, 'chatmesh_review_decisions_total{decision="approve"}')

    await review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="rita", id=case), metadata=ADMIN)
    await review.DecideCase(
        review_pb2.DecideCaseRequest(id=case, reviewer="rita", decision=review_pb2.DECISION_APPROVE), metadata=ADMIN
    )
    for _ in range(50):
        text = await asyncio.to_thread(scrape)
        if value(text, "chatmesh_review_open_cases") == 1:
            break
        await asyncio.sleep(SWEEP_SECONDS)
    assert value(text, "chatmesh_review_open_cases") == 1
    assert value(text, 'chatmesh_review_decisions_total{decision="approve"}') == before + 1
