"""Conversations that fit the model: a token-budget window with a summary of what no longer fits, one turn
at a time, and history in pages. The model here has a small context (CONTEXT tokens), kept in Redis."""

import asyncio
import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.dialogue.tokens import TokenCounter
from chatmesh.v1 import chat_pb2, chat_pb2_grpc

MODEL = "gpt-4o-mini"
CONTEXT = 1500
MARGIN = 128
# With no max_tokens, the reply gets half the context: the prompt has the rest, less the margin.
PROMPT_BUDGET = CONTEXT - CONTEXT // 2 - MARGIN
USER = "window-user"
CALL_SECONDS = 20.0


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    """This module's cluster: a model with a context of CONTEXT tokens, summaries past 300 left-out tokens."""
    with Cluster(
        redis_url=module_redis.url,
        env={
            "CHATMESH_MODEL_CONTEXT_TOKENS": json.dumps({MODEL: CONTEXT}),
            "CHATMESH_WINDOW_MARGIN_TOKENS": str(MARGIN),
            "CHATMESH_SUMMARY_TRIGGER_TOKENS": "300",
        },
    ) as running:
        yield running


def long_message(turn: int) -> str:
    """About 120 tokens of varied words, and a marker of the turn."""
    words = " ".join(f"{word}{turn}" for word in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot") * 10)
    return f"turn {turn}: {words}"


def request(message: str, conversation_id: str = "", **options: object) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=USER,
        message=message,
        # Above the cache's bound: every turn reaches the model.
        options=chat_pb2.ChatOptions(temperature=0.9, **options),
    )


def sent_for(sim: Cluster, message: str) -> list[dict[str, object]]:
    """The messages of the model call whose last message is `message` (summaries are model calls too)."""
    calls = [entry["messages"] for entry in sim.sim_requests(limit=10) if entry["messages"][-1]["content"] == message]
    assert calls, f"no model call ended with {message[:30]!r}"
    return calls[-1]


async def conversation(chat: chat_pb2_grpc.ChatServiceStub, conversation_id: str) -> chat_pb2.Conversation:
    response = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id=USER, page_size=200),
        timeout=CALL_SECONDS,
    )
    return response.conversation


async def test_a_long_conversation_never_overflows_the_models_context_and_is_summarized(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    counter = TokenCounter()
    conversation_id = ""
    for turn in range(40):
        reply = await chat.Chat(request(long_message(turn), conversation_id), timeout=CALL_SECONDS)
        conversation_id = reply.conversation_id
        sent = sent_for(sim, long_message(turn))
        assert counter.count_messages(MODEL, sent) <= PROMPT_BUDGET, f"turn {turn}"
        # Counted by the same rule as the model's count of the prompt (modelsim reports its own).
        assert reply.usage.input_tokens > 0

    stored = await conversation(chat, conversation_id)
    assert len(stored.messages) == 80  # everything is kept; the window is what the model sees
    for _ in range(100):  # the summary is written after the reply: at most 100 polls of 50 ms
        if stored.summary.message_count:
            break
        await asyncio.sleep(0.05)
        stored = await conversation(chat, conversation_id)
    assert stored.summary.text and stored.summary.message_count > 0

    await chat.Chat(request("and now?", conversation_id), timeout=CALL_SECONDS)
    sent = sent_for(sim, "and now?")
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Summary of the earlier part")
    summaries = [
        entry
        for entry in sim.sim_requests(limit=100)
        if entry["messages"][0]["content"].startswith("You keep the memory of a conversation")
    ]
    assert summaries, "the summary came from a model call"


async def test_a_message_that_cannot_fit_even_alone_is_refused_before_the_model(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    before = sim.sim_stats()["requests"]
    huge = " ".join(f"word{n}" for n in range(2000))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chat.Chat(request(huge), timeout=CALL_SECONDS)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message" in (refused.value.details() or "") and "tokens" in (refused.value.details() or "")
    assert sim.sim_stats()["requests"] == before


async def test_a_second_turn_while_one_runs_is_aborted_and_nothing_interleaves(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    first = await chat.Chat(request("start"), timeout=CALL_SECONDS)
    sim.sim_config(first_token_latency_seconds=0.5)
    running = asyncio.ensure_future(chat.Chat(request("slow one", first.conversation_id), timeout=CALL_SECONDS))
    await asyncio.sleep(0.2)

    with pytest.raises(grpc.aio.AioRpcError) as aborted:
        await chat.Chat(request("racing one", first.conversation_id), timeout=CALL_SECONDS)
    assert aborted.value.code() == grpc.StatusCode.ABORTED
    assert "in progress" in (aborted.value.details() or "")

    await running
    sim.sim_config(first_token_latency_seconds=0)
    contents = [message.content for message in (await conversation(chat, first.conversation_id)).messages]
    assert contents[0::2] == ["start", "slow one"]
    # Once it has ended, the next turn runs.
    assert (await chat.Chat(request("after", first.conversation_id), timeout=CALL_SECONDS)).text


async def test_history_comes_in_pages(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub) -> None:
    conversation_id = ""
    for turn in range(5):
        conversation_id = (
            await chat.Chat(request(f"page {turn}", conversation_id), timeout=CALL_SECONDS)
        ).conversation_id

    pages: list[list[str]] = []
    token = ""
    for _ in range(10):
        response = await chat.GetConversation(
            chat_pb2.GetConversationRequest(
                conversation_id=conversation_id, user_id=USER, page_size=4, page_token=token
            ),
            timeout=CALL_SECONDS,
        )
        pages.append([message.content for message in response.conversation.messages])
        token = response.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [4, 4, 2]
    assert [page[0] for page in pages] == ["page 0", "page 2", "page 4"]


@pytest.mark.parametrize(
    ("page", "field"),
    [
        ({"page_size": 500}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_bad_page_arguments_are_invalid(
    chat: chat_pb2_grpc.ChatServiceStub, page: dict[str, object], field: str
) -> None:
    first = await chat.Chat(request(f"pages {uuid.uuid4().hex}"), timeout=CALL_SECONDS)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chat.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id=USER, **page),
            timeout=CALL_SECONDS,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")
