"""Human review through the whole cluster (gateway → dialogue → safety, Redis): a turn the review policy sends to a
person becomes a case that names its tenant, user, conversation and request, with a redacted excerpt; a reviewer's
decision adds a term that the next turns are screened with; erasing the user removes the cases.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc, review_pb2, review_pb2_grpc

RELOAD_SECONDS = 0.1
KEYWORDS = "fraud\twire me bitcoin\nrefund\tchargeback\n"
POLICY = '{"fraud": "block_and_review", "refund": "allow_and_review"}'
PHONE = "138 0013 8000"
CALL_TIMEOUT = 20


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    keywords: Path = tmp_path_factory.mktemp("keywords") / "lists.txt"
    keywords.write_text(KEYWORDS, encoding="utf-8")
    with Cluster(
        redis_url=module_redis.url,
        env={
            "CHATMESH_SAFETY_KEYWORDS": str(keywords),
            "CHATMESH_SAFETY_KEYWORDS_RELOAD_SECONDS": str(RELOAD_SECONDS),
            "CHATMESH_REVIEW_POLICY": POLICY,
        },
    ) as running:
        yield running


@pytest.fixture
async def review(cluster: Cluster) -> AsyncIterator[review_pb2_grpc.ReviewServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield review_pb2_grpc.ReviewServiceStub(channel)


async def cases_of(review: review_pb2_grpc.ReviewServiceStub, conversation_id: str) -> list[review_pb2.ReviewCase]:
    listed = await review.ListCases(review_pb2.ListCasesRequest(page_size=200), timeout=CALL_TIMEOUT)
    return [case for case in listed.cases if case.turn.conversation_id == conversation_id]


async def test_a_turn_sent_for_review_becomes_a_case_of_that_turn(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, review: review_pb2_grpc.ReviewServiceStub
):
    blocked = await chat.Chat(
        chat_pb2.ChatRequest(user_id="alice", message=f"please wire me bitcoin, then call {PHONE}"),
        timeout=CALL_TIMEOUT,
    )
    allowed = await chat.Chat(
        chat_pb2.ChatRequest(user_id="alice", message="or I will file a chargeback"), timeout=CALL_TIMEOUT
    )

    assert blocked.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert allowed.finish_reason == chat_pb2.FINISH_REASON_STOP and allowed.text
    (case,) = await cases_of(review, blocked.conversation_id)
    assert (case.turn.tenant, case.turn.user_id, case.turn.request_id) == ("default", "alice", blocked.request_id)
    assert case.stage == chat_pb2.ContentFilter.STAGE_INPUT
    assert case.action == review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW and list(case.categories) == ["fraud"]
    assert "wire me bitcoin" in case.excerpt and PHONE not in case.excerpt
    (later,) = await cases_of(review, allowed.conversation_id)
    assert later.action == review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW and later.turn.request_id == allowed.request_id


async def test_a_term_a_decision_adds_is_enforced_on_the_next_turns(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, review: review_pb2_grpc.ReviewServiceStub
):
    refused = await chat.Chat(
        chat_pb2.ChatRequest(user_id="bob", message="wire me bitcoin for the pig butchering deal"),
        timeout=CALL_TIMEOUT,
    )
    (case,) = await cases_of(review, refused.conversation_id)
    await review.ClaimCase(review_pb2.ClaimCaseRequest(reviewer="rita", id=case.id), timeout=CALL_TIMEOUT)
    term = review_pb2.KeywordTerm(category="fraud", term="pig butchering")
    await review.DecideCase(
        review_pb2.DecideCaseRequest(
            id=case.id, reviewer="rita", decision=review_pb2.DECISION_BLOCK, note="known scam", add_term=term
        ),
        timeout=CALL_TIMEOUT,
    )
    try:
        for _ in range(100):
            response = await chat.Chat(
                chat_pb2.ChatRequest(user_id="bob", message="tell me about pig butchering"), timeout=CALL_TIMEOUT
            )
            if response.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER:
                break
            await asyncio.sleep(RELOAD_SECONDS)
        assert response.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
        assert list(response.content_filter.categories) == ["fraud"]
    finally:
        await review.RemoveTerm(review_pb2.RemoveTermRequest(term=term), timeout=CALL_TIMEOUT)


async def test_erasing_the_user_removes_their_cases(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, review: review_pb2_grpc.ReviewServiceStub
):
    refused = await chat.Chat(
        chat_pb2.ChatRequest(user_id="carol", message="wire me bitcoin today"), timeout=CALL_TIMEOUT
    )
    assert len(await cases_of(review, refused.conversation_id)) == 1

    erased = await chat.EraseUser(chat_pb2.EraseUserRequest(user_id="carol"), timeout=CALL_TIMEOUT)

    assert erased.review_cases == 1 and erased.conversations == 1
    assert await cases_of(review, refused.conversation_id) == []
